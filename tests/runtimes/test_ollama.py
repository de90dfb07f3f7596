"""OllamaRuntime against the Ollama stand-in on a real uvicorn server (no httpx mocks)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from core.errors import BackendBusy, BackendRejected, BackendUnavailable
from runtimes.http import HTTPOptions, StreamState
from runtimes.ollama import OllamaRuntime
from tests.runtimes.common import (
    ANSWER_SCHEMA,
    CIRCLE_TOOL,
    FAST,
    JSON_SCHEMA_FORMAT,
    ask,
    call_then_answer,
)
from tests.standins.engine import count_prompt_tokens, plan_reply
from tests.standins.ollama_server import BUSY, OllamaConfig, OllamaStandIn
from tests.standins.server_thread import ServerThread, StandInControl, free_port

pytestmark = pytest.mark.anyio

@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = OllamaConfig(step_base_s=0.001, step_per_seq_s=0, output_len="12")
    with ServerThread(OllamaStandIn(config).app) as srv:
        yield srv


@pytest.fixture
def single_slot() -> Iterator[ServerThread]:
    """OLLAMA_NUM_PARALLEL=1, OLLAMA_MAX_QUEUE=1, 20 ms a token, long answers."""
    config = OllamaConfig(num_parallel=1, max_queue=1, step_base_s=0.02, output_len="500")
    with ServerThread(OllamaStandIn(config).app) as srv:
        yield srv


async def test_streams_answer_counts_and_ttft(server: ServerThread, ctl: StandInControl) -> None:
    runtime = OllamaRuntime(server.url, options=FAST)
    pieces: list[str] = []
    request = ask("echo: 240 km in 3 hours")
    started = time.perf_counter()
    result = await runtime.generate(request, on_token=pieces.append)
    elapsed = time.perf_counter() - started
    await runtime.aclose()
    assert result.text == " 240 km in 3 hours"
    assert pieces == [" 240", " km", " in", " 3", " hours"]
    assert (result.finish_reason, result.completion_tokens) == ("stop", 5)
    assert result.prompt_tokens == count_prompt_tokens(request.messages)
    assert result.model == "phi4-mini"
    assert result.time_to_first_token_s is not None
    assert 0 < result.time_to_first_token_s < elapsed


async def test_num_predict_limit_gives_length(server: ServerThread, ctl: StandInControl) -> None:
    runtime = OllamaRuntime(server.url, options=FAST)
    request = ask("Is every cat a mammal?", max_tokens=4, seed=3)
    result = await runtime.generate(request)
    await runtime.aclose()
    expected = plan_reply(request.messages, natural_len=12, max_tokens=4, seed=3)
    assert (result.text, result.finish_reason, result.completion_tokens) == (
        expected.text,
        "length",
        4,
    )


async def test_options_and_keep_alive_passed_through(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = OllamaRuntime(
        server.url, model="phi4-mini", keep_alive="30m", num_ctx=8192, options=FAST
    )
    await runtime.generate(
        ask("hi", max_tokens=9, temperature=0.3, top_p=0.8, top_k=20, seed=5, stop=["END"])
    )
    await runtime.generate(ask("hi", model="phi4-mini:latest"))
    await runtime.aclose()
    first, second = (r["body"] for r in ctl.requests())
    assert (first["model"], first["stream"], first["keep_alive"]) == ("phi4-mini", True, "30m")
    assert first["options"] == {
        "num_predict": 9,
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 20,
        "seed": 5,
        "stop": ["END"],
        "num_ctx": 8192,
    }
    assert second["model"] == "phi4-mini:latest"
    assert not {"top_k", "seed", "stop"} & second["options"].keys()


async def test_cancel_mid_stream_closes_the_stream(single_slot: ServerThread) -> None:
    ctl = StandInControl(single_slot.url)
    runtime = OllamaRuntime(single_slot.url, options=FAST)
    pieces: list[str] = []
    result = await runtime.generate(
        ask("go on"), on_token=pieces.append, is_cancelled=lambda: len(pieces) >= 2
    )
    await runtime.aclose()
    assert result.finish_reason == "cancelled"
    assert result.text == "".join(pieces) and len(pieces) == 2
    (record,) = ctl.requests()
    assert record["client_closed"] is True and record["completion_tokens"] < 20
    ctl.wait_idle()


async def test_full_queue_answers_busy(single_slot: ServerThread) -> None:
    runtime = OllamaRuntime(single_slot.url, options=FAST)
    running = asyncio.Event()
    first = asyncio.ensure_future(runtime.generate(ask("a"), on_token=lambda _: running.set()))
    await asyncio.wait_for(running.wait(), 5)
    second = asyncio.ensure_future(runtime.generate(ask("b")))  # takes the one queue place
    await asyncio.sleep(0.1)
    with pytest.raises(BackendBusy, match="maximum pending requests exceeded") as info:
        await runtime.generate(ask("c"))
    assert info.value.status_code == 503  # type: ignore[attr-defined]
    for task in (first, second):
        task.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    await runtime.aclose()


async def test_unknown_model_is_rejected_with_ollama_message(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = OllamaRuntime(server.url, options=FAST)
    with pytest.raises(BackendRejected, match='model "llama9" not found, try pulling it first'):
        await runtime.generate(ask("hi", model="llama9"))
    await runtime.aclose()


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"status": 503, "retry_after": 1}, BackendBusy),
        ({"status": 429}, BackendBusy),
        (
            {"status": 500, "body": {"error": "llama runner process has terminated"}},
            BackendUnavailable,
        ),
    ],
)
async def test_error_statuses(
    server: ServerThread, ctl: StandInControl, fault: dict, error: type[Exception]
) -> None:
    ctl.inject(fault)
    runtime = OllamaRuntime(server.url, options=FAST)
    with pytest.raises(error) as info:
        await runtime.generate(ask("hi"))
    await runtime.aclose()
    assert type(info.value) is error
    assert info.value.retry_after == fault.get("retry_after")  # type: ignore[attr-defined]
    if fault["status"] == 503:
        assert BUSY in str(info.value)
    if fault["status"] == 500:
        assert "llama runner process has terminated" in str(info.value)


async def test_connection_refused_is_unavailable() -> None:
    runtime = OllamaRuntime(f"http://127.0.0.1:{free_port()}", options=FAST)
    with pytest.raises(BackendUnavailable) as info:
        await runtime.generate(ask("hi"))
    await runtime.aclose()
    assert type(info.value) is BackendUnavailable


async def test_stale_keepalive_connection_is_retried(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = OllamaRuntime(server.url, options=FAST)
    await runtime.generate(ask("echo: warm"))
    ctl.reset()
    ctl.inject({"drop": "before_response"})
    assert (await runtime.generate(ask("echo: fine"))).text == " fine"
    await runtime.aclose()
    assert len(ctl.requests()) == 2


async def test_keepalive_connection_closed_by_server_between_requests() -> None:
    config = OllamaConfig(zero_latency=True)
    with ServerThread(OllamaStandIn(config).app, timeout_keep_alive=0.2) as srv:
        options = HTTPOptions(read_timeout_s=5, keepalive_expiry_s=30)
        runtime = OllamaRuntime(srv.url, options=options)
        for word in ("one", "two"):
            assert (await runtime.generate(ask(f"echo: {word}"))).text == f" {word}"
            await asyncio.sleep(0.4)
        await runtime.aclose()


def test_error_line_inside_the_stream_is_mapped() -> None:
    runtime = OllamaRuntime("http://unused")
    state = StreamState(model="phi4-mini", on_token=None)
    runtime.parse_line(
        b'{"message": {"role": "assistant", "content": " hi"}, "done": false}', state
    )
    with pytest.raises(BackendUnavailable, match="out of memory"):
        runtime.parse_line(b'{"error": "out of memory"}', state)
    assert state.parts == [" hi"]


async def test_response_format_becomes_ollamas_format(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = OllamaRuntime(server.url, options=FAST)
    schema_reply = await runtime.generate(ask("hi", response_format=JSON_SCHEMA_FORMAT))
    object_reply = await runtime.generate(ask("hi", response_format={"type": "json_object"}))
    plain = await runtime.generate(ask("hi"))
    await runtime.aclose()
    first, second, third = (r["body"] for r in ctl.requests())
    assert first["format"] == ANSWER_SCHEMA
    assert second["format"] == "json"
    assert "format" not in third
    assert json.loads(schema_reply.text).keys() == {"answer", "confidence"}
    assert isinstance(json.loads(object_reply.text), dict)
    assert not plain.text.lstrip().startswith("{")


async def test_tool_call_then_answer_after_its_result(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = OllamaRuntime(server.url, options=FAST)
    _, call, _ = await call_then_answer(runtime)
    assert call["id"] == "call_0"  # Ollama gives none: ours, so a tool message can cite it
    none_offered = await runtime.generate(ask("hi", tools=[CIRCLE_TOOL], tool_choice="none"))
    await runtime.aclose()
    assert none_offered.tool_calls is None and "tools" not in ctl.requests()[2]["body"]
    first, second = (r["body"] for r in ctl.requests()[:2])
    assert first["tools"] == [CIRCLE_TOOL]
    # The call goes back as Ollama takes it: arguments an object, not JSON text.
    assert second["messages"][1]["tool_calls"] == [
        {"function": {"name": "calculate_circle_area", "arguments": {"radius": 0.5}}}
    ]
    # The tool's answer names its function, as Ollama's messages do (no call ids there).
    assert second["messages"][2] == {"role": "tool", "content": "78.54",
                                     "tool_name": "calculate_circle_area"}  # fmt: skip


async def test_thinking_kept_apart_from_the_answer() -> None:
    config = OllamaConfig(step_base_s=0.001, step_per_seq_s=0, thinking_tokens=2)
    with ServerThread(OllamaStandIn(config).app) as thinking_server:
        runtime = OllamaRuntime(thinking_server.url, options=FAST)
        pieces: list[str] = []
        result = await runtime.generate(ask("echo: ninety six"), on_token=pieces.append)
        await runtime.aclose()
    assert result.reasoning == " step1 step2"
    assert result.text == " ninety six" and pieces == [" ninety", " six"]
    assert result.completion_tokens == 4
