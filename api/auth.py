"""Bearer API keys (``REASONQ_AUTH_ENABLED``), as pure ASGI middleware.

Pure ASGI rather than ``BaseHTTPMiddleware``, which would buffer streamed responses (the
job event stream). A valid key makes its id the request's owner (``request.state.owner``,
read by ``api.deps.get_owner``), so jobs and batches belong to the key that made them,
and puts the key itself in ``request.state.api_key`` for its limits (``api.limits``).
The key is looked up on every request, so a revoked key is refused at once.
"""

from __future__ import annotations

import redis.exceptions
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.asgi import send_error
from core import apikeys, keys

# Probes, scrapes and the API's own description stay open.
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
     "/openapi.json"}
)  # fmt: skip


class AuthMiddleware:
    def __init__(self, app: ASGIApp, enabled: bool) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            await _unauthorized(send, "missing API key: send Authorization: Bearer <key>")
            return
        key = None
        if (key_id := apikeys.key_id_of(token)) is not None:
            try:
                record = await scope["app"].state.redis.hgetall(keys.api_key(key_id))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                # Outside the app's exception handlers: answer its 503 here (api/main.py).
                await _unavailable(send)
                return
            key = apikeys.verify(token, {k.decode(): v.decode() for k, v in record.items()})
        if key is None:
            await _unauthorized(send, "invalid or revoked API key")
            return
        state = scope.setdefault("state", {})
        state["owner"] = key.id
        state["api_key"] = key
        await self.app(scope, receive, send)


async def _unauthorized(send: Send, detail: str) -> None:
    await send_error(
        send, 401, "unauthorized", detail, {"www-authenticate": 'Bearer realm="reasonq"'}
    )


async def _unavailable(send: Send) -> None:
    detail = "the job queue (Redis) is unavailable; retry shortly"
    await send_error(send, 503, "redis_unavailable", detail, {"retry-after": "1"})
