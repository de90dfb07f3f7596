"""A throw-away cluster per chaos scenario, and the bookkeeping that judges its jobs.

Each scenario gets its own redis-server, stand-ins, Celery workers and API (real
processes on loopback), so it can kill and restart any of them without touching the
session ``stack`` the other tests share. Every wait here is bounded in count and time.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from core import keys
from tests.cluster import (
    RedisServer,
    Service,
    service_env,
    start_api,
    start_worker,
)
from tests.standins.server_thread import StandInProcess

TERMINAL = {"succeeded", "failed", "cancelled"}

FIGURES: list[str] = []
"""One line per scenario; tests/chaos/conftest.py prints them at the end of the session."""

# Short leases keep the suite short; the bound they give is what the scenarios check.
FAST_LEASES = {"visibility_timeout_s": 6, "restore_interval_s": 1}


def report(scenario: str, **figures: Any) -> str:
    """Record (and print) a scenario's one-line figure."""
    parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
    line = f"{scenario}: " + " ".join(parts)
    FIGURES.append(line)
    print(line, flush=True)
    return line


def echo_prompt(tag: str, words: int) -> str:
    """A prompt the stand-ins answer with exactly ``words`` tokens (one engine step each),
    so a job's length, and its answer, are known in advance."""
    return "echo: " + tag + "".join(f" w{i}" for i in range(words - 1))


def echo_answer(prompt: str) -> str:
    return "".join(" " + w for w in prompt[len("echo:") :].split())


