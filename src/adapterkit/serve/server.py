"""The serving layer between the routes and the engine: the engine's thread, requests checked,
tokenised and turned into rows, their adapters held while they run, and their answers watched.

One thread drives the engine; the event loop only parses, tokenises off-loop, queues and streams.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request

from ..compose import Composition, adapter_names, check_nesting, fusions
from ..errors import AdapterkitError, AdapterLoadError, AdapterNotFoundError, ConfigError
from ..generation import Engine, Generation, Sampling
from ..model import AdapterModel
from ..names import is_valid_name
from ..templates import shared_template
from .config import ServeConfig
from .metrics import Metrics
from .pool import AdapterPool
from .protocol import (
    ApiError,
    ChatMessage,
    CompletionRequest,
    Sampled,
    check_token_ids,
    check_unicode,
    scored_logprobs,
)
from .tokenization import check_messages, check_text_length, encode_messages

log = logging.getLogger(__name__)

T = TypeVar("T")


class Server:
    """The state behind the routes: the engine and its thread, the adapter pool, the metrics."""

    def __init__(
        self,
        model: AdapterModel,
        tokenizer,
        adapters_dir: str | Path,
        base_name: str,
        api_key: str | None = None,
        config: ServeConfig | None = None,
        compositions: dict[str, Composition] | None = None,
    ) -> None:
        """``compositions`` name blocks (``ak.Stack``, ``ak.Fuse``, ``ak.Average``) over adapters of
        the folder; a request names one like an adapter, and its adapters load as they would."""
        if model.training:
            model.eval()
        self.config = config = config or ServeConfig()
        base_config = getattr(model.base, "config", None)
        self.context = getattr(base_config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.vocabulary = len(tokenizer)
        self.base_name, self.api_key = base_name, api_key
        self.engine = Engine(model, tokenizer, config.max_batch_size, config.max_prefill_tokens)
        self.pool = AdapterPool(self.engine, Path(adapters_dir), config.max_loaded_adapters,
                                on_load=lambda: self.metrics.adapter_loads.inc())
        self.compositions = dict(compositions or {})
        self._check_compositions()
        self.metrics = Metrics(self)
        self.acquiring = 0  # requests waiting for their adapters (before the engine's queue)
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapterkit-tokenize")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def adapters_on_disk(self) -> list[str]:
        """The folder's adapters a request can name. A folder named like the base or a composition
        is shadowed by it (requests for that name get the base or the composition), so it is not
        listed. OSError when the folder cannot be read."""
        return [name for name in self.pool.available() if not self.is_shadowed(name)]

    def is_shadowed(self, name: str) -> bool:
        return name == self.base_name or name in self.compositions

    def refuse_shadowed(self, name: str) -> None:
        """Loading a folder that no request can reach would only take a resident slot."""
        if self.is_shadowed(name):
            what = "the base model" if name == self.base_name else "a composition"
            folder = ("an adapter folder of that name is never served; rename the folder"
                      if (self.pool.folder / name).exists() else "no adapter can be loaded under that name")
            raise ApiError(409, f"{name!r} is the name of {what}, which answers every request for it: {folder}",
                           "name_collision")

    def _check_compositions(self) -> None:
        """Refuse at start-up what would fail every request for a composition."""
        on_disk = set(self.pool.available())
        for name, block in self.compositions.items():
            if not is_valid_name(name) or name == self.base_name:
                raise ConfigError(f"invalid composition name {name!r}: use letters, digits, '_' or '-', and not the "
                                  "base's name")
            if not isinstance(block, Composition):
                raise ConfigError(f"composition {name!r} must be a stack, average or fuse, got {block!r}")
            check_nesting(block)
            if name in on_disk:
                raise ConfigError(f"composition {name!r} has the name of an adapter in the adapters folder; "
                                  "rename one")
            members = self.adapters_of(name)
            if len(members) > self.config.max_loaded_adapters:
                raise ConfigError(f"composition {name!r} uses {len(members)} adapters, "
                                  f"more than --max-loaded-adapters ({self.config.max_loaded_adapters}) keeps loaded; "
                                  "raise it or shorten the composition")

    @property
    def queued(self) -> int:
        return self.acquiring + len(self.engine.waiting)

    # ---- the engine's thread -------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._drive, name="adapterkit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _drive(self) -> None:
        while not self._stop.is_set():
            if not self.engine.wait_for_work(0.1):
                continue
            try:
                self.metrics.step(self.engine.step())
            except Exception:  # a bug, not a request's fault: log it and keep serving
                log.exception("engine step failed")

    # ---- requests into rows --------------------------------------------------------------------
    # -- completions --
    def sampling(self, request: Sampled, prompt_tokens: int) -> Sampling:
        max_tokens = getattr(request, "max_completion_tokens", None)  # chat's newer name wins, as in vLLM
        if max_tokens is None:
            max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = (16 if isinstance(request, CompletionRequest)
                          else max(1, min(512, self.context - prompt_tokens)))
        logprobs = request.alternatives()
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=request.stops(),
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            repetition_penalty=request.repetition_penalty,
            logprobs=logprobs,
            prompt_logprobs=bool(getattr(request, "echo", False) and logprobs is not None),
        )
        try:
            return sampling.check()
        except AdapterkitError as error:
            raise ApiError(400, str(error), "invalid_request") from None


    def check_room(self, model_name: str, prompts: int) -> None:
        limit = self.config.max_queue
        if prompts > limit:
            raise ApiError(400, f"the request has {prompts} prompts; this server queues at most {limit}: "
                                "send them in smaller requests", "too_many_prompts")
        if self.queued + prompts > limit:
            self.metrics.requests.labels(model_name, "rejected").inc(prompts)
            raise ApiError(429, f"the server is busy: {self.queued} requests are waiting (at most {limit}); "
                                "retry shortly", "rate_limit_exceeded", {"Retry-After": "1"})

    def check_scoring(self, prompts: list[list[int]], sampling: Sampling, echo: bool) -> None:
        """Refuse a request whose log-probabilities would make an answer too large to build."""
        asked = sum(scored_logprobs(len(p), sampling.max_tokens, echo, sampling.logprobs) for p in prompts)
        if asked > self.config.max_scored_tokens:
            raise ApiError(400, f"the request asks for {asked} log-probabilities (scored tokens x (1 + alternatives), "
                                f"with max_tokens {sampling.max_tokens}); this server answers at most "
                                f"{self.config.max_scored_tokens} per request: lower max_tokens or the alternatives "
                                "(logprobs, top_logprobs), or send fewer prompts per request", "too_many_logprobs")

    async def encode(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        """Token ids of each prompt: texts tokenised off the event loop after a cheap length check,
        token ids checked against the vocabulary."""
        for prompt in prompts:
            if isinstance(prompt, list):
                check_token_ids(prompt, self.vocabulary)
                continue
            check_unicode(prompt, "the prompt")
            check_text_length(len(prompt), self.context, "the prompt")
        tokenizer = self.engine.tokenizer

        def encode() -> list[list[int]]:
            return [list(p) if isinstance(p, list) else tokenizer.encode(p) for p in prompts]

        return await self.off_loop(encode)

    async def off_loop(self, work) -> Any:
        """``work()`` on the tokenizing thread: the event loop must never wait on a tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    def template_of(self, model_name: str) -> str | None:
        """The prompt template of what a request names: its adapter's, or the one every adapter of a
        composition shares; None for the base."""
        if model_name == self.base_name:
            return None
        names = [model_name] if model_name not in self.compositions else adapter_names(self.compositions[model_name])
        return shared_template([self.pool.template(name) for name in names])

    async def encode_chat(self, messages: list[ChatMessage], template: str | None = None) -> list[int]:
        """The conversation's tokens, as /tokenize gives them: the one user message put into a text
        ``template``, else the conversation rendered by the tokenizer's chat template."""
        tokenizer = self.engine.tokenizer
        check_messages(tokenizer, messages, template, self.context, "/v1/completions")
        return await self.off_loop(lambda: encode_messages(tokenizer, messages, template, True, False))

    def check_length(self, prompt: list[int], max_tokens: int) -> None:
        if not prompt:
            raise ApiError(400, "the prompt is empty", "empty_prompt")
        if len(prompt) + max_tokens > self.context:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.context} tokens; the prompt has {len(prompt)} "
                f"and max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens",
                "context_length_exceeded",
            )

    async def submit(self, model_name: str, prompts: list[list[int]], sampling: Sampling) -> list[Job]:
        """One queued row per prompt, once every adapter the request runs through is held; 429
        when the queue is full. The holds are taken together (never some while waiting for
        others) and given back if the engine refuses the rows (a composition that fails the
        model's checks fails here, its own request, before any row joins a batch)."""
        for prompt in prompts:
            self.check_length(prompt, sampling.max_tokens)
        self.check_room(model_name, len(prompts))
        adapter = None if model_name == self.base_name else self.compositions.get(model_name, model_name)
        held = self.adapters_of(model_name)
        arrived = time.perf_counter()
        self.acquiring += len(prompts)
        try:
            await self.pool.acquire(held, holds=len(prompts))
        except asyncio.CancelledError:  # the client left while its adapters loaded: no row will count it
            self.metrics.requests.labels(model_name, "cancelled").inc(len(prompts))
            raise
        finally:
            self.acquiring -= len(prompts)
        jobs: list[Job] = []
        try:
            for prompt in prompts:
                job = Job(self, Generation(prompt, sampling, adapter), model_name, arrived, held)
                self.engine.submit(job.generation)
                jobs.append(job)
        except BaseException:
            for job in jobs:
                job.generation.cancel()  # each gives its holds back as it leaves
            await self.pool.release(held, holds=len(prompts) - len(jobs))
            raise
        return jobs

    def adapters_of(self, model_name: str) -> list[str]:
        """The adapters a request for ``model_name`` holds while it runs (fusions after their children)."""
        if model_name == self.base_name:
            return []
        block = self.compositions.get(model_name)
        if block is None:
            return [model_name]
        return list(dict.fromkeys(adapter_names(block) + [fuse.name for fuse in reversed(fusions(block))]))

    def check_model(self, name: str) -> None:
        """Refuse a model that does not exist (404); a composition whose member is missing from the
        folder exists, but cannot load (400, naming the member)."""
        for adapter in self.adapters_of(name):
            if adapter not in self.pool.resident:
                try:
                    self.pool.path_of(adapter)
                except AdapterNotFoundError as error:
                    if name not in self.compositions:
                        raise
                    raise AdapterLoadError(f"composition {name!r} cannot be loaded: {error}") from None

    # ---- admin ---------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not self.api_key:
            raise ApiError(403, "adapter management is off: start the server with --api-key or ADAPTERKIT_API_KEY",
                           "management_disabled")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})


