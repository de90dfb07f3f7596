"""Request body size limits (413), as pure ASGI middleware that never buffers the body.

A declared Content-Length over the limit is refused before a byte is read. A body without
one (chunked) is counted as it streams: once past the limit the app's read fails and
whatever answer the app then starts is replaced by the 413. multipart/form-data bodies
(batch file uploads) get ``REASONQ_MAX_UPLOAD_BYTES``, everything else
``REASONQ_MAX_BODY_BYTES``.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.asgi import send_error


class _BodyTooLarge(Exception):
    """Raised into the app's body read; the middleware answers 413 instead of the app."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        upload = headers.get("content-type", "").startswith("multipart/form-data")
        limit, setting = (
            (self.max_upload_bytes, "REASONQ_MAX_UPLOAD_BYTES")
            if upload
            else (self.max_body_bytes, "REASONQ_MAX_BODY_BYTES")
        )
        reason = f"request body over {limit} bytes ({setting})"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(send, reason)
            return

        received = 0
        exceeded = False
        replaced = False  # the app's answer was swapped for the 413
        started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge(reason)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced, started
            if exceeded and not started:
                if not replaced:
                    replaced = True
                    await _too_large(send, reason)
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            if started:
                raise
            if not replaced:
                await _too_large(send, reason)


async def _too_large(send: Send, reason: str) -> None:
    await send_error(send, 413, "body_too_large", reason, {"connection": "close"})
