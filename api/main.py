"""The API application: ``uvicorn api.main:create_app --factory``.

A thin front: it validates, routes and enqueues by task name; it never imports a runtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.events import EventHub
from api.routes import health, jobs
from core.errors import IdempotencyConflict, JobNotFound, ReasonqError, RoutingError
from core.jobs import JobStore
from core.settings import Settings

_STATUS = {JobNotFound: 404, RoutingError: 422, IdempotencyConflict: 409}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.redis = aioredis.from_url(settings.redis_url, max_connections=512)
        app.state.store = JobStore(app.state.redis, settings.result_ttl_s)
        app.state.hub = EventHub(app.state.redis)
        await app.state.hub.start()
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
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Field and reason only: echoing the input could leak prompts into logs, and a NaN
        # in it can't be written as JSON.
        detail = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    app.include_router(health.router)
    app.include_router(jobs.router)
    return app
