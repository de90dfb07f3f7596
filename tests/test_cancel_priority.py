"""Cancel and priority, on a worker with a single slot so jobs really wait in the queue."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import Service, service_env, start_api, start_worker
from tests.conftest import Stack, wait_for_job
from tests.standins.server_thread import StandInProcess


class Solo:
    def __init__(self, url: str, backend: StandInProcess) -> None:
        self.url, self.backend = url, backend

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def submit(self, **job: object) -> str:
        with self.client() as client:
            response = client.post("/v1/jobs", json={"runtime": "vllm", **job})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def backend_log(self) -> list[dict]:
        return httpx.get(f"{self.backend.url}/_standin/requests").json()


@pytest.fixture(scope="module")
def solo(stack: Stack) -> Iterator[Solo]:
    # 0.01 s per token, 2,000 tokens: a generation runs ~20 s unless cancelled.
    backend = StandInProcess(
        "tests.standins.openai_server", "--step-base-s", "0.01", "--step-per-seq-s", "0",
        "--output-len", "2000",
    ).start()
    env = service_env(
        stack.redis.url, runtime_queues={"vllm": "solo"}, vllm_url=backend.url,
        worker_concurrency=1, worker_metrics_port=0,
        control_poll_s=30,  # so a prompt cancel proves the pub/sub nudge, not the poll
    )
    worker: Service = start_worker("solo", ["solo"], env, stack.log_dir)
    api, url = start_api(env, stack.log_dir)
    yield Solo(url, backend)
    api.stop()
    worker.stop()
    backend.stop()


def wait_running(solo: Solo, job_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with solo.client() as client:
        while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.02)


def test_cancel_running_job_closes_the_backend_stream(solo: Solo) -> None:
    job_id = solo.submit(prompt="count to a million", max_tokens=2000)
    wait_running(solo, job_id)
    time.sleep(0.3)  # let tokens flow
    began = time.monotonic()
    with solo.client() as client:
        cancelled = client.delete(f"/v1/jobs/{job_id}").json()
    took = time.monotonic() - began
    assert cancelled["status"] == "cancelled"
    assert cancelled["result"]["finish_reason"] == "cancelled"
    assert took < 0.5, f"cancel took {took:.2f} s"
    record = next(r for r in solo.backend_log() if "million" in str(r["body"]))
    assert record["client_closed"] is True
    assert record["completion_tokens"] < 2000


def test_cancel_queued_job_never_runs(solo: Solo) -> None:
    blocker = solo.submit(prompt="blocker one", max_tokens=60)
    wait_running(solo, blocker)
    queued = solo.submit(prompt="never run me")
    with solo.client() as client:
        response = client.delete(f"/v1/jobs/{queued}")
        assert response.json()["status"] == "cancelled"
        assert wait_for_job(client, blocker)["status"] == "succeeded"
        time.sleep(0.3)  # the worker has taken and dropped the cancelled message by now
        job = client.get(f"/v1/jobs/{queued}").json()
    assert job["status"] == "cancelled" and job["started_at"] is None
    assert not any("never run me" in str(r["body"]) for r in solo.backend_log())


def test_higher_priority_runs_first(solo: Solo) -> None:
    blocker = solo.submit(prompt="blocker two", max_tokens=80)
    wait_running(solo, blocker)
    low = [solo.submit(prompt=f"low {i}", max_tokens=2, priority=1) for i in range(3)]
    high = [solo.submit(prompt=f"high {i}", max_tokens=2, priority=8) for i in range(3)]
    with solo.client() as client:
        jobs = {j: wait_for_job(client, j) for j in low + high}
    order = sorted(jobs, key=lambda j: jobs[j]["started_at"])
    assert set(order[:3]) == set(high), [jobs[j]["priority"] for j in order]
