"""ASGI middleware: the body limit, and one answer for any unexpected error."""

from __future__ import annotations

import asyncio
import logging

from .protocol import ApiError

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is read to its end (so the client is
    never cut off mid-send), discarded and answered 413; a smaller one is buffered and replayed.
    A body that stops arriving for ``idle_seconds`` (a Content-Length larger than what is sent)
    is answered 408 and its connection closed, as web servers do, instead of waiting for good."""

    def __init__(self, app, limit: int, idle_seconds: float, on_refused) -> None:
        self.app, self.limit, self.idle_seconds, self.on_refused = app, limit, idle_seconds, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.idle_seconds)
            except TimeoutError:
                self.on_refused(408)
                error = ApiError(408, f"the request body stopped arriving after {size} bytes for "
                                      f"{self.idle_seconds:g} s; send all of it (as much as its Content-Length "
                                      "says, or its last chunk) without such a pause", "request_timeout",
                                 {"Connection": "close"})
                return await error.response()(scope, receive, send)
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
                answer = ApiError(500, f"internal error: {type(error).__name__}", "internal_error").response()
                await answer(scope, receive, send)

