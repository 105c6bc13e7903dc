"""Tests for aivh_ens.locks: one holder at a time, a dead holder's lock taken over, a live one named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from aivh_ens.errors import UserError
from aivh_ens.locks import FileLock, pid_alive, read_owner


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
