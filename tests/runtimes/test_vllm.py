"""VLLMRuntime against the OpenAI/vLLM stand-in on a real uvicorn server (no httpx mocks)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from core.errors import (
    BackendBusy,
    BackendRejected,
    BackendUnavailable,
    ContextTooLong,
)
from runtimes.base import GenerationRequest
from runtimes.http import HTTPOptions, StreamState, backend_message, retry_after_s
from runtimes.vllm import VLLMRuntime
from tests.runtimes.common import (
    CIRCLE_TOOL,
    FAST,
    JSON_SCHEMA_FORMAT,
    ask,
    call_then_answer,
    tool_conversation,
)
from tests.standins.engine import count_prompt_tokens, plan_reply
from tests.standins.openai_server import OpenAIConfig, OpenAIStandIn
from tests.standins.server_thread import ServerThread, StandInControl, free_port

pytestmark = pytest.mark.anyio

MODEL = "microsoft/Phi-4-mini-instruct"
@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = OpenAIConfig(step_base_s=0.001, step_per_seq_s=0, output_len="12")
    with ServerThread(OpenAIStandIn(config).app) as srv:
        yield srv


@pytest.fixture
def slow_server() -> Iterator[ServerThread]:
    """One sequence at a time, 20 ms a token, long answers: room to cancel and to queue."""
    config = OpenAIConfig(max_num_seqs=1, step_base_s=0.02, step_per_seq_s=0, output_len="500")
    with ServerThread(OpenAIStandIn(config).app) as srv:
        yield srv


async def test_streams_answer_usage_and_ttft(server: ServerThread, ctl: StandInControl) -> None:
    runtime = VLLMRuntime(server.url, options=FAST)
    pieces: list[str] = []
    request = ask("echo: The train takes 2.4 hours")
    started = time.perf_counter()
    result = await runtime.generate(request, on_token=pieces.append)
    elapsed = time.perf_counter() - started
    await runtime.aclose()

    assert result.text == " The train takes 2.4 hours"
    assert pieces == [" The", " train", " takes", " 2.4", " hours"]
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 5
    assert result.prompt_tokens == count_prompt_tokens(request.messages)
    assert result.model == MODEL
    assert result.time_to_first_token_s is not None
    assert 0 < result.time_to_first_token_s < elapsed


async def test_length_limit_and_deterministic_text(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = VLLMRuntime(server.url, model=MODEL, options=FAST)
    request = ask("What is 2 + 2?", max_tokens=5)
    result = await runtime.generate(request)
    await runtime.aclose()
    expected = plan_reply(request.messages, natural_len=12, max_tokens=5)
    assert (result.text, result.finish_reason, result.completion_tokens) == (
        expected.text,
        "length",
        5,
    )


async def test_sampling_params_passed_through(server: ServerThread, ctl: StandInControl) -> None:
    runtime = VLLMRuntime(server.url, model=MODEL, options=FAST)
    await runtime.generate(
        ask("hi", max_tokens=7, temperature=0.3, top_p=0.8, top_k=40, seed=11, stop=["\n\n"])
    )
    await runtime.generate(ask("hi"))  # defaults: no top_k, seed or stop on the wire
    await runtime.aclose()
    first, second = (r["body"] for r in ctl.requests())
    assert first["model"] == MODEL
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert (first["max_tokens"], first["temperature"], first["top_p"]) == (7, 0.3, 0.8)
    assert (first["top_k"], first["seed"], first["stop"]) == (40, 11, ["\n\n"])
    assert first["messages"] == [{"role": "user", "content": "hi"}]
    assert not {"top_k", "seed", "stop"} & second.keys()


async def test_stop_string_honoured(server: ServerThread, ctl: StandInControl) -> None:
    runtime = VLLMRuntime(server.url, options=FAST)
    result = await runtime.generate(ask("echo: one two STOP three", stop=[" STOP"]))
    await runtime.aclose()
    assert (result.text, result.finish_reason) == (" one two", "stop")


async def test_model_discovered_from_v1_models_once(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = VLLMRuntime(server.url, options=FAST)
    first = await runtime.generate(ask("echo: a"))
    second = await runtime.generate(ask("echo: b", model=MODEL))
    await runtime.aclose()
    assert first.model == second.model == MODEL
    assert [r["body"]["model"] for r in ctl.requests()] == [MODEL, MODEL]
    assert runtime._served_model == MODEL


async def test_cancel_mid_stream_closes_the_stream(slow_server: ServerThread) -> None:
    ctl = StandInControl(slow_server.url)
    runtime = VLLMRuntime(slow_server.url, options=FAST)
    pieces: list[str] = []
    result = await runtime.generate(
        ask("tell me everything"), on_token=pieces.append, is_cancelled=lambda: len(pieces) >= 3
    )
    await runtime.aclose()
    assert result.finish_reason == "cancelled"
    assert result.text == "".join(pieces) and len(pieces) == 3
    (record,) = ctl.requests()
    assert record["client_closed"] is True
    assert record["completion_tokens"] < 20  # the server stopped generating, far from 500
    ctl.wait_idle()  # the engine freed the slot


async def test_cancel_while_queued_behind_another_request(slow_server: ServerThread) -> None:
    ctl = StandInControl(slow_server.url)
    runtime = VLLMRuntime(slow_server.url, model=MODEL, options=FAST)
    running = asyncio.Event()
    blocker = asyncio.ensure_future(
        runtime.generate(ask("long one"), on_token=lambda _: running.set())
    )
    await asyncio.wait_for(running.wait(), 5)  # it holds the only slot now
    deadline = time.monotonic() + 0.3
    started = time.monotonic()
    result = await runtime.generate(ask("queued"), is_cancelled=lambda: time.monotonic() > deadline)
    waited = time.monotonic() - started
    blocker.cancel()
    await asyncio.gather(blocker, return_exceptions=True)
    await runtime.aclose()
    assert result.finish_reason == "cancelled" and result.text == ""
    assert waited < 1.0  # not stuck until the queued request got a slot (~10 s)
    queued = next(r for r in ctl.requests() if r["body"]["messages"][0]["content"] == "queued")
    assert queued["client_closed"] is True and queued["completion_tokens"] == 0


async def test_already_cancelled_sends_nothing(server: ServerThread, ctl: StandInControl) -> None:
    runtime = VLLMRuntime(server.url, model=MODEL, options=FAST)
    result = await runtime.generate(ask("hi"), is_cancelled=lambda: True)
    await runtime.aclose()
    assert result.finish_reason == "cancelled"
    assert ctl.requests() == []


async def test_unknown_model_is_rejected_with_vllm_message(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = VLLMRuntime(server.url, options=FAST)
    with pytest.raises(BackendRejected, match="The model `nope` does not exist.") as info:
        await runtime.generate(ask("hi", model="nope"))
    await runtime.aclose()
    assert not isinstance(info.value, ContextTooLong)
    assert info.value.status_code == 404  # type: ignore[attr-defined]


async def test_context_too_long(server: ServerThread, ctl: StandInControl) -> None:
    runtime = VLLMRuntime(server.url, options=FAST)
    with pytest.raises(ContextTooLong, match="maximum context length is 4096 tokens"):
        await runtime.generate(ask("word " * 100, max_tokens=4090))
    await runtime.aclose()


@pytest.mark.parametrize(
    ("fault", "error", "retry_after"),
    [
        ({"status": 429, "retry_after": 2}, BackendBusy, 2.0),
        ({"status": 503}, BackendBusy, None),
        ({"status": 500}, BackendUnavailable, None),
        ({"status": 502, "body": "<html>Bad Gateway</html>"}, BackendUnavailable, None),
    ],
)
async def test_error_statuses_map_to_retryable_errors(
    server: ServerThread,
    ctl: StandInControl,
    fault: dict,
    error: type[Exception],
    retry_after: float | None,
) -> None:
    ctl.inject(fault)
    runtime = VLLMRuntime(server.url, model=MODEL, options=FAST)
    with pytest.raises(error) as info:
        await runtime.generate(ask("hi"))
    await runtime.aclose()
    assert type(info.value) is error
    assert info.value.retryable  # type: ignore[attr-defined]
    assert info.value.retry_after == retry_after  # type: ignore[attr-defined]
    assert str(fault["status"]) in str(info.value)


async def test_connection_refused_is_unavailable() -> None:
    runtime = VLLMRuntime(f"http://127.0.0.1:{free_port()}", model=MODEL, options=FAST)
    with pytest.raises(BackendUnavailable) as info:
        await runtime.generate(ask("hi"))
    await runtime.aclose()
    assert type(info.value) is BackendUnavailable
    assert "ConnectError" in str(info.value)


async def test_read_timeout_is_unavailable(server: ServerThread, ctl: StandInControl) -> None:
    ctl.inject({"hang": True})
    runtime = VLLMRuntime(server.url, model=MODEL, options=HTTPOptions(read_timeout_s=0.2))
    with pytest.raises(BackendUnavailable, match="ReadTimeout"):
        await runtime.generate(ask("hi"))
    await runtime.aclose()
    assert ctl.requests()[0]["client_closed"] is True


async def test_connection_dropped_mid_stream_is_unavailable(
    server: ServerThread, ctl: StandInControl
) -> None:
    ctl.inject({"drop": "mid_stream", "after_tokens": 3})
    runtime = VLLMRuntime(server.url, model=MODEL, options=FAST)
    pieces: list[str] = []
    with pytest.raises(BackendUnavailable, match="RemoteProtocolError"):
        await runtime.generate(ask("hi"), on_token=pieces.append)
    await runtime.aclose()
    assert 0 < len(pieces) < 12
    assert len(ctl.requests()) == 1  # mid-stream failures are the worker's to retry


async def test_connection_dropped_before_response_is_retried_once(
    server: ServerThread, ctl: StandInControl
) -> None:
    """The server closing a pooled keep-alive connection as the request arrives: the race
    that uvicorn's idle timeout causes, made deterministic."""
    runtime = VLLMRuntime(server.url, model=MODEL, options=FAST)
    await runtime.generate(ask("echo: warm"))  # leaves one idle pooled connection
    ctl.reset()
    ctl.inject({"drop": "before_response"})
    assert (await runtime.generate(ask("echo: ok"))).text == " ok"
    assert len(ctl.requests()) == 2

    ctl.reset()
    ctl.inject({"drop": "before_response", "count": 2})
    with pytest.raises(BackendUnavailable):
        await runtime.generate(ask("echo: ok"))
    await runtime.aclose()
    assert len(ctl.requests()) == 2


