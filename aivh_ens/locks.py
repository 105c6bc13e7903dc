"""Exclusive lock files naming their owner (host, PID, backend job id and attempt) with a heartbeat.

Two processes on the same (run, fold) would overwrite each other's checkpoints; the second stops with a
message naming the lock and its owner. The lock file is created with ``O_EXCL`` (the one atomic test-and-set
every filesystem offers, NFS included) and holds a JSON record with a unique token per acquisition; a daemon
thread advances its heartbeat counter every ``heartbeat_s`` seconds while the lock is held. A lock is stale,
and taken over, when

- it names a process of this process space (same host, boot and PID namespace: see
  :mod:`aivh_ens.liveness`) that no longer runs (its PID is gone, or now belongs to a later process),
- it belongs to an earlier attempt of this very job (same backend job id, lower attempt number: a requeued
  Slurm task finding the lock of its first attempt),
- it is another host's (or another container's), and its heartbeat does not advance while this process
  watches it for the lock's grace period of local monotonic time (no two hosts' clocks are ever compared),
- it is empty or torn (a kill or ENOSPC between the exclusive create and the write) and its bytes do not change
  over this contender's grace period.

Taking over is atomic: the stale file is renamed to a unique name, and only the contender whose rename
succeeded and whose moved file is still the record it judged stale removes it and races (``O_EXCL``) for a
new one. The lock file is written once, at its creation, and never again: heartbeats go to a file of their own per
acquisition (``<lock>.<token>.beat``), so a heartbeat write that an NFS stall delays past a takeover lands in
a file nobody reads any more, instead of bringing the old owner's record back. A holder whose heartbeat
finds another token in its lock file has lost it: ``lost`` is set and
``on_lost`` is called (a heartbeat that cannot read or write the file, ESTALE, EIO or ENOSPC, retries
with backoff and loses nothing); :meth:`FileLock.verify` (which a job runs before each checkpoint write, through
:func:`aivh_ens.io.guarded`) raises :class:`LockLost`, so the job stops before its next checkpoint.

Generations (fencing tokens): each acquisition of a lock gets a number one higher than any earlier holder's
(kept in ``<lock>.gen``, and in the record of a stale lock taken over), recorded in the lock file. A holder
that writes into a folder under :func:`fenced` first puts its generation in the folder's ``fence.json``;
every later write there is refused once the fence holds a higher generation (a holder presumed dead, whose
delayed write lands after a takeover, cannot replace a newer holder's files: see :mod:`aivh_ens.fence`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aivh_ens import fence, progress
from aivh_ens.errors import UserError
from aivh_ens.io import guarded, write_json, write_text
from aivh_ens.liveness import pid_alive, record_alive, same_space, this_process

__all__ = [
    "FenceCrossed",
    "FileLock",
    "LockHeld",
    "LockLost",
    "pid_alive",
    "read_owner",
    "stale_reason",
    "watch_heartbeat",
]

HEARTBEAT_S = 30.0
"""Seconds between two heartbeats of a held lock."""
GRACE_S = 300.0
"""How long another host's lock is watched for a heartbeat before it counts as stale (recorded in the lock)."""


def current_job_id() -> str | None:
    """This process's batch job id: the Slurm array task (``<job>_<task>``) or job, else None."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or None


def current_attempt() -> int | None:
    """This process's attempt of its batch job: Slurm's restart count (0 for the first run), else None."""
    count = os.environ.get("SLURM_RESTART_COUNT")
    if count is not None and count.strip().isdigit():
        return int(count)
    return 0 if os.environ.get("SLURM_JOB_ID") else None


def gen_path(path: Path) -> Path:
    """The file that keeps lock ``path``'s last generation (``fold0.lock.gen``)."""
    return Path(path).with_name(f"{Path(path).name}.gen")


