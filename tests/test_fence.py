"""Fencing on real processes: a holder stalled (SIGSTOP, as an NFS stall stops every thread) past its lock's
grace while another host takes the fold over. Its delayed writes are refused before the rename, stop the
writer after it, and a file that lands late is refused by readers through the done.json that vouches for
the newer holder's files."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from aivh_ens import fence
from aivh_ens.io import write_json, write_text
from aivh_ens.locks import FileLock, LockLost, fenced, read_generation

BEAT, GRACE = 0.05, 0.4
STALLED = 3  # exit code of a holder that stopped on losing its lock


def _holder(folder: str, name: str, writes: int, stop_at: str | None, host: str | None) -> None:
    """Hold the fold lock, write ``writes`` versions of best.bin, then done.json vouching for it. ``stop_at``: a
    fault point of the last write where the whole process stops until a SIGCONT."""
    fdir = Path(folder) / "fold0"
    lock = FileLock(Path(folder) / "fold0.lock", "fold 0", heartbeat_s=BEAT, grace_s=GRACE, host=host)
    try:
        with fenced(lock, fdir):
            digests: dict[str, str] = {}
            for i in range(writes):
                if stop_at and i == writes - 1:
                    os.environ.update(AIVH_ENS_KILL_AT=stop_at, AIVH_ENS_FAULT="stop")
                write_text(fdir / "best.bin", f"{name} generation {lock.generation} write {i}", digests)
            write_json(fdir / "done.json", fence.vouch(fdir, digests))
    except LockLost:
        os._exit(STALLED)
    os._exit(0)


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _race(tmp_path: Path, stop_at: str) -> tuple[int, Path]:
    """A stops at ``stop_at`` in its second write; B (another host, for the lock) takes the fold over and
    finishes it; then A goes on. A's exit code and the fold folder."""
    ctx = mp.get_context("fork")
    a = ctx.Process(target=_holder, args=(str(tmp_path), "A", 2, stop_at, None))
    a.start()
    deadline = time.monotonic() + 30
    while not _stopped(a.pid):
        assert a.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    b = ctx.Process(target=_holder, args=(str(tmp_path), "B", 2, None, "another-host"))
    b.start()
    b.join(30)
    assert b.exitcode == 0
    os.kill(a.pid, signal.SIGCONT)
    a.join(30)
    return a.exitcode, tmp_path / "fold0"


def test_a_stalled_write_checked_after_the_takeover_is_refused(tmp_path):
    code, fdir = _race(tmp_path, "write:best.bin")  # stopped before its write guard ran
    done = json.loads((fdir / "done.json").read_text())
    assert code == STALLED
    assert (fdir / "best.bin").read_text() == "B generation 2 write 1"  # the newer holder's file stays
    assert done["generation"] == 2 and read_generation(tmp_path / "fold0.lock") == 2
    assert fence.unvouched(fdir, done, "best.bin") is None


def test_a_rename_delayed_past_the_takeover_stops_its_writer_and_is_refused_by_readers(tmp_path):
    code, fdir = _race(tmp_path, "land:best.bin")  # stopped between its write guard and its rename
    done = json.loads((fdir / "done.json").read_text())
    assert code == STALLED  # the guard after the rename stopped it: it wrote nothing more
    assert (fdir / "best.bin").read_text() == "A generation 1 write 1"  # the late rename landed ...
    why = fence.unvouched(fdir, done, "best.bin")
    assert why and "not the file its done.json vouches for" in why  # ... and readers refuse it


def test_a_fence_of_a_newer_generation_refuses_every_write(tmp_path):
    fdir = tmp_path / "fold0"
    with FileLock(tmp_path / "fold0.lock", "fold 0") as first:
        assert first.generation == 1
    with (
        pytest.raises(LockLost, match="generation 5"),
        fenced(FileLock(tmp_path / "fold0.lock", "fold 0"), fdir) as lock,
    ):
        assert lock.generation == 2 and fence.read_fence(fdir)["generation"] == 2
        (fdir / "fence.json").write_text(json.dumps({"generation": 5, "token": "t", "host": "h", "pid": 1}))
        write_text(fdir / "best.bin", "late")
    assert not (fdir / "best.bin").exists()
