"""The batch API end to end: upload, progress, results in input order, strictness, cancel."""

from __future__ import annotations

import csv
import io
import json
import time

import httpx
import redis

from api.batch_results import csv_lines, result_row
from core import keys
from tests.conftest import Stack


def upload(client: httpx.Client, name: str, text: str, **form: object) -> httpx.Response:
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}
    return client.post("/v1/batches", files={"file": (name, text.encode())}, data=data)


def wait_for_batch(client: httpx.Client, batch_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in {"completed", "cancelled"}:
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} still {batch['status']}: {batch['counts']}")


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_batch_runs_every_row_in_order(stack: Stack) -> None:
    lines = ["qid,question,temp"] + [f"q{i},What is {i} + {i}?,{i % 2 / 2}" for i in range(60)]
    with stack.client() as client:
        response = upload(
            client, "problems.csv", "\n".join(lines) + "\n",
            prompt_column="question", id_column="qid", temperature_column="temp",
            runtime="vllm", task_type="math",
        )
        assert response.status_code == 201, response.text
        created = response.json()
        assert created["counts"]["submitted"] == 60 and created["counts"]["total"] == 60
        assert created["status"] in {"in_progress", "completed"}
        batch = wait_for_batch(client, created["id"])
        results = client.get(f"/v1/batches/{created['id']}/results")
        as_jsonl = client.get(f"/v1/batches/{created['id']}/results", params={"format": "jsonl"})
    assert batch["status"] == "completed"
    counts = batch["counts"]
    assert counts["succeeded"] == 60 and counts["queued"] == counts["running"] == 0
    assert batch["jobs_per_s"] > 0 and batch["finished_at"]
    assert results.headers["content-type"].startswith("text/csv")
    rows = csv_rows(results.text)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(60)]
    assert all(r["status"] == "succeeded" and r["answer"] for r in rows)
    assert all(int(r["completion_tokens"]) > 0 and float(r["latency_s"]) > 0 for r in rows)
    jsonl = [json.loads(line) for line in as_jsonl.text.splitlines()]
    assert [r["index"] for r in jsonl] == list(range(60))
    # Each row is an ordinary job, with the row's own sampling parameter.
    job = stack.client().get(f"/v1/jobs/{jsonl[1]['job_id']}").json()
    assert job["status"] == "succeeded" and job["priority"] == 3


def test_counters_match_the_jobs(stack: Stack) -> None:
    """The Lua-kept counters agree with the jobs' own states."""
    lines = ["prompt"] + [f"p{i}" for i in range(40)]
    with stack.client() as client:
        created = upload(client, "c.csv", "\n".join(lines), runtime="vllm").json()
        batch = wait_for_batch(client, created["id"])
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    statuses = [r.hget(keys.job(f"{created['id']}-{i}"), "status") for i in range(40)]
    assert batch["counts"]["succeeded"] == statuses.count("succeeded") == 40
    assert r.ttl(keys.batch(created["id"])) > 0  # finished: expires with its jobs


def test_lenient_batch_keeps_good_rows_and_names_bad_lines(stack: Stack) -> None:
    text = (
        "id,prompt,max_tokens\n"
        "a,fine,16\n"
        "b,too many,fields,here\n"  # line 3
        "c,,16\n"  # line 4: empty prompt
        "d,fine too,-5\n"  # line 5: invalid max_tokens
        'e,"spans\ntwo lines",16\n'  # lines 6-7
    )
    with stack.client() as client:
        response = upload(
            client, "mixed.csv", text, id_column="id", max_tokens_column="max_tokens",
            runtime="vllm",
        )
        assert response.status_code == 201, response.text
        created = response.json()
        wait_for_batch(client, created["id"])
        rows = csv_rows(client.get(f"/v1/batches/{created['id']}/results").text)
    assert created["counts"]["submitted"] == 2 and created["counts"]["rejected"] == 3
    assert [(p["line"], p["index"]) for p in created["rejected_rows"]] == [(3, 1), (4, 2), (5, 3)]
    assert "expected 3 fields" in created["rejected_rows"][0]["message"]
    assert "prompt" in created["rejected_rows"][1]["message"]
    assert "max_tokens" in created["rejected_rows"][2]["message"]
    assert [r["status"] for r in rows] == [
        "succeeded", "rejected", "rejected", "rejected", "succeeded"
    ]
    assert [r["id"] for r in rows] == ["a", "1", "c", "d", "e"]


def test_strict_batch_is_refused_whole(stack: Stack) -> None:
    text = "prompt,temperature\nok,0.5\nbad,7\nok again,0.1\n"
    with stack.client() as client:
        before = len(httpx.get(f"{stack.vllm.url}/_standin/requests").json())
        response = upload(
            client, "strict.csv", text, strict=True, temperature_column="temperature",
            runtime="vllm",
        )
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "invalid_batch" and "line 3" in body["detail"]
    assert body["errors"] == [{"line": 3, "index": 1, "message": body["errors"][0]["message"]}]
    assert "temperature" in body["errors"][0]["message"]
    time.sleep(0.3)
    assert len(httpx.get(f"{stack.vllm.url}/_standin/requests").json()) == before

    with stack.client() as client:
        good = upload(client, "strict.csv", "prompt\nok\nok too\n", strict=True, runtime="vllm")
    assert good.status_code == 201 and good.json()["counts"]["submitted"] == 2


