"""Rows of a CSV or JSONL file, read one at a time, and how their columns map to a job.

Shared by the batch API (``api/batches.py``) and ``reasonq-submit``: both read a file of
problems lazily, so a 100,000-row file never sits in memory, and both name the line of a
row that is wrong. A bad row is yielded as a ``RowError`` and reading goes on; only a file
that can't be read as a table at all (no header, not UTF-8) raises ``TableError``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

Format = Literal["csv", "jsonl"]

JOB_FIELDS = (
    "task_type", "runtime", "model", "max_tokens", "temperature", "top_p", "top_k", "seed",
    "stop", "priority", "response_format",
)
"""Job fields a row may set from a column of its own (besides the prompt)."""
JSON_FIELDS = frozenset({"response_format"})
"""Of those, the ones whose value is JSON: text in a CSV cell or an option, as is in JSONL."""

# One CSV field may hold a whole prompt; the csv module's default cap is 128 KiB.
csv.field_size_limit(16 * 2**20)


class TableError(ValueError):
    """The file as a whole can't be read: no header, not UTF-8, a column that is missing."""


class RowError(ValueError):
    """Why one row can't become a job; ``line`` is 1-based, as an editor shows it."""

    def __init__(self, index: int, line: int, message: str, row_id: str | None = None):
        super().__init__(f"line {line}: {message}")
        self.index, self.line, self.message, self.row_id = index, line, message, row_id


@dataclass
class Row:
    """One data row: ``index`` counts data rows from 0, ``line`` is where it starts."""

    index: int
    line: int
    values: dict[str, Any]
    cells: list[str] | None = None  # a CSV row's fields as read, for writing it back verbatim


def detect_format(filename: str | None, declared: str | None = None) -> Format:
    """``declared`` if given, else from the file name; CSV unless it ends in .jsonl/.ndjson."""
    if declared:
        if declared not in ("csv", "jsonl"):
            raise TableError(f"unknown format {declared!r}; use csv or jsonl")
        return declared  # type: ignore[return-value]
    name = (filename or "").lower()
    return "jsonl" if name.endswith((".jsonl", ".ndjson")) else "csv"


def read_rows(text: TextIO, fmt: Format) -> tuple[list[str] | None, Iterator[Row | RowError]]:
    """The CSV header (None for JSONL) and the rows, read lazily from ``text``."""
    if fmt == "csv":
        return _read_csv(text)
    return None, _read_jsonl(text)


def _read_csv(text: TextIO) -> tuple[list[str], Iterator[Row | RowError]]:
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        raise TableError("the file is empty: a CSV needs a header line") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise TableError(f"line 1: unreadable header ({exc})") from None
    names = [name.strip() for name in header]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates or not all(names):
        raise TableError(
            f"line 1: column names must be unique and non-empty (bad: {duplicates or ['']})"
        )
    return names, _csv_rows(reader, names)


def _csv_rows(reader: Any, names: list[str]) -> Iterator[Row | RowError]:
    index, line = 0, reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RowError(index, line, f"malformed CSV ({exc})")
            index, line = index + 1, reader.line_num + 1
            continue
        except UnicodeDecodeError:
            raise TableError(f"line {line}: the file is not UTF-8 text") from None
        if not cells:  # a blank line is no row
            line = reader.line_num + 1
            continue
        if len(cells) != len(names):
            yield RowError(
                index, line, f"expected {len(names)} fields (the header's), got {len(cells)}"
            )
        else:
            yield Row(index, line, dict(zip(names, cells, strict=True)), cells)
        index, line = index + 1, reader.line_num + 1


def _read_jsonl(text: TextIO) -> Iterator[Row | RowError]:
    index = 0
    line = 0
    while True:
        try:
            raw = text.readline()
        except UnicodeDecodeError:
            raise TableError(f"line {line + 1}: the file is not UTF-8 text") from None
        if not raw:
            return
        line += 1
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield RowError(index, line, f"invalid JSON ({exc.msg} at column {exc.colno})")
        else:
            if isinstance(value, dict):
                yield Row(index, line, value)
            else:
                yield RowError(index, line, f"expected a JSON object, got {type(value).__name__}")
        index += 1


@dataclass
class ColumnMap:
    """Which column holds the prompt, the row id and each job field; defaults for the rest.

    An empty cell (CSV) or a missing key (JSONL) falls back to the default; values stay as
    read (strings from CSV), for the job model to validate and convert.
    """

    prompt: str = "prompt"
    id: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    def check_header(self, header: list[str] | None) -> None:
        """Fail early when a CSV lacks a mapped column (JSONL rows are checked one by one)."""
        if header is None:
            return
        wanted = [self.prompt, *([self.id] if self.id else []), *self.columns.values()]
        missing = [name for name in wanted if name not in header]
        if missing:
            raise TableError(
                f"line 1: no column {', '.join(map(repr, missing))} in the header "
                f"(columns: {', '.join(header)})"
            )

    def row_id(self, row: Row) -> str:
        """The row's id column, else its index; stable across runs."""
        value = row.values.get(self.id) if self.id else None
        return str(value) if value not in (None, "") else str(row.index)

    def job_fields(self, row: Row) -> dict[str, Any]:
        """The job's fields from ``row``; raises ``RowError`` when the prompt is missing."""
        prompt = row.values.get(self.prompt)
        if prompt in (None, ""):
            raise RowError(row.index, row.line, f"empty or missing prompt column {self.prompt!r}")
        fields = {name: value for name, value in self.defaults.items() if value is not None}
        for name, column in self.columns.items():
            value = row.values.get(column)
            if value not in (None, ""):
                fields[name] = value
        for name in JSON_FIELDS & fields.keys():
            if isinstance(fields[name], str):
                try:
                    fields[name] = json.loads(fields[name])
                except ValueError as exc:
                    raise RowError(row.index, row.line, f"{name}: not JSON ({exc})") from None
        fields["prompt"] = prompt if isinstance(prompt, str) else json.dumps(prompt)
        return fields

