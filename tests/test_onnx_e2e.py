"""The embedded default: a job with runtime onnx, through the queue, answered by SmolLM2."""

from __future__ import annotations

from core.settings import Settings
from tests.cluster import service_env, start_worker, wait_until
from tests.conftest import Stack, wait_for_job


def test_default_model_answers_through_the_queue(stack: Stack) -> None:
    model = Settings().onnx_model_path()
    assert (model / "genai_config.json").exists(), f"no model at {model}: run `make model`"
    with stack.client() as client:
        created = client.post(
            "/v1/jobs", json={"prompt": "What is the capital of France?", "temperature": 0}
        )
        assert created.status_code == 202
        assert created.json()["runtime"] == "onnx"  # the configured default
        job = wait_for_job(client, created.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert "Paris" in job["result"]["text"]
    assert job["result"]["model"] == model.name
    assert job["result"]["finish_reason"] == "stop"
    assert job["result"]["usage"]["completion_tokens"] > 0


def test_worker_loads_its_model_before_the_first_job(stack: Stack) -> None:
    """A worker serving onnx warms it up once ready, so its first job doesn't wait ~3 s."""
    env = service_env(
        stack.redis.url, runtime_queues={"onnx": "warm"}, worker_metrics_port=0
    )
    worker = start_worker("warm", ["warm"], env, stack.log_dir)
    try:
        wait_until(lambda: "onnx session" in worker.log_path.read_text(), 60, "model loaded")
    finally:
        worker.stop()
