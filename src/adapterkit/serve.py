"""``adapterkit serve``: an OpenAI-compatible HTTP server over one base model and a folder of adapters.

A request names its adapter in ``model`` (the base's own name for none): a sub-folder of the
adapters folder that is an adapter, or a training run's output folder (``train -o runs/de`` writes
``runs/de/adapter``, served as ``de``). Every request becomes a
row of the generation engine (``adapterkit.generation``), which batches continuously: a request
that arrives while others decode is prefilled at the next step and decodes with them, each row
through its own adapter, and leaves as soon as it ends. One thread drives the engine; the event
loop only parses, tokenises off-loop, queues and streams. Adapters load from the folder on first
use, outside the engine's lock, and at most ``max_loaded_adapters`` stay loaded (least recently
used go first, never one a request holds).

Prompt templates: /v1/completions passes the prompt to the model exactly as sent, as OpenAI's
completions do (clients that score text with ``echo`` and ``logprobs`` rely on it, and a client that
fills the template itself must not get it twice). /v1/chat/completions is where a server formats the
input: for an adapter that records a text template ("English: {prompt}\nGerman:") the one user
message fills it, and the answer ends at a newline unless the request sets ``stop``; otherwise the
tokenizer's chat template renders the conversation.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .compose import Composition, adapter_names, fusions
from .errors import AdapterkitError, ShapeMismatchError
from .generation import Engine, Generation, Sampling, TokenLogprob, check_stops
from .io import CONFIG_FILE, FUSION_CONFIG_FILE, check_base, read_adapter, read_adapter_config
from .model import AdapterModel
from .names import is_valid_name
from .templates import CHAT, check_template, render_prompt, shared_template

log = logging.getLogger(__name__)

RUN_ADAPTER = "adapter"  # inside a training run's output folder

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before any parsing
CHARS_PER_TOKEN_LIMIT = 32  # a prompt longer than context × this many characters is refused untokenised
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with a status."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- requests ------------------------------------------------------------------------------------
class _Sampled(BaseModel):
    # an OpenAI field we do not implement is refused by name; "5" is not a number, true not 1
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    user: str | None = None  # an end-user id for the caller's own records; it changes nothing here

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            check_stops(stops)
        except AdapterkitError as error:
            raise ApiError(400, str(error), "invalid_stop") from None
        return stops


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str


# ---- adapters on demand --------------------------------------------------------------------------
def adapter_folder(path: Path) -> Path | None:
    """The adapter a sub-folder of the adapters folder holds: itself, or a training run's adapter/."""
    for candidate in (path, path / RUN_ADAPTER):
        if (candidate / CONFIG_FILE).is_file() or (candidate / FUSION_CONFIG_FILE).is_file():
            if candidate == path or candidate.resolve().parent == path.resolve():  # never a link out of the run
                return candidate
    return None


def find_adapters(folder: Path) -> dict[str, Path]:
    """{name: adapter folder} of every sub-folder that is an adapter or a training run."""
    folder = folder.resolve()
    found = {}
    for path in folder.iterdir():
        if is_valid_name(path.name) and path.resolve().parent == folder:
            adapter = adapter_folder(path)
            if adapter is not None:
                found[path.name] = adapter
    return found


