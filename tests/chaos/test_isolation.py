"""With API keys on, no route leaks or touches another key's job, batch, file, result or
event stream: every route of the served schema that takes an id is tried with key B on
key A's ids (routes added later are covered too). Webhooks to private addresses are
refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.harness import Cluster, echo_prompt, report, submit
from tests.cluster import ROOT

SECRET = "a-prompt-only-key-a-may-read"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("chaos-isolation")),
        settings={
            "runtime_queues": {"vllm": "gpu"},
            "auth_enabled": "true",
            "webhook_secret": "chaos-webhook-secret",
        },
    )
    try:
        vllm = c.standin("vllm", "tests.standins.openai_server", "--step-base-s", "0.01")
        c.settings.update(vllm_url=vllm.url)
        c.worker("gpu", ["gpu"])
        c.api()
        yield c
    finally:
        c.close()


def create_key(cluster: Cluster, name: str) -> str:
    """``reasonq keys create``, as an operator would run it."""
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "keys", "create", "--name", name],
        cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def owned_by_a(client: httpx.Client) -> dict[str, str]:
    """A job, a batch, an OpenAI-style file and batch of key A; path parameter -> id."""
    ids: dict[str, str] = {}
    job = submit(client, {"prompt": echo_prompt(SECRET, 5), "runtime": "vllm"})
    assert job.status_code == 202, job.text
    ids["job_id"] = job.json()["id"]
    rows = f"prompt\n{echo_prompt(SECRET, 3)}\n".encode()
    batch = client.post(
        "/v1/batches", files={"file": ("rows.csv", rows)}, data={"runtime": "vllm"}
    )
    assert batch.status_code in {200, 201, 202}, batch.text
    ids["batch_id"] = batch.json()["id"]
    line = {
        "custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": echo_prompt(SECRET, 3)}]},
    }  # fmt: skip
    upload = client.post(
        "/openai/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
    )
    if upload.status_code == 200:
        ids["file_id"] = upload.json()["id"]
        openai = client.post(
            "/openai/v1/batches",
            json={"input_file_id": ids["file_id"], "endpoint": "/v1/chat/completions",
                  "completion_window": "24h"},
        )  # fmt: skip
        if openai.status_code == 200:
            ids["openai_batch_id"] = openai.json()["id"]
    return ids


def routes_with_ids(schema: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if "{" in path
    ]


def fill(path: str, ids: dict[str, str]) -> str | None:
    """The path with A's ids in it; None when A owns nothing of that kind."""
    def one(match: re.Match[str]) -> str:
        name = match[1]
        if name == "batch_id" and path.startswith("/openai/"):
            name = "openai_batch_id"
        if name not in ids:
            raise KeyError(name)
        return ids[name]

    try:
        return re.sub(r"\{(\w+)\}", one, path)
    except KeyError:
        return None


@pytest.mark.timeout(120)
def test_keys_cannot_reach_each_others_jobs(cluster: Cluster) -> None:
    key_a, key_b = create_key(cluster, "team-a"), create_key(cluster, "team-b")
    a = httpx.Client(base_url=cluster.url, timeout=10, headers={"Authorization": f"Bearer {key_a}"})
    b = httpx.Client(base_url=cluster.url, timeout=10, headers={"Authorization": f"Bearer {key_b}"})
    anonymous = httpx.Client(base_url=cluster.url, timeout=10)
    with a, b, anonymous:
        ids = owned_by_a(a)
        schema = anonymous.get("/openapi.json").json()
        tried, leaks, open_to_all = 0, [], []
        for method, template in routes_with_ids(schema):
            path = fill(template, ids)
            if path is None:
                continue
            for who, client, allowed in (("B", b, {403, 404}), ("no key", anonymous, {401})):
                with client.stream(method, path, params={"wait": 0}) as response:
                    body = b"" if response.status_code < 300 else response.read()
                tried += 1
                if response.status_code not in allowed or SECRET.encode() in body:
                    leaks.append(f"{who}: {method} {template} -> {response.status_code}")
            if method == "GET":  # A reads its own: the ids are real, so B's 404 means something
                with a.stream(method, path, params={"wait": 0}) as response:
                    if response.status_code != 200:
                        open_to_all.append(f"A: {method} {template} -> {response.status_code}")
        job = a.get(f"/v1/jobs/{ids['job_id']}").json()

        # Webhooks: private, loopback, link-local and metadata addresses are refused.
        refused = []
        for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook",
                    "http://192.168.0.1/hook", "http://169.254.169.254/latest/meta-data",
                    "http://[::1]/hook", "http://0.0.0.0/hook"):  # fmt: skip
            response = submit(a, {"prompt": "x", "runtime": "vllm", "callback_url": url})
            refused.append((url, response.status_code, response.json().get("code")))

    kinds = sorted(ids)
    report(
        "isolation",
        owned_by_a=",".join(kinds),
        requests_as_b_or_anonymous=tried,
        leaks=len(leaks),
        private_webhooks_refused=sum(code == "callback_url_refused" for *_, code in refused),
        of=len(refused),
    )
    assert not leaks, leaks
    assert not open_to_all, open_to_all
    assert tried >= 10
    assert job["status"] != "cancelled", "key B's DELETE cancelled key A's job"
    assert all(status == 422 and code == "callback_url_refused" for _, status, code in refused), (
        refused
    )
