"""Cancel and priority, on a worker with a single slot so jobs really wait in the queue;
also cancelling through Flower (Revoke, Terminate), which goes by Celery's revoke."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import Service, service_env, start_api, start_flower, start_worker, wait_until
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


@pytest.fixture(scope="module")
def flower(stack: Stack) -> Iterator[str]:
    service, url = start_flower(service_env(stack.redis.url), stack.log_dir)
    yield url
    service.stop()


def flower_revoke(flower: str, job_id: str, terminate: bool) -> None:
    response = httpx.post(
        f"{flower}/api/task/revoke/{job_id}", data={"terminate": str(terminate).lower()}
    )
    assert response.status_code == 200, response.text


def flower_state(flower: str, job_id: str) -> str | None:
    return httpx.get(f"{flower}/api/task/info/{job_id}", timeout=10).json().get("state")


def test_flower_revoke_cancels_a_queued_job(solo: Solo, flower: str) -> None:
    # Celery drops a revoked message unrun; the job must not stay `queued` for good.
    blocker = solo.submit(prompt="blocker three", max_tokens=2000)
    wait_running(solo, blocker)
    queued = solo.submit(prompt="revoked before it ran")
    flower_revoke(flower, queued, terminate=False)
    with solo.client() as client:
        assert client.delete(f"/v1/jobs/{blocker}").json()["status"] == "cancelled"
        job = wait_for_job(client, queued, timeout=10)
    assert job["status"] == "cancelled" and job["started_at"] is None, job
    assert not any("revoked before it ran" in str(r["body"]) for r in solo.backend_log())
    wait_until(lambda: flower_state(flower, queued) == "REVOKED", 10, "Flower: REVOKED")


def test_flower_terminate_stops_a_running_job(solo: Solo, flower: str) -> None:
    job_id = solo.submit(prompt="terminate me", max_tokens=2000)  # ~20 s unless stopped
    wait_running(solo, job_id)
    began = time.monotonic()
    flower_revoke(flower, job_id, terminate=True)
    with solo.client() as client:
        job = wait_for_job(client, job_id, timeout=10)
        took = time.monotonic() - began
        assert job["status"] == "cancelled", job
        assert job["result"]["finish_reason"] == "cancelled"
        assert took < 3, f"terminate took {took:.1f} s"
        # The worker lives on: its one slot runs the next job.
        after = solo.submit(prompt="after the terminate", max_tokens=4)
        assert wait_for_job(client, after)["status"] == "succeeded"
    wait_until(lambda: flower_state(flower, after) == "SUCCESS", 10, "Flower: next job")
    assert flower_state(flower, job_id) == "REVOKED"  # not SUCCESS once its run returned
    record = next(r for r in solo.backend_log() if "terminate me" in str(r["body"]))
    assert record["client_closed"] is True