class AdapterPool:
    """Adapters loaded from one folder on first use, at most ``capacity`` at a time.

    Only folders directly inside the folder are read, by names that cannot hold a path. Files are
    read and checked off the engine's lock; only attaching the tensors takes it (one step at most).
    An adapter is held while a request uses it; the least recently used one that nobody holds
    makes room. Requests for a cold adapter wait here, before the engine's queue."""

    def __init__(self, engine: Engine, folder: Path, capacity: int) -> None:
        self.engine, self.model = engine, engine.model
        self.folder = folder.resolve()
        self.capacity = capacity
        self.recent: OrderedDict[str, None] = OrderedDict((name, None) for name in self.model.adapters)
        self.holds: Counter[str] = Counter()
        self.templates: dict[str, str | None] = {}  # of the adapters loaded from the folder
        self.loading: set[str] = set()
        self._changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def path_of(self, name: str) -> Path:
        if not is_valid_name(name):
            raise ApiError(400, f"invalid adapter name {name!r}: use letters, digits, '_' or '-'", "invalid_model_name")
        path = self.folder / name
        try:
            if path.resolve().parent != self.folder:
                raise ApiError(400, f"adapter {name!r} is a link out of the adapters folder; refusing to read it", "invalid_model_name")
            found = adapter_folder(path)
        except OSError:
            found = None
        if found is None:
            raise ApiError(404, f"the model {name!r} does not exist: no adapter folder of that name", "model_not_found")
        return found

    def available(self) -> list[str]:
        try:
            return sorted(find_adapters(self.folder))
        except OSError:
            raise ApiError(503, "the adapters folder cannot be read; only the base model is served", "adapters_unavailable") from None

    def template(self, name: str) -> str | None:
        """The prompt template adapter ``name`` records (read from its folder until it is loaded)."""
        if name not in self.templates:
            try:
                return check_template(read_adapter_config(self.path_of(name)).get("prompt_template"))
            except AdapterkitError as error:
                raise ApiError(400, self._hide_paths(f"adapter {name!r} cannot be loaded: {error}"), "adapter_load_failed") from None
        return self.templates[name]

    async def acquire(self, name: str) -> None:
        """Hold ``name``, loading it (and evicting another) if needed; waits while every loaded
        adapter is held and there is no room. A loaded adapter serves on even if its folder went."""
        async with self.changed:
            while name not in self.recent:  # ready only once recorded here, after its load
                if name in self.loading:
                    await self.changed.wait()
                elif len(self.recent) + len(self.loading) < self.capacity or await self._evict_one():
                    await self._load_unlocked(name, self.path_of(name))
                else:
                    await self.changed.wait()
            self.recent.move_to_end(name)
            self.holds[name] += 1

    async def release(self, name: str) -> None:
        async with self.changed:
            self.holds[name] -= 1
            if self.holds[name] <= 0:
                del self.holds[name]
            self.changed.notify_all()

    async def reload(self, name: str) -> dict[str, Any]:
        path = self.path_of(name)
        async with self.changed:
            while name in self.loading:
                await self.changed.wait()
            reloaded = name in self.model.adapters
            if reloaded:
                self._refuse_if_held(name)
                await asyncio.to_thread(self._locked, self.model.delete_adapter, name)
                del self.recent[name]
            while len(self.recent) + len(self.loading) >= self.capacity and not await self._evict_one():
                await self.changed.wait()
            await self._load_unlocked(name, path)
            return {"name": name, "method": self.model.adapters[name].method, "loaded": True, "reloaded": reloaded}

    async def unload(self, name: str) -> None:
        async with self.changed:
            if name not in self.model.adapters:
                raise ApiError(404, f"no adapter named {name!r} is loaded", "model_not_found")
            self._refuse_if_held(name)
            await asyncio.to_thread(self._locked, self.model.delete_adapter, name)
            del self.recent[name]
            self.changed.notify_all()

    def _refuse_if_held(self, name: str) -> None:
        if self.holds[name]:
            raise ApiError(409, f"adapter {name!r} is serving {self.holds[name]} request(s); retry when they finish", "adapter_in_use")

    async def _load_unlocked(self, name: str, path: Path) -> None:
        """Load with the pool's condition released, so that requests for loaded adapters go on."""
        self.loading.add(name)
        self.changed.release()
        try:
            await self._load(name, path)
        finally:
            await self.changed.acquire()
            self.loading.discard(name)
            self.changed.notify_all()
        self.recent[name] = None

    async def _load(self, name: str, path: Path) -> None:
        try:
            saved = await asyncio.to_thread(read_adapter, path, self.model.base)
            if saved.base is not None:
                await asyncio.to_thread(check_base, saved.base, self.model.base, path)
            await asyncio.to_thread(self._locked, self.model.add_adapter, name, saved.config, saved.tensors)
            self.templates[name] = saved.prompt_template
        except ShapeMismatchError as error:
            raise ApiError(400, self._hide_paths(f"adapter {name!r} cannot be loaded: {path}: {error}"), "adapter_load_failed") from None
        except AdapterkitError as error:
            raise ApiError(400, self._hide_paths(f"adapter {name!r} cannot be loaded: {error}"), "adapter_load_failed") from None
        except OSError as error:
            raise ApiError(500, self._hide_paths(f"adapter {name!r} cannot be read: {error.strerror or error}"), "adapter_load_failed") from None

    def _hide_paths(self, message: str) -> str:
        """Errors name files relative to the adapters folder: clients never see server paths."""
        return message.replace(f"{self.folder}/", "").replace(str(self.folder), "<adapters>")

    async def _evict_one(self) -> bool:
        """Unload the least recently used adapter nobody holds; False when all are held."""
        needed = {n for name in self.recent for n in self.model.adapters[name].depends_on()}
        idle = next((name for name in self.recent if not self.holds[name] and name not in needed), None)
        if idle is None:
            return False
        await asyncio.to_thread(self._locked, self.model.delete_adapter, idle)
        del self.recent[idle]
        return True

    def _locked(self, function, *args):
        with self.engine.lock:
            return function(*args)


