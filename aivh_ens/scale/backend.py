"""The one interface of the sweep's backends (local, Ray, Slurm), and the one place that runs them.

A :class:`Backend` runs a list of job files (:meth:`Backend.run`) and stops every unfinished one
(:meth:`Backend.cancel`). :func:`run_jobs` drives any backend: it logs each finished job's row, turns SIGTERM
into the same interrupt as Ctrl-C, and on either cancels the jobs (each fold lock released) and raises
:class:`SweepInterrupted` with the rows so far, so the sweep still prints its table. A failure that the job
could not record itself (a killed process, a cancelled task) is written to ``failed.json`` by
:meth:`Backend.fail`.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Log = Callable[[str], None]
INTERRUPTED_ERROR = "interrupted; run the sweep again to resume"
STOP_GRACE_S = 10.0
"""Seconds a backend waits for its cancelled jobs to end before it returns their rows."""


class SweepInterrupted(Exception):
    """SIGINT or SIGTERM stopped a backend; ``rows`` are the jobs' rows so far (the rest: pending)."""

    def __init__(self, rows: list[dict[str, Any]]):
        super().__init__("the sweep was interrupted")
        self.rows = rows


class Backend:
    """Where a sweep's jobs run. A subclass implements :meth:`run` and :meth:`cancel`, and may implement
    :meth:`open` (connect; before the signal handlers, which it must not replace) and :meth:`close`."""

    def __init__(self, log: Log):
        self.log = log
        self.rows: list[dict[str, Any]] = []

    def open(self) -> None:
        """Connect to the engine and check what can be checked before a job is handed over."""

    def run(self, job_files: list[Path]) -> None:
        """Run every job, passing each finished job's row to :meth:`record`."""
        raise NotImplementedError

    def cancel(self, signalled: bool) -> None:
        """Stop every unfinished job (its fold lock released) and :meth:`record` their rows (``pending``).
        ``signalled``: the sweep got SIGTERM, which reached only this process, not the jobs'."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`open` took."""

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        """Log a finished job's row (one line) and keep it."""
        from aivh_ens.scale.jobs import row_line

        self.log(row_line(row))
        self.rows.append(row)
        return row

    @staticmethod
    def fail(job_file: Path, error: str, host: str = "", **extra: Any) -> dict[str, Any]:
        """The failed row of a job that could not record its own failure; ``failed.json`` says it too (with
        ``host``, where it ran, when known)."""
        from aivh_ens.scale.jobs import read_spec, record_failure, result_row

        record_failure(job_file, error, host)
        return result_row(read_spec(job_file), "failed", error=error, **extra)


def run_jobs(backend: Backend, job_files: list[Path]) -> list[dict[str, Any]]:
    """Run the jobs on ``backend``; their rows, each logged as it finished.

    Raises:
        SweepInterrupted: SIGINT or SIGTERM; every unfinished job was cancelled first (its lock released).
    """
    backend.open()
    try:
        seen: list[int] = []
        with _sigterm_interrupts(seen):
            try:
                backend.run(job_files)
            except BaseException as e:
                backend.cancel(signalled=bool(seen))  # no job outlives its sweep; each resumes later
                if isinstance(e, KeyboardInterrupt):
                    raise SweepInterrupted(backend.rows) from None
                raise
    finally:
        backend.close()
    return backend.rows


@contextlib.contextmanager
def _sigterm_interrupts(seen: list[int]) -> Iterator[None]:
    """While inside, SIGTERM (``docker stop``, a Kaggle or Slurm stop) stops the sweep as Ctrl-C does, and
    Ctrl-C raises KeyboardInterrupt even where this process was started with SIGINT ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, handler)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def interrupted_row(job_file: Path) -> dict[str, Any]:
    """The row of a job that the sweep stopped: pending, resumed by the next run."""
    from aivh_ens.scale.jobs import read_spec, result_row

    return result_row(read_spec(job_file), "pending", error=INTERRUPTED_ERROR)


def lock_owner(job_file: Path) -> dict[str, Any]:
    """The record of the process that holds the fold lock of ``job_file`` (empty when free)."""
    from aivh_ens.locks import read_owner
    from aivh_ens.scale.jobs import lock_path, read_spec

    return read_owner(lock_path(read_spec(job_file))) or {}


def release_killed(job_file: Path, owner: dict[str, Any], within_s: float = STOP_GRACE_S) -> None:
    """Release the fold lock of ``job_file`` that ``owner`` (:func:`lock_owner`, read before the cancel) held,
    once its process, on this host, is dead (waiting ``within_s`` at most): a killed task cannot release its
    own. A lock of another host is left to the next run's take-over."""
    from aivh_ens.liveness import pid_alive

    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return
    deadline = time.monotonic() + within_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not pid_alive(pid):
        release_lock(job_file, pid)


def release_lock(job_file: Path, pid: int) -> None:
    """Remove the fold lock of ``job_file`` when its owner is ``pid``, a dead job process of this host."""
    from aivh_ens.locks import release_dead_owner
    from aivh_ens.scale.jobs import lock_path, read_spec

    with contextlib.suppress(OSError, ValueError, KeyError):
        release_dead_owner(lock_path(read_spec(job_file)), pid)
