"""Backpressure against real workers: busy answers are retried after a delay, the shared
per-backend limit holds across two worker processes, and a busy worker hoards no jobs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.cluster import Service, service_env, start_api, start_worker
from tests.conftest import Stack, wait_for_job
from tests.standins.server_thread import StandInControl, StandInProcess

LIMIT = 3  # REASONQ_BACKEND_MAX_INFLIGHT for these workers
BACKOFF_S = 0.2


@dataclass
class Pair:
    url: str
    backend: StandInControl

    def submit(self, **job: object) -> str:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            response = client.post("/v1/jobs", json={"runtime": "vllm", **job})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait(self, job_id: str, timeout: float = 30) -> dict:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            return wait_for_job(client, job_id, timeout)


@pytest.fixture(scope="module")
def pair(stack: Stack) -> Iterator[Pair]:
    """Two workers (8 slots each) sharing one stand-in through a limit of ``LIMIT``."""
    backend = StandInProcess(
        "tests.standins.openai_server", "--step-base-s", "0.01", "--step-per-seq-s", "0",
        "--output-len", "20",
    ).start()
    env = service_env(
        stack.redis.url, runtime_queues={"vllm": "pair"}, vllm_url=backend.url,
        worker_concurrency=8, backend_max_inflight=LIMIT, worker_metrics_port=0,
        retry_backoff_s=BACKOFF_S, retry_backoff_max_s=1.0, retry_max_attempts=5,
    )
    workers = [start_worker(f"pair{i}", ["pair"], env, stack.log_dir) for i in range(2)]
    api, url = start_api(env, stack.log_dir)
    control = StandInControl(backend.url)
    yield Pair(url, control)
    api.stop()
    for worker in workers:
        worker.stop()
    backend.stop()


def test_busy_backend_is_retried_after_a_delay(pair: Pair) -> None:
    pair.backend.reset()
    pair.backend.inject({"status": 503, "count": 2}, {"status": 429, "retry_after": 0.4})
    job = pair.wait(pair.submit(prompt="echo: finally through"))
    assert job["status"] == "succeeded", job
    assert job["result"]["text"] == " finally through"
    assert job["attempts"] == 1  # retried inside the run, not redelivered
    log = pair.backend.requests()
    assert [r["status"] for r in log] == [503, 503, 429, 200]
    gaps = [b["received_at"] - a["received_at"] for a, b in itertools.pairwise(log)]
    # Exponential backoff with jitter in [0.5, 1] x (0.2, 0.4) s, then Retry-After 0.4 s.
    assert gaps[0] >= 0.5 * BACKOFF_S and gaps[1] >= 0.5 * 2 * BACKOFF_S, gaps
    assert gaps[2] >= 0.4, gaps


def test_backend_that_stays_busy_fails_the_job_as_retryable(pair: Pair) -> None:
    pair.backend.reset()
    pair.backend.inject({"status": 503, "count": 5})
    job = pair.wait(pair.submit(prompt="echo: never"))
    assert job["status"] == "failed"
    assert job["error"]["retryable"] is True
    assert len(pair.backend.requests()) == 5  # REASONQ_RETRY_MAX_ATTEMPTS, no spinning
    pair.backend.reset()


def test_inflight_limit_holds_across_two_workers(pair: Pair) -> None:
    pair.backend.reset()
    ids = [pair.submit(prompt=f"load {i}") for i in range(16)]  # 16 jobs, 16 worker slots
    assert all(pair.wait(i)["status"] == "succeeded" for i in ids)
    log = pair.backend.requests()
    assert len(log) == 16
    # The server's view of each request lies inside the worker's hold of its slot.
    edges = sorted(
        [(r["received_at"], 1) for r in log] + [(r["ended_at"], -1) for r in log],
        key=lambda e: (e[0], e[1]),
    )
    peak = running = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak <= LIMIT, f"{peak} requests in flight, limit {LIMIT}"
    assert peak == LIMIT  # and the limit was used, not just respected


def test_busy_worker_does_not_hoard_jobs(stack: Stack) -> None:
    """A worker whose 2 slots are busy reserves no third job: a worker started later runs it."""
    backend = StandInProcess(
        "tests.standins.openai_server", "--step-base-s", "0.01", "--step-per-seq-s", "0",
        "--output-len", "3000",
    ).start()
    env = service_env(
        stack.redis.url, runtime_queues={"vllm": "hoard"}, vllm_url=backend.url,
        worker_concurrency=2, worker_metrics_port=0,
    )
    services: list[Service] = [start_worker("busy", ["hoard"], env, stack.log_dir)]
    api, url = start_api(env, stack.log_dir)
    services.append(api)
    pair = Pair(url, StandInControl(backend.url))
    try:
        long_jobs = [pair.submit(prompt=f"long {i}", max_tokens=3000) for i in range(2)]
        wait_running(pair, long_jobs)
        short = [pair.submit(prompt=f"short {i}", max_tokens=3) for i in range(3)]
        time.sleep(0.5)  # a hoarding worker would have reserved them by now
        services.append(start_worker("idle", ["hoard"], env, stack.log_dir))
        began = time.monotonic()
        assert all(pair.wait(i, timeout=10)["status"] == "succeeded" for i in short)
        assert time.monotonic() - began < 5  # long jobs still run ~25 s more
        with httpx.Client(base_url=url, timeout=30) as client:
            for job_id in long_jobs:
                assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
                client.delete(f"/v1/jobs/{job_id}")
    finally:
        for service in reversed(services):
            service.stop()
        backend.stop()


def wait_running(pair: Pair, job_ids: list[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=pair.url, timeout=30) as client:
        while any(client.get(f"/v1/jobs/{j}").json()["status"] != "running" for j in job_ids):
            assert time.monotonic() < deadline, "jobs never started"
            time.sleep(0.05)
