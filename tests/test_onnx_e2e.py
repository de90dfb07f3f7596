"""The embedded default: a job with runtime onnx, through the queue, answered by SmolLM2."""

from __future__ import annotations

from core.settings import Settings
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
