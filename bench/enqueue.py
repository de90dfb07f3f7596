"""Bulk enqueue: a large CSV through ``POST /v1/batches``, and ``reasonq-submit``'s overhead.

    python -m bench enqueue                  (python -m bench.enqueue --rows 20000)

- ``batch-upload``: a ``--rows`` CSV (default 100,000) posted to the API (uvicorn
  subprocess, own redis-server, no workers, so only enqueueing is timed): rows enqueued per
  second, and the API process's peak RSS (``VmHWM``) while it ingests.
- ``bare-httpx`` / ``reasonq-submit``: ``--script-rows`` rows (default 2,000) run to their
  end through a Celery worker and a zero-latency vLLM stand-in, once by a bare asyncio httpx
  loop (POST, then ``GET ?wait=`` until done, same concurrency) and once by the script
  (in-process, no progress bar); their ratio is the script's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import write_results
from tests.cluster import RedisServer, service_env, start_api, start_worker
from tests.standins.server_thread import StandInProcess

ROUTING = {"vllm": "gpu", "onnx": "cpu", "ollama": "cpu"}


def write_problems(path: Path, rows: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt", "source"])
        for i in range(rows):
            writer.writerow([f"p{i}", f"Problem {i}: what is {i} times {i % 97}?", "bench"])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def batch_upload(rows: int, work: Path) -> dict[str, Any]:
    """Enqueue rate and API peak memory for one ``rows``-row upload."""
    problems = work / "problems.csv"
    write_problems(problems, rows)
    redis_server = RedisServer(work).start()
    api = None
    try:
        env = service_env(redis_server.url, runtime_queues=ROUTING, max_upload_bytes=2**30)
        api, url = start_api(env, work)
        rss_idle = peak_rss_mb(api.pid)
        with problems.open("rb") as f, httpx.Client(base_url=url, timeout=600) as client:
            start = time.perf_counter()
            response = client.post(
                "/v1/batches", files={"file": ("problems.csv", f, "text/csv")},
                data={"runtime": "vllm", "id_column": "id"},
            )
            elapsed = time.perf_counter() - start
        response.raise_for_status()
        batch = response.json()
        assert batch["counts"]["submitted"] == rows, batch["counts"]
        queued = redis.Redis.from_url(redis_server.url).llen("gpu")  # kombu's priority lists
        return {
            "run": "batch-upload",
            "rows": rows,
            "seconds": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed, 1),
            "api_rss_idle_mb": round(rss_idle, 1),
            "api_peak_rss_mb": round(peak_rss_mb(api.pid), 1),
            "file_mb": round(problems.stat().st_size / 2**20, 1),
            "queue_len_default_priority": queued,
        }
    finally:
        if api:
            api.stop()
        redis_server.stop()


async def bare_loop(url: str, rows: list[str], concurrency: int) -> None:
    """What a user would write without the script: POST each row, long-poll its end."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        todo = iter(rows)

        async def worker() -> None:
            for prompt in todo:
                job = (await client.post("/v1/jobs", json={"prompt": prompt, "runtime": "vllm"}))
                job = job.json()
                while job["status"] not in {"succeeded", "failed", "cancelled"}:
                    reply = await client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})
                    job = reply.json()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def script_overhead(rows: int, concurrency: int, work: Path) -> list[dict[str, Any]]:
    from scripts.submit_batch import main as submit

    redis_server = RedisServer(work).start()
    backend = StandInProcess("tests.standins.openai_server", "--zero-latency").start()
    services = []
    try:
        env = service_env(redis_server.url, runtime_queues=ROUTING, vllm_url=backend.url,
                          worker_metrics_port=0)
        services.append(start_worker("gpu", ["gpu"], env, work))
        api, url = start_api(env, work)
        services.append(api)
        out = []
        for run in ("bare-httpx", "reasonq-submit"):
            problems = work / f"{run}.csv"
            write_problems(problems, rows)
            prompts = [f"{run} {i}" for i in range(rows)]
            start = time.perf_counter()
            if run == "bare-httpx":
                asyncio.run(bare_loop(url, prompts, concurrency))
            else:
                status = submit([
                    str(problems), "-o", str(work / "answers.csv"), "--api", url,
                    "--runtime", "vllm", "--concurrency", str(concurrency), "--no-progress",
                ])
                assert status == 0, status
            elapsed = time.perf_counter() - start
            out.append({"run": run, "rows": rows, "seconds": round(elapsed, 2),
                        "rows_per_s": round(rows / elapsed, 1)})
        return out
    finally:
        for service in services:
            service.stop()
        backend.stop()
        redis_server.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--script-rows", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as tmp:
        upload = batch_upload(args.rows, Path(tmp))
        script = script_overhead(args.script_rows, args.concurrency, Path(tmp))
    bare, ours = script
    write_results(
        "enqueue",
        [upload, *script],
        ratios={
            "enqueue_rows_per_s": upload["rows_per_s"],
            "api_peak_rss_mb": upload["api_peak_rss_mb"],
            "script_vs_bare_httpx_time": round(ours["seconds"] / bare["seconds"], 3),
        },
        extra={"targets": {"enqueue_rows_per_s": ">= 2000", "api_peak_rss_mb": "< 300"}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
