"""Prometheus metrics move as real jobs run: the API's /metrics (its own counters, plus queue
depth and jobs finished read from Redis) and a worker's metrics port.

A second API and a worker with a metrics port run on the stack's Redis: runtime `ollama` is
routed to that worker's queue, `vllm` to a queue nobody consumes (its messages wait)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from core import keys
from tests.cluster import free_port, service_env, start_api, start_worker
from tests.conftest import ROUTING, Stack, wait_for_job

METERED, PARKED = "metered", "parked-metrics"


@dataclass
class Metered:
    api_url: str
    worker_metrics_url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=30)


@pytest.fixture(scope="module")
def metered(stack: Stack) -> Iterator[Metered]:
    port = free_port()
    routing = {**ROUTING, "ollama": METERED, "vllm": PARKED}
    env = service_env(
        stack.redis.url, runtime_queues=routing, ollama_url=stack.ollama.url,
        worker_metrics_port=port,
    )  # fmt: skip
    worker = start_worker("metered", [METERED], env, stack.log_dir)
    api, url = start_api(env, stack.log_dir)
    yield Metered(url, f"http://127.0.0.1:{port}/metrics")
    api.stop()
    worker.stop()
    client = redis.Redis.from_url(stack.redis.url)
    client.delete(*keys.queue_lists(PARKED))
    client.close()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_match_the_jobs_run(metered: Metered) -> None:
    api_url = f"{metered.api_url}/metrics"
    api_before, worker_before = scrape(api_url), scrape(metered.worker_metrics_url)
    with metered.client() as client:
        created = [
            client.post("/v1/jobs", json={"prompt": f"Count to {n}.", "runtime": "ollama"})
            for n in range(3)
        ]
        assert [r.status_code for r in created] == [202] * 3
        jobs = [wait_for_job(client, r.json()["id"]) for r in created]
    assert [job["status"] for job in jobs] == ["succeeded"] * 3
    api_after, worker_after = scrape(api_url), scrape(metered.worker_metrics_url)

    ollama = {"runtime": "ollama"}
    succeeded = {"status": "succeeded", "runtime": "ollama"}
    assert delta(api_before, api_after, "reasonq_jobs_submitted_total", **ollama) == 3
    assert delta(api_before, api_after, "reasonq_jobs_finished_total", **succeeded) == 3
    post = {"method": "POST", "route": "/v1/jobs", "status": "202"}
    assert delta(api_before, api_after, "reasonq_http_requests_total", **post) == 3
    get = {"method": "GET", "route": "/v1/jobs/{job_id}"}
    assert delta(api_before, api_after, "reasonq_http_request_seconds_count", **get) >= 3

    assert delta(worker_before, worker_after, "reasonq_jobs_total", **succeeded) == 3
    for histogram in ("reasonq_queue_wait_seconds", "reasonq_run_seconds",
                      "reasonq_time_to_first_token_seconds"):  # fmt: skip
        assert delta(worker_before, worker_after, f"{histogram}_count", **ollama) == 3, histogram
    tokens = sum(job["result"]["usage"]["completion_tokens"] for job in jobs)
    assert delta(worker_before, worker_after, "reasonq_tokens_generated_total", **ollama) == tokens

    text = httpx.get(api_url).text + httpx.get(metered.worker_metrics_url).text
    assert not any(job["id"] in text for job in jobs), "a job id became a label"


def test_queue_depth_counts_waiting_messages(metered: Metered) -> None:
    api_url = f"{metered.api_url}/metrics"
    before = scrape(api_url)
    with metered.client() as client:
        # Different priorities land in different priority lists of the queue.
        created = [
            client.post("/v1/jobs", json={"prompt": "Wait.", "runtime": "vllm", "priority": p})
            for p in (0, 5, 9, 9)
        ]
        assert [r.status_code for r in created] == [202] * 4
        after = scrape(api_url)
        assert delta(before, after, "reasonq_queue_depth", queue=PARKED) == 4
        assert (("reasonq_queue_depth", frozenset({"queue": METERED}.items())) in after)
        for response in created:
            client.delete(f"/v1/jobs/{response.json()['id']}")
    cancelled = scrape(api_url)
    # Cancelled jobs are tallied at once, though their messages still wait to be skipped.
    finished = {"status": "cancelled", "runtime": "vllm"}
    assert delta(after, cancelled, "reasonq_jobs_finished_total", **finished) == 4
    assert delta(before, cancelled, "reasonq_queue_depth", queue=PARKED) == 4
