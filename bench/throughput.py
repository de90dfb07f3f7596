"""Throughput and added latency: reasonq in front of an OpenAI-protocol server vs calling it.

    python -m bench throughput                       (make bench NAME=throughput)
    python -m bench.throughput --backend-url http://gpu-box:8000 --model Qwen/Qwen3-8B

Runs, each against the same backend (by default a stand-in vLLM started here, modelling
continuous batching: ``--max-num-seqs`` running sequences, each engine step
``step_base + step_per_seq * running`` seconds, one token per sequence per step):

The client (direct or through reasonq) is httpx on ``runtimes.transport.StreamTransport``
and a uvloop loop, so that its own cost stays out of the figures.

- ``direct``: one asyncio httpx client keeping S requests in flight, as
  ``vllm bench serve`` does: request/s, output tokens/s, TTFT and TPOT p50/p99.
- ``reasonq``: the same N requests posted to the API (uvicorn subprocess, own
  redis-server), run by W Celery worker processes on the documented default settings;
  the client keeps S jobs outstanding, each submitted and awaited in one request
  (``POST /v1/jobs?wait=``).
  Added latency per job = client end-to-end minus ``result.timings.backend_s`` (measured
  by the worker around the backend call). TTFT through reasonq is the backend's TTFT plus
  all of the job's added latency (an upper bound); TPOT is the backend's.
- ``*-zero``: the same against a stand-in answering at once, isolating the queue's own
  cost per job: ``reasonq-zero-serial`` runs one job at a time (overhead per job),
  ``reasonq-zero`` keeps S outstanding (jobs/s; its latency is mostly waiting in line).
  Latency percentiles leave out the opening burst of S submissions (``added_p99_all_ms``
  keeps it).
- ``naive``: Celery prefork, concurrency 2 (one worker), for contrast; fewer requests.

Every request asks for a fixed-seed ``max_tokens`` (uniform 32..128) from a stand-in that
never stops earlier, so every run generates the same tokens. CPU seconds per process come
from /proc, so one can see which process would saturate first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvloop

from bench.common import write_results
from runtimes.transport import StreamTransport
from tests.cluster import RedisServer, Service, service_env, start_api, wait_until
from tests.standins.server_thread import StandInProcess

SYSTEM_PROMPT = "You are a helpful assistant."  # what the "chat" profile adds, sent direct too
TEMPERATURE, TOP_P = 0.7, 0.9  # the "chat" profile's sampling, sent direct too


@dataclass(frozen=True)
class Backend:
    """The stand-in's engine model (or ``url`` of a real server)."""

    max_num_seqs: int = 64
    step_base_s: float = 0.02
    step_per_seq_s: float = 0.0002
    min_tokens: int = 32
    max_tokens: int = 128
    url: str | None = None
    model: str | None = None

    def describe(self) -> str:
        if self.url:
            return f"real server {self.url} model {self.model}"
        return (
            f"stand-in vLLM: max_num_seqs {self.max_num_seqs}, step "
            f"{self.step_base_s * 1e3:g} ms + {self.step_per_seq_s * 1e3:g} ms/running seq, "
            f"outputs uniform {self.min_tokens}..{self.max_tokens} tokens (seed 0)"
        )

    def ideal_req_s(self) -> float:
        """Requests/s of the modelled engine kept full, with no client or queue cost."""
        mean_tokens = (self.min_tokens + self.max_tokens) / 2
        step = self.step_base_s + self.step_per_seq_s * self.max_num_seqs
        return self.max_num_seqs / (mean_tokens * step)


@dataclass
class Sample:
    """One request as the client saw it."""

    e2e_s: float
    ttft_s: float | None
    tokens: int
    backend_s: float | None = None  # reasonq only: the worker's time around the backend call
    ok: bool = True
    index: int = 0  # submission order; the first S go out together as one burst


