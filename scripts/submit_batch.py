"""``reasonq-submit``: run every row of a CSV or JSONL file through reasonq, keep the answers.

    reasonq-submit problems.csv -o answers.csv --prompt-column question --runtime vllm

``answers.csv`` holds every input row, its columns as read, plus ``answer``, ``reasoning``
(a reasoning model's thinking), ``status``, ``error``, token counts, ``latency_s`` and
``job_id``, in input order. Interrupted and run again with the same arguments, it resumes:
each row's Idempotency-Key comes from the file's content, the options and the row's index,
so rows already submitted get their existing job back and none is submitted twice. Exits 1
(with a summary) when rows failed, 2 on a usage or file error.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

from core.rows import (
    JOB_FIELDS,
    ColumnMap,
    Format,
    Row,
    RowError,
    TableError,
    detect_format,
    read_rows,
)
from core.settings import Settings
from scripts.batch_client import JobClient, RateLimiter, Retry, RowRejected

OUTPUT_COLUMNS = (
    "answer", "reasoning", "status", "error", "prompt_tokens", "completion_tokens", "latency_s",
    "job_id",
)
"""Columns added to each input row; ``latency_s`` runs from enqueue to the job's end."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="reasonq-submit", description=__doc__.split("\n\n")[0].strip("`: ")
    )
    parser.add_argument("input", type=Path, help="CSV (with a header) or JSONL file")
    parser.add_argument("-o", "--output", type=Path, required=True, help="CSV or JSONL")
    parser.add_argument("--format", choices=["csv", "jsonl"], help="input format (default: name)")
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="reasonq API base URL")
    parser.add_argument("--api-key", help="Bearer key (default: REASONQ_CLIENT_API_KEY)")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--id-column", help="column naming each row (echoed back)")
    for name in JOB_FIELDS:
        flag = name.replace("_", "-")
        parser.add_argument(f"--{flag}-column", metavar="COLUMN", help=f"per-row {name}")
        parser.add_argument(f"--{flag}", metavar="VALUE", help=f"{name} of rows without one")
    parser.add_argument("--concurrency", type=int, default=64, help="rows in flight at once")
    parser.add_argument("--rate", type=float, default=0.0, help="max submissions/s (0: any)")
    parser.add_argument("--retries", type=int, default=8, help="tries per request")
    parser.add_argument("--wait", type=float, default=30.0, help="long-poll seconds per GET")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def column_map(args: argparse.Namespace) -> ColumnMap:
    options = vars(args)
    return ColumnMap(
        prompt=args.prompt_column,
        id=args.id_column,
        columns={f: options[f"{f}_column"] for f in JOB_FIELDS if options[f"{f}_column"]},
        defaults={f: options[f] for f in JOB_FIELDS if options[f] is not None},
    )


