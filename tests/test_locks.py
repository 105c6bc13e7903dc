"""Tests for aivh_ens.locks: one holder at a time, a dead holder's lock taken over, a live one named; PID reuse
and other containers, empty or torn lock files, failed creates and a heartbeat through transient errors."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from aivh_ens import locks
from aivh_ens.errors import UserError
from aivh_ens.liveness import start_time, this_process
from aivh_ens.locks import FileLock, LockHeld, pid_alive, read_owner, stale_reason


def test_lock_records_its_owner_and_is_released(tmp_path):
    path = tmp_path / "runs" / "r" / "fold0.lock"
    with FileLock(path, what="fold 0 of run r") as lock:
        owner = read_owner(path)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and lock.held
        with pytest.raises(UserError, match="fold 0 of run r is already locked by this process"):
            FileLock(path, what="fold 0 of run r").acquire()
    assert not path.exists()


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "time": 0}))
        with pytest.raises(UserError, match=rf"locked by PID {sleeper.pid} on .*wait for it to finish"):
            FileLock(path, what="the thing").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not pid_alive(sleeper.pid)
    with FileLock(path, what="the thing"):  # its process is gone: the lock is stale
        assert read_owner(path)["pid"] == os.getpid()


def test_read_owner_of_missing_or_torn_files(tmp_path):
    assert read_owner(tmp_path / "none.lock") is None
    (tmp_path / "torn.lock").write_text('{"pid": 12')
    assert read_owner(tmp_path / "torn.lock") is None


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_same_host_liveness_is_the_pid_and_its_start_time_in_one_process_space(tmp_path):
    proc = sleeper()
    try:
        here = this_process() | {"pid": proc.pid, "start": start_time(proc.pid), "token": "t"}
        assert here["boot_id"] and here["pidns"] and here["start"] is not None
        assert stale_reason(here) is None  # a live process: the lock holds
        reused = here | {"start": here["start"] - 1}  # that PID now names a later process
        assert stale_reason(reused) == f"PID {proc.pid} is gone"
        path = tmp_path / "r.lock"
        path.write_text(json.dumps(reused))
        with FileLock(path, "fold 0"):
            assert read_owner(path)["pid"] == os.getpid()
        path.write_text(json.dumps(here))
        with pytest.raises(LockHeld, match=f"locked by PID {proc.pid}"):
            FileLock(path, "fold 0").acquire()
    finally:
        proc.kill()
        proc.wait()
    # Another container with this host name (another PID namespace, or another boot): its PID says nothing
    # here, so a dead-looking PID is not taken over; its heartbeat is watched instead.
    for other in ({"pidns": "pid:[1]"}, {"boot_id": "another-boot"}):
        assert stale_reason(here | other) is None
        rec = here | other | {"grace": 0.3, "heartbeat_s": 0.05}
        path.write_text(json.dumps(rec))
        t0 = time.monotonic()
        with FileLock(path, "fold 0"):
            assert time.monotonic() - t0 >= 0.3  # watched for its grace period first


@pytest.mark.parametrize("content", [b"", b'{"pid": 12, "ho'])
def test_an_empty_or_torn_lock_file_that_never_changes_is_taken_over(tmp_path, content):
    path = tmp_path / "e.lock"
    path.write_bytes(content)
    t0 = time.monotonic()
    with FileLock(path, "fold 0", grace_s=0.3) as lock:
        assert time.monotonic() - t0 >= 0.3 and read_owner(path)["token"] == lock.token
    assert not path.exists() and not list(tmp_path.glob("*.stale-*"))


def test_a_torn_lock_file_still_being_written_is_not_taken_over(tmp_path):
    path = tmp_path / "w.lock"
    path.write_bytes(b"")
    stop = threading.Event()

    def writer() -> None:  # a holder whose write crawls in, a byte at a time
        while not stop.wait(0.02):
            with open(path, "ab") as f:
                f.write(b"{")

    t = threading.Thread(target=writer)
    t.start()
    try:
        with pytest.raises(UserError, match="could not take the lock"):
            FileLock(path, "fold 0", grace_s=2.0).acquire()
    finally:
        stop.set()
        t.join()
    assert path.read_bytes().startswith(b"{")


def test_a_failed_create_leaves_no_lock_file(tmp_path, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "fsync", full)
    path = tmp_path / "f.lock"
    with pytest.raises(OSError, match="No space left"):
        FileLock(path, "fold 0").acquire()
    assert not path.exists()


def test_the_heartbeat_survives_transient_os_errors(tmp_path, monkeypatch):
    real, failures = locks.write_json, []

    def flaky(path, obj):  # ESTALE on shared storage, three times in a row
        if len(failures) < 3:
            failures.append(path)
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path, obj)

    monkeypatch.setattr(locks, "write_json", flaky)  # the heartbeat's writes
    path = tmp_path / "h.lock"
    with FileLock(path, "fold 0", heartbeat_s=0.05) as lock:
        deadline = time.monotonic() + 60  # only a hang reaches it
        while read_owner(path)["beat"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(failures) == 3 and read_owner(path)["beat"] >= 2
        assert not lock.lost.is_set() and lock._beater.is_alive()
        lock.verify()