def workload(n: int, backend: Backend, seed: int = 0) -> list[dict[str, Any]]:
    """N chat requests: distinct prompts, seeded ``max_tokens``."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Request {i}: reason step by step about problem {rng.randrange(10**6)}.",
            "max_tokens": rng.randint(backend.min_tokens, backend.max_tokens),
        }
        for i in range(n)
    ]


# --- clients -----------------------------------------------------------------------------
async def closed_loop(
    jobs: list[dict[str, Any]], concurrency: int, one: Callable[[dict], Awaitable[Sample]]
) -> tuple[list[Sample], float]:
    """Run ``one`` over ``jobs`` keeping ``concurrency`` in flight; (samples, wall seconds)."""
    queue = enumerate(jobs)
    samples: list[Sample] = []

    async def lane() -> None:
        for index, job in queue:
            sample = await one(job)
            sample.index = index
            samples.append(sample)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return samples, time.perf_counter() - began


def _client(base_url: str, timeout: float, concurrency: int) -> httpx.AsyncClient:
    """The harness's client, the same for every run: httpx on the workers' own transport
    (``runtimes.transport``), run on uvloop. On httpx's default transport the
    client spent 3.7 ms CPU per job, which showed up as 2 ms of reasonq's added latency
    (docs/performance.md)."""
    transport = StreamTransport(max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)


async def run_direct(url: str, model: str, jobs: list[dict], concurrency: int):
    """Stream chat completions straight from the backend."""
    async with _client(url, 600, concurrency) as c:

        async def one(job: dict) -> Sample:
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": job["prompt"]},
                ],
                "max_tokens": job["max_tokens"],
                "temperature": TEMPERATURE,
                "top_p": TOP_P,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            began = time.perf_counter()
            ttft, tokens, pieces = None, None, 0
            async with c.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return Sample(time.perf_counter() - began, None, 0, ok=False)
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    for choice in chunk.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            pieces += 1
                            if ttft is None:
                                ttft = time.perf_counter() - began
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return Sample(time.perf_counter() - began, ttft, tokens or pieces)

        return await closed_loop(jobs, concurrency, one)


async def run_reasonq(api_url: str, model: str | None, jobs: list[dict], concurrency: int):
    """Post each job and wait for its end in the same request (``POST /v1/jobs?wait=``),
    long-polling further should it outlast the wait."""
    async with _client(api_url, 120, concurrency) as c:

        async def one(job: dict) -> Sample:
            body = {"runtime": "vllm", "task_type": "chat", **job}
            if model:
                body["model"] = model
            began = time.perf_counter()
            created = await c.post("/v1/jobs", json=body, params={"wait": 60})
            created.raise_for_status()
            record = created.json()
            while record["status"] not in ("succeeded", "failed", "cancelled"):
                record = (await c.get(f"/v1/jobs/{record['id']}", params={"wait": 60})).json()
            e2e = time.perf_counter() - began
            result = record.get("result")
            if record["status"] != "succeeded" or not result:
                return Sample(e2e, None, 0, ok=False)
            timings = result["timings"]
            ttft = timings["time_to_first_token_s"]
            backend_s = timings["backend_s"]
            return Sample(
                e2e,
                None if ttft is None else ttft + (e2e - backend_s),
                result["usage"]["completion_tokens"],
                backend_s,
            )

        return await closed_loop(jobs, concurrency, one)


# --- processes ---------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) for every process we can read."""
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return table


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of processes and all their descendants."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    for name, roots in groups.items():
        total, stack = 0.0, list(roots)
        while stack:
            pid = stack.pop()
            if pid in table:
                total += table[pid][1]
                stack += children.get(pid, [])
        out[name] = total
    return out


def start_worker(
    name: str, env: dict[str, str], log_dir: Path, pool: list[str] | None = None
) -> Service:
    """A worker on the ``gpu`` queue, as ``make run`` starts it (-E: Flower needs events)."""
    hostname = f"{name}@{socket.gethostname()}"
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "gpu",
        "-E", "--hostname", hostname, "--loglevel", "WARNING", "--without-mingle",
        "--without-gossip", *(pool or []),
    ]
    worker = Service(name, argv, env, log_dir).start()
    import redis

    client = redis.Redis.from_url(env["REASONQ_REDIS_URL"])
    try:
        wait_until(
            lambda: client.exists(f"reasonq:worker:{hostname}") or not worker.alive(),
            60, f"worker {name}",
        )
    finally:
        client.close()
    if not worker.alive():
        raise RuntimeError(f"worker {name} died:\n{worker.log_tail()}")
    return worker


@contextmanager
def standin(backend: Backend, zero_latency: bool = False) -> Iterator[tuple[str, list[int]]]:
    """(url, pids) of the backend: a fresh stand-in, or the real server (no pids)."""
    if backend.url and not zero_latency:
        yield backend.url, []
        return
    args = [
        "--max-num-seqs", str(backend.max_num_seqs), "--step-base-s", str(backend.step_base_s),
        "--step-per-seq-s", str(backend.step_per_seq_s), "--output-len", "100000",
        "--max-model-len", "200000",
    ]
    proc = StandInProcess(
        "tests.standins.openai_server", *args, *(["--zero-latency"] if zero_latency else [])
    ).start()
    try:
        assert proc.proc is not None
        yield proc.url, [proc.proc.pid]
    finally:
        proc.stop()


