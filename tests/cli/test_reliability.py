"""Kill anywhere, resume, lose nothing (cv, blend); two processes on one run; untrusted resume state stays inert."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from cli_checks import run, spawn, tiny_cv
from click.testing import CliRunner
from oof_project import make_project
from safetensors.torch import load_file

from aivh_ens import fence
from aivh_ens.cli import main

# One torch thread everywhere: the in-process reference and the killed subprocesses sum in the same order.
ARGS = ["cv", *tiny_cv(folds=2, epochs=2), "--name", "k", "--threads", "1"]


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=80, n_test=10, seed=5)


def _assert_every_file_whole(root: Path) -> None:
    """Every file under its final name parses completely (temp files may be left; they are never read)."""
    for f in root.rglob("*"):
        if not f.is_file() or f.name.endswith(".tmp"):
            continue
        if f.name == "done.json":  # it vouches for the fold's files as they are, whatever resumed in between
            done = json.loads(f.read_text())
            assert done["generation"] == fence.read_fence(f.parent)["generation"]
            assert set(done["sha256"]) == {"best.safetensors", "oof.csv"}
            assert not [n for n in done["sha256"] if fence.unvouched(f.parent, done, n)], done
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".csv":
            df = pd.read_csv(f)
            assert len(df) > 0 and not df.isna().any().any(), f
        elif f.suffix == ".safetensors":
            assert load_file(str(f))
        elif f.name == "state.pt":
            assert "optimizer" in torch.load(f, weights_only=True)


def test_best_weights_always_hold_the_epoch_the_state_names(tmp_path, data):
    """A new best epoch is staged, then state.pt names it, then it becomes best.safetensors: a kill between any
    two steps leaves best.safetensors holding the epoch state.pt calls the best, and the resume settles it.
    (One torch thread: a re-run epoch gives the same weights to the byte, so files can be compared.)"""
    w = tmp_path / "w"
    args = [*ARGS, "--select", "last", "--data", str(data), "--workdir", str(w), "--resume"]
    fold0 = w / "runs/k/fold0"
    best, staged = fold0 / "best.safetensors", fold0 / "best.safetensors.1.next"
    # 1. epoch 2's weights staged, its state.pt not yet in place: best.safetensors is still epoch 1's
    code, out = run(args, "write:state.pt@2")
    assert code == -9, out
    state = torch.load(fold0 / "state.pt", weights_only=True)
    assert (state["epoch"], state["best_epoch"]) == (0, 0)
    epoch1, epoch2 = best.read_bytes(), staged.read_bytes()
    assert epoch1 != epoch2  # (the old order had already renamed epoch 2's weights over best.safetensors)
    # 2. epoch 2's state.pt names it the best; its weights not yet promoted
    code, out = run(args, "promote:best.safetensors@1")
    assert code == -9 and "resuming after epoch 1" in out, out
    state = torch.load(fold0 / "state.pt", weights_only=True)
    assert (state["epoch"], state["best_epoch"]) == (1, 1)
    assert best.read_bytes() == epoch1 and staged.read_bytes() == epoch2
    # 3. the resume finishes that commit before anything else
    code, out = run(args)
    assert code == 0, out
    assert best.read_bytes() == epoch2 and not list(w.rglob("*.next"))
    _assert_every_file_whole(w)


def test_kill_anywhere_then_resume_equals_uninterrupted(tmp_path, data):
    ref = tmp_path / "ref"
    res = CliRunner().invoke(main, [*ARGS, "--data", str(data), "--workdir", str(ref)])
    assert res.exit_code == 0, res.output

    w = tmp_path / "w"
    args = [*ARGS, "--data", str(data), "--workdir", str(w), "--resume"]
    fold0, fold1 = w / "runs/k/fold0", w / "runs/k/fold1"
    # 1. during the first epoch of fold 0: nothing saved yet
    code, out = run(args, "batch@2")
    assert code == -9, out
    assert not (fold0 / "state.pt").exists()
    # 2. while writing the checkpoint of epoch 2 (the one of epoch 1 is in place)
    code, out = run(args, "write:state.pt@2")
    assert code == -9, out
    assert list(fold0.glob(".state.pt.*.tmp")), "the kill happened mid-write"
    assert torch.load(fold0 / "state.pt", weights_only=True)["epoch"] == 0
    _assert_every_file_whole(w)
    # 3. between folds: fold 0 done, fold 1 not started
    code, out = run(args, "fold-done@1")
    assert code == -9 and "resuming after epoch 1" in out, out
    assert (fold0 / "done.json").exists() and not fold1.exists()
    assert not list(fold0.glob("*.tmp")) and not list(fold0.glob(".*.tmp"))  # orphan removed on resume
    # 4. while writing oof/k.csv: fold 1 done, OOF not in place
    code, out = run(args, "write:k.csv@1")
    assert code == -9 and "fold 0: already done" in out, out
    assert (fold1 / "done.json").exists() and not (w / "oof/k.csv").exists()
    _assert_every_file_whole(w)
    # 5. uninterrupted finish: nothing retrained, OOF assembled
    code, out = run(args)
    assert code == 0 and out.count("already done") == 2 and "wrote " in out, out

    a, b = pd.read_csv(ref / "oof/k.csv"), pd.read_csv(w / "oof/k.csv")
    pd.testing.assert_frame_equal(a, b)
    _assert_every_file_whole(w)


def test_two_processes_on_different_folds_assemble_once(tmp_path, data):
    args = [*ARGS, "--data", str(data), "--workdir", str(tmp_path), "--epochs", "1"]
    procs = [spawn([*args, "--fold", "0"]), spawn([*args, "--fold", "1"])]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count("oof/k.csv (80 rows)") for o in outs) == 1, outs
    oof = pd.read_csv(tmp_path / "oof/k.csv")
    assert len(oof) == 80 and sorted(oof["fold"].unique()) == [0, 1]


def test_same_fold_twice_second_names_lock_and_pid(tmp_path, data):
    args = [*ARGS, "--data", str(data), "--workdir", str(tmp_path), "--fold", "0", "--epochs", "3"]
    first = spawn(args, kill_at="epoch-done", fault="hang")  # holds its lock until killed
    lock = tmp_path / "runs/k/fold0.lock"
    try:
        for _ in range(600):  # wait until the first process holds the lock
            if lock.exists():
                break
            first.poll()
            assert first.returncode is None, first.communicate()[0]
            time.sleep(0.05)
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and f"PID {first.pid}" in res.output and "fold0.lock" in res.output, (
            res.output
        )
        assert "Traceback" not in res.output
    finally:
        first.kill()
        first.wait()


def test_crafted_resume_state_is_refused(tmp_path, data):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    fdir = tmp_path / "runs/k/fold0"
    args = [*ARGS, "--data", str(data), "--workdir", str(tmp_path), "--fold", "0", "--resume"]
    # An interrupted fold whose resume state was replaced by a crafted pickle.
    fdir.mkdir(parents=True)
    with open(fdir / "state.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "refusing to resume" in res.output and "state.pt" in res.output
    assert not (tmp_path / "pwned").exists()


def test_killed_blend_keeps_its_trials_and_the_study_continues(tmp_path):
    root = make_project(tmp_path, 400)
    args = ["blend", "--workdir", root, "--quiet", "--trials", "20", "--nested-trials", "3"]
    code, out = run(args, "trial@13")  # killed inside the 13th trial of the search
    assert code == -9, out
    assert not (root / "runs/blend/blend.json").exists()
    url = f"sqlite:///{root / 'runs/blend/study.db'}"
    (summary,) = optuna.get_all_study_summaries(url, include_best_trial=False)
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 12  # every finished trial was kept

    code, out = run([*args, "--resume-study"])  # continue the killed study
    assert code == 0 and "32 trials in the study" in out, out
    doc = json.loads((root / "runs/blend/blend.json").read_text())
    assert doc["trials"] == 32
    _assert_every_file_whole(root)


def test_temp_files_of_dead_writers_are_swept_never_live_ones(tmp_path):
    import aivh_ens.io as io

    target = tmp_path / "submission.csv"
    dead = tmp_path / f".submission.csv.{io._HOST}-{2**22 + 12345}.x1.tmp"  # above pid_max: never alive
    live = tmp_path / f".submission.csv.{io._HOST}-{os.getppid()}.x2.tmp"  # a running process mid-write
    other_host = tmp_path / ".submission.csv.0000ffff-1.x3.tmp"  # PIDs of another host mean nothing here
    other_file = tmp_path / f".blend.json.{io._HOST}-{2**22 + 12345}.x4.tmp"  # another target's
    for f in (dead, live, other_host, other_file):
        f.write_text("partial")
    io.write_text(target, "id,label\n")
    assert target.read_text() == "id,label\n"
    assert not dead.exists() and live.exists() and other_host.exists() and other_file.exists()


def test_a_cv_whose_fold_lock_is_taken_over_stops_with_one_line_and_writes_nothing_more(
    tmp_path, data, monkeypatch
):
    """Another host took the fold over (it presumed this process dead) while this one stalled after its first
    epoch: the stalled process writes no further checkpoint of the fold and ends with one line."""
    w, marker = tmp_path / "w", tmp_path / "paused"
    monkeypatch.setenv("AIVH_ENS_FAULT", "pause:6")  # a stall after epoch 1 was saved
    monkeypatch.setenv("AIVH_ENS_FAULT_ONCE", str(marker))
    p = spawn([*ARGS, "--data", str(data), "--workdir", str(w)], "epoch-done@1")
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
        time.sleep(0.02)
    lock, fold0 = w / "runs/k/fold0.lock", w / "runs/k/fold0"
    lock.unlink()  # taken over: the other host's lock in its place
    taken = {"pid": 1, "host": "other-host", "token": "t", "beat": 3, "heartbeat": time.time(), "grace": 300}
    lock.write_text(json.dumps(taken))
    before = {f.name: f.stat().st_mtime_ns for f in fold0.iterdir() if not f.name.startswith(".")}
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "fold 0 of run k: lost its lock to PID 1 on other-host" in errors[0], out
    after = {f.name: f.stat().st_mtime_ns for f in fold0.iterdir() if not f.name.startswith(".")}
    assert after == before and "done.json" not in after  # no checkpoint written after the takeover
    assert json.loads(lock.read_text()) == taken  # the new owner's lock left alone
