"""API keys end to end: `reasonq keys` (a real CLI process) creates and revokes keys, a second
API with REASONQ_AUTH_ENABLED=true on the stack's Redis and workers checks them.

Runtime `ollama` is routed to a queue nobody consumes here, so its jobs stay queued for as
long as a quota test needs them to."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from core import keys
from tests.cluster import service_env, start_api
from tests.conftest import ROUTING, Stack

HELD = "held-auth"
MAX_BODY = 4096
MAX_UPLOAD = 32768


@dataclass
class AuthApi:
    url: str
    redis_url: str

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "core.cli", "keys", *argv],
            env=service_env(self.redis_url), capture_output=True, text=True, timeout=30,
            check=False,
        )  # fmt: skip

    def create_key(self, *options: str) -> str:
        done = self.cli("create", "--name", "team-test", *options)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def auth_api(stack: Stack) -> Iterator[AuthApi]:
    env = service_env(
        stack.redis.url,
        runtime_queues={**ROUTING, "ollama": HELD},
        auth_enabled=True,
        max_body_bytes=MAX_BODY,
        max_upload_bytes=MAX_UPLOAD,
    )
    api, url = start_api(env, stack.log_dir)
    yield AuthApi(url, stack.redis.url)
    api.stop()
    client = redis.Redis.from_url(stack.redis.url)
    client.delete(*keys.queue_lists(HELD))  # messages of jobs that never ran
    client.close()


def key_id(key: str) -> str:
    return key.removeprefix("rq_").split("_")[0]


def submit(client: httpx.Client, runtime: str = "ollama") -> httpx.Response:
    return client.post("/v1/jobs", json={"prompt": "What is 2 + 2?", "runtime": runtime})


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["code"] == "unauthorized"


def test_missing_invalid_and_revoked_keys_are_refused(auth_api: AuthApi) -> None:
    key = auth_api.create_key()
    forged = f"rq_{key_id(key)}_{'x' * 43}"  # a real id, a wrong secret
    for header in (None, "Bearer", "Bearer nonsense", f"Bearer {forged}", f"Basic {key}"):
        headers = {"Authorization": header} if header else {}
        assert_401(httpx.post(f"{auth_api.url}/v1/jobs", json={"prompt": "hi"}, headers=headers))
        assert_401(httpx.get(f"{auth_api.url}/v1/jobs/abc", headers=headers))
    for path in ("/healthz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{auth_api.url}{path}").status_code == 200, path
    assert httpx.get(f"{auth_api.url}/readyz").status_code != 401  # 503: HELD has no worker

    with auth_api.client(key) as client:
        job = submit(client, "vllm")
        assert job.status_code == 202, job.text
        assert client.get(f"/v1/jobs/{job.json()['id']}").status_code == 200
        listed = auth_api.cli("list")
        assert key_id(key) in listed.stdout and "team-test" in listed.stdout
        revoked = auth_api.cli("revoke", key_id(key))
        assert revoked.returncode == 0, revoked.stderr
        assert_401(client.get(f"/v1/jobs/{job.json()['id']}"))
        assert_401(submit(client, "vllm"))
    row = next(line for line in auth_api.cli("list").stdout.splitlines() if key_id(key) in line)
    assert row.split()[-1] == "revoked"
    assert auth_api.cli("revoke", "nosuchkey").returncode == 1


def test_a_job_belongs_to_the_key_that_made_it(auth_api: AuthApi, stack: Stack) -> None:
    mine, theirs = auth_api.create_key(), auth_api.create_key()
    with auth_api.client(mine) as client:
        created = submit(client, "vllm").json()
        job = client.get(f"/v1/jobs/{created['id']}", params={"wait": 30}).json()
        assert job["status"] == "succeeded", job
    stored = redis.Redis.from_url(stack.redis.url).hget(keys.job(created["id"]), "owner")
    assert stored.decode() == key_id(mine)
    with auth_api.client(theirs) as client:
        assert client.get(f"/v1/jobs/{created['id']}").status_code == 404
        assert client.delete(f"/v1/jobs/{created['id']}").status_code == 404


def test_rate_limit_answers_429_with_retry_after(auth_api: AuthApi) -> None:
    key = auth_api.create_key("--rate-limit", "2/s")
    with auth_api.client(key) as client:
        accepted = [submit(client) for _ in range(2)]
        assert [r.status_code for r in accepted] == [202, 202]
        refused = submit(client)
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "rate_limited"
        retry_after = int(refused.headers["retry-after"])
        assert retry_after >= 1
        time.sleep(retry_after)
        accepted.append(submit(client))
        assert accepted[-1].status_code == 202
        for response in accepted:
            client.delete(f"/v1/jobs/{response.json()['id']}")


def test_job_quota_counts_queued_and_running_jobs(auth_api: AuthApi, stack: Stack) -> None:
    key = auth_api.create_key("--max-concurrent-jobs", "1")
    active = keys.owner_active(key_id(key))
    store = redis.Redis.from_url(stack.redis.url)
    with auth_api.client(key) as client:
        held = submit(client)  # stays queued: nobody consumes its queue
        assert held.status_code == 202, held.text
        refused = submit(client, "vllm")
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "quota_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        assert store.scard(active) == 1  # the refused job was not counted
        # Cancelling the queued job frees its slot (the cancel script releases it) ...
        assert client.delete(f"/v1/jobs/{held.json()['id']}").json()["status"] == "cancelled"
        ran = submit(client, "vllm")
        assert ran.status_code == 202, ran.text
        job = client.get(f"/v1/jobs/{ran.json()['id']}", params={"wait": 30}).json()
        assert job["status"] == "succeeded", job
        # ... and so does a job that ran to its end (the finish script).
        assert store.scard(active) == 0
        again = submit(client)
        assert again.status_code == 202, again.text
        client.delete(f"/v1/jobs/{again.json()['id']}")
    assert store.scard(active) == 0


def raw_request(url: str, head: str) -> tuple[int, dict]:
    """Send only a request head (no body) and read the answer: proves it came unread."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_oversized_bodies_are_refused_with_413(auth_api: AuthApi) -> None:
    key = auth_api.create_key()
    # Declared too large: answered before a byte of the (never sent) body.
    status, body = raw_request(
        auth_api.url,
        f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
    )
    assert status == 413 and body["code"] == "body_too_large"
    assert "REASONQ_MAX_BODY_BYTES" in body["detail"]
    with auth_api.client(key) as client:
        # Streamed with no length (chunked): counted as it arrives.
        payload = json.dumps({"prompt": "x" * MAX_BODY}).encode()
        chunks = iter([payload[:1000], payload[1000:]])
        response = client.post(
            "/v1/jobs", content=chunks, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "body_too_large"
        # Uploads (multipart) get their own, larger limit.
        small_upload = {"file": ("rows.csv", b"prompt\n" + b"x" * (MAX_BODY * 2))}
        assert client.post("/v1/jobs", files=small_upload).status_code == 422  # not JSON
        big_upload = {"file": ("rows.csv", b"prompt\n" + b"x" * MAX_UPLOAD)}
        response = client.post("/v1/jobs", files=big_upload)
        assert response.status_code == 413, response.text
        assert "REASONQ_MAX_UPLOAD_BYTES" in response.json()["detail"]
        assert submit(client, "vllm").status_code == 202  # a normal body still passes
