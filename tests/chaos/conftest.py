"""Chaos scenarios: each module starts its own cluster (tests/chaos/harness.py) and kills
parts of it. Their one-line figures are printed at the end of the session."""

from __future__ import annotations

from typing import Any

from tests.chaos.harness import FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("chaos figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
