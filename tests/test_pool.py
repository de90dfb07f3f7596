"""workers.pool: a begun job's pool thread joins once the job is under way, not before.

The job's backend slot is held by someone else, so the job waits between its start and its
request as long as the test likes: its pool thread must not run meanwhile, and must run
once the slot frees and the request goes out (or at a warm shutdown, at once).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from core import keys
from core.settings import Settings
from tests.cluster import wait_until
from tests.standins.openai_server import OpenAIConfig, OpenAIStandIn
from tests.standins.server_thread import ServerThread
from tests.test_executor import queued_job
from workers import pool as pool_module
from workers.executor import Executor
from workers.pool import TaskPool


@pytest.fixture(scope="module")
def settings(redis_url: str) -> Iterator[Settings]:
    config = OpenAIConfig(step_base_s=0.001, step_per_seq_s=0, output_len="6")
    with ServerThread(OpenAIStandIn(config).app) as vllm:
        yield Settings(
            redis_url=redis_url,
            vllm_url=vllm.url,
            runtime_queues={"vllm": "gpu"},
            backend_max_inflight=1,
        )


@pytest.fixture
def executor(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Executor:
    executor = Executor(settings)
    monkeypatch.setattr(pool_module, "executor", executor)
    return executor


@pytest.fixture
def backend_slot_taken(settings: Settings) -> Iterator[redis.Redis]:
    """The only vLLM slot, held by another (fictitious) worker until the test frees it."""
    client = redis.Redis.from_url(settings.redis_url)
    client.zadd(keys.inflight("vllm"), {"someone-else": time.time()})
    yield client
    client.zrem(keys.inflight("vllm"), "someone-else")
    client.close()


def apply(pool: TaskPool, job_id: str, delivery_tag: str, calls: list[tuple]) -> object:
    """What Celery's consumer does with a received task: hand it to the pool."""
    request = {"properties": {"delivery_tag": delivery_tag}}
    return pool.apply_async(
        lambda *args: calls.append((time.monotonic(), args[1])),
        args=("reasonq.run_job", job_id, request, b"", "application/json", "utf-8"),
        callback=lambda result: None,
    )


def test_pool_thread_of_a_begun_job_waits_until_the_request_is_out(
    settings: Settings, executor: Executor, backend_slot_taken: redis.Redis
) -> None:
    record = queued_job(settings, "job-pooled")
    executor.begin("job-pooled", record, "delivery-p1", redelivered=False)
    pool = TaskPool(limit=2)
    calls: list[tuple] = []
    applied = apply(pool, "job-pooled", "delivery-p1", calls)
    wait_until(
        lambda: backend_slot_taken.hget(keys.job("job-pooled"), "status") == b"running",
        10,
        "job started",
    )
    time.sleep(0.5)
    assert calls == []  # started, but still waiting for its backend slot
    freed = time.monotonic()
    backend_slot_taken.zrem(keys.inflight("vllm"), "someone-else")
    applied.wait(10)  # type: ignore[attr-defined]
    assert [job for _, job in calls] == ["job-pooled"]
    assert calls[0][0] >= freed
    wait_until(
        lambda: backend_slot_taken.hget(keys.job("job-pooled"), "status") == b"succeeded",
        10,
        "job succeeded",
    )
    pool.on_stop()


def test_other_deliveries_go_to_a_thread_at_once(executor: Executor) -> None:
    pool = TaskPool(limit=2)
    calls: list[tuple] = []
    apply(pool, "job-unknown", "delivery-never-begun", calls).wait(5)  # type: ignore[attr-defined]
    assert [job for _, job in calls] == ["job-unknown"]
    pool.on_stop()


def test_warm_shutdown_hands_waiting_jobs_over(
    settings: Settings, executor: Executor, backend_slot_taken: redis.Redis
) -> None:
    record = queued_job(settings, "job-stopping")
    executor.begin("job-stopping", record, "delivery-p2", redelivered=False)
    pool = TaskPool(limit=2)
    calls: list[tuple] = []
    apply(pool, "job-stopping", "delivery-p2", calls)
    time.sleep(0.3)
    assert calls == []
    pool.on_stop()  # returns once the pool's threads are done
    assert [job for _, job in calls] == ["job-stopping"]
