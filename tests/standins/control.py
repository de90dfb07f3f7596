"""What both stand-ins share: fault injection, the request log, and disconnect-aware streaming.

Control endpoints (mounted by both servers under ``/_standin``):

- ``POST /_standin/faults`` with one fault or a list, e.g. ``{"status": 503, "count": 3}``,
  ``{"latency_s": 0.5}``, ``{"drop": "before_response"}``, ``{"drop": "mid_stream",
  "after_tokens": 3}``, ``{"hang": true}``. Each fault hits the next ``count`` generation
  requests (default 1; ``-1`` = until cleared); ``DELETE /_standin/faults`` clears them.
- ``GET /_standin/requests``: every generation request received, in order, with its body,
  timings, status, whether the client closed the stream early and the tokens it got;
  ``DELETE /_standin/requests`` empties the log.
- ``GET /_standin/stats``: engine occupancy (running, waiting, steps).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

ABORT_KEY = "standin.abort"
"""Scope key holding a callable that drops the TCP connection (set by ``ConnectionControl``)."""


@dataclass
class Fault:
    """One injected misbehaviour; exactly one of status / latency_s / drop / hang is set."""

    status: int | None = None
    body: Any = None  # replaces the server's own error body for ``status``
    retry_after: float | None = None
    latency_s: float | None = None
    drop: str | None = None  # "before_response" | "mid_stream"
    after_tokens: int = 0
    hang: bool = False
    count: int = 1


@dataclass
class RequestRecord:
    """One generation request as the server saw it (``time.time()`` stamps)."""

    path: str
    body: Any
    received_at: float
    scheduled_at: float | None = None
    ended_at: float | None = None
    status: int | None = None
    client_closed: bool = False
    completion_tokens: int = 0
    fault: dict[str, Any] | None = None


@dataclass
class Control:
    """Faults waiting to fire and the request log of one server."""

    faults: list[Fault] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)

    def take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        if fault.count > 0:
            fault.count -= 1
            if fault.count == 0:
                self.faults.pop(0)
        return fault

    def record(self, request: Request, body: Any) -> RequestRecord:
        rec = RequestRecord(path=request.url.path, body=body, received_at=time.time())
        self.requests.append(rec)
        return rec

    def routes(self, stats: Callable[[], dict[str, Any]]) -> list[Route]:
        async def faults(request: Request) -> Response:
            if request.method == "DELETE":
                self.faults.clear()
                return JSONResponse({"faults": []})
            data = await request.json()
            for item in data if isinstance(data, list) else [data]:
                self.faults.append(Fault(**item))
            return JSONResponse({"faults": [asdict(f) for f in self.faults]})

        async def requests(request: Request) -> Response:
            if request.method == "DELETE":
                self.requests.clear()
            return JSONResponse([asdict(r) for r in self.requests])

        async def stats_route(request: Request) -> Response:
            return JSONResponse(stats())

        return [
            Route("/_standin/faults", faults, methods=["POST", "DELETE"]),
            Route("/_standin/requests", requests, methods=["GET", "DELETE"]),
            Route("/_standin/stats", stats_route, methods=["GET"]),
        ]


class ConnectionControl:
    """Outermost ASGI wrapper: lets an endpoint drop its TCP connection without a response.

    ASGI has no such message, so this reaches uvicorn's transport through the raw ``send``
    (a bound method of uvicorn's request cycle) before Starlette wraps it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                scope[ABORT_KEY] = transport.abort
        await self.app(scope, receive, send)


def abort_connection(scope: Scope) -> None:
    """Reset the client's connection now; raises when not served by uvicorn."""
    abort = scope.get(ABORT_KEY)
    if abort is None:
        raise RuntimeError("dropping a connection needs uvicorn")
    abort()


class Dropped(Response):
    """A "response" that closes the connection without sending a byte."""

    def __init__(self) -> None:
        super().__init__(status_code=0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        abort_connection(scope)
        await asyncio.sleep(0.01)  # let uvicorn see connection_lost before the app returns


class Hang(Response):
    """Never answers; returns once the client gives up."""

    def __init__(self, rec: RequestRecord) -> None:
        super().__init__(status_code=0)
        self.rec = rec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.rec.client_closed = True
        self.rec.ended_at = time.time()


Chunks = Callable[[], AsyncIterator[bytes]]


class TokenStream(Response):
    """A streamed 200 whose body comes from ``chunks``, watching for the client to leave.

    When the client disconnects the generator is cancelled (so its ``finally`` can abort the
    engine sequence) and the request is logged as ``client_closed``. A ``mid_stream`` drop
    fault resets the connection after ``after_tokens`` chunks.
    """

    def __init__(
        self,
        chunks: Chunks,
        media_type: str,
        rec: RequestRecord,
        drop_after: int | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        # Not Response.__init__: that would announce "content-length: 0".
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", media_type.encode())]
        self.chunks = chunks
        self.rec = rec
        self.drop_after = drop_after
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.rec.status = 200
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        sender = asyncio.ensure_future(self._send(scope, send))
        done, _ = await asyncio.wait({watcher, sender}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            self.rec.client_closed = True
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        else:
            watcher.cancel()
        if self.on_close is not None:
            self.on_close()
        self.rec.ended_at = self.rec.ended_at or time.time()
        if sender in done:
            sender.result()

    async def _send(self, scope: Scope, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        sent = 0
        # aclosing: a cancel while awaiting send() must still run the generator's finally.
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                if self.drop_after is not None and sent >= self.drop_after:
                    abort_connection(scope)
                    await asyncio.sleep(0.01)
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += 1
        # Ended before the last byte goes out: a client may see the end (and send its next
        # request) before this coroutine runs again.
        self.rec.ended_at = time.time()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(work: Awaitable[Any], receive: Receive) -> tuple[bool, Any]:
    """Run ``work`` unless the client disconnects first: (disconnected, result)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return False, task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return True, None


async def read_json(request: Request) -> Any:
    """The request body as JSON; ``ValueError`` with a readable message when it is not."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON body: {exc}") from None


def fault_response(
    fault: Fault, rec: RequestRecord, default_body: Callable[[int], Any]
) -> Response | None:
    """The response a status / drop-before / hang fault replaces the real one with."""
    rec.fault = asdict(fault)
    if fault.status is not None:
        rec.status = fault.status
        rec.ended_at = time.time()
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        body = fault.body if fault.body is not None else default_body(fault.status)
        return JSONResponse(body, status_code=fault.status, headers=headers)
    if fault.drop == "before_response":
        rec.ended_at = time.time()
        return Dropped()
    if fault.hang:
        return Hang(rec)
    return None
