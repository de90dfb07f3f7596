"""The official ``openai`` client runs a batch job against reasonq, unchanged."""

from __future__ import annotations

import io
import json
import time

import pytest
from openai import NotFoundError, OpenAI

from tests.conftest import Stack
from tests.runtimes.common import CIRCLE_TOOL, tool_conversation


def request_line(custom_id: str, content: str, **body: object) -> str:
    return json.dumps({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "vllm", "messages": [{"role": "user", "content": content}], **body},
    })


def openai_client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/openai/v1", api_key="unused", max_retries=0)


def wait_until_done(client: OpenAI, batch_id: str, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in {"completed", "failed", "cancelled", "expired"}:
            return batch
        time.sleep(0.1)
    raise TimeoutError(batch.status)


def test_openai_client_runs_a_batch(stack: Stack) -> None:
    client = openai_client(stack)
    lines = [request_line(f"req-{i}", f"What is {i} squared?", max_tokens=16) for i in range(30)]
    lines[3] = request_line(
        "req-3", "developer and parts",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
    )
    uploaded = client.files.create(
        file=("requests.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status in {"in_progress", "completed"}
    assert batch.request_counts.total == 30
    batch = wait_until_done(client, batch.id)
    assert batch.status == "completed" and batch.completed_at
    assert batch.request_counts.completed == 30 and batch.metadata == {"job": "nightly"}
    output_text = client.files.content(batch.output_file_id).text
    output = [json.loads(line) for line in output_text.splitlines()]
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(30)]
    first = output[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    completion = first["response"]["body"]
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"]
    assert completion["usage"]["total_tokens"] > 0
    assert client.files.content(batch.error_file_id).text == ""
    assert client.files.content(uploaded.id).text == "\n".join(lines)


def test_invalid_line_fails_the_batch_naming_it(stack: Stack) -> None:
    client = openai_client(stack)
    lines = [
        request_line("a", "fine"),
        request_line("b", "hot", temperature=9),
        '{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}',
        request_line("a", "duplicate id"),
        "{not json",
    ]
    uploaded = client.files.create(
        file=("bad.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.failed_at
    assert batch.request_counts.total == 0
    errors = {e.line: e.message for e in batch.errors.data}
    assert set(errors) == {2, 3, 4, 5}
    assert "temperature" in errors[2] and "/v1/chat/completions" in errors[3]
    assert "earlier line" in errors[4] and "invalid JSON" in errors[5]


def test_cancel_and_unknown_ids(stack: Stack) -> None:
    import httpx

    client = openai_client(stack)
    httpx.post(f"{stack.vllm.url}/_standin/faults", json={"latency_s": 0.5, "count": -1})
    try:
        lines = [request_line(f"r{i}", f"slow {i}") for i in range(100)]
        uploaded = client.files.create(
            file=("slow.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        cancelled = client.batches.cancel(batch.id)
        assert cancelled.status in {"cancelling", "cancelled"} and cancelled.cancelling_at
        batch = wait_until_done(client, batch.id)
    finally:
        httpx.delete(f"{stack.vllm.url}/_standin/faults")
    assert batch.status == "cancelled" and batch.cancelled_at
    errors = client.files.content(batch.error_file_id).text.splitlines()
    assert len(errors) == batch.request_counts.failed > 50
    assert json.loads(errors[-1])["error"]["code"] == "cancelled"
    with pytest.raises(NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(NotFoundError):
        client.files.retrieve("file-nope")


def test_delete_a_file(stack: Stack) -> None:
    client = openai_client(stack)
    uploaded = client.files.create(
        file=("requests.jsonl", io.BytesIO(request_line("a", "hi").encode())), purpose="batch"
    )
    batch = wait_until_done(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id)  # fmt: skip
    deleted = client.files.delete(uploaded.id)
    assert deleted.id == uploaded.id and deleted.deleted
    for gone in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(NotFoundError):
            gone(uploaded.id)
    # The batch made from it is untouched; its output file can be deleted too.
    assert client.batches.retrieve(batch.id).request_counts.completed == 1
    assert client.files.content(batch.output_file_id).text
    assert client.files.delete(batch.output_file_id).deleted
    with pytest.raises(NotFoundError):
        client.files.content(batch.output_file_id)


def test_response_format_in_request_lines(stack: Stack) -> None:
    client = openai_client(stack)
    response_format = {"type": "json_schema", "json_schema": {
        "name": "sum", "schema": {"type": "object", "properties": {"total": {"type": "integer"}}},
    }}  # fmt: skip
    line = request_line("a", "Add 2 and 3.", response_format=response_format)
    uploaded = client.files.create(file=("r.jsonl", io.BytesIO(line.encode())), purpose="batch")
    batch = wait_until_done(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id)  # fmt: skip
    [output] = client.files.content(batch.output_file_id).text.splitlines()
    answer = json.loads(output)["response"]["body"]["choices"][0]["message"]["content"]
    assert isinstance(json.loads(answer)["total"], int)


def test_tools_in_request_lines(stack: Stack) -> None:
    # The first line asks; the second carries the call and the tool's answer on.
    client = openai_client(stack)
    call = {"id": "call-1", "type": "function",
            "function": {"name": "calculate_circle_area", "arguments": '{"radius": 5}'}}  # fmt: skip
    lines = [
        request_line("ask", "Area of a circle of radius 5?", tools=[CIRCLE_TOOL]),
        request_line("answer", "", tools=[CIRCLE_TOOL], messages=tool_conversation(call)),
    ]
    uploaded = client.files.create(
        file=("r.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    batch = wait_until_done(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id)  # fmt: skip
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    asked, answered = (
        json.loads(line)["response"]["body"]["choices"][0]
        for line in client.files.content(batch.output_file_id).text.splitlines()
    )
    assert asked["finish_reason"] == "tool_calls"
    assert asked["message"]["content"] is None
    [made] = asked["message"]["tool_calls"]
    assert made["function"]["name"] == "calculate_circle_area"
    assert json.loads(made["function"]["arguments"]).keys() == {"radius"}
    assert answered["finish_reason"] == "stop" and answered["message"]["content"]
    assert "tool_calls" not in answered["message"]
