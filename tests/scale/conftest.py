"""The sweep tests' set-up: a hard time limit per test (a hung pool or cluster must not stall CI)."""

from __future__ import annotations

import faulthandler
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

TEST_LIMIT_S = 420  # no sweep test may hang CI: past this, dump every thread's stack and exit


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def start_s() -> float:
    """Seconds this machine takes to start a Python process that imports torch and timm: every gap in a
    healthy tiny job (its start, its first batch) is a few of these, so a job timeout derived from it only
    trips on a hang, on any machine and under any load."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, timm"], check=True, timeout=TEST_LIMIT_S)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def hang_timeout(start_s: float) -> int:
    """A ``--job-timeout`` (seconds) that a healthy tiny job never reaches here (see :func:`start_s`)."""
    return max(10, round(4 * start_s))


@pytest.fixture(scope="module")
def task_hang_timeout(start_s: float) -> int:
    """The same for a Ray or Slurm task, whose clock starts once its worker imported the training code and
    took the fold lock (a local job's starts with its process): half the margin."""
    return max(8, round(2 * start_s))