async def test_keepalive_connection_closed_by_server_between_requests() -> None:
    """uvicorn drops idle connections after 0.2 s here; the client would keep them 30 s."""
    with ServerThread(OpenAIStandIn(OpenAIConfig(zero_latency=True)).app, 0.2) as srv:
        options = HTTPOptions(read_timeout_s=5, keepalive_expiry_s=30)
        runtime = VLLMRuntime(srv.url, model=MODEL, options=options)
        for word in ("one", "two", "three"):
            assert (await runtime.generate(ask(f"echo: {word}"))).text == f" {word}"
            await asyncio.sleep(0.4)
        await runtime.aclose()
        assert len(StandInControl(srv.url).requests()) == 3


async def test_api_key_sent_as_bearer_token() -> None:
    with ServerThread(OpenAIStandIn(OpenAIConfig(zero_latency=True, api_key="s3cret")).app) as srv:
        good = VLLMRuntime(srv.url, model=MODEL, api_key="s3cret", options=FAST)
        bad = VLLMRuntime(srv.url, model=MODEL, api_key="wrong", options=FAST)
        assert (await good.generate(ask("echo: in"))).text == " in"
        with pytest.raises(BackendRejected, match="401: Unauthorized"):
            await bad.generate(ask("echo: in"))
        await good.aclose()
        await bad.aclose()


