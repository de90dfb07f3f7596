"""`make run`: Redis (if none answers), the API, one `cpu` worker and Flower, supervised.

A process that dies is restarted (with a growing delay if it keeps dying), as compose's
``restart:`` policy does in a deployment. Ctrl-C stops everything: workers get a warm
shutdown, so jobs they run finish or go back to the queue.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import redis

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# Idle connections outlive clients' own keep-alive expiry (httpx: 5 s, uvicorn's default
# too), so a client never sends a request on a connection the server is just closing.
API_KEEP_ALIVE = ["--timeout-keep-alive", "65"]
BIN = Path(sys.executable).parent


@dataclass
class Supervised:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, start_new_session=True)
        print(f"[run] {self.name} started (pid {self.proc.pid})", flush=True)

    def check(self) -> None:
        """Restart the process if it exited; back off up to 30 s when it keeps dying."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if not self.next_start:
            delay = min(30.0, 0.5 * 2**min(self.restarts, 6))
            print(
                f"[run] {self.name} exited with {self.proc.returncode}; "
                f"restarting in {delay:.1f} s",
                flush=True,
            )
            self.next_start = now + delay
        elif now >= self.next_start:
            self.restarts += 1
            self.next_start = 0.0
            self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def redis_binary() -> str:
    found = shutil.which("redis-server") or BIN / "redis-server"
    if not Path(found).exists():
        sys.exit("no redis-server: run `make deps`, or set REASONQ_REDIS_URL to a running Redis")
    return str(found)


def local_redis(settings: Settings) -> Supervised | None:
    """A Redis for the stack when none answers at the configured loopback URL."""
    try:
        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1).ping()
        print(f"[run] using the Redis at {settings.redis_url}", flush=True)
        return None
    except redis.RedisError:
        pass
    url = urlparse(settings.redis_url)
    if url.hostname not in {"127.0.0.1", "localhost", "::1"}:
        sys.exit(f"Redis at {settings.redis_url} does not answer")
    data = settings.data_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # Same durability as compose.yaml: every acknowledged write is fsynced before the reply.
    argv = [
        redis_binary(), "--port", str(url.port or 6379), "--bind", "127.0.0.1",
        "--dir", str(data), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
    ]
    return Supervised("redis", argv)


def main() -> int:
    os.environ.setdefault("REASONQ_RUNTIME_QUEUES", '{"onnx": "cpu", "ollama": "cpu"}')
    settings = Settings()
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "workers.celery_app"]
    flower_env = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true")
    services = [
        s
        for s in (
            local_redis(settings),
            Supervised(
                "api",
                [python, "-m", "uvicorn", "api.main:create_app", "--factory",
                 "--host", settings.api_host, "--port", str(settings.api_port),
                 *API_KEEP_ALIVE],
            ),
            Supervised(
                "worker-cpu",
                [*celery, "worker", "-Q", "cpu", "-E", "--hostname", "cpu@%h",
                 "--loglevel", "INFO"],
            ),
            Supervised(
                "flower",
                [*celery, "flower", "--address=127.0.0.1", f"--port={settings.flower_port}"],
                env=flower_env,
            ),
        )
        if s is not None
    ]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for service in services:
        service.start()
        if service.name == "redis":
            client = redis.Redis.from_url(settings.redis_url)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    time.sleep(0.1)
    print(
        f"[run] API http://{settings.api_host}:{settings.api_port}/docs · "
        f"Flower http://127.0.0.1:{settings.flower_port} · Ctrl-C stops everything",
        flush=True,
    )
    while not stopping:
        for service in services:
            service.check()
        time.sleep(0.2)
    print("[run] stopping", flush=True)
    # Redis last, so workers can hand their jobs back before it goes.
    for service in reversed(services[1:] if services[0].name == "redis" else services):
        service.stop()
    for service in services:
        if service.name != "redis":
            service.wait(30)
    for service in services:
        if service.name == "redis":
            service.stop()
            service.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