def test_unreadable_files_are_refused(stack: Stack) -> None:
    with stack.client() as client:
        missing = upload(client, "x.csv", "question\nhi\n")
        empty = upload(client, "x.csv", "")
        jsonl = upload(client, "x.jsonl", '{"prompt": "a"}\nnot json\n', runtime="vllm")
        unserved = upload(client, "x.csv", "prompt\nhi\n", runtime="tgi")
    assert missing.status_code == 422 and "'prompt'" in missing.json()["detail"]
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    assert unserved.status_code == 422
    assert jsonl.status_code == 201
    assert jsonl.json()["rejected_rows"][0]["line"] == 2
    assert "invalid JSON" in jsonl.json()["rejected_rows"][0]["message"]


def test_cancel_stops_what_has_not_run(stack: Stack) -> None:
    # A slow backend keeps most rows queued while we cancel.
    httpx.post(f"{stack.vllm.url}/_standin/faults", json={"latency_s": 0.5, "count": -1})
    try:
        lines = ["prompt"] + [f"p{i}" for i in range(200)]
        with stack.client() as client:
            created = upload(client, "slow.csv", "\n".join(lines), runtime="vllm").json()
            cancelled = client.delete(f"/v1/batches/{created['id']}")
            assert cancelled.status_code == 200
            assert cancelled.json()["status"] in {"cancelling", "cancelled"}
            batch = wait_for_batch(client, created["id"])
            rows = client.get(
                f"/v1/batches/{created['id']}/results", params={"format": "jsonl"}
            ).text.splitlines()
    finally:
        httpx.delete(f"{stack.vllm.url}/_standin/faults")
    counts = batch["counts"]
    assert batch["status"] == "cancelled"
    assert counts["cancelled"] > 100
    assert counts["succeeded"] + counts["failed"] + counts["cancelled"] == 200
    assert sum(json.loads(r)["status"] == "cancelled" for r in rows) == counts["cancelled"]


def test_unknown_batch_is_404(stack: Stack) -> None:
    with stack.client() as client:
        assert client.get("/v1/batches/nope").json()["code"] == "batch_not_found"
        assert client.get("/v1/batches/nope/results").status_code == 404
        assert client.delete("/v1/batches/nope").status_code == 404


def test_cancelling_a_finished_batch_changes_nothing(stack: Stack) -> None:
    with stack.client() as client:
        created = upload(client, "done.csv", "prompt\na\nb", runtime="vllm").json()
        assert wait_for_batch(client, created["id"])["status"] == "completed"
        after = client.delete(f"/v1/batches/{created['id']}").json()
        again = client.get(f"/v1/batches/{created['id']}").json()
    assert after["status"] == again["status"] == "completed"
    assert again["counts"]["succeeded"] == 2 and again["counts"]["cancelled"] == 0


def test_result_rows_carry_the_reasoning() -> None:
    stored = {
        "index": 3, "batch_row_id": "q3", "status": "succeeded", "job_id": "j",
        "created_at": "10.0", "finished_at": "12.5",
        "result": {"text": "4", "reasoning": "2 + 2 is 4.",
                   "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
    }  # fmt: skip
    record = result_row(stored)
    assert (record["answer"], record["reasoning"], record["latency_s"]) == ("4", "2 + 2 is 4.", 2.5)
    header, line = csv_lines([record], header=True).decode().splitlines()
    assert header.split(",")[3:5] == ["answer", "reasoning"]
    assert line.split(",")[3:5] == ["4", "2 + 2 is 4."]


def test_response_format_per_batch_and_per_row(stack: Stack) -> None:
    # A batch-wide JSON schema (form field), one row with its own (a cell of JSON text),
    # and one row whose cell is not JSON: refused with the reason, the others answered.
    schema = {"type": "json_schema", "json_schema": {"name": "sum", "schema": {
        "type": "object", "properties": {"total": {"type": "integer"}}}}}  # fmt: skip
    own = json.dumps({"type": "json_object"}).replace('"', '""')
    lines = ["q,fmt", "Add 1 and 2.,", f'Add 3 and 4.,"{own}"', "Add 5 and 6.,{not json"]
    with stack.client() as client:
        response = upload(
            client, "sums.csv", "\n".join(lines) + "\n", prompt_column="q", runtime="vllm",
            response_format=json.dumps(schema), response_format_column="fmt",
        )  # fmt: skip
        assert response.status_code == 201, response.text
        created = response.json()
        [refused] = created["rejected_rows"]
        assert refused["line"] == 4 and "response_format: not JSON" in refused["message"]
        wait_for_batch(client, created["id"])
        rows = csv_rows(client.get(f"/v1/batches/{created['id']}/results").text)
        bad_default = upload(client, "x.csv", "q\nhi\n", prompt_column="q",
                             response_format='{"type": "xml"}')  # fmt: skip
    answers = {r["index"]: json.loads(r["answer"]) for r in rows if r["status"] == "succeeded"}
    assert isinstance(answers["0"]["total"], int)  # the batch's schema
    assert "total" not in answers["1"] and isinstance(answers["1"], dict)  # its own
    assert bad_default.status_code == 422 and "response_format" in bad_default.text
