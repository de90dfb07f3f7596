"""Answering from pure ASGI middleware, before any route runs."""

from __future__ import annotations

import json

from starlette.types import Send


async def send_error(
    send: Send, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    """Send the API's error body (``{"detail", "code"}``) with ``status`` and ``headers``."""
    body = json.dumps({"detail": detail, "code": code}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.encode(), value.encode()) for name, value in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
