"""Liveness and readiness."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.deps import RedisDep, SettingsDep
from core import keys

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The API process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(redis: RedisDep, settings: SettingsDep) -> JSONResponse:
    """200 only when Redis answers and every configured queue has a live worker."""
    consumers: dict[str, list[str]] = {queue: [] for queue in settings.queues}
    try:
        await redis.ping()
        names = [name async for name in redis.scan_iter(keys.WORKER_PATTERN, count=1000)]
        beats = await redis.mget(names) if names else []
    except RedisError as exc:
        return JSONResponse(
            {"ready": False, "redis": f"unreachable: {exc}", "queues": consumers}, 503
        )
    for beat in filter(None, beats):
        worker = json.loads(beat)
        for queue in worker["queues"]:
            consumers.setdefault(queue, []).append(worker["hostname"])
    missing = [queue for queue in settings.queues if not consumers[queue]]
    body = {"ready": not missing, "redis": "ok", "queues": consumers, "missing": missing}
    return JSONResponse(body, 503 if missing else 200)
