"""The API killed (``kill -9``) and restarted mid-batch, and the client crashing too: the
batch script (``reasonq-submit``) rides out the API's restart with its retries, and run
again after its own crash it resumes: same Idempotency-Keys, same jobs, none twice."""

from __future__ import annotations

import csv
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Cluster, echo_answer, echo_prompt, outcome, report
from tests.cluster import ROOT, free_port

ROWS = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("chaos-api")),
        settings={"runtime_queues": {"vllm": "gpu"}, "worker_concurrency": 32},
    )
    try:
        step = ["--step-base-s", "0.05", "--step-per-seq-s", "0"]
        vllm = c.standin("vllm", "tests.standins.openai_server", *step)
        c.settings.update(vllm_url=vllm.url)
        c.worker("gpu", ["gpu"])
        c.api(port=free_port())
        yield c
    finally:
        c.close()


def batch_script(cluster: Cluster, rows: Path, out: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "scripts.submit_batch", str(rows), "-o", str(out),
        "--api", cluster.url, "--runtime", "vllm", "--concurrency", "16", "--wait", "5",
        "--no-progress",
    ]  # fmt: skip
    log = (cluster.log_dir / "submit.log").open("ab")
    return subprocess.Popen(
        argv, cwd=ROOT, env=cluster.env(), stdout=log, stderr=subprocess.STDOUT
    )


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_api_restart_and_client_resume(cluster: Cluster, tmp_path: Path) -> None:
    rng = random.Random(3)
    prompts = [echo_prompt(f"row-{i}", rng.randint(10, 30)) for i in range(ROWS)]
    rows, out = tmp_path / "rows.csv", tmp_path / "answers.csv"
    with rows.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt"])
        writer.writerows([p] for p in prompts)

    first = batch_script(cluster, rows, out)
    time.sleep(2.0)
    api = cluster.apis[-1]
    api.kill()
    down_at = time.monotonic()
    time.sleep(1.0)
    port = int(api.argv[api.argv.index("--port") + 1])
    cluster.api(port=port)
    api_restart_s = time.monotonic() - down_at
    time.sleep(2.0)
    first.send_signal(signal.SIGKILL)  # the client crashes mid-batch too
    first.wait(10)
    assert not out.exists(), "the first run finished before it was killed"
    before = set(cluster.job_ids())

    began = time.monotonic()
    second = batch_script(cluster, rows, out)
    assert second.wait(90) == 0, (cluster.log_dir / "submit.log").read_text()[-3000:]
    resume_s = time.monotonic() - began

    with out.open(newline="") as f:
        answers = list(csv.DictReader(f))
    job_ids = [a["job_id"] for a in answers]
    all_jobs = cluster.job_ids()
    jobs = cluster.jobs(all_jobs)
    counts = outcome({j: jobs[j] for j in job_ids})
    report(
        "api restarted",
        accepted=ROWS,
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        lost=counts["lost"],
        duplicated=len(all_jobs) - len(set(job_ids)),
        reused_by_resume=len(before & set(job_ids)),
        api_restart_s=api_restart_s,
        resume_s=resume_s,
    )
    assert [a["status"] for a in answers] == ["succeeded"] * ROWS
    assert [a["answer"] for a in answers] == [echo_answer(p) for p in prompts]
    assert len(set(job_ids)) == ROWS
    # Every job in Redis is one of the rows' jobs: none was submitted twice.
    assert sorted(all_jobs) == sorted(job_ids)
    # The resumed run found the jobs the first one had created, instead of new ones.
    assert before and before <= set(job_ids)
    assert all(int(jobs[j]["attempts"]) == 1 for j in job_ids)
