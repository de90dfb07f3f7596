"""Fixtures of the HTTP runtimes' tests; each module defines its own stand-in ``server``."""

from __future__ import annotations

import pytest

from tests.standins.server_thread import ServerThread, StandInControl


@pytest.fixture
def ctl(server: ServerThread) -> StandInControl:
    """The module's stand-in, its request log and injected faults cleared."""
    control = StandInControl(server.url)
    control.reset()
    return control