def read_generation(path: Path) -> int:
    """The last generation handed out for lock ``path`` (0 before the first acquisition)."""
    try:
        text = gen_path(path).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return 0
    return int(text) if text.isdigit() else 0


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _holds_token(token: Any) -> Callable[[Path], bool]:
    """Whether a lock file is still the acquisition ``token`` judged stale (a lock file never changes)."""
    return lambda path: (_read_json(path) or {}).get("token") == token


def beat_path(path: Path, token: str) -> Path:
    """The heartbeat file of the acquisition ``token`` of lock ``path`` (``fold0.lock.<token>.beat``)."""
    return Path(path).with_name(f"{Path(path).name}.{token}.beat")


def read_owner(path: Path) -> dict | None:
    """The lock's owner record with its latest heartbeat (``beat``, ``heartbeat``, ``progress``), or None if
    the lock file is gone or unreadable (mid-write)."""
    owner = _read_json(path)
    if owner is None:
        return None
    beat = _read_json(beat_path(path, owner["token"])) if isinstance(owner.get("token"), str) else None
    return owner | (beat or {})


def stale_reason(
    owner: dict[str, Any], job_id: str | None = None, attempt: int | None = None, host: str | None = None
) -> str | None:
    """Why a lock record no longer protects anything, judged from the record alone, or None.

    None means live, or another host's lock whose heartbeat must be watched (:func:`watch_heartbeat`).
    ``job_id``/``attempt``: the contender's; ``host``: its host name (default this one).
    """
    theirs = owner.get("attempt")
    if (
        job_id is not None
        and owner.get("job_id") == job_id
        and attempt is not None
        and isinstance(theirs, int)
        and theirs < attempt
    ):
        return f"it belongs to attempt {theirs} of this job ({job_id}), which is attempt {attempt}"
    if same_space(owner, host):
        return None if record_alive(owner) else f"PID {owner.get('pid')} is gone"
    return None


def read_raw(path: Path) -> bytes | None:
    """The lock file's bytes, or None when it is gone."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def watch_bytes(path: Path, raw: bytes, grace: float, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Whether a file's bytes stay ``raw`` for ``grace`` seconds of local monotonic time (an empty or torn lock
    file that nobody is still writing)."""
    step = min(1.0, max(0.01, grace / 20))
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace:
        sleep(step)
        if read_raw(path) != raw:
            return False
    return True


def watch_heartbeat(
    path: Path, owner: dict[str, Any], sleep: Callable[[float], None] = time.sleep
) -> str | None:
    """Watch another host's lock for its grace period of local monotonic time.

    Returns None as soon as the file changes (its heartbeat advanced, or it changed hands or vanished), else
    why it is stale. Wall clocks are never compared: the holder's clock may be minutes off.
    """
    grace = float(owner.get("grace", GRACE_S))
    step = min(1.0, max(0.01, float(owner.get("heartbeat_s", HEARTBEAT_S)) / 4))
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace:
        sleep(step)
        if read_owner(path) != owner:
            return None
    return f"its heartbeat did not advance in {grace:.0f}s"


def describe_owner(owner: dict[str, Any]) -> str:
    """``PID 12 on host-a (job 345_1)``."""
    job = f" (job {owner['job_id']})" if owner.get("job_id") else ""
    return f"PID {owner.get('pid')} on {owner.get('host')}{job}"


class LockHeld(UserError):
    """A live process (here or on another host) holds the lock; ``owner`` is its record."""

    def __init__(self, message: str, owner: dict[str, Any] | None):
        super().__init__(message)
        self.owner = owner or {}


class LockLost(RuntimeError):
    """This process's lock was taken over by another (it was presumed dead): it must write nothing more."""


class FenceCrossed(LockLost):
    """The folder's fence names a newer holder of the lock than this process: it must write nothing more."""


