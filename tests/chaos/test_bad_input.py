"""Bad input gets a clear 4xx, never a 5xx: schemathesis against the API's own OpenAPI
schema (every route, at least 1,000 generated requests), and hand-made cases a schema
cannot express (oversized, invalid UTF-8, NaN, deep nesting, wrong content type)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.chaos.harness import Cluster, report

EXAMPLES_PER_OPERATION = 80
CALLS: list[int] = []  # status of every generated request


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # No workers: accepted jobs just wait in their queue, which is all this needs.
    c = Cluster(
        Path(tmp_path_factory.mktemp("chaos-input")),
        settings={"runtime_queues": {"vllm": "gpu", "ollama": "cpu", "onnx": "cpu"}},
    )
    try:
        c.api()
        yield c
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fuzzed_requests_never_get_5xx(cluster: Cluster) -> None:
    """Valid and invalid requests for every operation of the served schema (routes added
    later are fuzzed too); every 5xx is collected, with the request that caused it."""
    api = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    errors: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    for operation in operations:
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,  # the same requests every run: CI stays reproducible
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def call(case: Any) -> None:
            response = case.call(base_url=cluster.url, timeout=15)
            CALLS.append(response.status_code)
            # /readyz answers 503 by design here: no worker consumes the queues.
            readiness = case.path == "/readyz" and response.status_code == 503
            if response.status_code >= 500 and not readiness:
                errors.append(
                    f"{case.method} {case.formatted_path} {case.query} {case.body!r:.300}"
                    f" -> {response.status_code}: {response.text[:300]}"
                )

        call()
    assert not errors, "\n".join(errors[:20])
    assert len(operations) >= 4


JSON_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
JOB_FIELDS = {
    "task_type": st.sampled_from(["reasoning", "math", "coding", "chat", "poetry"]),
    "runtime": st.sampled_from(["vllm", "ollama", "onnx", "tgi"]),
    "model": st.text(max_size=300),
    "max_tokens": st.integers(-5, 40_000),
    "temperature": st.floats(-1, 3, allow_nan=False),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": st.integers(-1, 2000),
    "seed": st.integers(-1, 2**64),
    "stop": st.text(max_size=200) | st.lists(st.text(max_size=150), max_size=10),
    "priority": st.integers(-1, 10),
    "metadata": st.dictionaries(st.text(), JSON, max_size=5),
}
JOBS = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=2000)},
    optional={name: strategy for name, strategy in JOB_FIELDS.items()},
)


@pytest.mark.timeout(120)
def test_plausible_jobs_are_accepted_or_refused_never_5xx(cluster: Cluster) -> None:
    """Bodies close to valid (the schema's fuzzer mostly meets the prompt/messages rule):
    each is queued (202) or refused (422), whatever its metadata and odd values."""
    errors: list[str] = []
    with httpx.Client(base_url=cluster.url, timeout=15) as client:

        @given(body=JOBS)
        @settings(
            max_examples=300,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def post(body: dict[str, Any]) -> None:
            response = client.post("/v1/jobs", json=body)
            CALLS.append(response.status_code)
            if response.status_code not in {202, 422}:
                errors.append(f"{body!r:.300} -> {response.status_code}: {response.text[:300]}")

        post()
    assert not errors, "\n".join(errors[:20])


def nested(depth: int) -> str:
    """``{"a": {"a": ... 1}}`` as JSON text (json.dumps would hit the recursion limit)."""
    return '{"a": ' * depth + "1" + "}" * depth


def raw(body: str | bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


PROMPT = {"prompt": "2 + 2?"}
CASES: dict[str, tuple[str, str, dict[str, Any], set[int]]] = {
    "oversized body": ("POST", "/v1/jobs", {"json": {"prompt": "x" * 2_000_000}}, {413}),
    "oversized chunked body": (
        "POST", "/v1/jobs",
        {"content": iter([b'{"prompt": "', b"x" * 1_500_000, b'"}']),
         "headers": {"content-type": "application/json"}},
        {413},
    ),
    "huge max_tokens": ("POST", "/v1/jobs", {"json": {**PROMPT, "max_tokens": 10**12}}, {422}),
    "max_tokens past int64": ("POST", "/v1/jobs", raw('{"prompt": "x", "max_tokens": 1e400}'), {422}),
    "invalid UTF-8": ("POST", "/v1/jobs", raw(b'{"prompt": "\xff\xfe\xc0"}'), {400, 422}),
    "NaN temperature": ("POST", "/v1/jobs", raw('{"prompt": "x", "temperature": NaN}'), {422}),
    "Infinity top_p": ("POST", "/v1/jobs", raw('{"prompt": "x", "top_p": Infinity}'), {422}),
    "unknown field": ("POST", "/v1/jobs", {"json": {**PROMPT, "temprature": 0.2}}, {422}),
    "wrong content type": ("POST", "/v1/jobs", raw(json.dumps(PROMPT), "text/plain"), {415, 422}),
    "form body": ("POST", "/v1/jobs", {"data": PROMPT}, {415, 422}),
    "not JSON": ("POST", "/v1/jobs", raw("{prompt: x"), {400, 422}),
    "empty body": ("POST", "/v1/jobs", raw(""), {400, 422}),
    "JSON null": ("POST", "/v1/jobs", raw("null"), {422}),
    "deeply nested metadata": (
        "POST", "/v1/jobs", raw('{"prompt": "x", "metadata": ' + nested(5_000) + "}"),
        {400, 413, 422},
    ),
    "nested metadata just past the JSON encoder's limit": (
        "POST", "/v1/jobs", raw('{"prompt": "x", "metadata": ' + nested(990) + "}"),
        {202, 400, 422},
    ),
    "deeply nested array body": ("POST", "/v1/jobs", raw("[" * 100_000 + "]" * 100_000),
                                 {400, 413, 422}),
    "metadata not an object": ("POST", "/v1/jobs", {"json": {**PROMPT, "metadata": [1]}}, {422}),
    "prompt and messages": (
        "POST", "/v1/jobs", {"json": {**PROMPT, "messages": [{"role": "user", "content": "x"}]}},
        {422},
    ),
    "NUL in prompt": ("POST", "/v1/jobs", {"json": {"prompt": "a\u0000b"}}, {202, 422}),
    "lone surrogate": ("POST", "/v1/jobs", raw('{"prompt": "\\ud800"}'), {202, 422}),
    "priority 10": ("POST", "/v1/jobs", {"json": {**PROMPT, "priority": 10}}, {422}),
    "seed past int64": ("POST", "/v1/jobs", {"json": {**PROMPT, "seed": 2**64}}, {422}),
    "huge Idempotency-Key": (
        "POST", "/v1/jobs", {"json": PROMPT, "headers": {"Idempotency-Key": "k" * 5000}}, {422},
    ),
    "wait NaN": ("GET", "/v1/jobs/abc?wait=nan", {}, {404, 422}),
    "wait 1e309": ("GET", "/v1/jobs/abc?wait=1e309", {}, {404, 422}),
    "job id with NUL": ("GET", "/v1/jobs/%00", {}, {404}),
    "job id 10 kB": ("GET", "/v1/jobs/" + "a" * 10_000, {}, {404, 414, 422}),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_explicit_bad_input(cluster: Cluster, name: str) -> None:
    method, path, kwargs, expected = CASES[name]
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        response = client.request(method, path, **kwargs)
    CALLS.append(response.status_code)
    assert response.status_code in expected, f"{name}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        assert body.get("detail"), f"{name}: no reason given: {body}"


def test_bad_input_figure() -> None:
    """Runs last in this module: the figure over every request above."""
    fuzzed = len(CALLS) - len(CASES)
    assert fuzzed > 0, "run the whole module: the fuzzer did not run"
    report(
        "bad input",
        requests=len(CALLS),
        generated=fuzzed,
        explicit=len(CASES),
        status_2xx=sum(200 <= s < 300 for s in CALLS),
        status_4xx=sum(400 <= s < 500 for s in CALLS),
        status_5xx=sum(s >= 500 for s in CALLS),  # /readyz's 503s: no worker here
    )
    assert fuzzed >= 1000, f"only {fuzzed} generated requests"
