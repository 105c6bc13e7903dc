"""Runs that can be left alone: a hung job is killed after --job-timeout and the sweep moves on; a process
that failed a job is replaced; SIGTERM stops every job, releases the locks and prints the table; a killed
sweep takes its job processes with it. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_plans import write_plan

from aivh_ens.liveness import pid_alive

ROOT = Path(__file__).resolve().parents[2]
RUNS = [{"name": "e", "model": "test_efficientnet"}]
HANG_S = 3600  # a test that waits this long has hung


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=40, n_test=10, seed=3)


def sweep(plan: Path, work: Path, *extra: str, fault: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(fault or {})}
    cmd = [sys.executable, "-m", "aivh_ens", "sweep", str(plan), "--workdir", str(work), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def rows(out: str) -> dict[int, str]:
    """The end table's rows of run e: fold -> the rest of the line."""
    lines = [ln.split(None, 2) for ln in out.splitlines() if ln.startswith("e ")]
    return {int(r[1]): r[2] for r in lines if len(r) == 3 and r[1].isdigit()}


def started(work: Path, k: int) -> dict:
    return json.loads((work / "runs" / "e" / f"fold{k}" / "started.json").read_text())


def test_a_hung_job_is_killed_after_the_job_timeout_and_the_sweep_moves_on(tmp_path, data, hang_timeout):
    plan = write_plan(tmp_path / "plan.toml", data, RUNS, folds=2)
    timeout = hang_timeout
    hang = {
        "AIVH_ENS_KILL_AT": "batch",
        "AIVH_ENS_FAULT": "hang",
        "AIVH_ENS_FAULT_ONCE": str(tmp_path / "hung"),
    }
    t0 = time.monotonic()
    p = sweep(plan, tmp_path / "w", "--devices", "cpu", "--job-timeout", f"{timeout:g}", fault=hang)
    out, err = p.communicate(timeout=HANG_S)
    assert p.returncode == 1, out + err
    table = rows(out)
    assert "failed" in table[0] and f"made no progress in {timeout:g}s (--job-timeout)" in table[0], out
    assert table[1].startswith("done"), out
    assert time.monotonic() - t0 >= timeout
    fold0 = tmp_path / "w" / "runs" / "e" / "fold0"
    assert "made no progress" in json.loads((fold0 / "failed.json").read_text())["error"]
    hung, fresh = started(tmp_path / "w", 0)["pid"], started(tmp_path / "w", 1)["pid"]
    assert hung != fresh and not pid_alive(hung)  # killed; the next job ran in a fresh process
    assert "1 of 2 jobs not done (1 failed)" in err and "Traceback" not in err


def test_a_process_that_failed_a_job_is_replaced_before_the_next(tmp_path, data):
    plan = write_plan(tmp_path / "plan.toml", data, RUNS, folds=2)
    fault = {"AIVH_ENS_KILL_AT": "job:e:0", "AIVH_ENS_FAULT": "raise"}
    p = sweep(plan, tmp_path / "w", "--devices", "cpu", fault=fault)
    out, err = p.communicate(timeout=HANG_S)
    assert p.returncode == 1, out + err
    table = rows(out)
    assert "failed" in table[0] and "injected fault at job:e:0" in table[0] and table[1].startswith("done")
    failed_pid, done = started(tmp_path / "w", 0)["pid"], started(tmp_path / "w", 1)
    assert done["pid"] != failed_pid and not pid_alive(failed_pid)


def _wait_for_jobs(p: subprocess.Popen, work: Path, folds: int) -> list[int]:
    """The PIDs of the job processes, once every fold's job holds its lock and trains."""
    deadline = time.monotonic() + HANG_S
    files = [work / "runs" / "e" / f"fold{k}" / "started.json" for k in range(folds)]
    while not all(f.exists() for f in files):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.2)
    return [json.loads(f.read_text())["pid"] for f in files]


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(pid_alive(pid) for pid in pids)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_the_sweep_stops_its_jobs_and_releases_their_locks(tmp_path, data, how):
    """SIGTERM (docker stop, a Kaggle or Slurm stop): every job stops, its lock is released, the table is
    printed, exit 130. SIGKILL of the sweep: its job processes notice and stop too."""
    plan = write_plan(tmp_path / "plan.toml", data, RUNS, folds=2)
    work = tmp_path / "w"
    hang = {"AIVH_ENS_KILL_AT": "batch", "AIVH_ENS_FAULT": "hang"}  # both jobs train for ever
    p = sweep(plan, work, "--devices", "cpu,cpu", fault=hang)
    pids = _wait_for_jobs(p, work, 2)
    os.kill(p.pid, getattr(signal, how))
    out, err = p.communicate(timeout=HANG_S)
    assert _gone(pids, 60), pids  # a bound only a process that outlives its sweep reaches
    assert not list((work / "runs").rglob("*.lock")), "a lock was left held"
    if how == "SIGTERM":
        assert p.returncode == 130, out + err
        table = rows(out)
        assert sorted(table) == [0, 1] and all(r.startswith("pending") for r in table.values()), out
        assert "without --force" not in err and "run the same command again to resume" in err
        assert "Traceback" not in err
    else:
        assert p.returncode == -signal.SIGKILL


def test_max_jobs_per_worker_gives_the_device_a_fresh_process_after_n_jobs(tmp_path, data):
    """--max-jobs-per-worker 2, three jobs on one device: the first two run in one process, which then exits;
    the third runs in a fresh one."""
    from aivh_ens.scale.plan import load_plan
    from aivh_ens.scale.sweep import run_sweep

    plan = load_plan(write_plan(tmp_path / "plan.toml", data, RUNS, folds=3))
    result = run_sweep(plan, tmp_path / "w", devices="cpu", max_jobs_per_worker=2, log=print)
    assert [r["state"] for r in result.rows] == ["done"] * 3, result.rows
    pids = [started(tmp_path / "w", k)["pid"] for k in range(3)]  # the jobs ran in plan order, one at a time
    assert pids[0] == pids[1] != pids[2] and not pid_alive(pids[0]), pids