@dataclass
class Cluster:
    """redis-server + stand-ins + workers + APIs, restartable one by one."""

    log_dir: Path
    appendonly: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    redis: RedisServer = field(init=False)
    standins: dict[str, StandInProcess] = field(default_factory=dict)
    workers: dict[str, Service] = field(default_factory=dict)
    _worker_queues: dict[str, list[str]] = field(default_factory=dict)
    apis: list[Service] = field(default_factory=list)
    url: str = ""
    """The API most recently started."""

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.log_dir, appendonly=self.appendonly).start()
        self.r = redis.Redis.from_url(self.redis.url, socket_timeout=10)

    # --- processes ------------------------------------------------------------------
    def standin(self, name: str, module: str, *args: str) -> StandInProcess:
        proc = StandInProcess(module, *args).start()
        self.standins[name] = proc
        return proc

    def env(self, **overrides: Any) -> dict[str, str]:
        settings = {"worker_metrics_port": 0, **FAST_LEASES, **self.settings, **overrides}
        return service_env(self.redis.url, **settings)

    def worker(self, name: str, queues: list[str], **overrides: Any) -> Service:
        worker = start_worker(name, queues, self.env(**overrides), self.log_dir)
        self.workers[name] = worker
        self._worker_queues[name] = queues
        return worker

    def kill_worker(self, name: str) -> float:
        """``kill -9`` the worker's process group; returns when it died (``time.time()``)."""
        worker = self.workers[name]
        assert worker.alive(), f"worker {name} already dead:\n{worker.log_tail()}"
        assert not child_pids(worker.pid), "a worker with pool children: kill those too"
        worker.kill()
        return time.time()

    def restart_worker(self, name: str) -> Service:
        """Start a dead worker again under the same name, queues and settings."""
        worker = self.workers[name]
        assert not worker.alive()
        hostname = worker.argv[worker.argv.index("--hostname") + 1]
        self.r.delete(keys.worker(hostname))  # the dead one's heartbeat would look ready
        restarted = start_worker(name, self._worker_queues[name], worker.env, self.log_dir)
        self.workers[name] = restarted
        return restarted

    def api(self, port: int | None = None, **overrides: Any) -> str:
        service, self.url = start_api(self.env(**overrides), self.log_dir, port)
        self.apis.append(service)
        return self.url

    def close(self) -> None:
        for api in self.apis:
            api.stop(timeout=5)
        for worker in self.workers.values():
            worker.stop(timeout=10)
        for standin in self.standins.values():
            standin.stop()
        self.redis.stop(timeout=5)
        self.r.close()

    # --- jobs -----------------------------------------------------------------------
    def jobs(self, job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """The job hashes, read straight from Redis (one round trip)."""
        job_ids = list(job_ids)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.job(job_id))
            rows = pipe.execute()
        return {
            job_id: {k.decode(): v.decode() for k, v in row.items()}
            for job_id, row in zip(job_ids, rows, strict=True)
        }

    def job_ids(self) -> list[str]:
        """Every job in this cluster's Redis."""
        prefix = keys.job("")
        return [k.decode()[len(prefix) :] for k in self.r.scan_iter(f"{prefix}*", count=1000)]

    def wait_ended(
        self, job_ids: Iterable[str], timeout: float, on_tick: Callable[[], None] | None = None
    ) -> dict[str, dict[str, str]]:
        """Job hashes once every job ended, or at ``timeout`` (whatever state they are in)."""
        job_ids = list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            try:
                jobs = self.jobs(job_ids)
            except redis.ConnectionError:
                jobs = {}
            if jobs and all(j.get("status") in TERMINAL for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                return jobs
            if on_tick is not None:
                on_tick()
            time.sleep(0.1)

    def explain(self, jobs: dict[str, dict[str, str]]) -> str:
        """Jobs that did not end, with every log line naming them and the broker's view."""
        out = []
        for job_id, row in jobs.items():
            if row.get("status") in TERMINAL:
                continue
            out.append(f"--- job {job_id}: {row}")
            for service in [*self.workers.values(), *self.apis]:
                text = service.log_path.read_text(errors="replace")
                out += [f"{service.name}: {line}" for line in text.splitlines() if job_id in line]
            out.append(f"queued: {self.r.llen('gpu')} unacked: {self.r.hlen('unacked')}")
        return "\n".join(out)

    def republished(self) -> set[str]:
        """Jobs the orphan sweep published again, from the workers' logs."""
        found = set()
        for worker in self.workers.values():
            for line in worker.log_path.read_text(errors="replace").splitlines():
                if "its message was lost" in line:
                    found.add(line.split("job ", 1)[1].split(":", 1)[0])
        return found

    def logs(self) -> str:
        """Tails of every process log, for an assertion message."""
        services = [*self.workers.values(), *self.apis, self.redis]
        return "\n".join(f"--- {s.name}\n{s.log_tail(25)}" for s in services)


def child_pids(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux /proc), e.g. a prefork pool's children."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def submit(
    client: httpx.Client, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/jobs", json=body, headers=headers)


def submit_all(
    url: str, bodies: list[dict[str, Any]], threads: int = 8, keys_: list[str] | None = None
) -> list[str]:
    """Submit every body (202 expected), a few at a time; the job ids in order."""

    def one(i: int) -> str:
        with httpx.Client(base_url=url, timeout=30) as client:
            response = submit(client, bodies[i], keys_[i] if keys_ else None)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(bodies))))


def standin_log(standin: StandInProcess) -> list[dict[str, Any]]:
    return httpx.get(f"{standin.url}/_standin/requests", timeout=10).json()


def prompt_of(record: dict[str, Any]) -> str:
    """The user prompt of a logged generation request (vLLM or Ollama body)."""
    body = record["body"]
    messages = body.get("messages") or [{"role": "user", "content": body.get("prompt", "")}]
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def overlapping(records: list[dict[str, Any]], now: float) -> bool:
    """Whether two of these requests (one job's) were being served at the same time."""
    spans = sorted((r["received_at"], r["ended_at"] or now) for r in records)
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def outcome(jobs: dict[str, dict[str, str]]) -> dict[str, int]:
    """Counts by final status; ``lost`` = not ended (or gone)."""
    counts = {"succeeded": 0, "failed": 0, "cancelled": 0, "lost": 0}
    for job in jobs.values():
        status = job.get("status")
        counts[status if status in TERMINAL else "lost"] += 1
    return counts


def shuffled(items: list[Any], seed: int) -> list[Any]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def loads(value: str | None) -> Any:
    return json.loads(value) if value else None
