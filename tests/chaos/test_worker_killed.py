"""Workers killed mid-batch: every job still succeeds, once, within the redelivery bound.

The workers run Celery's threads pool: one process holds every running job, with no pool
child to lose on its own, so the process is the unit that dies here (``kill -9`` of its
process group; ``Cluster.kill_worker`` asserts it has no children). Its unacknowledged
messages wait out the visibility timeout, then a live worker's restore sweep puts them
back in the queue: redelivery within ``visibility_timeout_s + restore_interval_s`` of the
crash, plus the wait for a free slot. A job longer than the visibility timeout on a live
worker is never redelivered, because the worker renews its lease.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core import keys
from tests.chaos.harness import (
    FAST_LEASES,
    TERMINAL,
    Cluster,
    echo_answer,
    echo_prompt,
    loads,
    outcome,
    overlapping,
    prompt_of,
    report,
    standin_log,
    submit_all,
)

JOBS = 200
STEP_S = 0.1  # one token per engine step: a job of n words runs n * 0.1 s
SLOTS = 40  # per worker: 200 jobs are in flight across two workers in a few waves
BOUND_S = FAST_LEASES["visibility_timeout_s"] + FAST_LEASES["restore_interval_s"]
SLACK_S = 4.0  # a free slot, a busy 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("chaos-workers")),
        settings={
            "runtime_queues": {"vllm": "gpu", "ollama": "cpu"},
            "worker_concurrency": SLOTS,
            "max_attempts": 5,  # a job may sit on both victims; poison is another test
        },
    )
    try:
        step = ["--step-base-s", str(STEP_S), "--step-per-seq-s", "0"]
        vllm = c.standin("vllm", "tests.standins.openai_server", *step, "--max-num-seqs", "256")
        ollama = c.standin("ollama", "tests.standins.ollama_server", *step)
        c.settings.update(vllm_url=vllm.url, ollama_url=ollama.url)
        c.worker("gpu-a", ["gpu"])
        c.worker("gpu-b", ["gpu"])
        c.worker("steady", ["cpu"])  # never killed: runs the long job
        c.api()
        yield c
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_workers_lose_nothing(cluster: Cluster) -> None:
    url = cluster.url
    rng = random.Random(20240611)
    # The long job: 90 tokens = 9 s on the worker nobody kills, longer than the 6 s lease.
    long_prompt = echo_prompt("long-job", 90)
    [long_id] = submit_all(url, [{"prompt": long_prompt, "runtime": "ollama"}])
    prompts = [echo_prompt(f"job-{i}", rng.randint(10, 30)) for i in range(JOBS)]
    bodies = [{"prompt": p, "runtime": "vllm", "max_tokens": 64} for p in prompts]
    began = time.time()
    submitted: list[str] = []
    submitter = threading.Thread(target=lambda: submitted.extend(submit_all(url, bodies)))
    submitter.start()

    # Two kills at random moments of the batch, each of a random gpu worker, restarted a
    # moment later.
    kills: list[float] = []
    for _ in range(2):
        time.sleep(rng.uniform(1.0, 4.0))
        kills.append(cluster.kill_worker(victim := rng.choice(["gpu-a", "gpu-b"])))
        time.sleep(rng.uniform(0.2, 1.0))
        cluster.restart_worker(victim)
    submitter.join(60)
    assert not submitter.is_alive() and len(submitted) == JOBS, "submission failed"
    job_ids = submitted

    jobs = cluster.wait_ended([*job_ids, long_id], timeout=60)
    took = time.time() - began
    long_job = jobs.pop(long_id)
    counts = outcome(jobs)

    # The backend's view: a kill cuts a generation (the worker's connection resets), and
    # the job's next generation begins once its message was redelivered.
    by_prompt: dict[str, list[dict]] = {}
    for record in standin_log(cluster.standins["vllm"]):
        by_prompt.setdefault(prompt_of(record), []).append(record)
    now = time.time()
    redelivery: list[float] = []
    for records in by_prompt.values():
        records.sort(key=lambda r: r["received_at"])
        for cut, after in itertools.pairwise(records):
            killed_at = max((k for k in kills if k <= (cut["ended_at"] or now) + 0.5), default=0)
            if cut["client_closed"] and killed_at:
                redelivery.append(after["received_at"] - killed_at)
    concurrent = sum(overlapping(records, now) for records in by_prompt.values())
    finished_twice = sum(
        sum(r["status"] == 200 and not r["client_closed"] for r in records) > 1
        for records in by_prompt.values()
    )
    runs = {j: int(row.get("attempts", 0)) for j, row in jobs.items()}
    long_requests = [r for r in standin_log(cluster.standins["ollama"]) if "long-job" in str(r)]
    lost = {j: row for j, row in jobs.items() if row.get("status") not in TERMINAL}
    # A message taken by a worker that died before recording the delivery (kombu's BRPOP ->
    # unacked window) was published again by the orphan sweep (workers/orphans.py).
    orphans = sorted(cluster.republished() & set(jobs))

    report(
        "worker killed",
        accepted=JOBS,
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        lost=counts["lost"],
        duplicated=concurrent,
        redelivered=sum(n > 1 for n in runs.values()),
        orphans_republished=len(orphans),
        rerun_after_finish=finished_twice,
        redelivery_s=f"{min(redelivery, default=0):.1f}-{max(redelivery, default=0):.1f}",
        bound_s=BOUND_S,
        long_job_runs=len(long_requests),
        batch_s=took,
    )
    assert counts == {"succeeded": JOBS, "failed": 0, "cancelled": 0, "lost": 0}, (
        f"{counts}\n{cluster.explain(lost)}"
    )
    for job_id, prompt in zip(job_ids, prompts, strict=True):
        with httpx.Client(base_url=url, timeout=10) as client:
            job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded"
        assert job["result"]["text"] == echo_answer(prompt)
    assert concurrent == 0, "a job ran twice at the same time"
    assert redelivery, "no kill hit a running job: nothing was redelivered"
    assert max(redelivery) <= BOUND_S + SLACK_S, sorted(redelivery)
    # A lease renewed every visibility_timeout / 4 is not restored much before it expires.
    assert min(redelivery) >= FAST_LEASES["visibility_timeout_s"] * 0.75 - 0.5, redelivery
    # The long job, 9 s on a live worker with a 6 s lease, ran exactly once.
    assert long_job["status"] == "succeeded", long_job
    assert long_job["attempts"] == "1"
    assert len(long_requests) == 1, long_requests


@pytest.mark.timeout(60)
def test_message_lost_while_taken_is_published_again(cluster: Cluster) -> None:
    """The window above, made certain: a worker took the message (BRPOP) and died before
    recording the delivery. Here the message is taken by hand from a queue nobody serves
    yet; the worker started next finds the job orphaned and publishes it again."""
    url = cluster.api(runtime_queues={"vllm": "lonely"})
    prompt = echo_prompt("orphan", 5)
    [job_id] = submit_all(url, [{"prompt": prompt, "runtime": "vllm"}])
    taken = cluster.r.rpop(keys.queue_lists("lonely")[9 - 5])
    assert taken and job_id.encode() in taken
    taken_at = time.time()
    cluster.worker("lonely", ["lonely"], runtime_queues={"vllm": "lonely"})
    job = cluster.wait_ended([job_id], timeout=40)[job_id]
    recovered_s = float(job.get("finished_at", 0)) - taken_at
    bound_s = FAST_LEASES["visibility_timeout_s"] + 2 * FAST_LEASES["restore_interval_s"]
    report("message lost while taken", accepted=1, status=job.get("status"),
           recovered_s=recovered_s, bound_s=bound_s)  # fmt: skip
    assert job.get("status") == "succeeded", cluster.explain({job_id: job})
    assert loads(job["result"])["text"] == echo_answer(prompt)
    assert job["attempts"] == "1"
    assert recovered_s <= bound_s + SLACK_S
