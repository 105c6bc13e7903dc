"""`sweep --devices cpu,cpu`: 2 runs x 3 folds, one process per device, two at a time; a job SIGKILLed mid-fold
fails alone and resumes on the next run; same OOF as sequential cv; idempotent re-runs, refused plan changes,
and `status` from the files alone."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_checks import assert_user_error
from click.testing import CliRunner
from sweep_plans import TINY, write_plan

from aivh_ens.cli import main

ROOT = Path(__file__).resolve().parents[2]
RUNS = [{"name": "e", "model": "test_efficientnet"}, {"name": "c", "model": "test_convnext"}]
EPOCHS = 2


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=60, n_test=10, seed=11)


@pytest.fixture(scope="module")
def swept(
    tmp_path_factory, data
) -> tuple[Path, Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """One sweep for the module, in child processes so that the jobs' output is captured too: a first command
    in which the first job to finish an epoch is SIGKILLed, then the same command again."""
    root = tmp_path_factory.mktemp("sweep")
    plan = write_plan(root / "plan.toml", data, RUNS, epochs=EPOCHS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "aivh_ens", "sweep", str(plan), "--devices", "cpu,cpu"]
    cmd += ["--workdir", str(root / "w")]
    fault = {"AIVH_ENS_KILL_AT": "epoch-done", "AIVH_ENS_FAULT_ONCE": str(root / "killed")}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env | fault, timeout=360)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=360)
    return root / "w", plan, first, again


def table(out: str) -> dict[tuple[str, int], list[str]]:
    """The end table's rows by (run, fold)."""
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("e ", "c ")) and ln.split()[1].isdigit()]
    return {(r[0], int(r[1])): r[2:] for r in rows}


def jobs(work: Path) -> list[tuple[str, int, dict, dict]]:
    out = []
    for run in ("e", "c"):
        for k in range(3):
            fdir = work / "runs" / run / f"fold{k}"
            out.append((run, k, json.loads((fdir / "started.json").read_text()), fdir))
    return out


def killed(work: Path) -> tuple[str, int]:
    """The one job whose first attempt was killed (it took two)."""
    (job,) = [(run, k) for run, k, started, _ in jobs(work) if started["attempt"] == 2]
    return job


def test_a_killed_job_fails_alone_and_the_others_finish(swept):
    work, _, first, _ = swept
    assert first.returncode == 1, first.stdout + first.stderr
    rows = table(first.stdout)
    run, k = killed(work)
    assert len(rows) == 6 and [key for key, r in rows.items() if r[0] != "done"] == [(run, k)]
    assert rows[(run, k)][0] == "failed" and "killed by SIGKILL" in " ".join(rows[(run, k)])
    assert "1 of 6 jobs not done (1 failed)" in first.stderr
    assert "Traceback" not in first.stderr


def test_running_it_again_finishes_the_killed_job_from_its_last_epoch(swept):
    work, _, _, again = swept
    assert again.returncode == 0, again.stdout + again.stderr
    assert "6 jobs, 1 to run" in again.stdout
    run, k = killed(work)
    assert f"fold {k}: resuming after epoch 1" in again.stdout
    assert all(r[0] == "done" for r in table(again.stdout).values())
    for r, fold, started, fdir in jobs(work):
        done = json.loads((fdir / "done.json").read_text())
        assert done["attempt"] == started["attempt"] == (2 if (r, fold) == (run, k) else 1)
        assert len(pd.read_csv(fdir / "metrics.csv")) == EPOCHS
        assert not (fdir / "failed.json").exists()


def test_two_jobs_run_side_by_side_in_processes_kept_from_job_to_job(swept):
    work, _, first, again = swept
    spans, pids = [], {}
    for run, k, started, fdir in jobs(work):
        done = json.loads((fdir / "done.json").read_text())
        assert done["device"] == "cpu" and done["job_hash"] and started["physical_device"] == "cpu"
        pids[(run, k)] = done["pid"]
        spans.append((started["time"], (fdir / "done.json").stat().st_mtime))
    # The killed process was replaced; each device's process runs job after job.
    assert pids[killed(work)] not in {p for job, p in pids.items() if job != killed(work)}
    assert len(set(pids.values())) <= 3
    kill_time = (work.parent / "killed").stat().st_mtime  # the fault's marker, made just before the kill
    assert any(a0 < kill_time < a1 for a0, a1 in spans), (kill_time, spans)  # another job was running then
    out = first.stdout + again.stdout
    for run in ("e", "c"):  # each OOF file is assembled once, by the job that finished the run's last fold
        assert out.count(f"wrote {work.resolve() / 'oof' / run}.csv") == 1, out


