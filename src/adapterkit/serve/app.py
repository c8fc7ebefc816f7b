"""The routes: the OpenAI API, the playground, health, metrics and adapter management. This is the
one place where errors become HTTP statuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AdapterInUseError,
    AdapterkitError,
    AdapterLoadError,
    AdapterNameError,
    AdapterNotFoundError,
    ReplicaUnavailableError,
)
from ..generation import TokenLogprob
from ..names import shown
from ..templates import CHAT
from .middleware import AnswerUnexpected, BodyLimit
from .protocol import (
    BEAM_FIELDS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadRequest,
    TextOffsets,
    TokenizeRequest,
    beam_search_refused,
    chat_logprobs,
    check_token_ids,
    check_unicode,
    logprobs_block,
    usage,
)
from .server import Job, Server, finished, until_gone
from .tokenization import check_messages, check_text_length, encode_messages, tokenize_answer, tokenizer_info

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before any parsing
BODY_IDLE_SECONDS = 30.0  # a body that stops arriving for this long is answered 408

# our errors as statuses: the first class that matches wins
STATUSES: list[tuple[type[AdapterkitError], int, str]] = [
    (AdapterNotFoundError, 404, "model_not_found"),
    (AdapterInUseError, 409, "adapter_in_use"),
    (AdapterNameError, 400, "invalid_model_name"),
    (AdapterLoadError, 400, "adapter_load_failed"),
    (ReplicaUnavailableError, 503, "replica_unavailable"),
    (AdapterkitError, 400, "invalid_request"),
]


def as_api_error(error: AdapterkitError) -> ApiError:
    status, code = next((s, c) for kind, s, c in STATUSES if isinstance(error, kind))
    return ApiError(status, str(error), code)


def http_api_error(error: StarletteHTTPException) -> ApiError:
    """Starlette's own refusals (no such route, a method the route does not take) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
    return ApiError(error.status_code, str(error.detail), code)


