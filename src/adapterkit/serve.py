"""``adapterkit serve``: an OpenAI-compatible HTTP server over one base model and a folder of adapters.

A request names its adapter in ``model`` (the base's own name for none). Requests that arrive
within a short window are run together as one mixed-adapter batch: the base runs once for all of
them and each row goes through its own adapter. Adapters load from the folder on first use and at
most ``max_loaded_adapters`` stay loaded (least recently used go first, never one a request holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from .errors import AdapterkitError
from .io import CONFIG_FILE
from .model import AdapterModel
from .names import is_valid_name

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "code"}} with a status."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- requests ------------------------------------------------------------------------------------
class _Sampled(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int | None = Field(None, ge=1, le=1)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "invalid_stop")
        return stops


class CompletionRequest(_Sampled):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadRequest(BaseModel):
    name: str


@dataclass
class Sampling:
    """How one row picks its tokens: temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


# ---- one batch of rows ---------------------------------------------------------------------------
@dataclass
class Job:
    """One prompt waiting for, or being, a row of a batch. Events go back to the request's loop."""

    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    completion_tokens: int = 0
    created: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _TextStream:
    """Turns a row's tokens into text pieces, cut at the first stop string and never emitting text
    that might still become one (or half of a multi-byte character)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string ended the row)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if cuts:
            return self._send(text[: min(cuts)]), True
        if text.endswith("\ufffd"):
            return "", False
        held = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        return self._send(text[: len(text) - held]), False

    def rest(self) -> str:
        return self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, text: str) -> str:
        piece = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return piece


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """Runs batches of jobs through the model: left-padded prefill, then one token per step with
    the KV cache, each row through its own adapter, sampling and stop rules."""

    def __init__(self, model: AdapterModel, tokenizer, context: int) -> None:
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.lock = threading.Lock()  # forward passes and loading/unloading adapters never overlap
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        eos = getattr(getattr(model.base, "generation_config", None), "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids.discard(None)

    def run(self, jobs: list[Job]) -> None:
        try:
            self._generate(jobs)
        except Exception as error:  # a failed batch answers its requests; the server keeps serving
            for job in jobs:
                if job.finished is None:
                    job.finished = time.perf_counter()
                    job.emit("error", f"generation failed: {type(error).__name__}: {error}")

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        rows, width = len(jobs), max(len(job.prompt) for job in jobs)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[row, width - len(job.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        streams = [_TextStream(self.tokenizer, job.sampling.stop) for job in jobs]
        generators = [torch.Generator().manual_seed(job.sampling.seed) if job.sampling.seed is not None else None for job in jobs]
        greedy = all(job.sampling.temperature == 0 for job in jobs)
        cache = None
        with self.model.mixed_adapters([job.adapter for job in jobs]):
            for _ in range(max(job.sampling.max_tokens for job in jobs)):
                with self.lock:
                    out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
                cache, logits = out.cache, out.logits[:, -1]
                tokens = logits.argmax(-1).tolist() if greedy else [_pick(logits[r], jobs[r].sampling, generators[r]) for r in range(rows)]
                for job, stream, token in zip(jobs, streams, tokens):
                    if job.finished is None:
                        self._advance(job, stream, token)
                if all(job.finished is not None for job in jobs):
                    return
                ids = torch.tensor(tokens).unsqueeze(1)
                mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
                positions = (positions[:, -1:] + 1).clamp(max=self.context - 1)  # finished rows may run on

    def _advance(self, job: Job, stream: _TextStream, token: int) -> None:
        if job.cancelled:
            job.finished = time.perf_counter()
            return
        if token in self.eos_ids:
            return self._finish(job, stream.rest(), "stop")
        job.completion_tokens += 1
        piece, stopped = stream.add(token)
        if stopped:
            return self._finish(job, piece, "stop")
        if job.completion_tokens >= job.sampling.max_tokens:
            return self._finish(job, piece + stream.rest(), "length")
        if piece:
            job.emit("text", piece)

    def _finish(self, job: Job, piece: str, reason: str) -> None:
        if piece:
            job.emit("text", piece)
        job.finished = time.perf_counter()
        job.emit("done", reason)


class Batcher:
    """Gathers jobs for up to ``window`` seconds or ``max_batch_size`` jobs, then runs them as one batch."""

    def __init__(self, engine: Engine, max_batch_size: int, window: float, on_done) -> None:
        self.engine, self.max_batch_size, self.window, self.on_done = engine, max_batch_size, window, on_done
        self.queue: asyncio.Queue[Job] | None = None

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.window
            while len(jobs) < self.max_batch_size:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            await asyncio.to_thread(self.engine.run, jobs)
            await self.on_done(jobs)

    def submit(self, job: Job) -> None:
        if self.queue is None:
            raise ApiError(503, "the server is starting; retry in a moment", "not_ready")
        self.queue.put_nowait(job)


# ---- adapters on demand --------------------------------------------------------------------------
class AdapterPool:
    """Adapters loaded from one folder on first use, at most ``capacity`` at a time.

    Only folders directly inside the folder are read, by names that cannot hold a path. An adapter
    is held while a request uses it; the least recently used one that nobody holds makes room."""

    def __init__(self, engine: Engine, folder: Path, capacity: int) -> None:
        self.engine, self.model = engine, engine.model
        self.folder = folder.resolve()
        self.capacity = capacity
        self.recent: OrderedDict[str, None] = OrderedDict((name, None) for name in self.model.adapters)
        self.holds: Counter[str] = Counter()
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
        if path.resolve().parent != self.folder:
            raise ApiError(400, f"adapter {name!r} is a link out of the adapters folder; refusing to read it", "invalid_model_name")
        if not (path / CONFIG_FILE).is_file():
            raise ApiError(404, f"the model {name!r} does not exist: no adapter folder of that name", "model_not_found")
        return path

    def available(self) -> list[str]:
        return sorted(
            p.name for p in self.folder.iterdir()
            if is_valid_name(p.name) and p.resolve().parent == self.folder and (p / CONFIG_FILE).is_file()
        )

    async def acquire(self, name: str) -> None:
        """Hold ``name``, loading it (and evicting another) if needed; waits while every loaded
        adapter is held and there is no room."""
        async with self.changed:
            while name not in self.model.adapters:
                if len(self.recent) < self.capacity or await self._evict_one():
                    await self._load(name, self.path_of(name))
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
            reloaded = name in self.model.adapters
            if reloaded:
                self._refuse_if_held(name)
                await asyncio.to_thread(self._locked, self.model.delete_adapter, name)
                del self.recent[name]
            while len(self.recent) >= self.capacity and not await self._evict_one():
                await self.changed.wait()
            await self._load(name, path)
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

    async def _load(self, name: str, path: Path) -> None:
        try:
            await asyncio.to_thread(self._locked, self.model.load_adapter, path, name)
        except AdapterkitError as error:
            raise ApiError(400, f"adapter {name!r} cannot be loaded: {error}", "adapter_load_failed") from None
        self.recent[name] = None

    async def _evict_one(self) -> bool:
        """Unload the least recently used adapter nobody holds; False when all are held."""
        idle = next((name for name in self.recent if not self.holds[name]), None)
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
    """Per-adapter counters and latency histograms, written in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.prompt_tokens: Counter[str] = Counter()
        self.completion_tokens: Counter[str] = Counter()
        self.latency_buckets: defaultdict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.latency_sum: Counter[str] = Counter()
        self.errors: Counter[int] = Counter()
        self.batches = 0
        self.batch_rows = 0

    def job_done(self, label: str, job: Job, outcome: str) -> None:
        self.requests[label, outcome] += 1
        self.prompt_tokens[label] += len(job.prompt)
        self.completion_tokens[label] += job.completion_tokens
        seconds = (job.finished or time.perf_counter()) - job.created
        self.latency_sum[label] += seconds
        buckets = self.latency_buckets[label]
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1

    def render(self, loaded: int) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])

        family("adapterkit_requests_total", "counter", "Completed prompts by adapter and outcome.")
        lines += [f'adapterkit_requests_total{{adapter="{_label(a)}",outcome="{o}"}} {n}' for (a, o), n in sorted(self.requests.items())]
        family("adapterkit_prompt_tokens_total", "counter", "Prompt tokens by adapter.")
        lines += [f'adapterkit_prompt_tokens_total{{adapter="{_label(a)}"}} {n}' for a, n in sorted(self.prompt_tokens.items())]
        family("adapterkit_completion_tokens_total", "counter", "Generated tokens by adapter.")
        lines += [f'adapterkit_completion_tokens_total{{adapter="{_label(a)}"}} {n}' for a, n in sorted(self.completion_tokens.items())]
        family("adapterkit_request_latency_seconds", "histogram", "Time from request to last token, by adapter.")
        for adapter, buckets in sorted(self.latency_buckets.items()):
            label = _label(adapter)
            lines += [f'adapterkit_request_latency_seconds_bucket{{adapter="{label}",le="{b}"}} {n}' for b, n in zip(LATENCY_BUCKETS, buckets)]
            count = sum(n for (a, _), n in self.requests.items() if a == adapter)
            lines += [
                f'adapterkit_request_latency_seconds_bucket{{adapter="{label}",le="+Inf"}} {count}',
                f'adapterkit_request_latency_seconds_sum{{adapter="{label}"}} {self.latency_sum[adapter]:.6f}',
                f'adapterkit_request_latency_seconds_count{{adapter="{label}"}} {count}',
            ]
        family("adapterkit_http_errors_total", "counter", "Requests refused or failed, by HTTP status.")
        lines += [f'adapterkit_http_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.errors.items())]
        family("adapterkit_batches_total", "counter", "Batches run.")
        lines.append(f"adapterkit_batches_total {self.batches}")
        family("adapterkit_batch_rows_total", "counter", "Rows over all batches (rows / batches = mean batch size).")
        lines.append(f"adapterkit_batch_rows_total {self.batch_rows}")
        family("adapterkit_loaded_adapters", "gauge", "Adapters loaded now.")
        lines.append(f"adapterkit_loaded_adapters {loaded}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---- the application -----------------------------------------------------------------------------
class Server:
    """The state behind the routes: the engine, the batcher, the adapter pool and the metrics."""

    def __init__(
        self,
        model: AdapterModel,
        tokenizer,
        adapters_dir: str | Path,
        base_name: str,
        api_key: str | None = None,
        max_batch_size: int = 16,
        batch_window_ms: float = 10.0,
        max_loaded_adapters: int = 8,
    ) -> None:
        if model.training:
            model.eval()
        config = getattr(model.base, "config", None)
        context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.base_name, self.api_key = base_name, api_key
        self.engine = Engine(model, tokenizer, context)
        self.pool = AdapterPool(self.engine, Path(adapters_dir), max_loaded_adapters)
        self.batcher = Batcher(self.engine, max_batch_size, batch_window_ms / 1000.0, self._batch_done)
        self.metrics = Metrics()

    async def _batch_done(self, jobs: list[Job]) -> None:
        self.metrics.batches += 1
        self.metrics.batch_rows += len(jobs)
        for job in jobs:
            self.metrics.job_done(job.adapter or self.base_name, job, "cancelled" if job.cancelled else "ok")
            if job.adapter is not None:
                await self.pool.release(job.adapter)

    # -- completions --
    async def submit(self, request: _Sampled, prompts: list[list[int]]) -> list[Job]:
        adapter = None if request.model == self.base_name else request.model
        sampling = self._sampling(request, max(len(p) for p in prompts))
        for prompt in prompts:
            self._check_length(prompt, sampling.max_tokens)
        jobs = []
        loop = asyncio.get_running_loop()
        for prompt in prompts:
            if adapter is not None:
                await self.pool.acquire(adapter)
            job = Job(prompt, adapter, sampling, loop)
            try:
                self.batcher.submit(job)
            except ApiError:
                if adapter is not None:
                    await self.pool.release(adapter)
                raise
            jobs.append(job)
        return jobs

    def _sampling(self, request: _Sampled, prompt_tokens: int) -> Sampling:
        max_tokens = request.max_tokens or getattr(request, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = 16 if isinstance(request, CompletionRequest) else max(1, min(512, self.engine.context - prompt_tokens))
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        return Sampling(max_tokens, temperature, top_p, request.stops(), request.seed)

    def _check_length(self, prompt: list[int], max_tokens: int) -> None:
        context = self.engine.context
        if not prompt:
            raise ApiError(400, "the prompt is empty", "empty_prompt")
        if len(prompt) + max_tokens > context:
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens; the prompt has {len(prompt)} "
                f"and max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens",
                "context_length_exceeded",
            )

    def check_model(self, name: str) -> None:
        if name != self.base_name:
            self.pool.path_of(name)

    def encode_prompt(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text)

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this base model has no chat template; use /v1/completions", "no_chat_template")
        text = tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    # -- admin --
    def authorize(self, request: Request) -> None:
        if not self.api_key:
            raise ApiError(403, "adapter management is off: start the server with --api-key or ADAPTERKIT_API_KEY", "management_disabled")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def create_app(server: Server) -> FastAPI:
    """The FastAPI application for ``server``; run it with uvicorn (``adapterkit serve`` does)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(server.batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="adapterkit", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        server.metrics.errors[error.status] += 1
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors())
        return await api_error(request, ApiError(400, f"invalid request: {details}", "invalid_request"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": server.base_name, "loaded_adapters": list(server.pool.recent)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = server.metrics.render(len(server.pool.recent))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [server.base_name] + server.pool.available()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "adapterkit"} for n in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        server.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or (body.stream and len(prompts) > 1):
            raise ApiError(400, "give one prompt to stream, or a non-empty list of prompts without streaming", "invalid_prompt")
        encoded = [server.encode_prompt(p) for p in prompts]
        jobs = await server.submit(body, encoded)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece: str, reason: str | None, index: int = 0) -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            return _sse(jobs[0], lambda piece: chunk(piece, None), lambda reason: chunk("", reason))
        results = [await _collect(job) for job in jobs]
        answer = chunk("", None)
        answer["choices"] = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason} for i, (text, reason) in enumerate(results)]
        answer["usage"] = _usage(jobs)
        return answer

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        server.check_model(body.model)
        jobs = await server.submit(body, [server.encode_chat(body.messages)])
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, str], reason: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            first = chunk({"role": "assistant", "content": ""}, None)
            return _sse(jobs[0], lambda piece: chunk({"content": piece}, None), lambda reason: chunk({}, reason), first)
        text, reason = await _collect(jobs[0])
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}],
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


async def _events(job: Job) -> AsyncIterator[tuple]:
    while True:
        event = await job.events.get()
        if event[0] == "error":
            raise ApiError(500, event[1], "generation_failed")
        yield event
        if event[0] == "done":
            return


async def _collect(job: Job) -> tuple[str, str]:
    pieces, reason = [], "stop"
    async for event in _events(job):
        if event[0] == "text":
            pieces.append(event[1])
        else:
            reason = event[1]
    return "".join(pieces), reason


def _sse(job: Job, text_chunk, final_chunk, first: dict | None = None) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for event in _events(job):
                payload = text_chunk(event[1]) if event[0] == "text" else final_chunk(event[1])
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as error:
            yield f"data: {json.dumps({'error': {'message': error.message, 'code': error.code}})}\n\n"
        finally:
            if job.finished is None:
                job.cancelled = True  # the client went away: stop generating its row

    return StreamingResponse(stream(), media_type="text/event-stream")


def _usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(len(job.prompt) for job in jobs)
    completion = sum(job.completion_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(
    base: str,
    adapters_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 16,
    batch_window_ms: float = 10.0,
    max_loaded_adapters: int = 8,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Load ``base`` (on ``device``, in ``dtype``) and serve the adapters in ``adapters_dir`` until interrupted."""
    import uvicorn

    from .bases import load_base

    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise AdapterkitError(f"no adapters folder at {folder}")
    base_model, tokenizer = load_base(base, dtype, device)
    base_name = base if not Path(base).expanduser().is_dir() else Path(base).expanduser().resolve().name
    server = Server(AdapterModel(base_model), tokenizer, folder, base_name, api_key, max_batch_size, batch_window_ms, max_loaded_adapters)
    uvicorn.run(create_app(server), host=host, port=port, log_level="info")
