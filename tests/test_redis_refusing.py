"""The API against a Redis that is full or hangs (its own redis-server and uvicorn): a clear
503, never a 500 or a hung request, and nothing accepted before is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from tests.cluster import RedisServer, service_env, start_api
from workers.executor import _until_redis_answers

JOB = {"prompt": "What is 2 + 2?", "runtime": "vllm"}


@dataclass
class Api:
    redis: RedisServer
    client: httpx.Client


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    log_dir = Path(tmp_path_factory.mktemp("redis-refusing"))
    server = RedisServer(log_dir).start()
    env = service_env(server.url, redis_timeout_s=0.5, runtime_queues={"vllm": "gpu"})
    service, url = start_api(env, log_dir)
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            yield Api(server, client)
    finally:
        service.stop()
        server.stop()


def accepted_job(client: httpx.Client) -> str:
    response = client.post("/v1/jobs", json=JOB)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_full_redis_refuses_new_jobs_with_503_and_keeps_accepted_ones(api: Api) -> None:
    job_id = accepted_job(api.client)
    admin = redis.Redis.from_url(api.redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # already over: every write is refused
    try:
        refused = api.client.post("/v1/jobs", json=JOB)
        assert refused.status_code == 503
        assert refused.json()["code"] == "redis_refuses_writes"
        assert "is full" in refused.json()["detail"]
        assert refused.headers["Retry-After"] == "30"
        assert api.client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    finally:
        admin.config_set("maxmemory", 0)
    accepted_job(api.client)  # room again: accepted at once


def test_hung_redis_answers_503_within_the_timeout(api: Api) -> None:
    job_id = accepted_job(api.client)
    os.kill(api.redis.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        response = api.client.get(f"/v1/jobs/{job_id}")
        waited = time.monotonic() - began
    finally:
        os.kill(api.redis.pid, signal.SIGCONT)
    assert response.status_code == 503
    assert response.json()["code"] == "redis_unavailable"
    assert waited < 3  # REASONQ_REDIS_TIMEOUT_S is 0.5 here
    assert api.client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_worker_retries_a_write_while_redis_is_full(api: Api) -> None:
    # A worker holding a finished generation must not drop it because Redis was full.
    async def scenario() -> bytes | None:
        client = aioredis.from_url(api.redis.url)
        await client.config_set("maxmemory", 1)

        async def make_room() -> None:
            await asyncio.sleep(0.3)
            await client.config_set("maxmemory", 0)

        room = asyncio.create_task(make_room())
        try:
            await _until_redis_answers(lambda: client.set("result", "kept"), "test write")
            return await client.get("result")
        finally:
            await room
            await client.aclose()

    assert asyncio.run(scenario()) == b"kept"