# ---- metrics -------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one server, in a registry of its own."""

    def __init__(self, server: "Server") -> None:
        self.registry = registry = CollectorRegistry()
        adapter = ["adapter"]
        self.requests = PromCounter("adapterkit_requests", "Requests (prompts) by adapter and outcome: ok, error, cancelled, rejected.",
                                    ["adapter", "outcome"], registry=registry)
        self.prompt_tokens = PromCounter("adapterkit_prompt_tokens", "Prompt tokens by adapter.", adapter, registry=registry)
        self.completion_tokens = PromCounter("adapterkit_completion_tokens", "Generated tokens by adapter.", adapter, registry=registry)
        self.queue = Histogram("adapterkit_queue_seconds", "From arrival to the first engine step that takes the request (adapter loading included).",
                               adapter, buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("adapterkit_time_to_first_token_seconds", "From arrival to the first generated token.", adapter,
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("adapterkit_time_per_output_token_seconds", "Mean time between generated tokens, per request.", adapter,
                              buckets=TOKEN_BUCKETS, registry=registry)
        self.latency = Histogram("adapterkit_request_latency_seconds", "From arrival to the last token.", adapter,
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = PromCounter("adapterkit_http_errors", "Requests refused or failed, by HTTP status.", ["status"], registry=registry)
        self.steps = PromCounter("adapterkit_engine_steps", "Engine steps run.", registry=registry)
        self.step_rows = Histogram("adapterkit_engine_step_rows", "Rows that generated a token in an engine step (sum / count: the mean batch).",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self._recent_steps: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        Gauge("adapterkit_tokens_per_second", "Tokens generated per second over the last 10 seconds.", registry=registry
              ).set_function(self._tokens_per_second)
        Gauge("adapterkit_rows_in_flight", "Rows being prefilled or decoded.", registry=registry).set_function(lambda: server.engine.in_flight)
        Gauge("adapterkit_requests_queued", "Requests waiting for an adapter or a place in the batch.", registry=registry
              ).set_function(lambda: server.queued)
        Gauge("adapterkit_adapters_resident", "Adapters loaded now.", registry=registry).set_function(lambda: len(server.pool.recent))

    def step(self, tokens: int) -> None:
        """One engine step that generated ``tokens`` tokens (one per row that took part)."""
        self.steps.inc()
        self.step_rows.observe(tokens)
        self._recent_steps.append((time.perf_counter(), tokens))

    def _tokens_per_second(self) -> float:
        since = time.perf_counter() - 10.0
        return sum(tokens for when, tokens in list(self._recent_steps) if when >= since) / 10.0

    def finished(self, label: str, generation: Generation, arrived: float) -> None:
        outcome = {"stop": "ok", "length": "ok"}.get(generation.finish_reason, generation.finish_reason)
        self.requests.labels(label, outcome).inc()
        self.prompt_tokens.labels(label).inc(len(generation.prompt))
        self.completion_tokens.labels(label).inc(len(generation.tokens))
        if generation.started is not None:
            self.queue.labels(label).observe(generation.started - arrived)
        if generation.first_token is not None:
            self.ttft.labels(label).observe(generation.first_token - arrived)
            if len(generation.tokens) > 1:
                self.tpot.labels(label).observe((generation.finished - generation.first_token) / (len(generation.tokens) - 1))
        self.latency.labels(label).observe(generation.finished - arrived)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---- the application -----------------------------------------------------------------------------
class Server:
    """The state behind the routes: the engine and its thread, the adapter pool, the metrics."""

    def __init__(
        self,
        model: AdapterModel,
        tokenizer,
        adapters_dir: str | Path,
        base_name: str,
        api_key: str | None = None,
        max_batch_size: int = 16,
        max_loaded_adapters: int = 8,
        max_queue: int = 64,
        max_prefill_tokens: int = 512,
        compositions: dict[str, Composition] | None = None,
    ) -> None:
        """``compositions`` name blocks (``ak.Stack``, ``ak.Fuse``, ``ak.Average``) over adapters of
        the folder; a request names one like an adapter, and its adapters load as they would."""
        if model.training:
            model.eval()
        config = getattr(model.base, "config", None)
        self.context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.base_name, self.api_key, self.max_queue = base_name, api_key, max_queue
        self.engine = Engine(model, tokenizer, max_batch_size, max_prefill_tokens)
        self.pool = AdapterPool(self.engine, Path(adapters_dir), max_loaded_adapters)
        self.compositions = dict(compositions or {})
        for name in self.compositions:
            if not is_valid_name(name) or name == base_name:
                raise AdapterkitError(f"invalid composition name {name!r}: use letters, digits, '_' or '-', and not the base's name")
        self.metrics = Metrics(self)
        self.acquiring = 0  # requests waiting for their adapter (before the engine's queue)
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapterkit-tokenize")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return self.acquiring + len(self.engine.waiting)

    # -- the engine's thread --
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

    # -- completions --
    def sampling(self, request: _Sampled, prompt_tokens: int) -> Sampling:
        max_tokens = request.max_tokens if request.max_tokens is not None else getattr(request, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = 16 if isinstance(request, CompletionRequest) else max(1, min(512, self.context - prompt_tokens))
        logprobs = getattr(request, "logprobs", None)
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
        if prompts > self.max_queue:
            raise ApiError(400, f"the request has {prompts} prompts; this server queues at most {self.max_queue}: "
                                "send them in smaller requests", "too_many_prompts")
        if self.queued + prompts > self.max_queue:
            self.metrics.requests.labels(model_name, "rejected").inc(prompts)
            raise ApiError(429, f"the server is busy: {self.queued} requests are waiting (at most {self.max_queue}); retry shortly",
                           "rate_limit_exceeded", {"Retry-After": "1"})

    async def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, tokenised off the event loop after a cheap length check."""
        limit = self.context * CHARS_PER_TOKEN_LIMIT
        for text in texts:
            _check_unicode(text, "the prompt")
            if len(text) > limit:
                raise ApiError(400, f"the prompt has {len(text)} characters, more than this model's context of {self.context} "
                                    f"tokens can hold; shorten it", "context_length_exceeded")
        tokenizer = self.engine.tokenizer
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, lambda: [tokenizer.encode(t) for t in texts])

    def template_of(self, model_name: str) -> str | None:
        """The prompt template of what a request names: its adapter's, or the one every adapter of a
        composition shares; None for the base."""
        if model_name == self.base_name:
            return None
        names = [model_name] if model_name not in self.compositions else adapter_names(self.compositions[model_name])
        return shared_template([self.pool.template(name) for name in names])

    async def encode_chat(self, messages: list[ChatMessage], template: str | None = None) -> list[int]:
        """The conversation's tokens: the one user message put into a text ``template``, else the
        conversation rendered by the tokenizer's chat template."""
        tokenizer = self.engine.tokenizer
        text_template = template is not None and template != CHAT
        if text_template and [m.role for m in messages] != ["user"]:
            raise ApiError(400, f"this adapter answers single prompts in the format {template!r}: send one user message "
                                "(or the filled-in prompt to /v1/completions)", "invalid_messages")
        if not text_template and not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this base model has no chat template; use /v1/completions", "no_chat_template")
        for message in messages:
            _check_unicode(message.content, "a message")
        # every message renders as at least its role and content, and at least one token
        characters = sum(len(m.role) + len(m.content) for m in messages)
        if len(messages) > self.context or characters > self.context * CHARS_PER_TOKEN_LIMIT:
            raise ApiError(400, f"the messages are longer than this model's context of {self.context} tokens can hold", "context_length_exceeded")

        def encode() -> list[int]:
            if text_template:
                return tokenizer.encode(render_prompt(template, messages[0].content), add_special_tokens=False)
            chat = tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False)
            return tokenizer.encode(chat, add_special_tokens=False)

        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, encode)

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

    async def submit(self, model_name: str, prompts: list[list[int]], sampling: Sampling) -> list["_Job"]:
        """Queue one row per prompt once the adapter is held; 429 when the queue is full."""
        for prompt in prompts:
            self.check_length(prompt, sampling.max_tokens)
        self.check_room(model_name, len(prompts))
        adapter = None if model_name == self.base_name else self.compositions.get(model_name, model_name)
        held = self.adapters_of(model_name)
        arrived = time.perf_counter()
        jobs = []
        self.acquiring += len(prompts)
        try:
            for prompt in prompts:
                for name in held:  # a fusion after its members
                    await self.pool.acquire(name)
                job = _Job(self, Generation(prompt, sampling, adapter), model_name, arrived, held)
                self.engine.submit(job.generation)
                self.acquiring -= 1
                jobs.append(job)
        except BaseException:
            self.acquiring -= len(prompts) - len(jobs)
            for job in jobs:
                job.generation.cancel()
            raise
        return jobs

    def adapters_of(self, model_name: str) -> list[str]:
        """The adapters a request for ``model_name`` holds while it runs."""
        if model_name == self.base_name:
            return []
        block = self.compositions.get(model_name)
        if block is None:
            return [model_name]
        return adapter_names(block) + [fuse.name for fuse in reversed(fusions(block))]

    def check_model(self, name: str) -> None:
        for adapter in self.adapters_of(name):
            if adapter not in self.pool.recent:
                self.pool.path_of(adapter)

    # -- admin --
    def authorize(self, request: Request) -> None:
        if not self.api_key:
            raise ApiError(403, "adapter management is off: start the server with --api-key or ADAPTERKIT_API_KEY", "management_disabled")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key", {"WWW-Authenticate": "Bearer"})


class _Job:
    """A request's row on the event loop's side: the engine's callbacks become events in a queue;
    at the end the adapter is released and the metrics recorded (after the row left the batch)."""

    def __init__(self, server: Server, generation: Generation, label: str, arrived: float, held: list[str]) -> None:
        self.server, self.generation, self.label, self.arrived, self.held = server, generation, label, arrived, held
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        generation.on_token = lambda _, piece, logprob: self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", piece))
        generation.on_done = lambda _: self.loop.call_soon_threadsafe(self._done)

    def _done(self) -> None:
        self.server.metrics.finished(self.label, self.generation, self.arrived)
        self.events.put_nowait(("done", self.generation.finish_reason))
        for name in self.held:
            self.loop.create_task(self.server.pool.release(name))

    async def events_until_done(self) -> AsyncIterator[tuple]:
        while True:
            event = await self.events.get()
            if event[0] == "done" and self.generation.error is not None:
                raise ApiError(500, f"generation failed for this request: {self.generation.error}", "generation_failed")
            yield event
            if event[0] == "done":
                return

    async def result(self) -> None:
        async for _ in self.events_until_done():
            pass


async def _until_done_or_gone(jobs: list[_Job], request: Request) -> None:
    """Wait for every job; if the client disconnects first, cancel them (their rows leave the batch
    at the next step) and stop."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    results = asyncio.ensure_future(asyncio.gather(*(job.result() for job in jobs)))
    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not results.done():
        for job in jobs:
            job.generation.cancel()
        results.cancel()
        results.add_done_callback(lambda future: future.cancelled() or future.exception())
        raise ApiError(499, "the client closed the connection", "client_closed")
    results.result()


def _logprobs_block(tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's completions ``logprobs``: tokens, their log-probabilities, the top alternatives and
    each token's character offset in the returned text."""
    tokens = [tokenizer.decode([e.token]) for e in entries]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {tokenizer.decode([t]): v for t, v in e.top} for e in entries],
        "text_offset": offsets,
    }


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is read to its end (so the client is
    never cut off mid-send), discarded and answered 413; a smaller one is buffered and replayed."""

    def __init__(self, app, limit: int, on_refused) -> None:
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size <= self.limit:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if size > self.limit:
            self.on_refused(413)
            error = ApiError(413, f"the request body has {size} bytes; the limit is {self.limit}", "request_too_large")
            return await error.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class AnswerUnexpected:
    """ASGI middleware: an unexpected error is logged once and answered 500 in OpenAI's shape, and
    the connection stays open. (Starlette's handler for ``Exception`` answers too, but then
    re-raises, and the server closes the connection: a pooled client's next request on it failed.)"""

    def __init__(self, app, on_error) -> None:
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as error:
            log.exception("request failed")
            self.on_error()
            if not started:
                await ApiError(500, f"internal error: {type(error).__name__}", "internal_error").response()(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    """The FastAPI application for ``server``; run it with uvicorn (``adapterkit serve`` does)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.stop()

    app = FastAPI(title="adapterkit", lifespan=lifespan)
    app.add_middleware(AnswerUnexpected, on_error=lambda: server.metrics.errors.labels("500").inc())
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, on_refused=lambda status: server.metrics.errors.labels(str(status)).inc())
    playground = resources.files("adapterkit").joinpath("playground.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        server.metrics.errors.labels(str(error.status)).inc()
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        unsupported = [str(e["loc"][-1]) for e in error.errors() if e["type"] == "extra_forbidden"]
        if unsupported:
            message = f"unsupported field(s): {', '.join(unsupported)}; adapterkit does not implement them"
            return await api_error(request, ApiError(400, message, "unsupported_field"))
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors())
        return await api_error(request, ApiError(400, f"invalid request: {details}", "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
        return await api_error(request, ApiError(error.status_code, str(error.detail), code))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": server.base_name, "loaded_adapters": list(server.pool.recent),
                "rows_in_flight": server.engine.in_flight, "queued": server.queued}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [server.base_name] + server.pool.available() + sorted(server.compositions)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "adapterkit"} for n in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _refuse_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or (body.stream and len(prompts) > 1):
            raise ApiError(400, "give one prompt to stream, or a non-empty list of prompts without streaming", "invalid_prompt")
        if body.stream and body.logprobs is not None:
            raise ApiError(400, "logprobs is supported without streaming only", "unsupported_field")
        if body.echo and body.stream:
            raise ApiError(400, "echo is supported without streaming only", "unsupported_field")
        server.check_model(body.model)
        sampling = server.sampling(body, 0)
        server.check_room(body.model, len(prompts))
        jobs = await server.submit(body.model, await server.encode(prompts), sampling)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece: str, reason: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            return _sse(jobs[0], lambda piece: chunk(piece, None), lambda reason: chunk("", reason))
        await _until_done_or_gone(jobs, request)
        tokenizer = server.engine.tokenizer
        choices = []
        for i, (job, prompt) in enumerate(zip(jobs, prompts)):
            generation = job.generation
            text = (prompt if body.echo else "") + generation.text
            logprobs = None
            if body.logprobs is not None:
                logprobs = _logprobs_block(tokenizer, (generation.prompt_logprobs if body.echo else []) + generation.logprobs)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": generation.finish_reason})
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
                "usage": _usage(jobs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _refuse_unsupported(body)
        server.check_model(body.model)
        server.check_room(body.model, 1)
        template = await asyncio.to_thread(server.template_of, body.model)
        prompt = await server.encode_chat(body.messages, template)
        sampling = server.sampling(body, len(prompt))
        if template not in (None, CHAT) and body.stop is None:
            sampling.stop = ["\n"]  # the answer's line, as in scoring and ``adapterkit generate``
        jobs = await server.submit(body.model, [prompt], sampling)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, str], reason: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            first = chunk({"role": "assistant", "content": ""}, None)
            return _sse(jobs[0], lambda piece: chunk({"content": piece}, None), lambda reason: chunk({}, reason), first)
        await _until_done_or_gone(jobs, request)
        generation = jobs[0].generation
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text}, "logprobs": None,
                             "finish_reason": generation.finish_reason}],
                "usage": _usage(jobs)}

    @app.post("/v1/adapters")
    async def load(body: LoadRequest, request: Request) -> dict[str, Any]:
        server.authorize(request)
        return await server.pool.reload(body.name)

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str, request: Request) -> dict[str, Any]:
        server.authorize(request)
        await server.pool.unload(name)
        return {"name": name, "loaded": False}

    return app


def _check_unicode(text: str, what: str) -> None:
    """JSON can carry a lone UTF-16 surrogate (\\ud800); it is not text, and tokenizers refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{what} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode",
                       "invalid_text") from None


def _refuse_unsupported(body: _Sampled) -> None:
    for name in ("n", "best_of"):
        value = getattr(body, name, None)
        if value is not None and value != 1:
            raise ApiError(400, f"{name} = {value} is not supported: one choice per prompt (send the prompt again, with seeds)",
                           "unsupported_field")


def _sse(job: _Job, text_chunk, final_chunk, first: dict | None = None) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for event in job.events_until_done():
                if event[0] == "text":
                    payload = text_chunk(event[1])
                else:  # the last chunk also carries the token counts (as OpenAI's include_usage does)
                    payload = final_chunk(event[1]) | {"usage": _usage([job])}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as error:
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': 'server_error', 'param': None, 'code': error.code}})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not job.generation.done:
                job.generation.cancel()  # the client went away: its row leaves at the next step

    return StreamingResponse(stream(), media_type="text/event-stream")


def _usage(jobs: list[_Job]) -> dict[str, int]:
    prompt = sum(len(job.generation.prompt) for job in jobs)
    completion = sum(len(job.generation.tokens) for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(
    base: str,
    adapters_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_loaded_adapters: int = 8,
    max_queue: int = 64,
    max_prefill_tokens: int = 512,
    compositions: dict[str, Composition] | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Load ``base`` (on ``device``, in ``dtype``) and serve the adapters in ``adapters_dir`` (and
    ``compositions`` of them) until interrupted. The port is taken before the base loads, so a busy
    one fails at once with our error."""
    import uvicorn

    from .bases import load_base

    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise AdapterkitError(f"no adapters folder at {folder}")
    if not find_adapters(folder):
        log.warning("%s holds no adapter yet (neither <name>/%s nor a training run's <name>/%s/%s): only the base is served "
                    "until one is added", folder, CONFIG_FILE, RUN_ADAPTER, CONFIG_FILE)
    listener = listen(host, port)
    try:
        base_model, tokenizer = load_base(base, dtype, device)
        base_name = base if not Path(base).expanduser().is_dir() else Path(base).expanduser().resolve().name
        server = Server(AdapterModel(base_model), tokenizer, folder, base_name, api_key, max_batch_size, max_loaded_adapters,
                        max_queue, max_prefill_tokens, compositions)
        uvicorn.Server(uvicorn.Config(create_app(server), log_level="info")).run(sockets=[listener])
    finally:
        listener.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (as uvicorn binds one), or an error saying why not."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, protocol)
    except (OSError, UnicodeError) as error:
        raise AdapterkitError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:
        listener.close()
        hint = "; another program (another adapterkit serve?) uses it: stop it or pick another --port" if error.errno == errno.EADDRINUSE else ""
        raise AdapterkitError(f"cannot listen on {host}:{port}: {error.strerror}{hint}") from None
    return listener
