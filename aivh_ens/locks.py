"""Exclusive lock files naming their owner (PID, host), with stale-lock takeover.

Two processes on the same (run, fold) would overwrite each other's checkpoints; the second stops with a
message naming the lock and the PID holding it. A lock left by a killed process on this host is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from aivh_ens.errors import UserError


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_owner(path: Path) -> dict | None:
    """The lock's owner record, or None if the file is gone or unreadable (mid-write)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


class FileLock:
    """``with FileLock(path, what="fold 2 of run x"):`` — raises UserError if a live process holds it."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.held = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held = True
                return
            owner = read_owner(self.path)
            if owner is None:
                time.sleep(0.05)  # being written right now, or unreadable: look again
                owner = read_owner(self.path)
            if (
                owner is not None
                and owner.get("host") == socket.gethostname()
                and not pid_alive(int(owner.get("pid", -1)))
            ):
                # Stale: its process is gone. Remove and race for it again (O_EXCL decides the winner).
                self.path.unlink(missing_ok=True)
                continue
            if owner is not None and owner.get("pid") == os.getpid():
                raise UserError(f"{self.what} is already locked by this process ({self.path})")
            who = f"PID {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
            raise UserError(
                f"{self.what} is locked by {who} ({self.path}); wait for it to finish, or delete the lock "
                "file if that process is gone"
            )
        raise UserError(f"could not take the lock {self.path}; delete it if no process is using {self.what}")

    def release(self) -> None:
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
