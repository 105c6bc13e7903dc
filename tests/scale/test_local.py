"""`sweep --devices cpu,cpu`: 2 runs x 3 folds in two pinned worker processes; same OOF as sequential cv;
idempotent re-runs, refused plan changes, and `status` from the files alone."""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=60, n_test=10, seed=11)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One sweep for the module, in a child process so that its workers' output is captured too."""
    root = tmp_path_factory.mktemp("sweep")
    plan = write_plan(root / "plan.toml", data, RUNS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "aivh_ens",
        "sweep",
        str(plan),
        "--devices",
        "cpu,cpu",
        "--workdir",
        str(root / "w"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=360)
    return root / "w", plan, res


def jobs(work: Path) -> list[tuple[str, int, dict, dict]]:
    out = []
    for run in ("e", "c"):
        for k in range(3):
            fdir = work / "runs" / run / f"fold{k}"
            out.append((run, k, json.loads((fdir / "started.json").read_text()), fdir))
    return out


def test_two_cpu_workers_run_the_jobs_side_by_side(swept):
    work, _, res = swept
    assert res.returncode == 0, res.stdout + res.stderr
    table = [
        ln.split()
        for ln in res.stdout.splitlines()
        if ln.startswith(("e ", "c ")) and ln.split()[1].isdigit()
    ]
    assert len(table) == 6 and all(row[2] == "done" for row in table)
    spans, pids = [], set()
    for _run, _k, started, fdir in jobs(work):
        done = json.loads((fdir / "done.json").read_text())
        assert done["device"] == "cpu" and done["attempt"] == 1 and done["job_hash"]
        pids.add(done["pid"])
        spans.append((started["time"], (fdir / "done.json").stat().st_mtime))
    assert len(pids) == 2  # two pinned workers, each kept for the whole sweep
    overlap = any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for b0, b1 in spans[i + 1 :])
    assert overlap, spans
    for run in ("e", "c"):  # each OOF file is assembled once, by the worker that finished the run's last fold
        assert res.stdout.count(f"wrote {work.resolve() / 'oof' / run}.csv") == 1, res.stdout


def test_the_oof_equals_sequential_cv_with_the_same_seed(swept, data, tmp_path):
    work, _, _ = swept
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
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
    work, plan, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("done.json")}
    oof = {p: p.stat().st_mtime_ns for p in (work / "oof").glob("*.csv")}
    res = CliRunner().invoke(main, ["sweep", str(plan), "--devices", "cpu,cpu", "--workdir", str(work)])
    assert res.exit_code == 0, res.output
    assert "6 jobs, 0 to run" in res.output
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in oof} == oof


def test_a_changed_plan_is_refused_naming_the_fields(swept, data):
    work, plan, _ = swept
    changed = write_plan(work.parent / "changed.toml", data, [RUNS[0], {**RUNS[1], "lr": 0.5, "epochs": 2}])
    before = sorted(p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file())
    res = CliRunner().invoke(main, ["sweep", str(changed), "--workdir", str(work)])
    assert_user_error(res, "changed.toml", "run c", "epochs, lr", "--force")
    res = CliRunner().invoke(main, ["sweep", str(changed), "--workdir", str(work), "--force", "--dry-run"])
    assert res.exit_code == 0 and res.output.count(" pending") == 6, res.output
    assert sorted(p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()) == before


def test_status_reads_done_running_failed_and_interrupted_from_the_files(swept, tmp_path):
    work, _, _ = swept
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
    (e / "fold1" / "done.json").unlink()  # fold 1: running here, one epoch of two done
    (e / "fold1.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "time": 0}))
    (e / "fold2" / "done.json").unlink()  # fold 2: its last attempt failed
    (e / "fold2" / "failed.json").write_text(
        json.dumps({"error": "RuntimeError: CUDA out of memory", "host": "h"})
    )
    (e / "fold0" / "done.json").unlink()  # fold 0: killed, resumable
    (e / "fold0" / "state.pt").write_bytes(b"")
    out = CliRunner().invoke(main, ["status", "e", "--workdir", str(copy)]).output
    assert f"running (epoch 1/1, ETA 0.0 min)  {os.uname().nodename}:{os.getpid()}" in out
    assert "failed" in out and "RuntimeError: CUDA out of memory" in out and "interrupted (epoch 1/1)" in out
    res = CliRunner().invoke(main, ["status", "nope", "--workdir", str(copy)])
    assert_user_error(res, "nope")
