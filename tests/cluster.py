"""Real processes for tests and benchmarks: redis-server, Celery workers, the API on uvicorn.

Each runs as a subprocess on a free loopback port, so tests can stop, kill and restart
them. Nothing here fakes Redis or Celery.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from scripts.run_stack import API_KEEP_ALIVE
from tests.standins.server_thread import REPO_ROOT as ROOT
from tests.standins.server_thread import free_port


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval=0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # e.g. refused until the service listens
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


class Service:
    """A subprocess with its log kept in a file, for post-mortems of failed tests."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def redis_server_binary() -> str:
    """The system's redis-server, else the one `make deps` put in the virtualenv."""
    found = shutil.which("redis-server") or shutil.which(
        "redis-server", path=str(Path(sys.executable).parent)
    )
    if not found:
        raise RuntimeError("redis-server not found: run `make deps` (see README)")
    return found


class RedisServer(Service):
    def __init__(self, log_dir: Path, appendonly: bool = False, port: int | None = None):
        self.port = port or free_port()
        data = log_dir / f"redis-{self.port}"
        data.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if appendonly
            else ["--appendonly", "no"]
        )
        argv = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", str(data), *persistence,
        ]
        super().__init__(f"redis-{self.port}", argv, dict(os.environ), log_dir)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        super().start()
        client = redis.Redis.from_url(self.url)
        wait_until(client.ping, 10, "redis-server")
        client.close()
        return self


def service_env(redis_url: str, **settings: object) -> dict[str, str]:
    """Environment for a reasonq process: REASONQ_* settings from keyword arguments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONQ_")}
    env["REASONQ_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = str(ROOT)
    for name, value in settings.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        env[f"REASONQ_{name.upper()}"] = str(value)
    return env


def start_worker(
    name: str, queues: list[str], env: dict[str, str], log_dir: Path, timeout: float = 60
) -> Service:
    """A Celery worker process, returned once its heartbeat shows it consuming."""
    hostname = f"{name}@{socket.gethostname()}"
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "-Q", ",".join(queues), "-E", "--hostname", hostname, "--loglevel", "INFO",
        "--without-mingle", "--without-gossip",
    ]
    worker = Service(name, argv, env, log_dir).start()
    client = redis.Redis.from_url(env["REASONQ_REDIS_URL"])
    try:
        wait_until(
            lambda: client.exists(f"reasonq:worker:{hostname}") or not worker.alive(),
            timeout, f"worker {name}",
        )
    finally:
        client.close()
    if not worker.alive():
        raise RuntimeError(f"worker {name} died:\n{worker.log_tail()}")
    return worker


def start_api(env: dict[str, str], log_dir: Path, port: int | None = None) -> tuple[Service, str]:
    port = port or free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        *API_KEEP_ALIVE,
    ]
    api = Service(f"api-{port}", argv, env, log_dir).start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 30, "the API")
    return api, url


def start_flower(env: dict[str, str], log_dir: Path) -> tuple[Service, str]:
    """A real ``celery flower`` process, its API open as ``make run`` has it."""
    port = free_port()
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "flower",
        f"--port={port}", "--address=127.0.0.1",
    ]  # fmt: skip
    flower = Service(f"flower-{port}", argv, {**env, "FLOWER_UNAUTHENTICATED_API": "true"}, log_dir)
    flower.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthcheck").status_code == 200, 30, "Flower")
    except BaseException:
        flower.stop()
        raise
    return flower, url
