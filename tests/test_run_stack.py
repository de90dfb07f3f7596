"""`make run`'s supervisor: starts Redis when none answers, restarts what dies, stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from core.settings import Settings
from tests.cluster import ROOT, free_port, service_env, wait_until


def started_pids(log: Path, name: str) -> list[int]:
    return [int(p) for p in re.findall(rf"\[run\] {name} started \(pid (\d+)\)", log.read_text())]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_stack_supervises_and_stops_everything(tmp_path: Path) -> None:
    redis_port, api_port = free_port(), free_port()
    env = service_env(
        f"redis://127.0.0.1:{redis_port}/0",  # nothing listens there: the stack starts Redis
        api_port=api_port,
        flower_port=free_port(),
        data_dir=tmp_path,
        onnx_model=Settings().onnx_model_path(),
        worker_metrics_port=0,
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        stack = subprocess.Popen(
            [sys.executable, "-m", "scripts.run_stack"], cwd=ROOT, env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_until(lambda: httpx.get(f"{api}/readyz").status_code == 200, 90, "readyz")
        assert (tmp_path / "redis" / "appendonlydir").exists()  # AOF on, as in compose

        job = httpx.post(f"{api}/v1/jobs", json={"prompt": "What is the capital of France?"})
        answer = httpx.get(job.json()["url"], params={"wait": 60}, timeout=70).json()
        assert answer["status"] == "succeeded" and "Paris" in answer["result"]["text"]

        for name, ready in (("worker-cpu", "/readyz"), ("api", "/healthz")):
            first = started_pids(log, name)[-1]
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: len(started_pids(log, name)) == 2, 30, f"{name} restart")  # noqa: B023
            wait_until(
                lambda: httpx.get(f"{api}{ready}").status_code == 200, 60, f"{name} back"  # noqa: B023
            )
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(60)
    children = [pid for name in ("api", "worker-cpu", "flower", "redis")
                for pid in started_pids(log, name)]
    time.sleep(0.5)
    assert not [pid for pid in children if pid_alive(pid)], log.read_text()[-2000:]
    try:
        redis.Redis(port=redis_port, socket_connect_timeout=0.5).ping()
        raise AssertionError("the Redis the stack started is still running")
    except redis.ConnectionError:
        pass
