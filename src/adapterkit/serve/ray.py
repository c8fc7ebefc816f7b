"""``adapterkit serve --ray``: the server as a Ray Serve application, its replicas on one machine or
on a Ray cluster.

Each replica is one single server: a ``Server`` (engine, pool, metrics) answering through
``create_app``'s routes, unchanged. In front of them an ingress only places requests and relays the
answers. A request that names an adapter or a composition in ``model`` is placed by Ray Serve's
model multiplexing on a replica that serves it already, or, when none does (or all that do are
full), on the replica serving fewest; there the pool loads what is missing, as the single server's
does. Ray's per-replica record of the models a replica serves is an LRU as long as the pool's cap
(``--max-loaded-adapters``). Requests for the base, or that name no model, go to any replica.
``POST``/``DELETE /v1/adapters`` reach every replica that holds the adapter (``POST`` loads it
where Ray places its requests when none does). Each answer's ``x-adapterkit-replica`` header names
the replica that gave it.
"""
# no `from __future__ import annotations`: Ray's FastAPI ingress reads the routes' annotations as types

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..bases import default_base
from ..compose import Composition, compositions_from_json
from ..errors import AdapterInUseError, AdapterkitError, ConfigError, ReplicaUnavailableError
from ..names import is_valid_name
from ..quantization import check_quantize
from .app import BODY_IDLE_SECONDS, MAX_BODY_BYTES, as_api_error, create_app, http_api_error
from .config import ServeConfig
from .main import adapters_folder, base_name_of, listen, load_server
from .middleware import AnswerUnexpected, BodyLimit
from .protocol import ApiError

log = logging.getLogger(__name__)

APP_NAME = "adapterkit"
REPLICA_HEADER = "x-adapterkit-replica"
MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")  # POSTs naming a model
ADAPTERS_ROUTE = "/v1/adapters"
STOPPED = "the replica answering this request stopped; retry it (Ray starts another, and the others go on)"


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the ingress hands it to a replica: what an ASGI app needs to answer it."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @classmethod
    async def of(cls, request: Request) -> "Forwarded":
        scope = request.scope
        return cls(request.method, scope["path"], scope["query_string"], list(scope["headers"]), await request.body())

    def scope(self) -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                "method": self.method, "path": self.path, "root_path": "", "query_string": self.query,
                "headers": self.headers, "client": None, "server": None}

    def field(self, name: str) -> Any:
        """Field ``name`` of a JSON object body; None for any other body (the app answers that)."""
        try:
            document = json.loads(self.body)
        except (ValueError, RecursionError):
            return None
        return document.get(name) if isinstance(document, dict) else None


def routed_model(request: Forwarded, base_name: str) -> str | None:
    """The model Ray places ``request`` by: the adapter or composition a request names; None (any
    replica) for the base, a name that cannot be one, and every other route."""
    if request.method != "POST" or request.path not in MODEL_ROUTES:
        return None
    model = request.field("model")
    return model if is_valid_name(model) and model != base_name else None


def managed_adapter(request: Forwarded) -> str | None:
    """The adapter a ``POST /v1/adapters`` or ``DELETE /v1/adapters/{name}`` loads or unloads; None
    for other requests and invalid names (one replica's app answers those)."""
    if request.method == "POST" and request.path == ADAPTERS_ROUTE:
        name = request.field("name")
    elif request.method == "DELETE" and request.path.startswith(ADAPTERS_ROUTE + "/"):
        name = request.path.removeprefix(ADAPTERS_ROUTE + "/")
    else:
        return None
    return name if is_valid_name(name) else None


