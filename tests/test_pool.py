"""workers.pool: a begun job's pool thread joins once the job is under way, not before.

The job's backend slot is held by someone else, so the job waits between its start and its
request as long as the test likes: its pool thread must not run meanwhile, and must run
once the slot frees and the request goes out (or at a warm shutdown, at once).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from core import keys
from core.settings import Settings
from tests.cluster import wait_until
from tests.conftest import MakeExecutor
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
def executor(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, executor_for: MakeExecutor
) -> Executor:
    executor = executor_for(settings)
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


def begin_and_apply(
    settings: Settings, executor: Executor, job_id: str
) -> tuple[TaskPool, list[tuple[float, str]], Any]:
    """A queued job received as Celery's consumer receives it: begun on the executor's loop,
    then handed to the pool. Returns the pool, the calls of the job's pool thread (when,
    job id) and the pool's handle on it."""
    record = queued_job(settings, job_id)
    delivery_tag = f"delivery-{job_id}"
    executor.begin(job_id, record, delivery_tag, redelivered=False)
    pool = TaskPool(limit=2)
    calls: list[tuple[float, str]] = []
    applied = apply(pool, job_id, delivery_tag, calls)
    return pool, calls, applied


def apply(pool: TaskPool, job_id: str, delivery_tag: str, calls: list[tuple[float, str]]) -> Any:
    """What Celery's consumer does with a received task: hand it to the pool."""
    request = {"properties": {"delivery_tag": delivery_tag}}
    return pool.apply_async(
        lambda *args: calls.append((time.monotonic(), args[1])),
        args=("reasonq.run_job", job_id, request, b"", "application/json", "utf-8"),
        callback=lambda result: None,
    )


def status(client: redis.Redis, job_id: str) -> bytes | None:
    return client.hget(keys.job(job_id), "status")


def test_pool_thread_of_a_begun_job_waits_until_the_request_is_out(
    settings: Settings, executor: Executor, backend_slot_taken: redis.Redis
) -> None:
    pool, calls, applied = begin_and_apply(settings, executor, "job-pooled")
    wait_until(lambda: status(backend_slot_taken, "job-pooled") == b"running", 10, "start")
    time.sleep(0.5)
    assert calls == []  # started, but still waiting for its backend slot
    freed = time.monotonic()
    backend_slot_taken.zrem(keys.inflight("vllm"), "someone-else")
    applied.wait(10)
    assert [job for _, job in calls] == ["job-pooled"]
    assert calls[0][0] >= freed
    wait_until(lambda: status(backend_slot_taken, "job-pooled") == b"succeeded", 10, "end")
    pool.on_stop()


def test_other_deliveries_go_to_a_thread_at_once(executor: Executor) -> None:
    pool = TaskPool(limit=2)
    calls: list[tuple[float, str]] = []
    apply(pool, "job-unknown", "delivery-never-begun", calls).wait(5)
    assert [job for _, job in calls] == ["job-unknown"]
    pool.on_stop()


def test_warm_shutdown_hands_waiting_jobs_over(
    settings: Settings, executor: Executor, backend_slot_taken: redis.Redis
) -> None:
    pool, calls, _ = begin_and_apply(settings, executor, "job-stopping")
    time.sleep(0.3)
    assert calls == []
    pool.on_stop()  # returns once the pool's threads are done
    assert [job for _, job in calls] == ["job-stopping"]