@contextlib.contextmanager
def fenced(lock: FileLock, folder: str | os.PathLike) -> Iterator[FileLock]:
    """Hold ``lock`` while writing under ``folder``: its generation is put in the folder's fence first, and
    once the lock is lost, or the fence names a newer holder, no atomic write there lands
    (:func:`aivh_ens.io.guarded`, checked before and after each rename); the heartbeat's interrupt
    (``on_lost``) or a refused write leaves the block as one :class:`LockLost` that names the new owner."""

    def check() -> None:
        lock.verify()
        newer = fence.newer_holder(folder, lock.generation, lock.token)
        if newer is not None:
            lock.lost.set()
            raise FenceCrossed(
                f"{lock.what}: {Path(folder) / fence.FENCE} names generation {newer['generation']} (PID "
                f"{newer.get('pid')} on {newer.get('host')}), newer than this process's {lock.generation}"
            )

    try:
        with lock, guarded(folder, check):
            fence.claim(folder, lock.generation, lock.token)
            yield lock
    except FenceCrossed:
        raise  # it names the newer holder already
    except (KeyboardInterrupt, LockLost):
        if not lock.lost.is_set():
            raise  # a real Ctrl-C, or another lock's loss
        owner = read_owner(lock.path)
        who = describe_owner(owner) if owner else "nobody (the lock file is gone)"
        raise LockLost(f"{lock.what}: lost its lock to {who} and stopped, writing nothing more") from None


def release_dead_owner(path: str | os.PathLike, pid: int) -> None:
    """Remove the lock at ``path`` (and its heartbeat file) when its owner is ``pid`` on this host, a process the
    caller killed and knows dead: the same atomic take-over a contender makes, so a newer owner's lock stays."""

    def owned(aside: Path) -> bool:
        owner = _read_json(aside) or {}
        return owner.get("pid") == pid and owner.get("host") == socket.gethostname()

    if Path(path).exists():
        FileLock(path, "a killed job's lock")._take_over(owned)


