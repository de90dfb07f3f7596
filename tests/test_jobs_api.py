"""End to end through real processes: API (uvicorn) -> Redis -> Celery workers -> stand-ins."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.conftest import Stack, wait_for_job
from tests.runtimes.common import CIRCLE_QUESTION, CIRCLE_TOOL, tool_conversation


def submit(client: httpx.Client, **job: object) -> dict:
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.mark.parametrize("runtime", ["vllm", "ollama"])
def test_submit_poll_answer(stack: Stack, runtime: str) -> None:
    with stack.client() as client:
        created = submit(
            client,
            prompt="A train travels 240 km in 3 hours. How fast is it?",
            runtime=runtime,
            task_type="math",
            metadata={"row": 7},
        )
        assert created["status"] in {"queued", "running"}  # a warm worker may be quick
        assert created["url"] == f"{stack.url}/v1/jobs/{created['id']}"
        job = wait_for_job(client, created["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["text"]
    assert result["runtime"] == runtime
    assert result["usage"]["completion_tokens"] > 0
    assert result["usage"]["prompt_tokens"] > 0
    assert result["finish_reason"] in {"stop", "length"}
    timings = result["timings"]
    assert timings["queue_wait_s"] >= 0
    assert timings["run_s"] >= timings["backend_s"] > 0
    assert timings["time_to_first_token_s"] is not None
    assert job["metadata"] == {"row": 7}
    assert job["queue"] == ("gpu" if runtime == "vllm" else "cpu")
    assert job["started_at"] and job["finished_at"]


def test_profile_and_overrides_reach_the_backend(stack: Stack) -> None:
    httpx.delete(f"{stack.vllm.url}/_standin/requests")
    with stack.client() as client:
        job = submit(
            client, prompt="Write a Python function to add two numbers.", runtime="vllm",
            task_type="coding", temperature=0.1, top_k=20, seed=42, stop=["\n\n"],
        )
        assert wait_for_job(client, job["id"])["status"] == "succeeded"
    body = httpx.get(f"{stack.vllm.url}/_standin/requests").json()[-1]["body"]
    assert body["messages"][0]["role"] == "system"
    assert "coding assistant" in body["messages"][0]["content"]  # the coding profile
    assert body["temperature"] == 0.1  # the job's own value beats the profile's 0.5
    assert body["top_p"] == 0.9  # from the profile
    assert body["top_k"] == 20 and body["seed"] == 42 and body["stop"] == ["\n\n"]


@pytest.mark.parametrize("runtime", ["vllm", "ollama"])
def test_json_output_by_schema(stack: Stack, runtime: str) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "steps": {"type": "integer"}},
        "required": ["answer", "steps"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "solution", "schema": schema}}
    with stack.client() as client:
        job = submit(client, prompt="What is 17 * 3?", runtime=runtime, task_type="math",
                     response_format=response_format)  # fmt: skip
        job = wait_for_job(client, job["id"])
    assert job["status"] == "succeeded", job
    assert json.loads(job["result"]["text"]).keys() == {"answer", "steps"}


def test_json_output_is_refused_for_the_onnx_runtime(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post("/v1/jobs", json={
            "prompt": "x", "runtime": "onnx", "response_format": {"type": "json_object"},
        })  # fmt: skip
    assert response.status_code == 422
    assert response.json()["code"] == "unsupported_by_runtime"
    assert "vllm" in response.json()["detail"]


@pytest.mark.parametrize("runtime", ["vllm", "ollama"])
def test_tool_call_then_the_answer_to_its_result(stack: Stack, runtime: str) -> None:
    with stack.client() as client:
        job = submit(client, prompt=CIRCLE_QUESTION, runtime=runtime, tools=[CIRCLE_TOOL])
        job = wait_for_job(client, job["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["finish_reason"] == "tool_calls"
        [call] = job["result"]["tool_calls"]
        assert call["function"]["name"] == "calculate_circle_area"
        assert json.loads(call["function"]["arguments"]).keys() == {"radius"}
        # The client runs the tool and sends the conversation on, as the next job.
        turn = submit(client, messages=tool_conversation(call), runtime=runtime,
                      tools=[CIRCLE_TOOL])  # fmt: skip
        turn = wait_for_job(client, turn["id"])
    assert turn["status"] == "succeeded", turn
    assert turn["result"]["finish_reason"] == "stop" and turn["result"]["text"]
    assert turn["result"]["tool_calls"] is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"runtime": "onnx", "tools": [CIRCLE_TOOL]}, "cannot call tools"),
        ({"runtime": "ollama", "tools": [CIRCLE_TOOL], "tool_choice": "required"},
         "cannot force a tool call"),
    ],
)  # fmt: skip
def test_tools_refused_where_the_runtime_cannot_honour_them(
    stack: Stack, body: dict, reason: str
) -> None:
    with stack.client() as client:
        response = client.post("/v1/jobs", json={"prompt": "x", **body})
    assert response.status_code == 422
    assert response.json()["code"] == "unsupported_by_runtime"
    assert reason in response.json()["detail"]


def test_wait_returns_when_the_job_ends(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, prompt="hi", runtime="vllm")
        waited = client.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()
    assert waited["status"] == "succeeded"


def test_submit_and_wait_in_one_request(stack: Stack) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"prompt": "echo: done at once", "runtime": "vllm"}
    with stack.client() as client:
        ended = client.post("/v1/jobs", params={"wait": 20}, json=body, headers=key)
        replayed = client.post("/v1/jobs", params={"wait": 20}, json=body, headers=key)
        httpx.post(f"{stack.vllm.url}/_standin/faults", json={"latency_s": 1.0})
        pending = client.post("/v1/jobs", params={"wait": 0.2}, json=body | {"prompt": "slow"})
        too_long = client.post("/v1/jobs", params={"wait": 61}, json=body)
    assert ended.status_code == 200, ended.text
    assert ended.json()["status"] == "succeeded"
    assert ended.json()["result"]["text"] == " done at once"
    assert ended.headers["location"].endswith(f"/v1/jobs/{ended.json()['id']}")
    assert replayed.status_code == 200 and replayed.json()["id"] == ended.json()["id"]
    assert pending.status_code == 202 and pending.json()["status"] in {"queued", "running"}
    assert too_long.status_code == 422


def test_idempotency_key_returns_the_same_job(stack: Stack) -> None:
    key = uuid.uuid4().hex
    with stack.client() as client:
        first = client.post(
            "/v1/jobs", json={"prompt": "once", "runtime": "vllm"},
            headers={"Idempotency-Key": key},
        )
        again = client.post(
            "/v1/jobs", json={"prompt": "once", "runtime": "vllm"},
            headers={"Idempotency-Key": key},
        )
        other = client.post(
            "/v1/jobs", json={"prompt": "something else", "runtime": "vllm"},
            headers={"Idempotency-Key": key},
        )
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"


def test_unknown_job_is_404(stack: Stack) -> None:
    with stack.client() as client:
        assert client.get("/v1/jobs/nope").status_code == 404
        assert client.delete("/v1/jobs/nope").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "body"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "x", "priority": 10}, "priority"),
        ({"prompt": "x", "task_type": "poetry"}, "task_type"),
        ({"prompt": "x", "runtime": "tgi"}, "runtime"),
        ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "type"),
        ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
        ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
            "name": "a b", "schema": {}}}}, "name"),
        ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "objekt"}}}}, "schema"),
        ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"properties": {"a": {"minimum": "x"}}}}}}, "schema"),
        ({"prompt": "x", "tool_choice": "auto"}, "body"),
        ({"prompt": "x", "tools": [CIRCLE_TOOL],
          "tool_choice": {"type": "function", "function": {"name": "other"}}}, "body"),
        ({"prompt": "x", "tools": [CIRCLE_TOOL, CIRCLE_TOOL]}, "body"),
        ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
        ({"prompt": "x", "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "objekt"}}}]}, "parameters"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages"),
        ({"messages": [{"role": "assistant"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages"),
    ],
)
def test_validation_errors_name_the_field(stack: Stack, body: dict, field: str) -> None:
    with stack.client() as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(field in map(str, e["loc"]) for e in errors), errors
    assert all(e["msg"] for e in errors)


def test_invalid_schema_error_says_where(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "number", "minimum": "0"}}}
    body = {"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}  # fmt: skip
    with stack.client() as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert "not a valid JSON Schema" in error["msg"]
    assert "properties/answer/minimum" in error["msg"], error


def test_nan_temperature_is_rejected(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post(
            "/v1/jobs", content=b'{"prompt": "x", "temperature": NaN}',
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 422


def test_backend_4xx_fails_at_once_with_its_message(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, prompt="hi", runtime="vllm", model="no-such-model")
        job = wait_for_job(client, job["id"])
    assert job["status"] == "failed"
    assert job["error"]["retryable"] is False
    assert "no-such-model" in job["error"]["message"]
    assert job["attempts"] == 1


def test_backend_errors_are_retried_then_succeed(stack: Stack) -> None:
    httpx.post(f"{stack.ollama.url}/_standin/faults", json={"status": 503, "count": 2})
    with stack.client() as client:
        job = submit(client, prompt="retry me", runtime="ollama")
        job = wait_for_job(client, job["id"])
    assert job["status"] == "succeeded", job


def test_backend_down_past_the_retry_budget_fails_retryable(stack: Stack) -> None:
    httpx.post(f"{stack.vllm.url}/_standin/faults", json={"status": 500, "count": 10})
    try:
        with stack.client() as client:
            job = submit(client, prompt="doomed", runtime="vllm")
            job = wait_for_job(client, job["id"])
    finally:
        httpx.delete(f"{stack.vllm.url}/_standin/faults")
    assert job["status"] == "failed"
    assert job["error"]["retryable"] is True
    assert job["error"]["code"] == "backend_unavailable"


def test_readyz_names_queue_consumers(stack: Stack) -> None:
    with stack.client() as client:
        ready = client.get("/readyz")
        assert client.get("/healthz").json() == {"status": "ok"}
    assert ready.status_code == 200, ready.text
    queues = ready.json()["queues"]
    assert queues["cpu"] and queues["gpu"]


def test_openapi_documents_the_job_api(stack: Stack) -> None:
    with stack.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"post"} <= set(paths["/v1/jobs"])
    assert {"get", "delete"} <= set(paths["/v1/jobs/{job_id}"])
