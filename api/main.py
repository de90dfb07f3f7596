"""The API application: ``uvicorn api.main:create_app --factory``.

A thin front: it validates, routes and enqueues Celery messages; it never imports a runtime.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.auth import AuthMiddleware
from api.body_limit import BodyLimitMiddleware
from api.events import EventHub
from api.metrics import MetricsMiddleware
from api.routes import batches, events, health, jobs, metrics, openai_batches
from core.connections import redis_client
from core.errors import (
    CallbackRefused,
    IdempotencyConflict,
    JobNotFound,
    ReasonqError,
    RoutingError,
    TooManyRequests,
)
from core.jobs import JobStore
from core.settings import Settings

log = logging.getLogger("reasonq.api")

_STATUS = {
    JobNotFound: 404,
    RoutingError: 422,
    CallbackRefused: 422,
    IdempotencyConflict: 409,
    TooManyRequests: 429,
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.redis = redis_client(settings, max_connections=512)
        app.state.store = JobStore(app.state.redis, settings.result_ttl_s)
        app.state.hub = EventHub(app.state.redis)
        await app.state.hub.start()
        # Everything loaded so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise stall every request for 50-150 ms.
        gc.freeze()
        yield
        await app.state.hub.stop()
        await app.state.redis.aclose()

    app = FastAPI(
        title="reasonq",
        version="0.1.0",
        summary="A distributed job queue for LLM reasoning jobs.",
        lifespan=lifespan,
    )

    @app.exception_handler(ReasonqError)
    async def reasonq_error(request: Request, exc: ReasonqError) -> JSONResponse:
        code = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
        headers = (
            {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyRequests) else None
        )
        return JSONResponse({"detail": str(exc), "code": exc.code}, code, headers)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis down or restarting: the client may retry the same request, with its
        # Idempotency-Key, once Redis is back.
        log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "the job queue (Redis) is unavailable; retry shortly",
             "code": "redis_unavailable"},
            503,
            {"Retry-After": "1"},
        )  # fmt: skip

    @app.exception_handler(redis.exceptions.OutOfMemoryError)
    @app.exception_handler(redis.exceptions.ReadOnlyError)
    async def redis_refuses_writes(request: Request, exc: Exception) -> JSONResponse:
        # Full (maxmemory with noeviction) or a read-only replica: nothing was written, since
        # a write script is refused before it runs; what was accepted before stays.
        log.error("%s %s: Redis refuses writes: %s", request.method, request.url.path, exc)
        why = "is full" if isinstance(exc, redis.exceptions.OutOfMemoryError) else "is read-only"
        return JSONResponse(
            {"detail": f"the job queue (Redis) {why} and refuses writes; retry later",
             "code": "redis_refuses_writes"},
            503,
            {"Retry-After": "30"},
        )  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Field and reason only: echoing the input could leak prompts into logs, and a NaN
        # in it can't be written as JSON.
        detail = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    # Pure ASGI middleware (streams pass through); the last added runs first: requests are
    # timed whatever their fate, then authenticated, then their body is size-limited.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(AuthMiddleware, enabled=settings.auth_enabled)
    app.add_middleware(MetricsMiddleware)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(batches.router)
    app.include_router(openai_batches.router)
    return app
