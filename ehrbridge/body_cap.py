"""One cap on every request body, whatever route it is for.

FastAPI reads and parses a JSON body *before* it solves a route's dependencies,
the token check among them, so without a cap an anonymous client could make any
JSON route (dead-letter replay, mode change, the Alertmanager webhook) buffer
as many bytes as it cares to send. The routes with their own, lower limits
(FHIR ingest: ``http.max_body_bytes``; CDS Hooks: ``cds_hooks.max_body_bytes``)
read their bodies themselves with ``read_limited`` and answer in their own
format (a FHIR OperationOutcome, a CDS error), so they are left to it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyCap:
    """ASGI: 413 for a body over ``limit`` bytes, declared or streamed; never read past it."""

    def __init__(self, app: App, limit: int, own_limits: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.own_limits = own_limits  # path prefixes whose routes enforce their own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(self.own_limits):
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.limit:
            await _too_large(send, self.limit)
            return
        await _Guarded(self.limit, receive, send).run(self.app, scope)


class _Guarded:
    """One request: counts what the app reads, answers 413 itself past the limit.

    The route may turn a failing read into its own 400 (FastAPI does), so at the
    limit the 413 is sent first, the app is told the client left, and whatever
    it answers after that is dropped.
    """

    def __init__(self, limit: int, receive: Receive, send: Send) -> None:
        self.limit, self._receive, self._send = limit, receive, send
        self.seen = 0
        self.started = self.answered = False

    async def run(self, app: App, scope: Scope) -> None:
        await app(scope, self.receive, self.send)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                if not self.started:
                    self.answered = True
                    await _too_large(self._send, self.limit)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.answered:
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # uvicorn's parser refuses a malformed length before us
    return 0


async def _too_large(send: Send, limit: int) -> None:
    # Connection: close, since the rest of the body is never read.
    body = f'{{"detail":"the request body is larger than {limit} bytes"}}'.encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