@contextmanager
def reasonq_stack(
    backend_url: str, model: str | None, workers: int, log_dir: Path, naive: bool = False
) -> Iterator[tuple[str, dict[str, list[int]]]]:
    """redis-server, W workers and the API; yields (api url, pids per component)."""
    redis_server = RedisServer(log_dir).start()
    settings: dict[str, object] = {
        "runtime_queues": {"vllm": "gpu"},
        "vllm_url": backend_url,
        "worker_metrics_port": 0,
    }
    if model:
        settings["vllm_model"] = model
    if naive:
        settings["worker_concurrency"] = 2
    env = service_env(redis_server.url, **settings)
    pool = ["--pool", "prefork", "--concurrency", "2"] if naive else None
    started: list[Service] = []
    try:
        for i in range(1 if naive else workers):
            started.append(start_worker(f"bench{i}", env, log_dir, pool))
        api, url = start_api(env, log_dir)
        started.append(api)
        yield url, {
            "api": [api.pid],
            "workers": [w.pid for w in started[:-1]],
            "redis": [redis_server.pid],
        }
    finally:
        for service in reversed(started):
            service.stop()
        redis_server.stop()


# --- reporting ---------------------------------------------------------------------------
def _pct(values: list[float], q: float, scale: float = 1e3) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 2) if values else None


def summarise(
    name: str, samples: list[Sample], wall: float, concurrency: int, cpu: dict[str, float]
) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    # Latency percentiles leave out the opening burst of S submissions (steady state);
    # ``added_p99_all_ms`` keeps it.
    steady = [s for s in ok if s.index >= concurrency] or ok
    ttft = [s.ttft_s for s in steady if s.ttft_s is not None]
    tpot = []
    for s in steady:
        if s.ttft_s is not None and s.tokens > 1:
            span = s.backend_s - (s.ttft_s - (s.e2e_s - s.backend_s)) if s.backend_s else None
            tpot.append((span if span is not None else s.e2e_s - s.ttft_s) / (s.tokens - 1))
    added = [s.e2e_s - s.backend_s for s in steady if s.backend_s is not None]
    added_all = [s.e2e_s - s.backend_s for s in ok if s.backend_s is not None]
    row: dict[str, Any] = {
        "run": name,
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "in_flight": concurrency,
        "req_s": round(len(ok) / wall, 2),
        "out_tok_s": round(sum(s.tokens for s in ok) / wall, 1),
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "tpot_p50_ms": _pct(tpot, 50),
        "tpot_p99_ms": _pct(tpot, 99),
        "e2e_p50_ms": _pct([s.e2e_s for s in steady], 50),
        "added_p50_ms": _pct(added, 50),
        "added_p99_ms": _pct(added, 99),
        "added_p99_all_ms": _pct(added_all, 99),
    }
    n = max(1, len(samples))
    for part, seconds in cpu.items():
        row[f"cpu_{part}_ms_job"] = round(seconds / n * 1e3, 2)
    row["wall_s"] = round(wall, 1)
    return row


def measured(
    name: str, run: Awaitable, concurrency: int, pids: dict[str, list[int]]
) -> dict[str, Any]:
    before = {**cpu_seconds(pids), "client": time.process_time()}
    samples, wall = uvloop.run(run)
    after = {**cpu_seconds(pids), "client": time.process_time()}
    row = summarise(name, samples, wall, concurrency, {k: after[k] - before[k] for k in after})
    print(json.dumps(row), flush=True)
    return row


