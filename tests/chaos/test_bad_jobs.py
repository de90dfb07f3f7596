"""Jobs that misbehave: one that takes its worker down every time it runs (poison) is
failed after ``REASONQ_MAX_ATTEMPTS`` deliveries, not redelivered forever; one whose
backend never answers (stuck) is failed at its deadline and frees its slot."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core import keys
from tests.chaos.harness import (
    Cluster,
    echo_answer,
    echo_prompt,
    prompt_of,
    report,
    standin_log,
    submit_all,
)
from tests.cluster import wait_until
from tests.standins.server_thread import StandInControl

MAX_ATTEMPTS = 3
LEASE = {"visibility_timeout_s": 4, "restore_interval_s": 1}
DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("chaos-bad-jobs")),
        settings={
            "runtime_queues": {"vllm": "gpu", "ollama": "solo"},
            "max_attempts": MAX_ATTEMPTS,
            **LEASE,
        },
    )
    try:
        step = ["--step-base-s", "0.05", "--step-per-seq-s", "0"]
        vllm = c.standin("vllm", "tests.standins.openai_server", *step)
        ollama = c.standin("ollama", "tests.standins.ollama_server", *step)
        c.settings.update(vllm_url=vllm.url, ollama_url=ollama.url)
        c.worker("victim", ["gpu"])
        c.worker("solo", ["solo"], worker_concurrency=1, job_deadline_s=DEADLINE_S)
        c.api()
        yield c
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_poison_job_is_failed_after_max_attempts(cluster: Cluster) -> None:
    """Models a job that crashes its worker: each time it starts running, ``kill -9``."""
    prompt = echo_prompt("poison", 200)  # 10 s: it is still running when the kill comes
    [job_id] = submit_all(cluster.url, [{"prompt": prompt, "runtime": "vllm"}])
    began = time.monotonic()
    kills = 0
    for attempt in range(1, MAX_ATTEMPTS + 1):
        # Running, and generating: its backend request for this delivery arrived.
        wait_until(
            lambda a=attempt: cluster.jobs([job_id])[job_id].get("attempts") == str(a)
            and cluster.jobs([job_id])[job_id]["status"] == "running"
            and len(poison_runs(cluster)) == a,
            30, f"delivery {attempt} of the poison job",
        )
        cluster.kill_worker("victim")
        kills += 1
        cluster.restart_worker("victim")
    job = cluster.wait_ended([job_id], timeout=30)[job_id]
    took = time.monotonic() - began
    # Its last delivery was acknowledged: nothing left to redeliver.
    wait_until(lambda: cluster.r.hlen("unacked") == 0, 10, "the last delivery's ack")
    queued = sum(cluster.r.llen(name) for name in keys.queue_lists("gpu"))
    # The worker it crashed runs the next job normally.
    healthy = echo_prompt("healthy", 5)
    [next_id] = submit_all(cluster.url, [{"prompt": healthy, "runtime": "vllm"}])
    next_job = cluster.wait_ended([next_id], timeout=30)[next_id]
    runs = poison_runs(cluster)
    report(
        "poison job",
        accepted=1,
        worker_kills=kills,
        status=job["status"],
        code=(job.get("error") or "").split('"code":"')[-1].split('"')[0],
        backend_runs=len(runs),
        redelivered_after=0 if queued == 0 else queued,
        seconds=took,
    )
    assert job["status"] == "failed", job
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        public = client.get(f"/v1/jobs/{job_id}").json()
    assert public["error"]["code"] == "poison_job"
    assert public["error"]["retryable"] is False
    assert f"died {MAX_ATTEMPTS} times" in public["error"]["message"]
    assert public["attempts"] == MAX_ATTEMPTS + 1  # the last delivery found it poison
    assert len(runs) == MAX_ATTEMPTS, "a backend run per delivery that crashed"
    assert queued == 0
    assert next_job["status"] == "succeeded"


@pytest.mark.timeout(60)
def test_stuck_job_fails_at_deadline_and_frees_its_slot(cluster: Cluster) -> None:
    control = StandInControl(cluster.standins["ollama"].url)
    control.reset()
    control.inject({"hang": True})  # the next generation never answers
    stuck, then = echo_prompt("stuck", 5), echo_prompt("after-stuck", 5)
    began = time.monotonic()
    # One slot: the second job waits for the stuck one to give it up.
    stuck_id, then_id = submit_all(
        cluster.url, [{"prompt": p, "runtime": "ollama"} for p in (stuck, then)], threads=1
    )
    jobs = cluster.wait_ended([stuck_id, then_id], timeout=30)
    took = time.monotonic() - began
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        a = client.get(f"/v1/jobs/{stuck_id}").json()
        b = client.get(f"/v1/jobs/{then_id}").json()
    held = cluster.r.zcard(keys.inflight("ollama"))
    log = {prompt_of(r): r for r in control.requests()}
    report(
        "stuck job",
        accepted=2,
        stuck=a["status"],
        code=(a.get("error") or {}).get("code"),
        next_job=b["status"],
        deadline_s=DEADLINE_S,
        stuck_run_s=(a["finished_at"] and jobs[stuck_id]["finished_at"])
        and float(jobs[stuck_id]["finished_at"]) - float(jobs[stuck_id]["started_at"]),
        slots_held_after=held,
        seconds=took,
    )
    assert a["status"] == "failed", a
    assert a["error"]["code"] == "deadline_exceeded" and a["error"]["retryable"] is True
    run_s = float(jobs[stuck_id]["finished_at"]) - float(jobs[stuck_id]["started_at"])
    assert DEADLINE_S <= run_s < DEADLINE_S + 3, run_s
    assert b["status"] == "succeeded", b
    assert b["result"]["text"] == echo_answer(then)
    assert float(jobs[then_id]["started_at"]) >= float(jobs[stuck_id]["finished_at"]) - 0.05
    assert log[stuck]["client_closed"] is True, "the hung request was left open"
    assert held == 0, "the stuck job's backend slot was not released"


def poison_runs(cluster: Cluster) -> list[dict]:
    return [r for r in standin_log(cluster.standins["vllm"]) if "poison" in prompt_of(r)]