async def test_nested_error_format_message_extracted() -> None:
    config = OpenAIConfig(zero_latency=True, error_format="nested")
    with ServerThread(OpenAIStandIn(config).app) as srv:
        runtime = VLLMRuntime(srv.url, options=FAST)
        with pytest.raises(BackendRejected, match="The model `x` does not exist."):
            await runtime.generate(ask("hi", model="x"))
        await runtime.aclose()


def test_error_inside_the_stream_is_mapped() -> None:
    runtime = VLLMRuntime("http://unused")
    state = StreamState(model=MODEL, on_token=None)
    with pytest.raises(BackendUnavailable, match="engine died"):
        runtime.parse_line(b'data: {"error": {"message": "engine died", "code": 500}}', state)
    with pytest.raises(ContextTooLong):
        runtime.parse_line(
            b'data: {"object": "error", "message": "maximum context length is 10", "code": 400}',
            state,
        )


def test_backend_message_and_retry_after_parsing() -> None:
    assert backend_message(b'{"error": {"message": "m1", "type": "t"}}') == "m1"
    assert backend_message(b'{"object": "error", "message": "m2"}') == "m2"
    assert backend_message(b'{"error": "m3"}') == "m3"
    assert backend_message(b"plain text") == "plain text"
    assert retry_after_s("3") == 3.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_s("soon") is None


