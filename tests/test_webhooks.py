"""Webhooks end to end: real workers POST to a real receiver (uvicorn on a thread).

The signature is checked with the snippet in docs/webhooks.md itself, so the documented
procedure is the tested one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import keys
from core.errors import CallbackRefused
from core.settings import Settings
from core.webhooks import DeliveryQueue, check_callback_url, permitted
from tests.cluster import RedisServer, free_port
from tests.conftest import WEBHOOK_SECRET, Stack
from tests.standins.server_thread import ServerThread
from workers.webhooks import WebhookSender

DOC = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


def documented_verify() -> Any:
    """``verify`` from the first Python block of docs/webhooks.md."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert code, "docs/webhooks.md lost its verification snippet"
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # noqa: S102 (our own documentation's code)
    return namespace["verify"]


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Records every POST; ``fail[path]`` answers that many 500s before the 2xx (-1: all),
    ``slow[path]`` takes that long to answer."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)

    async def hook(self, request: Request) -> Response:
        path = request.url.path
        self.calls.append(Call(path, dict(request.headers), await request.body(), time.time()))
        await asyncio.sleep(self.slow.get(path, 0))
        if self.fail.get(path, 0) != 0:
            self.fail[path] -= 1
            return Response("nope", status_code=500)
        return Response(status_code=204)

    def path(self) -> str:
        return f"/hook/{uuid.uuid4().hex}"

    def wait_calls(self, path: str, n: int, timeout: float = 10) -> list[Call]:
        deadline = time.monotonic() + timeout
        while len(calls := [c for c in self.calls if c.path == path]) < n:
            assert time.monotonic() < deadline, f"{len(calls)} of {n} calls to {path}"
            time.sleep(0.02)
        return calls


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A ``Receiver`` served on a free port (``POST /hook/{name}``)."""
    rec = Receiver()
    app = Starlette(routes=[Route("/hook/{name}", rec.hook, methods=["POST"])])
    with ServerThread(app) as server:
        rec.url = server.url
        yield rec


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as rec:
        yield rec


def submit(client: httpx.Client, **job: object) -> httpx.Response:
    return client.post("/v1/jobs", json={"prompt": "What is 2 + 2?", "runtime": "vllm", **job})


def wait_webhook(client: httpx.Client, job_id: str, status: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}").json())["webhook"]["status"] != status:
        assert time.monotonic() < deadline, job["webhook"]
        time.sleep(0.02)
    return job


def test_final_job_is_posted_signed(stack: Stack, receiver: Receiver) -> None:
    path = receiver.path()
    with stack.client() as client:
        created = submit(client, callback_url=receiver.url + path)
        assert created.status_code == 202, created.text
        assert created.json()["webhook"]["status"] == "pending"
        (call,) = receiver.wait_calls(path, 1)
        job = wait_webhook(client, created.json()["id"], "delivered")
    verify = documented_verify()
    assert verify(WEBHOOK_SECRET, call.headers, call.body)
    assert not verify("another-secret", call.headers, call.body)
    assert not verify(WEBHOOK_SECRET, call.headers, call.body.replace(b"succeeded", b"failed"))
    stale = int(call.headers["x-reasonq-timestamp"]) + 301
    assert not verify(WEBHOOK_SECRET, call.headers, call.body, now=stale)  # a replay
    assert call.headers["x-reasonq-delivery"] == f"job:{job['id']}"
    assert call.headers["x-reasonq-attempt"] == "1"
    # The body is the job as GET shows it, less the state of this very delivery.
    webhook = job.pop("webhook")
    assert json.loads(call.body) == job
    assert job["status"] == "succeeded" and job["result"]["text"]
    assert webhook["attempts"] == 1 and webhook["last_status"] == 204
    assert webhook["last_error"] is None and webhook["delivered_at"]
    assert webhook["url"] == receiver.url + path


def test_failing_receiver_is_retried_with_backoff(stack: Stack, receiver: Receiver) -> None:
    path = receiver.path()
    receiver.fail[path] = 2
    with stack.client() as client:
        job_id = submit(client, callback_url=receiver.url + path).json()["id"]
        calls = receiver.wait_calls(path, 3)
        webhook = wait_webhook(client, job_id, "delivered")["webhook"]
    assert [c.headers["x-reasonq-attempt"] for c in calls] == ["1", "2", "3"]
    verify = documented_verify()
    assert all(verify(WEBHOOK_SECRET, c.headers, c.body) for c in calls)
    # conftest: first retry after 0.1 s, doubling.
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, gaps
    assert webhook["attempts"] == 3 and webhook["last_status"] == 204
    time.sleep(0.3)
    assert len(receiver.wait_calls(path, 3)) == 3  # delivered: no more attempts


def test_delivery_gives_up_after_max_attempts(stack: Stack, receiver: Receiver) -> None:
    path = receiver.path()
    receiver.fail[path] = -1  # always 500
    with stack.client() as client:
        job_id = submit(client, callback_url=receiver.url + path).json()["id"]
        webhook = wait_webhook(client, job_id, "failed")["webhook"]
    assert webhook["attempts"] == 4  # conftest's webhook_max_attempts
    assert webhook["last_status"] == 500 and webhook["last_error"] == "HTTP 500"
    assert webhook["delivered_at"] is None and webhook["next_attempt_at"] is None
    assert len(receiver.wait_calls(path, 4)) == 4


def test_a_slow_receiver_does_not_slow_jobs(stack: Stack, receiver: Receiver) -> None:
    path = receiver.path()
    receiver.slow[path] = 3.0
    with stack.client() as client:
        slow_job = submit(client, callback_url=receiver.url + path).json()["id"]
        receiver.wait_calls(path, 1)  # the worker is now waiting on the receiver
        began = time.monotonic()
        for _ in range(3):  # same runtime, so the same worker process
            job_id = submit(client).json()["id"]
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
            assert job["status"] == "succeeded"
        took = time.monotonic() - began
        assert client.get(f"/v1/jobs/{slow_job}").json()["webhook"]["status"] == "pending"
        assert took < 1.5, f"3 jobs took {took:.2f} s beside a hanging webhook"
        wait_webhook(client, slow_job, "delivered")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",  # private
        "http://169.254.169.254/latest/meta-data",  # link-local: cloud metadata
        "http://127.0.0.2:9/hook",  # loopback, outside the test allow-list (127.0.0.1)
        "http://[::1]:9/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://100.64.0.1/hook",  # shared address space (carrier NAT)
        "http://0.0.0.0:9/hook",
    ],
)
def test_non_public_callback_url_is_refused(stack: Stack, url: str) -> None:
    with stack.client() as client:
        response = submit(client, callback_url=url)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "callback_url_refused"
    assert "not a public address" in response.json()["detail"]


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "javascript:alert(1)"])
def test_malformed_callback_url_is_refused(stack: Stack, url: str) -> None:
    with stack.client() as client:
        response = submit(client, callback_url=url)
    assert response.status_code == 422
    assert any("callback_url" in map(str, e["loc"]) for e in response.json()["detail"])


def test_address_policy() -> None:
    ip = ipaddress.ip_address
    assert permitted(ip("93.184.215.14"), [])
    assert permitted(ip("2606:4700::1111"), [])
    for private in ["10.1.2.3", "192.168.0.1", "172.16.5.5", "127.0.0.1", "169.254.1.1",
                    "::1", "fe80::1", "fd00::1", "::ffff:192.168.0.1", "224.0.0.1", "0.0.0.0"]:
        assert not permitted(ip(private), []), private
    assert permitted(ip("10.1.2.3"), ["10.0.0.0/8"])
    assert not permitted(ip("10.1.2.3"), ["10.2.0.0/16", "hooks.internal"])
    assert permitted(ip("::ffff:127.0.0.1"), ["127.0.0.1"])


def test_submission_check_resolves_the_host() -> None:
    def check(url: str, **settings: Any) -> list:
        return asyncio.run(check_callback_url(url, Settings(webhook_secret="s", **settings)))

    with pytest.raises(CallbackRefused, match="not a public address"):
        check("http://127.0.0.1:8080/hook")
    assert check("http://127.0.0.1:8080/hook", webhook_allow_hosts=["127.0.0.0/8"])
    # A host name resolves first; allow-listed by name, it may point anywhere.
    with pytest.raises(CallbackRefused, match="not a public address"):
        check("http://localhost:8080/hook")
    assert check("http://LOCALHOST:8080/hook", webhook_allow_hosts=["localhost"])
    with pytest.raises(CallbackRefused, match="does not resolve"):
        check("http://no-such-host.invalid/hook")
    with pytest.raises(CallbackRefused, match="REASONQ_WEBHOOK_SECRET"):
        asyncio.run(check_callback_url("http://127.0.0.1/", Settings(webhook_secret=None)))


# --- the delivery queue on a private Redis (the stack's workers would race for it) -------
@pytest.fixture
def private_redis(log_dir: Path) -> Iterator[str]:
    server = RedisServer(log_dir).start()
    yield server.url
    server.stop()


def test_address_is_checked_again_at_delivery(private_redis: str, receiver: Receiver) -> None:
    """A URL accepted once (allow-listed then, or DNS said public) is checked again before
    each attempt: here the sender's allow-list no longer covers it, so nothing is sent."""
    path = receiver.path()
    settings = Settings(redis_url=private_redis, webhook_secret="s", webhook_allow_hosts=[])

    async def scenario() -> dict:
        redis = aioredis.from_url(private_redis)
        queue = DeliveryQueue(redis, 60)
        await queue.enqueue("job:x", receiver.url + path, b"{}", time.time())
        sender = WebhookSender(redis, settings)
        await sender.run_once()
        await asyncio.gather(*sender.sending)
        await sender.client.aclose()
        state = await redis.hgetall(keys.webhook("job:x"))
        await redis.aclose()
        return {k.decode(): v.decode() for k, v in state.items()}

    state = asyncio.run(scenario())
    assert state["status"] == "pending" and state["attempts"] == "1"
    assert "not a public address" in state["last_error"]
    assert [c for c in receiver.calls if c.path == path] == []