class Job:
    """A request's row on the event loop's side: the engine's callbacks become events in a queue;
    at the end the adapters are given back and the metrics recorded (after the row left the batch)."""

    def __init__(self, server: Server, generation: Generation, label: str, arrived: float, held: list[str]) -> None:
        self.server, self.generation, self.label, self.arrived, self.held = server, generation, label, arrived, held
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        generation.on_token = lambda _, piece, logprob: self.loop.call_soon_threadsafe(
            self.events.put_nowait, ("text", piece, logprob))
        generation.on_done = lambda _: self.loop.call_soon_threadsafe(self._done)

    def _done(self) -> None:
        self.server.metrics.finished(self.label, self.generation, self.arrived)
        self.events.put_nowait(("done", self.generation.finish_reason))
        if self.held:
            self.loop.create_task(self.server.pool.release(self.held))

    async def events_until_done(self) -> AsyncIterator[tuple]:
        while True:
            event = await self.events.get()
            if event[0] == "done" and self.generation.error is not None:
                # the same prompt through the same adapter fails again: OpenAI's clients retry a 500
                # (twice, by default) unless told not to
                raise ApiError(500, f"generation failed for this request: {self.generation.error}",
                               "generation_failed", {"x-should-retry": "false"})
            yield event
            if event[0] == "done":
                return

    async def result(self) -> None:
        async for _ in self.events_until_done():
            pass


async def finished(jobs: list[Job]) -> list[Job]:
    """``jobs`` once all are done; if one fails or the wait is cancelled, the rest leave the batch."""
    try:
        await asyncio.gather(*(job.result() for job in jobs))
    except BaseException:
        for job in jobs:
            job.generation.cancel()
        raise
    return jobs


async def until_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled (rows it queued
    leave at the next step, adapters it waited for are not held) and the answer is a 499."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        task.add_done_callback(lambda future: future.cancelled() or future.exception())
        raise ApiError(499, "the client closed the connection", "client_closed")
    return task.result()
