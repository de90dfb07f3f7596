"""Session-wide real services: redis-server, vLLM and Ollama stand-ins, Celery workers on
the `cpu` and `gpu` queues, and the API under uvicorn. Nothing is faked but the two
inference servers that cannot run here."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from tests.cluster import RedisServer, Service, service_env, start_api, start_worker
from tests.standins.server_thread import StandInProcess
from workers.executor import Executor

ROUTING = {"onnx": "cpu", "ollama": "cpu", "vllm": "gpu"}
WEBHOOK_SECRET = "test-webhook-secret"


@dataclass
class Stack:
    redis: RedisServer
    vllm: StandInProcess
    ollama: StandInProcess
    workers: dict[str, Service]
    api: Service
    url: str
    env: dict[str, str]
    log_dir: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def stack(log_dir: Path) -> Iterator[Stack]:
    redis_server = RedisServer(log_dir).start()
    # Fast engine steps keep the suite quick; lengths are fixed so answers are predictable.
    vllm = StandInProcess(
        "tests.standins.openai_server", "--step-base-s", "0.002", "--step-per-seq-s", "0",
        "--output-len", "uniform:8:24",
    ).start()
    ollama = StandInProcess("tests.standins.ollama_server").start()
    env = service_env(
        redis_server.url,
        runtime_queues=ROUTING,
        vllm_url=vllm.url,
        ollama_url=ollama.url,
        worker_metrics_port=0,
        retry_backoff_s=0.05,
        retry_backoff_max_s=0.2,
        retry_max_attempts=4,
        # Webhook receivers in tests listen on loopback; retries come fast.
        webhook_secret=WEBHOOK_SECRET,
        webhook_allow_hosts=["127.0.0.1"],
        webhook_backoff_s=0.1,
        webhook_backoff_max_s=0.4,
        webhook_poll_interval_s=0.05,
        webhook_max_attempts=4,
    )
    workers = {
        "cpu": start_worker("cpu", ["cpu"], env, log_dir),
        "gpu": start_worker("gpu", ["gpu"], env, log_dir),
    }
    api, url = start_api(env, log_dir)
    stack = Stack(redis_server, vllm, ollama, workers, api, url, env, log_dir)
    yield stack
    api.stop()
    for worker in workers.values():
        worker.stop()
    vllm.stop()
    ollama.stop()
    redis_server.stop()


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    """Poll a job until it ends, as a user would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost``: (certificate, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of the test module's own, for tests that need Redis and nothing else."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server.url
    server.stop()


MakeExecutor = Callable[[Settings], Executor]


@pytest.fixture
def executor_for() -> Iterator[MakeExecutor]:
    """Makes a test's in-process worker executors, and stops them after it: left running,
    their loops would poll a redis-server its module has stopped, a line a second to the
    end of the run."""
    made: list[Executor] = []

    def make(settings: Settings) -> Executor:
        made.append(Executor(settings))
        return made[-1]

    yield make
    for executor in made:
        loop = executor.start()
        asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)


async def _cancel_all() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