# --- the benchmark -----------------------------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="N per run (default 1000)")
    parser.add_argument("--concurrency", type=int, default=None, help="S (default max-num-seqs)")
    parser.add_argument("--workers", type=int, default=2, help="W worker processes (default 2)")
    parser.add_argument("--naive-requests", type=int, default=48, help="0 skips the naive run")
    parser.add_argument("--zero-requests", type=int, default=1000, help="0 skips zero-latency")
    parser.add_argument("--max-num-seqs", type=int, default=Backend.max_num_seqs)
    parser.add_argument("--step-base-s", type=float, default=Backend.step_base_s)
    parser.add_argument("--step-per-seq-s", type=float, default=Backend.step_per_seq_s)
    parser.add_argument("--backend-url", help="a real vLLM / Ollama (OpenAI API) server")
    parser.add_argument("--model", help="model name on --backend-url")
    parser.add_argument("--name", default="throughput", help="results file name")
    args = parser.parse_args(argv)
    if args.backend_url and not args.model:
        parser.error("--backend-url needs --model")
    backend = Backend(
        max_num_seqs=args.max_num_seqs, step_base_s=args.step_base_s,
        step_per_seq_s=args.step_per_seq_s, url=args.backend_url, model=args.model,
    )
    concurrency = args.concurrency or backend.max_num_seqs
    jobs = workload(args.requests, backend)
    model = args.model or "microsoft/Phi-4-mini-instruct"
    log_dir = Path(tempfile.mkdtemp(prefix="reasonq-bench-"))
    print(f"backend: {backend.describe()}", flush=True)
    print(f"N={args.requests} S={concurrency} W={args.workers}; logs in {log_dir}", flush=True)
    began = time.monotonic()
    rows: list[dict[str, Any]] = []

    with standin(backend) as (url, backend_pids):
        pids = {"backend": backend_pids}
        uvloop.run(run_direct(url, model, workload(concurrency, backend, 1), concurrency))
        rows.append(measured("direct", run_direct(url, model, jobs, concurrency), concurrency,
                             pids))
        with reasonq_stack(url, args.model, args.workers, log_dir) as (api, parts):
            uvloop.run(run_reasonq(api, None, workload(concurrency, backend, 1), concurrency))
            rows.append(measured("reasonq", run_reasonq(api, None, jobs, concurrency),
                                 concurrency, {**pids, **parts}))
        if args.naive_requests:
            with reasonq_stack(url, args.model, 1, log_dir, naive=True) as (api, parts):
                naive_jobs = jobs[: args.naive_requests]
                rows.append(measured("naive-prefork-2", run_reasonq(api, None, naive_jobs,
                                     concurrency), concurrency, {**pids, **parts}))
    if args.zero_requests:
        zero_jobs = workload(args.zero_requests, backend, 2)
        with standin(backend, zero_latency=True) as (url, backend_pids):
            pids = {"backend": backend_pids}
            rows.append(measured("direct-zero", run_direct(url, model, zero_jobs, concurrency),
                                 concurrency, pids))
            with reasonq_stack(url, None, args.workers, log_dir) as (api, parts):
                uvloop.run(run_reasonq(api, None, zero_jobs[:concurrency], concurrency))
                serial_jobs = zero_jobs[: max(1, args.zero_requests // 4)]
                rows.append(measured("reasonq-zero-serial", run_reasonq(api, None, serial_jobs,
                                     1), 1, {**pids, **parts}))
                rows.append(measured("reasonq-zero", run_reasonq(api, None, zero_jobs,
                                     concurrency), concurrency, {**pids, **parts}))

    by = {row["run"]: row for row in rows}
    direct, ours = by["direct"], by["reasonq"]
    ratios: dict[str, float | None] = {
        "throughput_vs_direct": round(ours["req_s"] / direct["req_s"], 3),
        "added_latency_ms_p50": ours["added_p50_ms"],
        "added_latency_ms_p99": ours["added_p99_ms"],
    }
    if "naive-prefork-2" in by:
        ratios["naive_throughput_vs_direct"] = round(
            by["naive-prefork-2"]["req_s"] / direct["req_s"], 3
        )
    if "reasonq-zero" in by:
        zero = by["reasonq-zero"]
        ratios["zero_latency_jobs_s"] = zero["req_s"]
        serial = by["reasonq-zero-serial"]
        ratios["zero_latency_overhead_ms_p50"] = serial["added_p50_ms"]
        ratios["zero_latency_overhead_ms_p99"] = serial["added_p99_ms"]
    targets = {
        "throughput_vs_direct >= 0.95": ratios["throughput_vs_direct"] >= 0.95,
        "added_latency_ms_p50 <= 5": (ours["added_p50_ms"] or 1e9) <= 5,
        "added_latency_ms_p99 <= 25": (ours["added_p99_ms"] or 1e9) <= 25,
    }
    extra = {
        "backend": backend.describe(),
        "ideal_req_s": None if backend.url else round(backend.ideal_req_s(), 2),
        "requests": args.requests,
        "concurrency": concurrency,
        "workers": args.workers,
        "targets_met": targets,
        "elapsed_s": round(time.monotonic() - began, 1),
    }
    write_results(args.name, rows, ratios, extra)
    print(f"backend: {backend.describe()}; ideal {extra['ideal_req_s']} req/s")
    for target, met in targets.items():
        print(f"target {target}: {'met' if met else 'MISSED'}")
    print(f"elapsed {extra['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
