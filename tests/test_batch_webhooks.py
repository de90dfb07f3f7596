"""Batch summary webhooks: real workers POST one signed summary when a batch's last job ends.

End to end against the session stack and a real receiver (uvicorn on a thread); the race
between ingest sealing a batch and its last job ending is played out on a private Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from core import keys
from core.batches import BatchStore, batch_job_id
from core.broker import TaskMessage
from core.jobs import JobStore
from core.settings import Settings
from core.webhooks import BatchSummaries
from tests.cluster import RedisServer
from tests.conftest import WEBHOOK_SECRET, Stack
from tests.test_batches_api import upload, wait_for_batch
from tests.test_webhooks import Call, Receiver, documented_verify, receiving


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as rec:
        yield rec


def prompts(n: int) -> str:
    return "\n".join(["prompt"] + [f"What is {i} + {i}?" for i in range(n)]) + "\n"


def wait_delivered(client: httpx.Client, batch_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (batch := client.get(f"/v1/batches/{batch_id}").json())["webhook"]["status"] != (
        "delivered"
    ):
        assert time.monotonic() < deadline, batch["webhook"]
        time.sleep(0.05)
    return batch


def result_statuses(client: httpx.Client, batch_id: str) -> Counter[str]:
    results = client.get(f"/v1/batches/{batch_id}/results", params={"format": "jsonl"})
    return Counter(json.loads(line)["status"] for line in results.text.splitlines())


def check_summary(call: Call, batch: dict, statuses: Counter[str]) -> dict:
    """The one POST is signed, names the batch, and is the batch as GET shows it (less its
    own delivery), with counts that match the rows' results."""
    assert documented_verify()(WEBHOOK_SECRET, call.headers, call.body)
    assert call.headers["x-reasonq-delivery"] == f"batch:{batch['id']}"
    summary = json.loads(call.body)
    webhook = batch.pop("webhook")
    assert summary == batch
    assert webhook["status"] == "delivered" and webhook["attempts"] == 1
    assert webhook["last_status"] == 204 and webhook["delivered_at"]
    counts = summary["counts"]
    for status in ("succeeded", "failed", "cancelled"):
        assert counts[status] == statuses[status], (status, counts, statuses)
    assert counts["queued"] == counts["running"] == 0
    assert summary["finished_at"] and summary["jobs_per_s"] is not None
    return summary


def test_finished_batch_posts_one_signed_summary(stack: Stack, receiver: Receiver) -> None:
    path = receiver.path()
    with stack.client() as client:
        created = upload(
            client, "twenty.csv", prompts(20), runtime="vllm", callback_url=receiver.url + path
        )
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]
        assert created.json()["webhook"]["url"] == receiver.url + path
        (call,) = receiver.wait_calls(path, 1, timeout=30)
        batch = wait_delivered(client, batch_id)
        statuses = result_statuses(client, batch_id)
    summary = check_summary(call, batch, statuses)
    assert summary["status"] == "completed"
    assert summary["counts"]["total"] == summary["counts"]["submitted"] == 20
    assert summary["counts"]["succeeded"] == 20
    time.sleep(0.5)  # several sender polls: still only the one delivery
    assert len(receiver.wait_calls(path, 1)) == 1


def test_cancelled_batch_gets_its_summary(stack: Stack, receiver: Receiver) -> None:
    path = receiver.path()
    # A slow backend keeps most rows queued while the batch is cancelled.
    httpx.post(f"{stack.vllm.url}/_standin/faults", json={"latency_s": 0.5, "count": -1})
    try:
        with stack.client() as client:
            created = upload(
                client, "slow.csv", prompts(100), runtime="vllm", callback_url=receiver.url + path
            ).json()
            assert client.delete(f"/v1/batches/{created['id']}").status_code == 200
            wait_for_batch(client, created["id"])
            (call,) = receiver.wait_calls(path, 1, timeout=30)
            batch = wait_delivered(client, created["id"])
            statuses = result_statuses(client, created["id"])
    finally:
        httpx.delete(f"{stack.vllm.url}/_standin/faults")
    summary = check_summary(call, batch, statuses)
    counts = summary["counts"]
    assert summary["status"] == "cancelled" and summary["cancel_requested_at"]
    assert counts["cancelled"] > 50
    assert counts["succeeded"] + counts["failed"] + counts["cancelled"] == 100
    time.sleep(0.5)
    assert len(receiver.wait_calls(path, 1)) == 1


