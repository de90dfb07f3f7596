"""`python -m bench [NAME]`: run one benchmark (bench/NAME.py) or all of them."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

HELPERS = {"__main__", "common"}


def names() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in HELPERS)


def main(argv: list[str]) -> int:
    chosen = argv or names()
    unknown = sorted(set(chosen) - set(names()))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; have {names()}", file=sys.stderr)
        return 2
    status = 0
    for name in chosen:
        print(f"=== bench/{name}.py", flush=True)
        status |= int(importlib.import_module(f"bench.{name}").main([]) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
