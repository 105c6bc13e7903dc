"""Fold locks across processes and hosts: exclusive create, atomic takeover of dead PIDs' locks, heartbeats
watched over local monotonic time (never another host's clock), requeued attempts, lost locks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aivh_ens.io import guarded, write_json
from aivh_ens.locks import FileLock, LockHeld, LockLost, read_owner, stale_reason
from aivh_ens.scale.jobs import retry_attempt
from aivh_ens.system import interrupt_main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
RACER = """
import sys, time
from aivh_ens.locks import FileLock, LockHeld
lock = FileLock(sys.argv[1], "fold 0 of run r")
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    lock.acquire()
except LockHeld:
    print("lost", flush=True)
else:
    print("won", flush=True)
    time.sleep(1.5)
    lock.release()
"""
# A holder on "another host" whose wall clock is off by argv[2] seconds; its heartbeat runs every 50 ms.
HOLDER = """
import sys, time
from aivh_ens.locks import FileLock
off = float(sys.argv[2])
lock = FileLock(sys.argv[1], "fold 0", host="other-host", clock=lambda: time.time() + off, heartbeat_s=0.05,
                grace_s=5.0)  # generous: a loaded CI machine can stall a thread for a second
lock.acquire()
print("holding", flush=True)
time.sleep(600)
"""


def race(path: Path) -> list[str]:
    start = time.time() + 3.0  # both are past their imports by then, and spin on the same instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(path), str(start)], stdout=subprocess.PIPE, text=True, env=ENV
        )
        for _ in range(2)
    ]
    return sorted(p.communicate(timeout=60)[0].strip() for p in procs)


def dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    return dead.pid


def test_two_processes_racing_for_a_lock_one_wins(tmp_path):
    path = tmp_path / "fold0.lock"
    assert race(path) == ["lost", "won"]
    assert not path.exists()  # released by the winner


def test_two_processes_taking_over_one_stale_lock_at_once_one_wins(tmp_path):
    path = tmp_path / "fold0.lock"
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "token": "old", "time": 0}))
    assert race(path) == ["lost", "won"]
    assert not path.exists() and not list(tmp_path.glob("*.stale-*"))  # nothing left behind


def test_a_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    path = tmp_path / "fold0.lock"
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "time": time.time()}))
    with FileLock(path, "fold 0"):
        assert read_owner(path)["pid"] == os.getpid()
    assert not path.exists()


@pytest.mark.parametrize("offset_s", [600.0, -600.0])
def test_a_holder_on_another_host_keeps_its_lock_while_its_heartbeat_advances(tmp_path, offset_s):
    """Its clock runs 10 minutes ahead (or behind): only whether its heartbeat advances counts."""
    path = tmp_path / "fold0.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(offset_s)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        rec = read_owner(path)
        assert rec["host"] == "other-host" and rec["time"] == pytest.approx(time.time() + offset_s, abs=60)
        for _ in range(3):
            with pytest.raises(LockHeld, match="locked by PID .* on other-host"):
                FileLock(path, "fold 0").acquire()
        assert read_owner(path)["token"] == rec["token"] and read_owner(path)["beat"] > rec["beat"]
    finally:
        holder.send_signal(signal.SIGKILL)  # the host dies: its heartbeat stops
        holder.wait(timeout=60)
    with FileLock(path, "fold 0"):  # watched for the lock's grace (5 s) without a beat: stale
        assert read_owner(path)["host"] == socket.gethostname()
    assert not path.exists()


def foreign(path: Path, job_id: str | None = None, attempt: int | None = None) -> dict:
    rec = {"pid": 1, "host": "other-host", "job_id": job_id, "attempt": attempt, "token": "t", "beat": 3}
    path.write_text(json.dumps(rec | {"heartbeat": time.time(), "heartbeat_s": 30, "grace": 300}))
    return read_owner(path)


def test_only_a_later_attempt_of_the_same_job_takes_a_lock_over_by_its_id(tmp_path):
    path = tmp_path / "fold0.lock"
    owner = foreign(path, job_id="4242_3", attempt=0)  # fresh heartbeat, but its job was requeued
    assert "attempt 0 of this job (4242_3)" in stale_reason(owner, "4242_3", 1)
    assert stale_reason(owner, "4242_3", 0) is None  # another process of the same allocation: live
    assert stale_reason(owner, "4242_3", None) is None and stale_reason(owner, "4242_4", 1) is None
    assert stale_reason(foreign(path, job_id="4242_3"), "4242_3", 1) is None  # no attempt recorded
    foreign(path, job_id="4242_3", attempt=0)
    with FileLock(path, "fold 0", job_id="4242_3", attempt=1):
        assert read_owner(path)["attempt"] == 1 and read_owner(path)["pid"] == os.getpid()


def test_a_ray_retry_takes_over_its_dead_attempts_lock_at_once(tmp_path):
    """A Ray task keeps its id across retries: a lock held under that id (its heartbeat still fresh, on a host
    that cannot be checked) is the earlier attempt's, whose worker died; any other id's lock is left alone."""
    path = tmp_path / "fold0.lock"
    assert retry_attempt(path, "task-a") == 0  # no lock: a first attempt
    foreign(path, job_id="task-a", attempt=0)
    attempt = retry_attempt(path, "task-a")
    assert attempt == 1
    t0 = time.monotonic()
    with FileLock(path, "fold 0", job_id="task-a", attempt=attempt):
        assert read_owner(path)["attempt"] == 1 and read_owner(path)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 30  # not the 300 s grace period of the record's heartbeat
    owner = foreign(path, job_id="task-b", attempt=4)  # another task's live lock
    assert retry_attempt(path, "task-a") == 0 and stale_reason(owner, "task-a", 0) is None


def test_a_holder_that_loses_its_lock_is_told_and_stops(tmp_path):
    import signal

    # interrupt_main does nothing while SIGINT is ignored or default-handled (an earlier test in this process,
    # a Ray or uvicorn start, may have left it so): Python's own handler, as in a job process
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _lose_a_held_lock(tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)


def _lose_a_held_lock(tmp_path):
    path = tmp_path / "fold0.lock"
    lock = FileLock(path, "fold 0", heartbeat_s=0.05, on_lost=interrupt_main)
    with pytest.raises(KeyboardInterrupt), lock:  # what a sweep job does: interrupt its training
        foreign(path)  # taken over by another process after this one was presumed dead
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
            if read_owner(path)["token"] != "t":  # a beat that read before the takeover wrote after it
                foreign(path)  # (the contender would then stop at its next beat): take it over again
    assert lock.lost.is_set() and read_owner(path)["token"] == "t"  # the new holder's lock is left alone


def test_a_holder_that_lost_its_lock_writes_no_further_checkpoint(tmp_path):
    """However soon after the takeover (before any heartbeat), the next write under the fold is refused."""
    path, fold = tmp_path / "fold0.lock", tmp_path / "fold0"
    with FileLock(path, "fold 0 of run r") as lock, guarded(fold, lock.verify):
        write_json(fold / "metrics.json", {"epoch": 1})  # still ours
        foreign(path)
        with pytest.raises(LockLost, match="fold 0 of run r: the lock .* is now held by PID 1 on other-host"):
            write_json(fold / "state.json", {"epoch": 2})
        write_json(tmp_path / "elsewhere.json", {})  # only the guarded folder is refused
    assert lock.lost.is_set() and sorted(p.name for p in fold.iterdir()) == ["metrics.json"]


def test_the_heartbeat_advances_while_the_lock_is_held(tmp_path):
    path = tmp_path / "fold0.lock"
    with FileLock(path, "fold 0", heartbeat_s=0.05, grace_s=1.0) as lock:
        first = read_owner(path)
        deadline = time.monotonic() + 10
        while read_owner(path)["beat"] == first["beat"] and time.monotonic() < deadline:
            time.sleep(0.02)
        rec = read_owner(path)
        assert rec["beat"] > first["beat"] and rec["token"] == lock.token and rec["grace"] == 1.0
        assert not lock.lost.is_set()
        beat = path.with_name(f"{path.name}.{lock.token}.beat")
        assert json.loads(path.read_text())["beat"] == 0  # the lock file itself is never rewritten
        assert json.loads(beat.read_text())["beat"] == rec["beat"]
    assert not path.exists() and not beat.exists()


def test_a_heartbeat_delayed_past_a_takeover_cannot_bring_the_old_owner_back(tmp_path, monkeypatch):
    """An NFS stall holds a heartbeat write while another host takes the lock over; when the write lands, the
    new owner's lock is untouched and the old holder learns at its next beat that it lost."""
    from aivh_ens import locks

    path = tmp_path / "fold0.lock"
    stalled, release = threading.Event(), threading.Event()
    real = locks.write_json

    def stalling(p, obj):  # the second heartbeat write stalls until the takeover is done
        if p.name.endswith(".beat") and obj["beat"] == 2:
            stalled.set()
            release.wait(60)
        return real(p, obj)

    monkeypatch.setattr(locks, "write_json", stalling)  # the heartbeat's writes
    lock = FileLock(path, "fold 0", heartbeat_s=0.05)
    lock.acquire()
    try:
        assert stalled.wait(60)
        path.unlink()  # presumed dead: taken over by another host, whose lock is now in place
        new = foreign(path)
        release.set()  # the stalled write lands
        deadline = time.monotonic() + 60
        while not lock.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.lost.is_set() and read_owner(path)["token"] == new["token"] == "t"
        assert json.loads(path.read_text()) == json.loads(json.dumps(new))
        with pytest.raises(LockLost):
            lock.verify()
    finally:
        release.set()
        lock.release()
    assert read_owner(path)["token"] == "t"  # released without touching the new owner's lock
