"""What every benchmark shares: machine facts, timing helpers, the results file and table.

    rows = [{"engine": "ours", "tok_s": 51.2}, ...]
    write_results("decoder", rows, ratios={"batch1_vs_genai": 1.19})

writes ``bench/results/decoder.json`` as ``{"name", "table", "ratios", "machine", "date"}``
and prints the rows as an aligned table, then the ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "format_table", "machine", "median_of", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU model, core count, memory and Python/platform versions of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or None
    if hasattr(os, "getloadavg"):  # other work on the machine skews the numbers
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def median_of(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """Run ``fn`` ``warmup`` + ``repeat`` times; (median wall seconds, last return value)."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as a plain aligned text table (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_results(
    name: str,
    table: Sequence[dict[str, Any]],
    ratios: dict[str, float | None] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Print ``table`` and ``ratios``; write them to ``bench/results/<name>.json``."""
    ratios = dict(ratios or {})
    print(format_table(table))
    for key, value in ratios.items():
        print(f"{key}: {_cell(value) if value is not None else 'n/a'}")
    document = {
        "name": name,
        "table": list(table),
        "ratios": ratios,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
