"""`status` and locks: another host's lock is "running" while its heartbeat is fresh, and not once it has been
silent for twice its grace period (a dead host)."""

from __future__ import annotations

import json
import os
import time

from aivh_ens.scale.status import fold_status


def test_another_hosts_silent_lock_is_not_shown_running(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "fold0").mkdir(parents=True)
    lock = run / "fold0.lock"
    rec = {"pid": 1, "host": "other-host", "token": "t", "time": time.time(), "grace": 300}
    lock.write_text(json.dumps(rec))
    beat = run / "fold0.lock.t.beat"
    beat.write_text(json.dumps({"beat": 4, "heartbeat": time.time()}))
    assert fold_status(tmp_path, "r", 0, 2)["state"].startswith("running")
    old = time.time() - 601
    for f in (lock, beat):
        os.utime(f, (old, old))
    assert fold_status(tmp_path, "r", 0, 2)["state"] == "pending"  # a dead host's lock: not running