def test_the_oof_equals_sequential_cv_with_the_same_seed(swept, data, tmp_path):
    work = swept[0]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": EPOCHS}.items()]
    for run in RUNS:
        args = ["cv", *flags, "--model", run["model"], "--name", run["name"], "--data", str(data)]
        res = CliRunner().invoke(main, [*args, "--workdir", str(tmp_path), "--threads", "1", "--quiet"])
        assert res.exit_code == 0, res.output
        seq = pd.read_csv(tmp_path / "oof" / f"{run['name']}.csv")
        par = pd.read_csv(work / "oof" / f"{run['name']}.csv")
        assert seq[["file_name", "label", "fold"]].equals(par[["file_name", "label", "fold"]])
        np.testing.assert_allclose(par["prob"], seq["prob"], atol=1e-6)
    # Folds that plain cv finished count as done for a sweep of the same plan.
    res = CliRunner().invoke(main, ["sweep", str(swept[1]), "--workdir", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0 and res.output.count(" done ") == 6, res.output


def test_running_the_same_sweep_again_trains_nothing(swept):
    work, plan = swept[:2]
    before = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("done.json")}
    oof = {p: p.stat().st_mtime_ns for p in (work / "oof").glob("*.csv")}
    res = CliRunner().invoke(main, ["sweep", str(plan), "--devices", "cpu,cpu", "--workdir", str(work)])
    assert res.exit_code == 0, res.output
    assert "6 jobs, 0 to run" in res.output
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in oof} == oof


def test_a_changed_plan_is_refused_naming_the_fields(swept, data):
    work, plan = swept[:2]
    runs = [RUNS[0], {**RUNS[1], "lr": 0.5, "epochs": EPOCHS + 1}]
    changed = write_plan(work.parent / "changed.toml", data, runs, epochs=EPOCHS)
    before = sorted(p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file())
    res = CliRunner().invoke(main, ["sweep", str(changed), "--workdir", str(work)])
    assert_user_error(res, "changed.toml", "run c", "epochs, lr", "--force")
    res = CliRunner().invoke(main, ["sweep", str(changed), "--workdir", str(work), "--force", "--dry-run"])
    assert res.exit_code == 0 and res.output.count(" pending") == 6, res.output
    assert sorted(p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()) == before


def test_status_reads_done_running_failed_and_interrupted_from_the_files(swept, tmp_path):
    work = swept[0]
    res = CliRunner().invoke(main, ["status", "--workdir", str(work)])
    assert res.exit_code == 0, res.output
    rows = [ln.split() for ln in res.output.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (run, str(k), "done") for run in ("c", "e") for k in range(3)
    ]
    done = json.loads((work / "runs" / "e" / "fold1" / "done.json").read_text())
    assert [r for r in rows if r[:2] == ["e", "1"]][0][5] == f"{done['val_f1']:.4f}"
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    e = copy / "runs" / "e"
    (e / "fold1" / "done.json").unlink()  # fold 1: running here, both epochs done
    (e / "fold1.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "time": 0}))
    (e / "fold2" / "done.json").unlink()  # fold 2: its last attempt failed
    (e / "fold2" / "failed.json").write_text(
        json.dumps({"error": "RuntimeError: CUDA out of memory", "host": "h"})
    )
    (e / "fold0" / "done.json").unlink()  # fold 0: killed, resumable
    (e / "fold0" / "state.pt").write_bytes(b"")
    out = CliRunner().invoke(main, ["status", "e", "--workdir", str(copy)]).output
    assert f"running (epoch 2/2, ETA 0.0 min)  {os.uname().nodename}:{os.getpid()}" in out
    assert "failed" in out and "RuntimeError: CUDA out of memory" in out and "interrupted (epoch 2/2)" in out
    res = CliRunner().invoke(main, ["status", "nope", "--workdir", str(copy)])
    assert_user_error(res, "nope")


def test_two_sweeps_started_at_once_train_every_fold_exactly_once(data, tmp_path):
    plan = write_plan(tmp_path / "plan.toml", data, RUNS, folds=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "aivh_ens",
        "sweep",
        str(plan),
        "--devices",
        "cpu",
        "--workdir",
        str(tmp_path),
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in "ab"
    ]
    outs = [p.communicate(timeout=360) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode in (0, 1) and "Traceback" not in err, out + err
        assert all(r[0] in ("done", "skipped", "running") for r in table(out).values()), out
    for run in ("e", "c"):
        for k in range(2):
            fdir = tmp_path / "runs" / run / f"fold{k}"
            started, done = (json.loads((fdir / f).read_text()) for f in ("started.json", "done.json"))
            assert started["attempt"] == done["attempt"] == 1, (run, k)  # trained once, by one of them
            assert len(pd.read_csv(fdir / "metrics.csv")) == 1
        oof = pd.read_csv(tmp_path / "oof" / f"{run}.csv")
        assert len(oof) == 60 and oof["file_name"].is_unique and oof["prob"].notna().all()


def test_force_takes_every_fold_lock_before_deleting_anything(swept):
    work, plan = swept[:2]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lock = work / "runs" / "c" / "fold2.lock"
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "token": "t"}))
        before = sorted(p.stat().st_mtime_ns for p in (work / "runs").rglob("done.json"))
        res = CliRunner().invoke(main, ["sweep", str(plan), "--workdir", str(work), "--force"])
        assert_user_error(
            res, "--force", "fold 2 of run c is locked by PID", str(holder.pid), "stop it first"
        )
        assert sorted(p.stat().st_mtime_ns for p in (work / "runs").rglob("done.json")) == before
        assert (work / "oof" / "c.csv").exists() and not (work / "runs" / "e" / "fold0.lock").exists()
    finally:
        holder.kill()
        holder.wait()
        lock.unlink(missing_ok=True)
