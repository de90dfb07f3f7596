"""Server-sent events end to end: real workers stream Ollama stand-in tokens through Redis
pub/sub and the API to an HTTP client reading ``/v1/jobs/{id}/events``.

The stand-in's Ollama engine steps every ~22 ms, so a job of 30 tokens streams for ~0.7 s.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from core import keys
from tests.conftest import Stack, wait_for_job


@dataclass
class Event:
    name: str
    data: dict
    at: float  # time.time() when the client read it


def events(client: httpx.Client, job_id: str, kind: str = "jobs") -> Iterator[Event]:
    """Parse the stream as a client would; ends when the server ends it."""
    with client.stream("GET", f"/v1/{kind}/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = None, None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
            elif line == "" and name is not None:
                yield Event(name, data, time.time())
                name, data = None, None


def submit(client: httpx.Client, **job: object) -> str:
    response = client.post("/v1/jobs", json={"runtime": "ollama", **job})
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.fixture
def ollama(stack: Stack) -> Iterator[httpx.Client]:
    control = httpx.Client(base_url=stack.ollama.url)
    control.delete("/_standin/faults")
    control.delete("/_standin/requests")
    yield control
    control.delete("/_standin/faults")
    control.close()


def test_tokens_stream_then_result(stack: Stack, ollama: httpx.Client) -> None:
    # The backend waits 0.5 s before generating, so the stream is open before the first token.
    ollama.post("/_standin/faults", json={"latency_s": 0.5})
    with stack.client() as client:
        job_id = submit(client, prompt="Count slowly, please.", max_tokens=30)
        seen = list(events(client, job_id))
    names = [e.name for e in seen]
    assert names[0] == "status" and seen[0].data["status"] in {"queued", "running"}
    assert names[-2:] == ["status", "result"] and seen[-2].data == {"status": "succeeded"}
    tokens = [e for e in seen if e.name == "token"]
    assert len(tokens) >= 3, names  # streamed in pieces, not all at the end
    assert names.index("token") > names.index("status")
    assert max(i for i, n in enumerate(names) if n == "token") < len(names) - 2
    result = seen[-1].data
    assert result["id"] == job_id and result["status"] == "succeeded"
    assert "".join(e.data["text"] for e in tokens) == result["result"]["text"]
    # Latency: the stand-in logs when it produced the first token (same clock, same host).
    produced = ollama.get("/_standin/requests").json()[-1]["scheduled_at"]
    latency = tokens[0].at - produced
    assert latency < 0.1, f"first token reached the watcher {latency * 1000:.0f} ms late"


def test_reasoning_events_reach_the_watcher_as_their_own_event(
    stack: Stack, ollama: httpx.Client
) -> None:
    # The stack's stand-ins don't reason: publish a worker's reasoning event by hand
    # (tests/test_executor.py checks that workers publish them).
    ollama.post("/_standin/faults", json={"latency_s": 0.5})
    publisher = redis.Redis.from_url(stack.redis.url)
    with stack.client() as client:
        job_id = submit(client, prompt="Think first.", max_tokens=5)
        seen = []
        for event in events(client, job_id):
            seen.append(event)
            if len(seen) == 1:
                thought = {"type": "reasoning", "text": "Let me see."}
                publisher.publish(keys.job_events(job_id), json.dumps(thought))
    names = [e.name for e in seen]
    assert names.count("reasoning") == 1 and names[-1] == "result", names
    assert seen[names.index("reasoning")].data == {"text": "Let me see."}


def test_ended_job_sends_result_at_once(stack: Stack) -> None:
    with stack.client() as client:
        job_id = submit(client, prompt="hi", runtime="vllm")
        job = wait_for_job(client, job_id)
        began = time.monotonic()
        seen = list(events(client, job_id))
    assert time.monotonic() - began < 1.0
    assert [e.name for e in seen] == ["status", "result"]
    assert seen[0].data == {"status": "succeeded"}
    assert seen[1].data == job


def test_late_subscriber_gets_state_then_everything_so_far(
    stack: Stack, ollama: httpx.Client
) -> None:
    with stack.client() as client:
        job_id = submit(client, prompt="Tell me a long story.", max_tokens=40)
        while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
            time.sleep(0.01)
        time.sleep(0.3)  # tokens pile up in the worker while nobody watches
        seen = list(events(client, job_id))
    assert seen[0].name == "status" and seen[0].data == {"status": "running"}
    tokens = [e.data["text"] for e in seen if e.name == "token"]
    # Nobody watched before: the first token event carries all the text generated so far.
    assert "".join(tokens) == seen[-1].data["result"]["text"]
    assert len(tokens[0]) > len(tokens[-1])


def test_two_watchers_get_the_same_stream(stack: Stack, ollama: httpx.Client) -> None:
    ollama.post("/_standin/faults", json={"latency_s": 0.3})
    results: list[list[Event]] = []
    with stack.client() as client:
        job_id = submit(client, prompt="Two readers.", max_tokens=20)
        readers = [
            threading.Thread(target=lambda: results.append(list(events(client, job_id))))
            for _ in range(2)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(10)
    assert len(results) == 2
    texts = ["".join(e.data["text"] for e in seen if e.name == "token") for seen in results]
    assert texts[0] == texts[1] == results[0][-1].data["result"]["text"]
    with redis.Redis.from_url(stack.redis.url) as r:
        assert not r.exists(keys.job_watchers(job_id))


def test_a_client_that_leaves_stops_watching(stack: Stack, ollama: httpx.Client) -> None:
    ollama.post("/_standin/faults", json={"latency_s": 3})  # the job stays running meanwhile
    watchers = redis.Redis.from_url(stack.redis.url)
    with stack.client() as client:
        job_id = submit(client, prompt="A long answer.")
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.iter_lines()  # kept: dropping it closes the connection
            assert next(lines) == "event: status"
            assert watchers.smembers(keys.job_watchers(job_id)) != set()
        deadline = time.monotonic() + 2
        while watchers.exists(keys.job_watchers(job_id)):
            assert time.monotonic() < deadline, "the closed stream still watches"
            time.sleep(0.02)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    watchers.close()


def test_unknown_job_is_404(stack: Stack) -> None:
    with stack.client() as client:
        response = client.get("/v1/jobs/nope/events")
    assert response.status_code == 404
    assert response.json()["code"] == "job_not_found"


def test_batch_progress_then_result(stack: Stack, ollama: httpx.Client) -> None:
    # 12 rows of ~10 tokens on Ollama's 4 slots: three waves of ~0.25 s.
    rows = "prompt\n" + "".join(f"What is {i} squared?\n" for i in range(12))
    form = {"runtime": "ollama", "max_tokens": "10"}
    with stack.client() as client:
        created = client.post("/v1/batches", files={"file": ("rows.csv", rows.encode())}, data=form)
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]
        seen = list(events(client, batch_id, "batches"))
        final = client.get(f"/v1/batches/{batch_id}").json()
        again = list(events(client, batch_id, "batches"))  # ended: the result at once
        unknown = client.get("/v1/batches/nope/events")
    assert seen[-1].name == "result" and seen[-1].data["status"] == "completed"
    assert seen[-1].data["counts"] == final["counts"] and final["counts"]["succeeded"] == 12
    progress = [e.data for e in seen if e.name == "progress"]
    assert all(p["status"] in {"ingesting", "in_progress"} for p in progress)
    done = [p["counts"]["succeeded"] for p in progress]
    assert len(done) >= 3 and done == sorted(done), done  # moved as jobs ended
    assert [e.name for e in again] == ["result"] and again[0].data["counts"] == final["counts"]
    assert unknown.status_code == 404
