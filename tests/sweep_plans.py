"""Plan files for the sweep tests (tests/scale/), and a sweep driver stopped by a signal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from aivh_ens.liveness import pid_alive
from aivh_ens.locks import read_owner

ROOT = Path(__file__).resolve().parents[1]

TINY = {"recipe": "tiny", "img_size": 32, "batch_size": 16, "folds": 3, "group": "pairs", "epochs": 1}


def write_plan(path: Path, data: Path, runs: list[dict], **shared: object) -> Path:
    """A plan file: [shared] (TINY, the data folder and ``shared``) and one [[runs]] table per dict."""

    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = ["[shared]", f'data = "{data}"']
    lines += [f"{k} = {fmt(v)}" for k, v in {**TINY, **shared}.items()]
    for run in runs:
        lines += ["", "[[runs]]", *(f"{k} = {fmt(v)}" for k, v in run.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def stop_hung_sweep(plan: Path, work: Path, run: str, folds: int, sig: int, *backend: str) -> tuple[str, str]:
    """``aivh-ens sweep PLAN --workdir WORK BACKEND...`` in a child process whose jobs train for ever, sent
    ``sig`` once every fold's job holds its lock; its output and error. Asserts what every backend owes a
    stopped sweep: exit 130, each fold ``pending`` ("interrupted"), its job's process gone, no lock left."""
    cmd = [sys.executable, "-m", "aivh_ens", "sweep", str(plan), *backend, "--workdir", str(work)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env |= {"AIVH_ENS_KILL_AT": "batch", "AIVH_ENS_FAULT": "hang"}  # every job trains for ever
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    locks = [work / "runs" / run / f"fold{k}.lock" for k in range(folds)]
    deadline = time.monotonic() + 300
    while not all((read_owner(lock) or {}).get("job_id") for lock in locks):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.2)
    pids = [read_owner(lock)["pid"] for lock in locks]
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    rows = [ln for ln in out.splitlines() if ln.startswith(f"{run} ") and ln.split()[1].isdigit()]
    assert len(rows) == folds and all("pending" in r and "interrupted" in r for r in rows), out
    assert not any(pid_alive(pid) for pid in pids), pids
    assert not any(lock.exists() for lock in locks), "a lock was left held"
    return out, err
