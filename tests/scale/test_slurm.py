"""`sweep --backend slurm` through submitit's local executor: a fold that gets Slurm's warning signal (a time
limit coming, or preemption) is requeued and resumes from its last finished epoch (it does not start over)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import submitit  # the slurm extra: make install (and CI) installs it; missing fails loudly
from sweep_plans import stop_hung_sweep, write_plan

from aivh_ens.scale.plan import load_plan
from aivh_ens.scale.sweep import SlurmOptions, run_sweep

ROOT = Path(__file__).resolve().parents[2]


def _signal_when_hung(marker: Path, stop: threading.Event) -> None:
    """Send the hung job the signal Slurm (and submitit's local executor) sends before a time limit or on
    preemption, as soon as the fault has written its PID: the job need not sit out a real time limit."""
    while not stop.wait(0.2):
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(marker.read_text())
            time.sleep(0.5)  # the fault writes the marker just before it starts to hang
            os.kill(pid, getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))
            return


def hanging_fold(tmp_path: Path, demo_data, monkeypatch, epochs: int) -> tuple[Any, SlurmOptions]:
    """(plan, Slurm options) of 2 folds on submitit's local executor, where the first fold to finish an epoch
    hangs there (once: the marker file ``hung`` lets a second attempt through). The 90 s limit per attempt
    (importing torch alone can take 30 s on a busy 2-core machine) is only a backstop."""
    data = demo_data(n=40, n_test=10, seed=17)
    runs = [{"name": "s", "model": "test_efficientnet"}]
    plan = load_plan(write_plan(tmp_path / "plan.toml", data, runs, folds=2, epochs=epochs))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("AIVH_ENS_KILL_AT", "epoch-done@1")
    monkeypatch.setenv("AIVH_ENS_FAULT", "hang")
    monkeypatch.setenv("AIVH_ENS_FAULT_ONCE", str(tmp_path / "hung"))
    return plan, SlurmOptions(cluster="local", timeout_min=1.5, gpus_per_task=0, cpus_per_task=1)


def test_a_signalled_fold_is_requeued_and_resumes(tmp_path, demo_data, monkeypatch):
    # The hung fold waits for the warning signal, which the test sends; submitit checkpoints and requeues it.
    plan, opts = hanging_fold(tmp_path, demo_data, monkeypatch, epochs=3)
    stop = threading.Event()
    watcher = threading.Thread(target=_signal_when_hung, args=(tmp_path / "hung", stop), daemon=True)
    watcher.start()
    try:
        result = run_sweep(plan, tmp_path / "w", backend="slurm", slurm=opts, log=print)
    finally:
        stop.set()
    assert result.failed == 0 and [r["state"] for r in result.rows] == ["done", "done"], result.rows
    assert (tmp_path / "hung").exists()
    attempts = {}
    for k in range(2):
        fdir = tmp_path / "w" / "runs" / "s" / f"fold{k}"
        done = json.loads((fdir / "done.json").read_text())
        attempts[k] = done["attempt"]
        assert pd.read_csv(fdir / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
        if done["attempt"] == 2:  # resumed (its log says so, below): 3 epochs recorded over two processes
            # (no timing comparison: at 40 images an epoch takes 0.1 s, less than the per-epoch set-up around it)
            assert done["epochs_run"] == 3
            assert done["job_id"] and not (fdir.parent / f"fold{k}.lock").exists()
    assert sorted(attempts.values()) == [1, 2]
    logs = "".join(p.read_text() for p in (tmp_path / "w" / "runs" / "slurm").rglob("*.out"))
    assert "resuming after epoch 1" in logs, logs[-3000:]
    assert (tmp_path / "w" / "oof" / "s.csv").exists() and not os.environ.get("SLURM_JOB_ID")


def test_a_hung_task_is_cancelled_after_the_job_timeout(tmp_path, demo_data, monkeypatch, task_hang_timeout):
    """A fold that stops making progress once it finished an epoch (its heartbeat goes on) is cancelled after
    --job-timeout: a failed row and failed.json saying so, its lock released; the other fold finishes."""
    plan, opts = hanging_fold(tmp_path, demo_data, monkeypatch, epochs=2)
    result = run_sweep(
        plan, tmp_path / "w", backend="slurm", slurm=opts, log=print, job_timeout=task_hang_timeout
    )
    states = sorted((r["state"], r["error"] or "") for r in result.rows)
    assert states[0][0] == "done" and states[1][0] == "failed", result.rows
    assert f"made no progress in {task_hang_timeout}s (--job-timeout) and was cancelled" in states[1][1]
    k = next(r["fold"] for r in result.rows if r["state"] == "failed")
    fdir = tmp_path / "w" / "runs" / "s" / f"fold{k}"
    assert "made no progress" in json.loads((fdir / "failed.json").read_text())["error"]
    assert not (fdir.parent / f"fold{k}.lock").exists()  # the cancelled job stopped and released it


def test_a_stopped_sweep_cancels_its_array_and_releases_the_locks(tmp_path, demo_data):
    """SIGTERM to a sweep driver whose two array tasks train for ever: it exits 130 with both folds pending,
    and the tasks are cancelled (gone) with their locks released."""
    data = demo_data(n=40, n_test=10, seed=17)
    plan = write_plan(tmp_path / "plan.toml", data, [{"name": "s", "model": "test_efficientnet"}], folds=2)
    slurm = ["--backend", "slurm", "--slurm-cluster", "local", "--timeout-min", "5", "--gpus-per-task", "0"]
    _, err = stop_hung_sweep(plan, tmp_path / "w", "s", 2, signal.SIGTERM, *slurm, "--cpus-per-task", "1")
    assert "aivh_ens/" not in err, err  # no traceback of ours (submitit's local controllers print theirs)