def run_key(path: Path, columns: ColumnMap) -> str:
    """Same file content and options -> same keys; change either and rows are new jobs."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    options = json.dumps([columns.prompt, columns.columns, columns.defaults], sort_keys=True)
    digest.update(options.encode())
    return digest.hexdigest()[:32]


@dataclass
class Tally:
    submitted: int = 0
    succeeded: int = 0
    failed: list[str] = field(default_factory=list)  # "line N: reason", for the summary


class OrderedWriter:
    """Writes results in input order as they complete out of order (the done prefix)."""

    def __init__(self, out: TextIO, fmt: Format, header: list[str] | None) -> None:
        self.out, self.fmt, self.header = out, fmt, header
        self.pending: dict[int, tuple[Row | RowError, dict[str, Any]]] = {}
        self.next = 0
        if fmt == "csv":
            self.csv = csv.writer(out)
            self.csv.writerow([*(header or ["line"]), *OUTPUT_COLUMNS])

    def add(self, row: Row | RowError, result: dict[str, Any]) -> None:
        self.pending[row.index] = (row, result)
        while self.next in self.pending:
            self._write(*self.pending.pop(self.next))
            self.next += 1

    def _write(self, row: Row | RowError, result: dict[str, Any]) -> None:
        if self.fmt == "csv":
            if isinstance(row, Row) and row.cells is not None:
                cells = row.cells
            elif isinstance(row, Row):  # a JSONL row into a CSV: its fields, in header order
                cells = [_cell(row.values.get(name)) for name in self.header or []]
            else:
                cells = [""] * len(self.header or ["line"])
            self.csv.writerow([*cells, *(_cell(result[c]) for c in OUTPUT_COLUMNS)])
        else:
            values = row.values if isinstance(row, Row) else {"line": row.line}
            self.out.write(json.dumps({**values, **result}, ensure_ascii=False) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def result_of(job: dict[str, Any]) -> dict[str, Any]:
    result, error = job.get("result") or {}, job.get("error")
    usage = result.get("usage", {})
    latency = None
    if job.get("finished_at"):
        created, finished = (datetime.fromisoformat(job[k]) for k in ("created_at", "finished_at"))
        latency = round((finished - created).total_seconds(), 3)
    return {
        "answer": result.get("text"),
        "reasoning": result.get("reasoning"),
        "status": job["status"],
        "error": f"{error['code']}: {error['message']}" if error else None,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "latency_s": latency,
        "job_id": job["id"],
    }


def rejected(reason: str) -> dict[str, Any]:
    return {c: None for c in OUTPUT_COLUMNS} | {"status": "rejected", "error": reason}


async def process(
    row: Row | RowError, columns: ColumnMap, key: str, jobs: JobClient, tally: Tally
) -> dict[str, Any]:
    if isinstance(row, RowError):
        return rejected(str(row))
    try:
        body = columns.job_fields(row)
    except RowError as exc:
        return rejected(str(exc))
    try:
        job = await jobs.submit(body, f"reasonq-submit:{key}:{row.index}")
        tally.submitted += 1
        return result_of(await jobs.wait(job))
    except RowRejected as exc:
        return rejected(f"line {row.line}: {exc}")
    except httpx.HTTPError as exc:  # retries used up: the row fails, the run goes on
        return rejected(f"line {row.line}: gave up after retries ({type(exc).__name__}: {exc})")


@dataclass
class Plan:
    """What a run reads and writes, settled before any row is sent."""

    fmt: Format
    out_fmt: Format
    header: list[str] | None
    total: int
    columns: ColumnMap
    key: str


def plan(args: argparse.Namespace) -> Plan:
    fmt = detect_format(args.input.name, args.format)
    columns = column_map(args)
    with args.input.open(encoding="utf-8-sig", newline="") as f:
        header, rows = read_rows(f, fmt)
        columns.check_header(header)
        clash = sorted(set(header or []) & set(OUTPUT_COLUMNS))
        if clash:
            raise TableError(f"line 1: columns {clash} would be overwritten by the answers")
        total = sum(1 for _ in rows)
    return Plan(
        fmt, detect_format(args.output.name), header, total, columns, run_key(args.input, columns)
    )


async def run(args: argparse.Namespace, settings: Settings) -> Tally:
    """Every row through the API; the output file appears (whole) only at the end."""
    todo = plan(args)
    api_key = args.api_key or settings.client_api_key
    client = httpx.AsyncClient(
        base_url=args.api,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        limits=httpx.Limits(
            max_connections=args.concurrency, max_keepalive_connections=args.concurrency
        ),
        timeout=httpx.Timeout(args.wait + 30, connect=10),
    )
    tally = Tally()
    partial = args.output.with_name(args.output.name + ".part")
    async with client:
        jobs = JobClient(client, Retry(attempts=args.retries), RateLimiter(args.rate), args.wait)
        with (
            args.input.open(encoding="utf-8-sig", newline="") as f,
            partial.open("w", encoding="utf-8", newline="") as out,
            tqdm(total=todo.total, unit="row", disable=args.no_progress, smoothing=0.1) as bar,
        ):
            _, rows = read_rows(f, todo.fmt)
            writer = OrderedWriter(out, todo.out_fmt, todo.header)

            async def worker() -> None:
                for row in rows:  # shared by the workers: each takes the next row
                    result = await process(row, todo.columns, todo.key, jobs, tally)
                    writer.add(row, result)
                    if result["status"] == "succeeded":
                        tally.succeeded += 1
                    else:
                        tally.failed.append(f"{result['status']}: {result['error']}")
                    bar.set_postfix(
                        submitted=tally.submitted, done=tally.succeeded,
                        failed=len(tally.failed), refresh=False,
                    )
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    os.replace(partial, args.output)
    return tally


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tally = asyncio.run(run(args, Settings()))
    except (TableError, OSError, UnicodeDecodeError) as exc:
        print(f"reasonq-submit: {args.input}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reasonq-submit: interrupted; run again to resume", file=sys.stderr)
        return 130
    rows = tally.succeeded + len(tally.failed)
    print(
        f"{rows} rows: {tally.succeeded} succeeded, {len(tally.failed)} failed "
        f"-> {args.output}",
        file=sys.stderr,
    )
    if tally.failed:
        for reason in tally.failed[:10]:
            print(f"  {reason}", file=sys.stderr)
        if len(tally.failed) > 10:
            print(f"  ... and {len(tally.failed) - 10} more", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