async def asgi_answer(app: FastAPI, request: Forwarded) -> AsyncIterator[dict[str, Any]]:
    """The messages ``app`` sends in answer to ``request``, run as uvicorn runs it: the body once,
    then a disconnect when the caller stops listening, which cancels the request's rows."""
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    body = [{"type": "http.request", "body": request.body, "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    answering = asyncio.ensure_future(app(request.scope(), receive, messages.put))
    answering.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
    finally:
        gone.set()
        await asyncio.shield(answering)  # the app sees the disconnect and lets the request's rows go


@serve.deployment(name="Replica")
class Replica:
    """One single server over the base, answering what the ingress forwards with the app's routes."""

    def __init__(self, base: str, folder: Path, api_key: str | None, config: ServeConfig,
                 compositions: dict[str, Composition] | None, device: str | None, dtype: str | None,
                 quantize: str | None) -> None:
        self.server = load_server(base, folder, api_key, config, compositions, device, dtype, quantize)
        self.app = create_app(self.server)
        self.server.start()  # what the app's lifespan does under uvicorn
        self.name = serve.get_replica_context().replica_id.unique_id

        async def serves(model: str) -> str:
            """Ray's record that this replica serves ``model``, which places the model's next
            requests here; the pool loads the adapters when a request runs."""
            return model

        self.serves = serve.multiplexed(max_num_models_per_replica=config.max_loaded_adapters)(serves)

    def __del__(self) -> None:
        self.server.stop()

    async def answer(self, request: Forwarded) -> AsyncIterator[dict[str, Any]]:
        """The app's answer to ``request``, message by message. A model that exists is recorded as
        served here first; the app answers the others (404, 400) as the single server does."""
        model = serve.get_multiplexed_model_id()
        if model and self.exists(model):
            await self.serves(model)
        async for message in self.run(request):
            yield message

    async def manage(self, request: Forwarded, name: str) -> list[dict[str, Any]] | None:
        """The app's answer to loading or unloading adapter ``name``, if this replica holds it."""
        if name not in self.server.pool.resident:
            return None
        return [message async for message in self.run(request)]

    def refusal(self, name: str) -> str | None:
        """Why reloading or unloading ``name`` here would be refused now (it is in use), if it would."""
        if name not in self.server.pool.resident:
            return None
        try:
            self.server.pool.refuse_if_used(name)
        except AdapterInUseError as error:
            return str(error)
        return None

    def exists(self, model: str) -> bool:
        try:
            self.server.check_model(model)
        except AdapterkitError:
            return False
        return True

    async def run(self, request: Forwarded) -> AsyncIterator[dict[str, Any]]:
        async for message in asgi_answer(self.app, request):
            if message["type"] == "http.response.start":
                message = message | {"headers": [*message["headers"], (REPLICA_HEADER.encode(), self.name.encode())]}
            yield message


def streams_events(start: dict[str, Any]) -> bool:
    """Whether the answer ``start`` begins is an event stream (sent on as it comes)."""
    return dict(start["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")


async def relayed(messages: AsyncIterator[dict[str, Any]]) -> "Relayed":
    """A replica's answer, to send on. Any answer but an event stream is taken whole first (the app
    sends it in one body), so that a replica stopping between its headers and its body is still
    answered with a whole 503 rather than a response cut after its headers."""
    try:
        start = await anext(messages)
        if not streams_events(start):
            return Relayed([start, *[message async for message in messages]])
    except BackPressureError:
        raise ApiError(429, "every replica is busy and the queue in front of them is full; retry shortly",
                       "rate_limit_exceeded", {"Retry-After": "1"}) from None
    except RayActorError:
        raise ReplicaUnavailableError(STOPPED) from None
    return Relayed([start], messages)


class Relayed(Response):
    """A replica's answer, sent on message by message as it comes (a stream stays a stream). If the
    replica stops mid-way through an event stream, the stream ends with an error event, as the
    app's streams do."""

    def __init__(self, messages: list[dict[str, Any]], rest: AsyncIterator[dict[str, Any]] | None = None) -> None:
        self.messages, self.rest, self.background = messages, rest, None

    async def __call__(self, scope, receive, send) -> None:
        for message in self.messages:
            await send(message)
        if self.rest is None:
            return
        try:
            async for message in self.rest:
                await send(message)
        except RayActorError:
            error = json.dumps(as_api_error(ReplicaUnavailableError(STOPPED)).body())
            await send({"type": "http.response.body", "body": f"data: {error}\n\ndata: [DONE]\n\n".encode(),
                        "more_body": False})


api = FastAPI(title="adapterkit on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(AnswerUnexpected, on_error=lambda: None)
api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, idle_seconds=BODY_IDLE_SECONDS, on_refused=lambda status: None)


@api.exception_handler(ApiError)
async def api_error(request: Request, error: ApiError) -> Response:
    return error.response()


@api.exception_handler(AdapterkitError)
async def adapterkit_error(request: Request, error: AdapterkitError) -> Response:
    return as_api_error(error).response()


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, error: StarletteHTTPException) -> Response:
    """A method the catch-all route does not take (TRACE, say): 405 in OpenAI's shape, as the replicas answer."""
    return http_api_error(error).response()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """The HTTP side: each request placed on a replica, and its answer relayed."""

    def __init__(self, replicas: DeploymentHandle, base_name: str) -> None:
        self.replicas, self.base_name = replicas, base_name

    @api.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    async def forward(self, request: Request) -> Response:
        forwarded = await Forwarded.of(request)
        name = managed_adapter(forwarded)
        if name is None:
            return await self.relay(forwarded, routed_model(forwarded, self.base_name))
        answer = await self.manage(forwarded, name)
        if answer is not None:
            return Relayed(answer)
        return await self.relay(forwarded, name if forwarded.method == "POST" else None)

    async def relay(self, request: Forwarded, model: str | None) -> Response:
        """The answer of the replica Ray places ``request`` on (by ``model``; any, for None)."""
        handle = self.replicas.options(stream=True, multiplexed_model_id=model or "")
        return await relayed(handle.answer.remote(request))

    async def manage(self, request: Forwarded, name: str) -> list[dict[str, Any]] | None:
        """The answer of the replicas that hold ``name`` to loading or unloading it, all or none: if
        any holder would refuse (the adapter is in use there), none acts and that refusal is the
        answer. None when no replica holds it. A request that takes the adapter between the asking
        and the acting leaves some holders changed and others not: the answer then says so."""
        reasons = await self.replicas.broadcast("refusal", name).results_async(return_exceptions=True)
        refused = [reason for reason in reasons if isinstance(reason, str)]
        if refused:
            raise AdapterInUseError(refused[0])
        answers = await self.replicas.broadcast("manage", request, name).results_async(return_exceptions=True)
        held = [answer for answer in answers if isinstance(answer, list)]
        refusals = [answer for answer in held if answer[0]["status"] >= 400]
        if refusals and len(refusals) < len(held):
            raise AdapterInUseError(f"adapter {name!r} came into use on {len(refusals)} of the {len(held)} replicas "
                                    "holding it while the others acted; retry to finish")
        return (refusals or held or [None])[0]


def application(
    base: str,
    adapters_dir: str | Path,
    replicas: int = 1,
    api_key: str | None = None,
    config: ServeConfig | None = None,
    compositions: dict[str, Composition] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> serve.Application:
    """``replicas`` single servers over ``base`` and the adapters in ``adapters_dir`` (a folder every
    node of the cluster reads at the same path), behind one ingress. A replica takes as many
    requests as it batches and queues; beyond that, ``max_queue`` more wait for a free replica,
    and the rest are answered 429. On ``cuda`` each replica has a GPU of its own."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"--replicas must be a whole number of at least 1, got {replicas!r}")
    check_quantize(quantize)  # here, not in each replica, where Ray would show a traceback
    config = config or ServeConfig()
    folder = adapters_folder(adapters_dir).resolve()
    per_replica = config.max_batch_size + config.max_queue
    gpus = 1 if device is not None and device.startswith("cuda") else 0
    servers = Replica.options(num_replicas=replicas, max_ongoing_requests=per_replica,
                              max_queued_requests=config.max_queue,
                              ray_actor_options={"num_cpus": 1, "num_gpus": gpus})
    ingress = Ingress.options(max_ongoing_requests=replicas * per_replica + config.max_queue,
                              ray_actor_options={"num_cpus": 0})
    return ingress.bind(servers.bind(base, folder, api_key, config, compositions, device, dtype, quantize),
                        base_name_of(base))


BUILD_ARGUMENTS = ("base", "adapters", "replicas", "api_key", "device", "dtype", "quantize", "compositions",
                   *ServeConfig.names())


def build(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's application builder, for a config file's ``import_path: adapterkit.serve.ray:build``:
    ``args`` are ``serve``'s options with underscores (``adapters`` is required; ``compositions`` is
    the table a compositions file holds). Without ``api_key``, $ADAPTERKIT_API_KEY."""
    unknown = sorted(set(args) - set(BUILD_ARGUMENTS))
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; adapterkit.serve.ray:build takes "
                          f"{', '.join(BUILD_ARGUMENTS)}")
    if "adapters" not in args:
        raise ConfigError("adapterkit.serve.ray:build needs 'adapters': the folder of adapters")
    limits = ServeConfig(**{name: args[name] for name in ServeConfig.names() if name in args})
    compositions = compositions_from_json(args["compositions"]) if "compositions" in args else None
    api_key = args.get("api_key") or os.environ.get("ADAPTERKIT_API_KEY") or None
    return application(args.get("base") or default_base(), args["adapters"], args.get("replicas", 1), api_key, limits,
                       compositions, args.get("device"), args.get("dtype"), args.get("quantize"))


def run(
    base: str,
    adapters_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    api_key: str | None = None,
    config: ServeConfig | None = None,
    compositions: dict[str, Composition] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> None:
    """Serve ``application(...)`` at ``host``:``port`` until interrupted, on the Ray cluster this
    machine is part of (``ray start``), else on a local one started here. A busy port fails at once."""
    app = application(base, adapters_dir, replicas, api_key, config, compositions, device, dtype, quantize)
    listen(host, port).close()
    ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME)
    log.info("serving %s and the adapters in %s on %d Ray Serve replica(s) at http://%s:%d/v1", base_name_of(base),
             adapters_dir, replicas, host, port)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
