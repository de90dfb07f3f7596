"""The stand-ins themselves: wire format as official clients parse it, batching, subprocess."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.standins.engine import LengthDistribution, plan_reply
from tests.standins.openai_server import OpenAIConfig, OpenAIStandIn
from tests.standins.server_thread import ServerThread, StandInControl, StandInProcess


@pytest.fixture(scope="module")
def vllm() -> Iterator[ServerThread]:
    config = OpenAIConfig(step_base_s=0.001, step_per_seq_s=0, output_len="6")
    with ServerThread(OpenAIStandIn(config).app) as srv:
        yield srv


def test_openai_client_parses_streamed_and_plain_answers(vllm: ServerThread) -> None:
    client = openai.OpenAI(base_url=vllm.url + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "echo: four is the answer"}]
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " four is the answer"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert plain.choices[0].message.content == " four is"
    assert plain.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=messages)


def test_continuous_batching_caps_running_sequences() -> None:
    """max_num_seqs=2, 10 tokens at 20 ms a step: of 6 requests sent at once, never more than
    2 run together, and the others wait for a slot."""
    config = OpenAIConfig(max_num_seqs=2, step_base_s=0.02, step_per_seq_s=0, output_len="10")
    with ServerThread(OpenAIStandIn(config).app) as srv:
        body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(
                pool.map(
                    lambda _: httpx.post(srv.url + "/v1/chat/completions", json=body), range(6)
                )
            )
        log = StandInControl(srv.url).requests()
    # By intervals, not by arrival: on a busy machine the requests may arrive staggered. A
    # stream's end is stamped as its last chunk is sent, after its slot went to the next
    # sequence at that step: less than a step (20 ms) of apparent overlap.
    running = [(r["scheduled_at"], r["ended_at"] - 0.015) for r in log]
    assert max(sum(s <= t < e for s, e in running) for t, _ in running) == 2
    assert max(r["scheduled_at"] - r["received_at"] for r in log) > 0.1  # one waited a wave


def test_length_distribution_is_seeded() -> None:
    draws = [LengthDistribution("uniform:1:1000", seed=7).draw() for _ in range(2)]
    assert draws[0] == draws[1]
    dist = LengthDistribution("lognormal:4:0.5", seed=1)
    assert len({dist.draw() for _ in range(20)}) > 10
    with pytest.raises(ValueError):
        LengthDistribution("bogus:1")


def test_stop_string_cuts_inside_a_token() -> None:
    reply = plan_reply([{"role": "user", "content": "echo: alpha beta"}], 0, None, stop=["ta"])
    assert (reply.text, reply.finish_reason) == (" alpha be", "stop")


@pytest.mark.parametrize(
    ("module", "path"),
    [("tests.standins.openai_server", "/v1/models"), ("tests.standins.ollama_server", "/api/tags")],
)
def test_runs_as_a_subprocess(module: str, path: str) -> None:
    with StandInProcess(module, "--zero-latency") as proc:
        assert httpx.get(proc.url + path).status_code == 200
