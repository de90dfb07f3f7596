"""Dependencies injected into routes.

All ``async def``, though none awaits: FastAPI runs a plain ``def`` dependency in its
threadpool, a thread hop per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from api.events import EventHub
from core.batches import BatchStore
from core.jobs import JobStore
from core.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> aioredis.Redis:
    return request.app.state.redis


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_batches(request: Request) -> BatchStore:
    return BatchStore(request.app.state.redis, request.app.state.store)


async def get_hub(request: Request) -> EventHub:
    return request.app.state.hub


async def get_owner(request: Request) -> str:
    """The caller's identity; every job and batch belongs to one."""
    return getattr(request.state, "owner", "anonymous")


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[aioredis.Redis, Depends(get_redis)]
StoreDep = Annotated[JobStore, Depends(get_store)]
HubDep = Annotated[EventHub, Depends(get_hub)]
BatchesDep = Annotated[BatchStore, Depends(get_batches)]
OwnerDep = Annotated[str, Depends(get_owner)]