def create_app(server: Server) -> FastAPI:
    """The FastAPI application for ``server``; run it with uvicorn (``adapterkit serve`` does)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.stop()

    app = FastAPI(title="adapterkit", lifespan=lifespan)
    app.add_middleware(AnswerUnexpected, on_error=lambda: server.metrics.errors.labels("500").inc())
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, idle_seconds=BODY_IDLE_SECONDS,
                       on_refused=lambda status: server.metrics.errors.labels(str(status)).inc())
    playground = resources.files("adapterkit").joinpath("playground.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        server.metrics.errors.labels(str(error.status)).inc()
        return error.response()

    @app.exception_handler(AdapterkitError)
    async def adapterkit_error(request: Request, error: AdapterkitError) -> JSONResponse:
        return await api_error(request, as_api_error(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        unsupported = [str(e["loc"][-1]) for e in error.errors() if e["type"] == "extra_forbidden"]
        beams = [name for name in unsupported if name in BEAM_FIELDS]
        if beams:
            return await api_error(request, beam_search_refused(beams[0]))
        if unsupported:
            message = f"unsupported field(s): {', '.join(unsupported)}; adapterkit does not implement them"
            return await api_error(request, ApiError(400, message, "unsupported_field"))
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors())
        return await api_error(request, ApiError(400, f"invalid request: {details}", "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, http_api_error(error))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": server.base_name, "loaded_adapters": list(server.pool.resident),
                "rows_in_flight": server.engine.in_flight, "queued": server.queued}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        try:
            adapters = server.adapters_on_disk()
        except OSError:
            raise ApiError(503, "the adapters folder cannot be read; only the base model is served",
                           "adapters_unavailable") from None
        names = [server.base_name] + adapters + sorted(server.compositions)
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        try:
            server.check_model(name)
        except AdapterNameError:  # a name no adapter can have is not found either (openai's NotFoundError)
            raise AdapterNotFoundError(f"the model {shown(name)} does not exist") from None
        return model_card(name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.refuse_unsupported()
        prompts = body.prompts()
        if not prompts or (body.stream and len(prompts) > 1):
            raise ApiError(400, "give one prompt to stream, or a non-empty list of prompts without streaming",
                           "invalid_prompt")
        if body.echo and body.stream:
            raise ApiError(400, "echo is supported without streaming only", "unsupported_field")
        server.check_model(body.model)
        sampling = server.sampling(body, 0)
        server.check_room(body.model, len(prompts))
        ids = await server.encode(prompts)
        server.check_scoring(ids, sampling, body.echo)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        tokenizer = server.engine.tokenizer

        def chunk(piece: str, reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": reason}]}

        if body.stream:
            jobs = await until_gone(request, server.submit(body.model, ids, sampling))
            offsets = TextOffsets(tokenizer)

            def streamed(piece: str, logprob: TokenLogprob | None) -> dict[str, Any]:
                """A token's chunk; with ``logprobs``, its log-probability (the stopping token's too)."""
                if logprob is None:
                    return chunk(piece, None)
                return chunk(piece, None, logprobs_block(tokenizer, [logprob], offsets([logprob.token])))

            return _sse(jobs[0], streamed, lambda reason: chunk("", reason),
                        usage_chunk=usage_apart(body, chunk("", None)))
        jobs = await until_gone(request, _answered(server, body.model, ids, sampling))

        def build() -> list[dict[str, Any]]:  # tens of MB of logprobs take seconds: never on the event loop
            choices = []
            for i, (job, prompt) in enumerate(zip(jobs, prompts)):
                generation = job.generation
                echoed = (prompt if isinstance(prompt, str) else tokenizer.decode(prompt)) if body.echo else ""
                logprobs = None
                if body.logprobs is not None:
                    scored = (generation.prompt_logprobs if body.echo else []) + generation.logprobs
                    # a text prompt is echoed as sent, token ids as they decode, special tokens included
                    offsets = (TextOffsets(tokenizer, skip_special_tokens=isinstance(prompt, str))(generation.prompt)
                               if body.echo else [])
                    offsets += TextOffsets(tokenizer, len(echoed))(generation.tokens)
                    logprobs = logprobs_block(tokenizer, scored, offsets)
                choices.append({"index": i, "text": echoed + generation.text, "logprobs": logprobs,
                                "finish_reason": generation.finish_reason})
            return choices

        choices = await asyncio.to_thread(build)
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
                "usage": usage([job.generation for job in jobs])}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        body.refuse_unsupported()
        server.check_model(body.model)
        server.check_room(body.model, 1)
        template = await asyncio.to_thread(server.template_of, body.model)
        prompt = await server.encode_chat(body.messages, template)
        sampling = server.sampling(body, len(prompt))
        if template not in (None, CHAT) and body.stop is None:
            sampling.stop = ["\n"]  # the answer's line, as in scoring and ``adapterkit generate``
        server.check_scoring([prompt], sampling, echo=False)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        tokenizer = server.engine.tokenizer

        def chunk(delta: dict[str, str], reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

        if body.stream:
            jobs = await until_gone(request, server.submit(body.model, [prompt], sampling))
            first = chunk({"role": "assistant", "content": ""}, None)

            def streamed(piece: str, logprob: TokenLogprob | None) -> dict[str, Any]:
                scored = None if logprob is None else chat_logprobs(tokenizer, [logprob])
                return chunk({"content": piece}, None, scored)

            return _sse(jobs[0], streamed, lambda reason: chunk({}, reason), first,
                        usage_apart(body, chunk({}, None)))
        jobs = await until_gone(request, _answered(server, body.model, [prompt], sampling))
        generation = jobs[0].generation
        message = {"role": "assistant", "content": generation.text}
        logprobs = None if sampling.logprobs is None else await asyncio.to_thread(
            chat_logprobs, tokenizer, generation.logprobs)
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                             "finish_reason": generation.finish_reason}],
                "usage": usage([generation])}

    # ---- the tokenizer, as vLLM serves it (lm-evaluation-harness's remote tokenizer uses these) ----
    info = tokenizer_info(server.engine.tokenizer, server.context)

    @app.get("/tokenizer_info")
    async def get_tokenizer_info() -> dict[str, Any]:
        return info

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        body.checked()
        tokenizer, special = server.engine.tokenizer, body.special_tokens()
        if body.model is not None:
            server.check_model(body.model)
        if body.prompt is not None:
            check_unicode(body.prompt, "the prompt")
            check_text_length(len(body.prompt), server.context, "the prompt")
            ids = await server.off_loop(lambda: tokenizer.encode(body.prompt, add_special_tokens=special))
        else:
            template = None if body.model is None else await asyncio.to_thread(server.template_of, body.model)
            check_messages(tokenizer, body.messages, template, server.context, None)
            ids = await server.off_loop(
                lambda: encode_messages(tokenizer, body.messages, template, body.add_generation_prompt, special))
        strs = bool(body.return_token_strs)
        return await server.off_loop(lambda: tokenize_answer(tokenizer, ids, server.context, strs))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            server.check_model(body.model)
        check_token_ids(body.tokens, server.vocabulary, "tokens", "invalid_tokens")
        return {"prompt": await server.off_loop(lambda: server.engine.tokenizer.decode(body.tokens))}

    @app.post("/v1/adapters")
    async def load(body: LoadRequest, request: Request) -> dict[str, Any]:
        server.authorize(request)
        server.refuse_shadowed(body.name)
        return await server.pool.reload(body.name)

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str, request: Request) -> dict[str, Any]:
        server.authorize(request)
        await server.pool.unload(name)
        return {"name": name, "loaded": False}

    return app


async def _answered(server: Server, model: str, prompts: list[list[int]], sampling) -> list[Job]:
    return await finished(await server.submit(model, prompts, sampling))


def usage_apart(body, envelope: dict[str, Any]) -> dict[str, Any] | None:
    """With ``stream_options.include_usage``, OpenAI's usage chunk: no choices, the request's usage."""
    if body.stream_options is None or not body.stream_options.include_usage:
        return None
    return envelope | {"choices": []}


def _sse(job: Job, text_chunk: Callable, final_chunk: Callable, first: dict | None = None,
         usage_chunk: dict | None = None) -> StreamingResponse:
    """The answer as server-sent events. The token counts come in a chunk of their own when the
    client asked for it (``usage_chunk``), else on the last chunk (so that a client that sums the
    usage of every chunk counts it once)."""
    none = {} if usage_chunk is None else {"usage": None}  # OpenAI's other chunks, with include_usage

    async def stream() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first | none)}\n\n"
            async for event in job.events_until_done():
                if event[0] == "text":
                    payload = text_chunk(event[1], event[2]) | none
                elif usage_chunk is None:
                    payload = final_chunk(event[1]) | {"usage": usage([job.generation])}
                else:
                    yield f"data: {json.dumps(final_chunk(event[1]) | none)}\n\n"
                    payload = usage_chunk | {"usage": usage([job.generation])}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not job.generation.done:
                job.generation.cancel()  # the client went away: its row leaves at the next step

    return StreamingResponse(stream(), media_type="text/event-stream")


def model_card(name: str) -> dict[str, Any]:
    """A model as OpenAI's /v1/models lists it."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "adapterkit"}
