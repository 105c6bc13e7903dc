"""Exclusive lock files naming their owner (host, PID, backend job id) with a heartbeat; stale-lock takeover.

Two processes on the same (run, fold) would overwrite each other's checkpoints; the second stops with a
message naming the lock and its owner. The lock file is created with ``O_EXCL`` (the one atomic test-and-set
every filesystem offers, NFS included) and holds a JSON record that a daemon thread refreshes every
``heartbeat_s`` seconds while the lock is held. A lock is stale, and taken over, when

- its PID is dead on this host,
- its heartbeat is older than its grace period (a process on another host that died or lost the storage),
- it carries this process's own backend job id (a requeued Slurm job finding the lock of its first attempt).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from aivh_ens.errors import UserError

HEARTBEAT_S = 30.0
"""Seconds between two refreshes of a held lock's heartbeat."""
GRACE_S = 300.0
"""A lock of another host whose heartbeat is older than this is stale (recorded in the lock file)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def current_job_id() -> str | None:
    """This process's batch job id: the Slurm array task (``<job>_<task>``) or job, else None."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or None


def read_owner(path: Path) -> dict | None:
    """The lock's owner record, or None if the file is gone or unreadable (mid-write)."""
    try:
        owner = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def stale_reason(owner: dict[str, Any], job_id: str | None = None, now: float | None = None) -> str | None:
    """Why a lock record no longer protects anything (see the module docstring), or None if it is live."""
    if job_id is not None and owner.get("job_id") == job_id:
        return f"it belongs to this job ({job_id}), requeued"
    pid = int(owner.get("pid", -1))
    if owner.get("host") == socket.gethostname():
        return None if pid_alive(pid) else f"PID {pid} is gone"
    beat = float(owner.get("heartbeat", owner.get("time", 0.0)))
    age = (time.time() if now is None else now) - beat
    grace = float(owner.get("grace", GRACE_S))
    return f"its heartbeat is {age:.0f}s old (grace {grace:.0f}s)" if age > grace else None


def describe_owner(owner: dict[str, Any]) -> str:
    """``PID 12 on host-a (job 345_1)``."""
    job = f" (job {owner['job_id']})" if owner.get("job_id") else ""
    return f"PID {owner.get('pid')} on {owner.get('host')}{job}"


class LockHeld(UserError):
    """A live process (here or on another host) holds the lock; ``owner`` is its record."""

    def __init__(self, message: str, owner: dict[str, Any] | None):
        super().__init__(message)
        self.owner = owner or {}


class FileLock:
    """``with FileLock(path, what="fold 2 of run x"):`` — raises :class:`LockHeld` if a live owner holds it.

    Args:
        path: the lock file.
        what: what it protects, for messages.
        job_id: this process's batch job id (default: from the Slurm/submitit environment).
        heartbeat_s: seconds between heartbeat refreshes; grace_s: age after which another host's lock is stale.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        what: str,
        *,
        job_id: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        grace_s: float = GRACE_S,
    ):
        self.path = Path(path)
        self.what = what
        self.job_id = job_id if job_id is not None else current_job_id()
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        self.held = False
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        """The owner record this lock writes (and refreshes)."""
        now = time.time()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "job_id": self.job_id,
            "time": now,
            "heartbeat": now,
            "grace": self.grace_s,
        }

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record(), f)
        return True

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; LockHeld when a live owner has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held = True
                self._start_heartbeat()
                return
            owner = read_owner(self.path)
            if owner is None:
                time.sleep(0.05)  # being written right now, or unreadable: look again
                owner = read_owner(self.path)
            if owner is not None and stale_reason(owner, self.job_id) is not None:
                # Remove and race for it again: O_EXCL decides the winner.
                self.path.unlink(missing_ok=True)
                continue
            if (
                owner is not None
                and owner.get("pid") == os.getpid()
                and owner.get("host") == socket.gethostname()
            ):
                raise LockHeld(f"{self.what} is already locked by this process ({self.path})", owner)
            who = describe_owner(owner) if owner else "another process"
            raise LockHeld(
                f"{self.what} is locked by {who} ({self.path}); wait for it to finish, or delete the lock "
                "file if that process is gone",
                owner,
            )
        raise UserError(f"could not take the lock {self.path}; delete it if no process is using {self.what}")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beater = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._beater.start()

    def _beat(self) -> None:
        from aivh_ens.io import write_json  # io imports this module

        while not self._stop.wait(self.heartbeat_s):
            owner = read_owner(self.path)
            if owner is None or owner.get("pid") != os.getpid() or owner.get("host") != socket.gethostname():
                return  # released, or taken over by another process after we were presumed dead
            write_json(self.path, {**owner, "heartbeat": time.time()})

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        if self._beater is not None:
            self._stop.set()
            self._beater.join(timeout=10)
            self._beater = None
        if self.held:
            owner = read_owner(self.path)
            if owner is not None and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
