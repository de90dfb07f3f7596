"""Redis killed (``kill -9``) and restarted mid-batch, with compose.yaml's persistence (AOF,
``appendfsync always``): every job answered 202 still ends; submissions during the outage
get a quick 503 with a reason; workers and the API reconnect by themselves."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core import apikeys
from tests.chaos.harness import (
    Cluster,
    echo_answer,
    echo_prompt,
    outcome,
    overlapping,
    prompt_of,
    report,
    standin_log,
    submit_all,
)

OUTAGE_S = 4.0
HANG_S = 10.0  # an answer slower than this during the outage counts as a hang


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("chaos-redis")),
        appendonly=True,
        # A lease outlives the outage: running jobs are renewed once Redis is back, not
        # redelivered (an outage longer than the lease reruns them, fenced: one answer).
        settings={
            "runtime_queues": {"vllm": "gpu"},
            "worker_concurrency": 16,
            "visibility_timeout_s": 10,
        },
    )
    try:
        step = ["--step-base-s", "0.05", "--step-per-seq-s", "0"]
        vllm = c.standin("vllm", "tests.standins.openai_server", *step)
        c.settings.update(vllm_url=vllm.url)
        c.worker("gpu-a", ["gpu"])
        c.worker("gpu-b", ["gpu"])
        c.api()
        yield c
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_redis_restart_loses_no_accepted_job(cluster: Cluster) -> None:
    rng = random.Random(7)
    prompts = [echo_prompt(f"job-{i}", rng.randint(10, 30)) for i in range(120)]
    answers: dict[int, tuple[int, float, dict]] = {}  # prompt index -> status, seconds, body
    stop = threading.Event()

    def submitter(worker: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=30) as client:
            for i in range(worker, len(prompts), 4):
                if stop.is_set():
                    return
                began = time.monotonic()
                try:
                    response = client.post(
                        "/v1/jobs", json={"prompt": prompts[i], "runtime": "vllm"}
                    )
                    answers[i] = (response.status_code, time.monotonic() - began, response.json())
                except httpx.HTTPError as exc:
                    answers[i] = (0, time.monotonic() - began, {"error": repr(exc)})
                time.sleep(0.08)

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    cluster.redis.kill()
    down_at = time.time()
    # During the outage: new submissions are refused quickly, and say why.
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        time.sleep(0.5)
        began = time.monotonic()
        during = client.post("/v1/jobs", json={"prompt": "during the outage", "runtime": "vllm"})
        during_s = time.monotonic() - began
        ready = client.get("/readyz")
    time.sleep(max(0.0, OUTAGE_S - (time.time() - down_at)))
    cluster.redis.start()
    up_at = time.time()
    for thread in threads:
        thread.join(60)
    stop.set()

    accepted = {i: body["id"] for i, (code, _, body) in answers.items() if code == 202}
    refused = {i: (code, body) for i, (code, _, body) in answers.items() if code != 202}
    slowest = max(s for _, s, _ in answers.values())
    jobs = cluster.wait_ended(accepted.values(), timeout=60)
    ended_at = time.time()
    # Workers and the API are back on their own: a fresh job runs, and a long-poll on it
    # answers when it ends (the API's event hub subscribed again).
    [after] = submit_all(cluster.url, [{"prompt": echo_prompt("after", 5), "runtime": "vllm"}])
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        polled = time.monotonic()
        after_job = client.get(f"/v1/jobs/{after}", params={"wait": 20}).json()
        poll_s = time.monotonic() - polled
    recovered_s = time.time() - up_at
    counts = outcome(jobs)
    log = standin_log(cluster.standins["vllm"])
    by_prompt: dict[str, list[dict]] = {}
    for record in log:
        by_prompt.setdefault(prompt_of(record), []).append(record)
    concurrent = sum(overlapping(r, time.time()) for r in by_prompt.values())

    report(
        "redis restarted",
        accepted=len(accepted),
        refused_503=sum(code == 503 for code, _ in refused.values()),
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        lost=counts["lost"],
        duplicated=concurrent,
        outage_s=up_at - down_at,
        all_ended_after_restart_s=ended_at - up_at,
        recovered_s=recovered_s,
        slowest_answer_s=slowest,
    )
    assert during.status_code == 503, during.text
    assert during.json()["code"] == "redis_unavailable" and during.json()["detail"]
    assert during_s < HANG_S
    assert ready.status_code == 503
    assert slowest < HANG_S, "a submission hung during the outage"
    assert all(code == 503 for code, _ in refused.values()), refused
    assert accepted and refused, "the outage did not overlap the batch"
    assert counts["lost"] == 0, f"{counts}\n{cluster.explain(jobs)}"
    assert counts["succeeded"] == len(accepted), {
        j: row.get("error") for j, row in jobs.items() if row.get("status") != "succeeded"
    }
    for i, job_id in accepted.items():
        row = jobs[job_id]
        assert row["result"] and echo_answer(prompts[i]) in row["result"]
    assert concurrent == 0
    assert after_job["status"] == "succeeded", cluster.logs()
    assert poll_s < 10, f"the long-poll missed the job's end ({poll_s:.1f} s)"
    assert all(w.alive() for w in cluster.workers.values()), "a worker died"


@pytest.mark.timeout(60)
def test_redis_down_with_auth_on_answers_503(cluster: Cluster) -> None:
    """With API keys on, the key lookup itself needs Redis: still a 503, not a 500."""
    url = cluster.api(auth_enabled="true")
    _, token = apikeys.create(cluster.r, "chaos")
    cluster.redis.kill()
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.get("/v1/jobs/abc", headers={"Authorization": f"Bearer {token}"})
    finally:
        cluster.redis.start()
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "redis_unavailable"