class FileLock:
    """``with FileLock(path, what="fold 2 of run x"):`` — raises :class:`LockHeld` if a live owner holds it.

    Args:
        path: the lock file.
        what: what it protects, for messages.
        job_id, attempt: this process's batch job id and attempt (default: from the Slurm environment).
        heartbeat_s: seconds between heartbeats; grace_s: how long a contender on another host watches for one.
        on_lost: called (from the heartbeat thread) when another process has taken the lock over.
        host, clock: this host's name and wall clock (recorded for people; never compared across hosts).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        what: str,
        *,
        job_id: str | None = None,
        attempt: int | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        grace_s: float = GRACE_S,
        on_lost: Callable[[], None] | None = None,
        host: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.path = Path(path)
        self.what = what
        self.job_id = job_id if job_id is not None else current_job_id()
        self.attempt = attempt if attempt is not None else current_attempt()
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        self.on_lost = on_lost
        self.host = host or socket.gethostname()
        self.clock = clock
        self.token = ""
        self.generation = 0  # this acquisition's fencing number (see the module docstring)
        self._seen_generation = 0  # the highest generation of a stale record this lock took over
        self.held = False
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        """The owner record this lock writes (its heartbeat advances ``beat``)."""
        now = self.clock()
        return {
            **this_process(self.host),  # host, boot id, PID namespace, PID, start time
            "job_id": self.job_id,
            "attempt": self.attempt,
            "token": self.token,
            "generation": self.generation,
            "time": now,
            "heartbeat": now,
            "beat": 0,
            "heartbeat_s": self.heartbeat_s,
            "grace": self.grace_s,
        }

    def _try_create(self) -> bool:
        self.token = uuid.uuid4().hex
        self.generation = max(read_generation(self.path), self._seen_generation) + 1
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.record(), f)
                f.flush()
                os.fsync(f.fileno())
            write_text(gen_path(self.path), f"{self.generation}\n")
        except BaseException:  # ENOSPC, EIO, a signal: an empty or torn lock file must not stay behind
            self.path.unlink(missing_ok=True)
            raise
        return True

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; LockHeld when a live owner has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(8):
            if self._try_create():
                self.held = True
                self.lost.clear()
                self._start_heartbeat()
                return
            owner = read_owner(self.path)
            if owner is None:
                self._judge_torn()
                continue
            if owner.get("pid") == os.getpid() and same_space(owner, self.host):
                raise LockHeld(f"{self.what} is already locked by this process ({self.path})", owner)
            reason = stale_reason(owner, self.job_id, self.attempt, self.host)
            if reason is None and not same_space(owner, self.host):
                reason = watch_heartbeat(self.path, owner)
                if reason is None and read_owner(self.path) is None:
                    continue  # released while we watched: race for it
            if reason is None:
                who = describe_owner(owner)
                raise LockHeld(
                    f"{self.what} is locked by {who} ({self.path}); wait for it to finish, or delete the lock "
                    "file if that process is gone",
                    owner,
                )
            gen = owner.get("generation")
            if isinstance(gen, int):  # its holder may still write late: the next generation must be higher
                self._seen_generation = max(self._seen_generation, gen)
            self._take_over(_holds_token(owner.get("token")))
        raise UserError(f"could not take the lock {self.path}; delete it if no process is using {self.what}")

    def _judge_torn(self) -> None:
        """The lock file is gone, being written, or empty or torn for good: look again for a moment, then watch
        its bytes for the grace period and take it over if they never change."""
        for _ in range(5):
            raw = read_raw(self.path)
            if raw is None or read_owner(self.path) is not None:
                return  # released, or now whole: judge it again
            time.sleep(0.05)
        if watch_bytes(self.path, raw, self.grace_s):
            self._take_over(lambda aside: read_raw(aside) == raw)

    def _take_over(self, judged: Callable[[Path], bool]) -> None:
        """Remove the stale lock file atomically: only one contender's rename moves it away, and a file that
        changed since it was judged (``judged(moved file)`` is False: a heartbeat, a new holder) is put back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        try:
            if not judged(aside):
                with contextlib.suppress(
                    FileExistsError
                ):  # put the live record back, unless a new one is there
                    os.link(aside, self.path)
            else:
                token = (_read_json(aside) or {}).get("token")
                if isinstance(token, str):
                    beat_path(self.path, token).unlink(missing_ok=True)
        finally:
            aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beater = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._beater.start()

    def _beat(self) -> None:
        missing = failures = beats = 0
        wait = self.heartbeat_s
        while not self._stop.wait(wait):
            wait = self.heartbeat_s
            try:
                owner = _read_json(self.path)
                if owner is None and missing == 0:
                    missing = 1  # mid-write, or moved aside for a moment by a contender that will put it back
                    continue
                if owner is None or owner.get("token") != self.token:
                    self._lose()
                    return
                missing = 0
                beats += 1  # to this acquisition's own file: a late write cannot bring back a lost lock
                beat = {"heartbeat": self.clock(), "beat": beats, "progress": progress.beats()}
                write_json(beat_path(self.path, self.token), beat)
                failures = 0
            except OSError:  # ESTALE, EIO, ENOSPC: transient on shared storage; retry soon, backing off
                failures += 1
                wait = min(self.heartbeat_s, self.heartbeat_s / 16 * 2**failures)

    def verify(self) -> None:
        """Raise :class:`LockLost` unless the lock file still holds this acquisition's token."""
        owner = read_owner(self.path)
        if owner is None:  # mid-write, or moved aside for a moment by a contender: look once more
            time.sleep(0.05)
            owner = read_owner(self.path)
        if owner is None or owner.get("token") != self.token:
            self.lost.set()
            who = describe_owner(owner) if owner else "nobody (the lock file is gone)"
            raise LockLost(f"{self.what}: the lock {self.path} is now held by {who}; this process stops")

    def _lose(self) -> None:
        self.lost.set()
        with contextlib.suppress(OSError):
            beat_path(self.path, self.token).unlink(missing_ok=True)
        if self.on_lost is not None:
            self.on_lost()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        if self._beater is not None:
            self._stop.set()
            self._beater.join(timeout=10)
            self._beater = None
        if self.held:
            owner = _read_json(self.path)
            beat_path(self.path, self.token).unlink(missing_ok=True)
            if owner is not None and owner.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