@pytest.mark.parametrize(
    ("url", "code"),
    [("http://10.0.0.1/hook", "callback_url_refused"), ("ftp://example.com/x", None)],
)
def test_bad_callback_url_refuses_the_batch(stack: Stack, url: str, code: str | None) -> None:
    with stack.client() as client:
        response = upload(client, "p.csv", prompts(3), runtime="vllm", callback_url=url)
    assert response.status_code == 422, response.text
    if code:  # refused by the address policy
        assert response.json()["code"] == code
        assert "not a public address" in response.json()["detail"]
    else:  # not an http(s) URL at all: refused by the form's validation
        assert any("callback_url" in map(str, e["loc"]) for e in response.json()["detail"])


# --- when a batch ends, on a private Redis (the stack's workers would take the summaries) --
@pytest.fixture
def private_redis(log_dir: Path) -> Iterator[str]:
    server = RedisServer(log_dir).start()
    yield server.url
    server.stop()


def test_batch_is_listed_once_whichever_ends_it_last(private_redis: str) -> None:
    """A batch ends when its last job ends after ingest sealed it, or at the seal if its jobs
    all ended before: either way it is listed for its summary once, and only with a
    callback_url. The listing is claimed by one worker and its summary queued."""
    settings = Settings(redis_url=private_redis, webhook_secret="s")

    async def scenario() -> None:
        redis = aioredis.from_url(private_redis)
        jobs = JobStore(redis, 60)
        batches = BatchStore(redis, jobs)

        async def batch(batch_id: str, rows: int, **fields: str) -> list[str]:
            await batches.create(batch_id, {"owner": "o", "format": "csv", **fields})
            ids = [batch_job_id(batch_id, i) for i in range(rows)]
            records = [
                {"id": job_id, "status": "queued", "owner": "o", "runtime": "vllm",
                 "batch_id": batch_id}
                for job_id in ids
            ]
            messages = [TaskMessage("unconsumed", "{}")] * rows  # no worker on this Redis
            assert await batches.add_rows(batch_id, records, messages, {})
            return ids

        async def listed() -> list[bytes]:
            return await redis.zrange(keys.BATCHES_ENDED, 0, -1)

        hook = {"callback_url": "http://127.0.0.1:9/hook", "api_url": "http://api"}
        # Its jobs all end before the seal: the seal ends it.
        early = await batch("early", 2, **hook)
        for job_id in early:
            assert await jobs.cancel(job_id) == "cancelled"
        assert await listed() == []
        await batches.seal("early")
        assert await listed() == [b"early"]
        # Sealed first: its last job ends it, not the ones before.
        late = await batch("late", 2, **hook)
        await batches.seal("late")
        await jobs.cancel(late[0])
        assert await listed() == [b"early"]
        await jobs.cancel(late[1])
        assert sorted(await listed()) == [b"early", b"late"]
        # No callback: never listed.
        for job_id in await batch("quiet", 1):
            await jobs.cancel(job_id)
        await batches.seal("quiet")
        assert sorted(await listed()) == [b"early", b"late"]

        summaries = BatchSummaries(redis, settings)
        now = time.time()
        first, second = await asyncio.gather(
            summaries.claim(now, 30, 10), summaries.claim(now, 30, 10)
        )
        assert sorted(first + second) == ["early", "late"]  # each claimed by one caller
        assert first == [] or second == []
        for batch_id in first + second:
            assert await summaries.queue(batch_id, now)
        assert await listed() == []
        delivery = await redis.hgetall(keys.webhook("batch:early"))
        summary = json.loads(delivery[b"body"])
        assert summary["id"] == "early" and summary["status"] == "completed"
        assert summary["counts"]["cancelled"] == 2 and summary["counts"]["total"] == 2
        assert summary["results_url"] == "http://api/v1/batches/early/results"
        assert "webhook" not in summary
        mirrored = json.loads(await redis.hget(keys.batch("early"), "webhook"))
        assert mirrored["status"] == "pending"
        await redis.aclose()

    asyncio.run(scenario())
