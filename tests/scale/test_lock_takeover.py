"""Fold locks across processes and hosts: exclusive create, dead PIDs, stale heartbeats, requeued jobs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aivh_ens.locks import FileLock, LockHeld, read_owner, stale_reason

ROOT = Path(__file__).resolve().parents[2]
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


def test_two_processes_racing_for_a_lock_one_wins(tmp_path):
    path = tmp_path / "fold0.lock"
    start = time.time() + 3.0  # both are past their imports by then, and spin on the same instant
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(path), str(start)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["lost", "won"]
    assert not path.exists()  # released by the winner


def foreign(path: Path, age_s: float, job_id: str | None = None, grace: float = 60.0) -> None:
    beat = time.time() - age_s
    rec = {"pid": 1, "host": "other-host", "job_id": job_id, "time": beat, "heartbeat": beat, "grace": grace}
    path.write_text(json.dumps(rec))


def test_a_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    path = tmp_path / "fold0.lock"
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": time.time()}))
    with FileLock(path, "fold 0"):
        assert read_owner(path)["pid"] == os.getpid()
    assert not path.exists()


def test_a_foreign_lock_is_live_until_its_heartbeat_passes_the_grace_period(tmp_path):
    path = tmp_path / "fold0.lock"
    foreign(path, age_s=5)
    with pytest.raises(LockHeld, match="PID 1 on other-host") as e:
        FileLock(path, "fold 0").acquire()
    assert e.value.owner["host"] == "other-host"
    foreign(path, age_s=120)  # grace 60 s: the other host died or lost the storage
    assert "heartbeat is 120s old" in stale_reason(read_owner(path))
    with FileLock(path, "fold 0"):
        assert read_owner(path)["host"] == socket.gethostname()


def test_a_requeued_job_takes_over_the_lock_of_its_first_attempt(tmp_path):
    path = tmp_path / "fold0.lock"
    foreign(path, age_s=1, job_id="4242_3")  # fresh heartbeat, but it is this very job, requeued
    with pytest.raises(LockHeld):
        FileLock(path, "fold 0", job_id="4242_4").acquire()
    with FileLock(path, "fold 0", job_id="4242_3"):
        assert read_owner(path)["job_id"] == "4242_3" and read_owner(path)["pid"] == os.getpid()


def test_the_heartbeat_is_refreshed_while_the_lock_is_held(tmp_path):
    path = tmp_path / "fold0.lock"
    with FileLock(path, "fold 0", heartbeat_s=0.05, grace_s=1.0):
        first = read_owner(path)["heartbeat"]
        deadline = time.time() + 10
        while read_owner(path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        rec = read_owner(path)
        assert rec["heartbeat"] > first and rec["grace"] == 1.0 and rec["time"] == pytest.approx(first)
    assert not path.exists()
