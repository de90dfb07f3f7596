"""``reasonq-submit`` as a user runs it: a subprocess against the real stack."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

from tests.cluster import ROOT, wait_until
from tests.conftest import Stack


def submit_cmd(stack: Stack, *args: object) -> list[str]:
    return [
        sys.executable, "-m", "scripts.submit_batch", *map(str, args),
        "--api", stack.url, "--no-progress", "--runtime", "vllm",
    ]


def run_submit(stack: Stack, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        submit_cmd(stack, *args), check=False, cwd=ROOT, env=stack.env, capture_output=True,
        text=True,
        timeout=120,
    )


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def backend_prompts(stack: Stack, tag: str) -> Counter[str]:
    """How many times the backend was asked each prompt carrying ``tag``."""
    log = httpx.get(f"{stack.vllm.url}/_standin/requests").json()
    prompts = (r["body"]["messages"][-1]["content"] for r in log)
    return Counter(p for p in prompts if tag in p)


def test_csv_round_trip_keeps_rows_columns_and_order(stack: Stack, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    rows = [[f"r{i}", f"{tag} problem {i}: 2+{i}?", f'note, "quoted" {i}', ""] for i in range(300)]
    write_csv(tmp_path / "in.csv", ["key", "question", "notes", "empty"], rows)
    done = run_submit(
        stack, tmp_path / "in.csv", "-o", tmp_path / "out.csv", "--prompt-column", "question",
        "--id-column", "key", "--max-tokens", "32",
    )
    assert done.returncode == 0, done.stderr
    assert "300 rows: 300 succeeded, 0 failed" in done.stderr
    out = read_csv(tmp_path / "out.csv")
    assert [[r["key"], r["question"], r["notes"], r["empty"]] for r in out] == rows
    assert all(r["status"] == "succeeded" and r["answer"] for r in out)
    assert all(int(r["completion_tokens"]) > 0 and float(r["latency_s"]) >= 0 for r in out)
    assert not (tmp_path / "out.csv.part").exists()
    assert set(backend_prompts(stack, tag).values()) == {1}


def test_killed_run_resumes_without_duplicates(stack: Stack, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    write_csv(tmp_path / "in.csv", ["prompt"], [[f"{tag} row {i}"] for i in range(200)])
    args = (tmp_path / "in.csv", "-o", tmp_path / "out.csv", "--concurrency", "8")
    # A slow backend, so the kill lands midway.
    httpx.post(f"{stack.vllm.url}/_standin/faults", json={"latency_s": 0.05, "count": -1})
    try:
        first = subprocess.Popen(
            submit_cmd(stack, *args), cwd=ROOT, env=stack.env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: sum(backend_prompts(stack, tag).values()) >= 40, 30, "40 rows")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        asked_before = sum(backend_prompts(stack, tag).values())
        assert 40 <= asked_before < 200
    finally:
        httpx.delete(f"{stack.vllm.url}/_standin/faults")
    time.sleep(0.5)  # jobs in flight at the kill still end on the workers
    second = run_submit(stack, *args)
    assert second.returncode == 0, second.stderr
    out = read_csv(tmp_path / "out.csv")
    assert [r["prompt"] for r in out] == [f"{tag} row {i}" for i in range(200)]
    assert all(r["status"] == "succeeded" for r in out)
    asked = backend_prompts(stack, tag)
    assert len(asked) == 200 and set(asked.values()) == {1}, "a row ran twice or never"
    assert len({r["job_id"] for r in out}) == 200


def test_bad_rows_are_reported_and_the_rest_answered(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text(
        "id,prompt,temperature\n"
        "1,fine,0.5\n"
        "2,broken,row,extra\n"  # line 3
        "3,too hot,9\n"  # line 4: rejected by the API
        "4,,0.1\n"  # line 5: no prompt
        "5,also fine,\n"
    )
    done = run_submit(
        stack, tmp_path / "in.csv", "-o", tmp_path / "out.jsonl",
        "--temperature-column", "temperature",
    )
    assert done.returncode == 1
    assert "5 rows: 2 succeeded, 3 failed" in done.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["status"] for r in out] == [
        "succeeded", "rejected", "rejected", "rejected", "succeeded"
    ]
    assert out[1]["error"].startswith("line 3:") and out[1]["line"] == 3
    assert out[2]["error"].startswith("line 4:") and "temperature" in out[2]["error"]
    assert out[3]["error"].startswith("line 5:") and "prompt" in out[3]["error"]
    assert out[4]["id"] == "5" and out[4]["answer"]


def test_usage_errors_exit_2(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("question\nhi\n")
    missing_column = run_submit(stack, tmp_path / "in.csv", "-o", tmp_path / "o.csv")
    missing_file = run_submit(stack, tmp_path / "nope.csv", "-o", tmp_path / "o.csv")
    assert missing_column.returncode == 2 and "'prompt'" in missing_column.stderr
    assert missing_file.returncode == 2


def test_response_format_option_gives_json_answers(stack: Stack, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["question"], [[f"Add {i} and {i}."] for i in range(5)])
    schema = {"type": "json_schema", "json_schema": {"name": "sum", "schema": {
        "type": "object", "properties": {"total": {"type": "integer"}}}}}  # fmt: skip
    done = run_submit(
        stack, tmp_path / "in.csv", "-o", tmp_path / "out.csv", "--prompt-column", "question",
        "--response-format", json.dumps(schema),
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(r["answer"]) for r in read_csv(tmp_path / "out.csv")]
    assert len(answers) == 5 and all(isinstance(a["total"], int) for a in answers)
