"""Flower (a real `celery flower` process on the stack's Redis) shows the workers and each job
as a `reasonq.run_job` task with its state, runtime, run time and retries, and never its
prompt: the API sends redacted args (REASONQ_FLOWER_SHOW_CONTENT off)."""

from __future__ import annotations

import ast
import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import service_env, start_flower, wait_until
from tests.conftest import ROUTING, Stack, wait_for_job


@pytest.fixture(scope="module")
def flower(stack: Stack) -> Iterator[str]:
    # The API open, as `make run` has it; compose sets basic auth.
    service, url = start_flower(service_env(stack.redis.url, runtime_queues=ROUTING), stack.log_dir)
    yield url
    service.stop()


def test_flower_lists_workers_and_redacted_tasks(flower: str, stack: Stack) -> None:
    host = socket.gethostname()
    workers: dict = {}

    def sees_workers() -> bool:
        nonlocal workers
        workers = httpx.get(f"{flower}/api/workers", params={"refresh": 1}, timeout=10).json()
        return {f"cpu@{host}", f"gpu@{host}"} <= workers.keys()

    wait_until(sees_workers, 20, "Flower to see the workers", interval=0.5)
    assert any(q["name"] == "gpu" for q in workers[f"gpu@{host}"]["active_queues"])

    secret = f"the secret prompt {uuid.uuid4().hex}"
    with stack.client() as client:
        created = client.post("/v1/jobs", json={"prompt": secret, "runtime": "vllm"})
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["id"])
    assert job["status"] == "succeeded", job

    def task() -> dict:
        return httpx.get(f"{flower}/api/task/info/{job['id']}", timeout=10).json()

    wait_until(lambda: task()["state"] == "SUCCESS", 20, "Flower to see the task succeed")
    info = task()
    assert info["name"] == "reasonq.run_job"
    assert info["worker"] == f"gpu@{host}"
    assert info["args"] == repr((job["id"],))
    summary = ast.literal_eval(info["kwargs"])
    assert summary["runtime"] == "vllm" and summary["task_type"] == "chat"
    assert summary["prompt_chars"] >= len(secret)  # with the profile's system prompt
    assert info["runtime"] > 0
    assert info["retries"] == 0
    assert "'status': 'succeeded'" in info["result"]

    listed = httpx.get(f"{flower}/api/tasks", timeout=10)
    assert job["id"] in listed.json()
    for answer in (listed.text, httpx.get(f"{flower}/api/task/info/{job['id']}").text):
        assert secret not in answer
        assert job["result"]["text"] not in answer  # nor the answer