async def test_response_format_sent_as_is_and_json_comes_back(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = VLLMRuntime(server.url, model=MODEL, options=FAST)
    schema_reply = await runtime.generate(ask("hi", response_format=JSON_SCHEMA_FORMAT))
    object_reply = await runtime.generate(ask("hi", response_format={"type": "json_object"}))
    await runtime.aclose()
    first, second = (r["body"] for r in ctl.requests())
    assert first["response_format"] == JSON_SCHEMA_FORMAT
    assert second["response_format"] == {"type": "json_object"}
    assert json.loads(schema_reply.text).keys() == {"answer", "confidence"}
    assert isinstance(json.loads(object_reply.text), dict)


async def test_tool_call_streamed_in_pieces_then_answer_after_its_result(
    server: ServerThread, ctl: StandInControl
) -> None:
    runtime = VLLMRuntime(server.url, options=FAST)
    called, call, _ = await call_then_answer(runtime)
    await runtime.aclose()
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert called.completion_tokens > 1  # the arguments came in several pieces
    sent = [r["body"] for r in ctl.requests()]
    assert sent[0]["tools"] == [CIRCLE_TOOL] and "tool_choice" not in sent[0]
    assert sent[1]["messages"] == tool_conversation(call)


async def test_forced_tool_choice_reaches_vllm(server: ServerThread, ctl: StandInControl) -> None:
    runtime = VLLMRuntime(server.url, options=FAST)
    choice = {"type": "function", "function": {"name": "calculate_circle_area"}}
    forced = await runtime.generate(
        GenerationRequest(
            messages=tool_conversation({"id": "c1", "type": "function", "function": {
                "name": "calculate_circle_area", "arguments": "{}"}}),
            tools=[CIRCLE_TOOL], tool_choice=choice,
        )
    )  # fmt: skip
    await runtime.aclose()
    assert forced.finish_reason == "tool_calls"  # even after a tool result: it was forced
    assert ctl.requests()[0]["body"]["tool_choice"] == choice


def test_parallel_tool_calls_are_assembled_by_index() -> None:
    # Two calls interleaved, as vLLM streams parallel calls: name first, arguments after.
    runtime, state = VLLMRuntime("http://unused"), StreamState(model=MODEL, on_token=None)
    deltas = [
        [{"index": 0, "id": "call-a", "type": "function", "function": {"name": "f"}}],
        [{"index": 0, "function": {"arguments": '{"x": '}}],
        [{"index": 1, "id": "call-b", "type": "function", "function": {"name": "g"}}],
        [{"index": 1, "function": {"arguments": "{}"}}],
        [{"index": 0, "function": {"arguments": "1}"}}],
    ]
    for calls in deltas:
        chunk = {"choices": [{"index": 0, "delta": {"tool_calls": calls}}]}
        runtime.parse_line(b"data: " + json.dumps(chunk).encode(), state)
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    runtime.parse_line(b"data: " + json.dumps(finish).encode(), state)
    completion = state.completion()
    assert completion.finish_reason == "tool_calls"
    calls = [(c["id"], c["function"]["name"], c["function"]["arguments"])
             for c in completion.tool_calls or []]  # fmt: skip
    assert calls == [("call-a", "f", '{"x": 1}'), ("call-b", "g", "{}")]


async def test_reasoning_kept_apart_from_the_answer() -> None:
    config = OpenAIConfig(step_base_s=0.001, step_per_seq_s=0, reasoning_tokens=3)
    with ServerThread(OpenAIStandIn(config).app) as reasoning_server:
        runtime = VLLMRuntime(reasoning_server.url, options=FAST)
        pieces: list[str] = []
        result = await runtime.generate(ask("echo: ninety six"), on_token=pieces.append)
        cut = await runtime.generate(ask("echo: ninety six", max_tokens=2))
        await runtime.aclose()
    assert result.reasoning == " step1 step2 step3"
    assert result.text == " ninety six" and pieces == [" ninety", " six"]
    assert result.completion_tokens == 5  # vLLM counts the thought too
    assert result.time_to_first_token_s is not None
    assert (cut.reasoning, cut.text, cut.finish_reason) == (" step1 step2", "", "length")


def test_reasoning_content_of_older_vllm_is_read_too() -> None:
    runtime, state = VLLMRuntime("http://unused"), StreamState(model=MODEL, on_token=None)
    for delta in ({"reasoning_content": "Hmm."}, {"reasoning": " So"}, {"content": "4"}):
        chunk = {"choices": [{"index": 0, "delta": delta}]}
        runtime.parse_line(b"data: " + json.dumps(chunk).encode(), state)
    completion = state.completion()
    assert (completion.reasoning, completion.text) == ("Hmm. So", "4")
