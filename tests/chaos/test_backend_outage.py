"""A backend (vLLM or Ollama stand-in) killed for longer than the retry budget, then
restarted on the same port: jobs whose retries outlast the outage succeed, the others
fail with ``retryable: true``; no worker crashes, the broker redelivers nothing, and no
job has two generations in flight at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos.harness import (
    Cluster,
    echo_answer,
    echo_prompt,
    overlapping,
    prompt_of,
    report,
    standin_log,
    submit_all,
)

# Backend tries and backoff: waits of 0.5, 1, 2, 2, 2 s, each times U(0.5, 1), so a job
# gives up between 3.75 and 7.5 s after its first try.
RETRIES = {"retry_max_attempts": 6, "retry_backoff_s": 0.5, "retry_backoff_max_s": 2.0}
BUDGET_MIN_S, BUDGET_MAX_S = 3.75, 7.5
OUTAGE_S = BUDGET_MAX_S + 2.0  # from the kill to the restart's launch
STANDINS = {"vllm": "tests.standins.openai_server", "ollama": "tests.standins.ollama_server"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("chaos-backend")),
        settings={"runtime_queues": {"vllm": "gpu", "ollama": "cpu"}, **RETRIES},
    )
    try:
        step = ["--step-base-s", "0.05", "--step-per-seq-s", "0"]
        vllm = c.standin("vllm", STANDINS["vllm"], *step)
        ollama = c.standin("ollama", STANDINS["ollama"], *step, "--num-parallel", "16")
        c.settings.update(vllm_url=vllm.url, ollama_url=ollama.url)
        c.worker("gpu", ["gpu"])
        c.worker("cpu", ["cpu"])
        c.api()
        yield c
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("runtime", ["vllm", "ollama"])
def test_backend_outage(cluster: Cluster, runtime: str) -> None:
    standin = cluster.standins[runtime]
    pids = {name: w.pid for name, w in cluster.workers.items()}

    def jobs(tag: str, n: int, words: int = 10) -> tuple[list[str], list[str]]:
        prompts = [echo_prompt(f"{runtime}-{tag}-{i}", words) for i in range(n)]
        return prompts, submit_all(cluster.url, [{"prompt": p, "runtime": runtime} for p in prompts])

    inflight = jobs("inflight", 4, words=60)  # 3 s each: cut mid-stream by the kill
    time.sleep(0.8)
    before = standin_log(standin)
    assert standin.proc is not None
    standin.proc.kill()
    standin.proc.wait(5)
    down_at = time.time()
    time.sleep(0.3)
    early = jobs("early", 4)  # every retry falls inside the outage
    time.sleep(max(0.0, OUTAGE_S - (time.time() - down_at)))
    late = jobs("late", 4)  # retries still going when the backend is back
    standin.start()
    up_at = time.time()
    after = jobs("after", 4)
    everything = [*inflight[1], *early[1], *late[1], *after[1]]
    ended = cluster.wait_ended(everything, timeout=40)
    recovered_s = max(float(ended[j].get("finished_at", 0)) for j in late[1]) - up_at

    log = [*before, *standin_log(standin)]
    by_prompt: dict[str, list[dict]] = {}
    for record in log:
        by_prompt.setdefault(prompt_of(record), []).append(record)
    concurrent = sum(overlapping(records, down_at) for records in by_prompt.values())
    statuses = [ended[j].get("status") for j in everything]
    report(
        f"backend outage ({runtime})",
        accepted=len(everything),
        succeeded=statuses.count("succeeded"),
        failed=statuses.count("failed"),
        lost=sum(s not in {"succeeded", "failed", "cancelled"} for s in statuses),
        duplicated=concurrent,
        outage_s=up_at - down_at,
        retry_budget_s=f"{BUDGET_MIN_S}-{BUDGET_MAX_S}",
        late_jobs_done_after_s=recovered_s,
    )
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        public = {j: client.get(f"/v1/jobs/{j}").json() for j in everything}
    for job_id in [*inflight[1], *early[1]]:
        job = public[job_id]
        assert job["status"] == "failed", job
        assert job["error"]["retryable"] is True, job["error"]
        assert job["error"]["code"].startswith("backend_"), job["error"]
    for prompts, ids in (late, after):
        for prompt, job_id in zip(prompts, ids, strict=True):
            assert public[job_id]["status"] == "succeeded", public[job_id]
            assert public[job_id]["result"]["text"] == echo_answer(prompt)
    assert all(public[j]["attempts"] == 1 for j in everything), "the broker redelivered a job"
    assert concurrent == 0, "a job had two generations in flight at once"
    assert {n: w.pid for n, w in cluster.workers.items()} == pids
    assert all(w.alive() for w in cluster.workers.values()), "a worker crashed"