def test_claims_are_exclusive_and_expire(private_redis: str) -> None:
    """One claimant per attempt; a claim whose worker died is taken again after the lease,
    and the dead worker's late outcome is ignored."""

    async def scenario() -> None:
        redis = aioredis.from_url(private_redis)
        queue = DeliveryQueue(redis, 60)
        now = time.time()
        assert await queue.enqueue("job:y", "http://example.com/", b"{}", now)
        assert not await queue.enqueue("job:y", "http://example.com/", b"{}", now)  # once
        first, second = await asyncio.gather(
            queue.claim(now, 0.3, 10), queue.claim(now, 0.3, 10)
        )
        assert len(first) + len(second) == 1
        (dead,) = first or second
        assert dead.attempt == 1 and dead.body == b"{}"
        assert await queue.claim(now + 0.1, 0.3, 10) == []  # leased
        (again,) = await queue.claim(now + 0.4, 0.3, 10)  # lease ran out: claimed again
        assert again.attempt == 1
        assert not await queue.record(dead, now, "delivered", 200, None)  # superseded
        assert await queue.record(again, now, "pending", 500, "HTTP 500", now + 5)
        assert await queue.claim(now + 1, 0.3, 10) == []  # not due before now + 5
        (retry,) = await queue.claim(now + 5, 0.3, 10)
        assert retry.attempt == 2
        await redis.aclose()

    asyncio.run(scenario())


def test_sender_logs_one_line_while_redis_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    sender = WebhookSender(client, Settings(webhook_poll_interval_s=0.05))

    async def run_a_while() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await sender.run_forever()
        await client.aclose()

    with caplog.at_level("WARNING", logger="reasonq.webhooks"):
        asyncio.run(run_a_while())
    records = [r for r in caplog.records if r.name == "reasonq.webhooks"]
    assert records, "the sender said nothing about Redis"
    assert all("Redis unavailable" in r.getMessage() and not r.exc_info for r in records)
