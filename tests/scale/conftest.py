"""The sweep tests' set-up: a hard time limit per test (a hung pool or cluster must not stall CI)."""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Iterator

import pytest

TEST_LIMIT_S = 420  # no sweep test may hang CI: past this, dump every thread's stack and exit


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
