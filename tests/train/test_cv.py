"""`aivh-ens cv` end to end on generated data: OOF contract, resume, locks, refusals, bad images."""

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
from cli_checks import assert_user_error, tiny_cv
from click.testing import CliRunner

from aivh_ens.cli import main
from aivh_ens.metrics import f1
from aivh_ens.train import fold as fold_mod

# Tiny and fast: 32 px, 1-2 epochs, 3 folds over 120 images.
FAST = tiny_cv(epochs=None)


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=120, n_test=20, seed=3)


def cv(workdir: Path, data: Path, *extra: str):
    res = CliRunner().invoke(main, ["cv", *FAST, "--data", str(data), "--workdir", str(workdir), *extra])
    return res


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_cv_writes_the_oof_contract(tmp_path, data):
    res = cv(tmp_path, data, "--epochs", "2", "--name", "r1", "--tta", "none")
    assert res.exit_code == 0, res.output
    assert "fold file: " in res.output and "k3_s42_gpairs.csv" in res.output
    assert "OOF at 0.5: f1" in res.output
    oof = pd.read_csv(tmp_path / "oof" / "r1.csv")
    train = pd.read_csv(data / "train.csv")
    folds = pd.read_csv(tmp_path / "folds" / "k3_s42_gpairs.csv")
    assert list(oof.columns) == [
        "file_name",
        "label",
        "fold",
        "prob",
        "group",
    ]  # grouped folds: the group too
    assert (oof["group"] == folds["group"]).all()
    assert oof["file_name"].tolist() == train["file_name"].tolist()  # train.csv order, every row once
    assert (oof["label"] == train["label"]).all() and (oof["fold"] == folds["fold"]).all()
    assert oof["prob"].between(0, 1).all() and oof["prob"].nunique() > 10
    cfg = json.loads((tmp_path / "runs" / "r1" / "config.json").read_text())
    assert cfg["fold_file"] == "folds/k3_s42_gpairs.csv" and len(cfg["fold_sha256"]) == 64
    assert cfg["config"]["model"] == "test_efficientnet" and "torch" in cfg["versions"]
    for k in range(3):
        fdir = tmp_path / "runs" / "r1" / f"fold{k}"
        m = pd.read_csv(fdir / "metrics.csv")
        assert list(m["epoch"]) == [1, 2]
        assert {"train_loss", "val_loss", "val_acc", "val_f1", "val_auc", "lr", "img_s", "seconds"} <= set(m)
        assert (fdir / "best.safetensors").stat().st_size > 0 and not (fdir / "state.pt").exists()
        done = json.loads((fdir / "done.json").read_text())
        assert done["best_epoch"] in (1, 2) and done["oof_tta"] == "none"
        # Without TTA, the OOF rows of this fold are the best epoch's validation predictions.
        rows = oof[oof["fold"] == k]
        assert abs(done["val_f1"] - f1(rows["label"], rows["prob"] >= 0.5)) < 1e-9
        assert abs(done["val_f1"] - m.loc[done["best_epoch"] - 1, "val_f1"]) < 1e-5
    assert no_temp_files(tmp_path)


def test_oof_rows_are_scored_through_the_runs_tta_views(tmp_path, data):
    """Each OOF probability is the mean, over the run's TTA views, of the fold's best weights' P(AI): here the
    10 views of hflip+shift:1, recomputed by hand from the fold's validation images."""
    import dataclasses

    import torch

    from aivh_ens.data.cache import open_source
    from aivh_ens.layout import read_run_config
    from aivh_ens.score.tta import TTADataset
    from aivh_ens.train.loop import load_weights
    from aivh_ens.train.models import build_model

    res = cv(tmp_path, data, "--epochs", "1", "--name", "t", "--fold", "0", "--tta", "hflip+shift:1")
    assert res.exit_code == 0, res.output
    fdir = tmp_path / "runs" / "t" / "fold0"
    assert json.loads((fdir / "done.json").read_text())["oof_tta"] == "hflip+shift:1"
    oof = pd.read_csv(fdir / "oof.csv")
    run_cfg, _ = read_run_config(tmp_path, "t")
    assert run_cfg.tta == "hflip+shift:1"
    model, dc = build_model(dataclasses.replace(run_cfg, pretrained=False))
    load_weights(model, fdir / "best.safetensors")
    model.eval()
    source = open_source(
        run_cfg, data, oof["file_name"].tolist(), tmp_path, progress=False, log=lambda m: None
    )
    x = torch.stack([TTADataset(source, [i], run_cfg, dc.img_size)[0][0][0] for i in range(len(oof))]).float()
    x = (x - torch.tensor(dc.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(dc.std).view(1, 3, 1, 1) * 255)
    views = []
    for img in (x, x.flip(-1)):  # each flip, then moved one pixel right, left, down, up (the border mirrored)
        pad = torch.nn.functional.pad(img, (1, 1, 1, 1), mode="reflect")
        views += [img] + [
            pad[..., 1 - dy : 33 - dy, 1 - dx : 33 - dx] for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))
        ]
    with torch.no_grad():
        probs = torch.stack([torch.softmax(model(v), 1)[:, 1] for v in views])  # (10, N)
    np.testing.assert_allclose(oof["prob"].to_numpy(), probs.mean(0).numpy(), atol=2e-5)
    # views averaged as logits too: what logit-space blends and stacks average the test images' views as
    np.testing.assert_allclose(
        oof["prob_logit"].to_numpy(), torch.sigmoid(torch.logit(probs).mean(0)), atol=2e-5
    )
    assert np.abs(oof["prob"].to_numpy() - probs[0].numpy()).max() > 1e-4  # the views changed the scores


def test_a_bad_tta_spec_is_refused_before_training(tmp_path, data):
    res = cv(tmp_path, data, "--epochs", "1", "--name", "b", "--tta", "hflip+shift:0")
    assert res.exit_code == 2 and "tta='hflip+shift:0' (--tta) must be none, hflip" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "runs" / "b").exists()


def test_finished_folds_are_not_retrained(tmp_path, data, monkeypatch):
    assert cv(tmp_path, data, "--epochs", "1", "--name", "r").exit_code == 0
    before = (tmp_path / "oof" / "r.csv").read_bytes()

    def boom(*a, **k):
        raise AssertionError("a finished fold was retrained")

    monkeypatch.setattr("aivh_ens.train.cv.fit_fold", boom)
    res = cv(tmp_path, data, "--epochs", "1", "--name", "r")
    assert res.exit_code == 0, res.output
    assert res.output.count("already done") == 3
    assert (tmp_path / "oof" / "r.csv").read_bytes() == before


def test_resume_equals_uninterrupted(tmp_path, data, monkeypatch):
    ref = tmp_path / "ref"
    assert cv(ref, data, "--epochs", "3", "--fold", "0", "--name", "r").exit_code == 0

    # Interrupt after the first epoch's state is saved (as a kill would), then resume.
    real_save = fold_mod._save_state
    calls = {"n": 0}

    def save_then_die(path, state):
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(fold_mod, "_save_state", save_then_die)
    res = cv(run, data, "--epochs", "3", "--fold", "0", "--name", "r")
    assert res.exit_code != 0 and (run / "runs/r/fold0/state.pt").exists()
    assert not (run / "runs/r/fold0/done.json").exists()

    refused = cv(run, data, "--epochs", "3", "--fold", "0", "--name", "r")
    assert_user_error(refused, "--resume")

    res = cv(run, data, "--epochs", "3", "--fold", "0", "--name", "r", "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming after epoch 1" in res.output
    a = pd.read_csv(ref / "runs/r/fold0/oof.csv")
    b = pd.read_csv(run / "runs/r/fold0/oof.csv")
    np.testing.assert_array_equal(a["prob"].to_numpy(), b["prob"].to_numpy())
    ma, mb = pd.read_csv(ref / "runs/r/fold0/metrics.csv"), pd.read_csv(run / "runs/r/fold0/metrics.csv")
    np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=0, atol=0)


def test_validate_last_skips_the_early_passes_and_ships_what_select_last_ships(tmp_path, data):
    """Validation changes nothing in training: validating only the last epoch selects it, so the fold ships
    the weights ``--select last`` ships; the earlier epochs have no validation scores and cannot be picked."""
    args = ("--epochs", "3", "--fold", "0", "--name", "r")
    assert cv(tmp_path / "last", data, *args, "--select", "last").exit_code == 0
    res = cv(tmp_path / "skip", data, *args, "--validate-last", "1", "--select", "loss")
    assert res.exit_code == 0, res.output
    fold = tmp_path / "skip/runs/r/fold0"
    m = pd.read_csv(fold / "metrics.csv")
    assert m["val_f1"].isna().tolist() == [True, True, False] and m["train_loss"].notna().all()
    assert json.loads((fold / "done.json").read_text())["best_epoch"] == 3
    a, b = (pd.read_csv(w / "runs/r/fold0/oof.csv") for w in (tmp_path / "last", tmp_path / "skip"))
    np.testing.assert_array_equal(a["prob"].to_numpy(), b["prob"].to_numpy())
    ma = pd.read_csv(tmp_path / "last/runs/r/fold0/metrics.csv")
    np.testing.assert_array_equal(ma["train_loss"].to_numpy(), m["train_loss"].to_numpy())
    assert ma["val_loss"].iloc[-1] == pytest.approx(m["val_loss"].iloc[-1], abs=1e-9)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, data):
    runs = {w: tmp_path / w for w in ("a", "b", "c")}
    for w, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert cv(runs[w], data, "--epochs", "1", "--seed", seed, "--name", "d").exit_code == 0
    a, b, c = runs["a"], runs["b"], runs["c"]
    fold_file = "folds/k3_s7_gpairs.csv"
    assert (a / fold_file).read_bytes() == (b / fold_file).read_bytes()
    assert (a / "oof/d.csv").read_bytes() == (b / "oof/d.csv").read_bytes()
    for k in range(3):  # the fold weights too, bit for bit (on CPU)
        name = f"runs/d/fold{k}/best.safetensors"
        assert (a / name).read_bytes() == (b / name).read_bytes()
    other = pd.read_csv(c / "oof/d.csv")
    assert not (c / fold_file).exists() and (c / "folds/k3_s8_gpairs.csv").exists()
    assert not np.array_equal(other["prob"], pd.read_csv(a / "oof/d.csv")["prob"])


def test_threads_option_and_env_set_torch_threads(tmp_path, data, monkeypatch):
    import torch

    from aivh_ens.errors import UserError

    seen: list[int] = []

    def stop(*a, **k):
        seen.append(torch.get_num_threads())
        raise UserError("stopped before training")

    monkeypatch.setattr("aivh_ens.train.cv.run_cv", stop)
    monkeypatch.delenv("AIVH_ENS_THREADS", raising=False)  # the third call checks the default
    before = torch.get_num_threads()
    args = ["cv", "--recipe", "tiny", "--data", str(data), "--workdir", str(tmp_path)]
    try:
        torch.set_num_threads(2)
        assert_user_error(CliRunner().invoke(main, [*args, "--threads", "1"]), "stopped before training")
        torch.set_num_threads(2)
        assert_user_error(CliRunner(env={"AIVH_ENS_THREADS": "1"}).invoke(main, args), "stopped before")
        torch.set_num_threads(2)
        assert_user_error(CliRunner().invoke(main, args), "stopped before training")
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 2]
    res = CliRunner().invoke(main, [*args, "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output


def test_busy_cpu_note_with_several_threads(monkeypatch):
    import torch

    from aivh_ens import system as cv_mod

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(cv_mod, "busy_elsewhere", lambda: 3)
        note = cv_mod.cpu_contention_note("cpu")
        assert note is not None and "3 other process(es)" in note and "--threads 1" in note
        torch.set_num_threads(1)
        assert cv_mod.cpu_contention_note("cpu") is None  # one thread: nothing to wait for
        torch.set_num_threads(2)
        monkeypatch.setattr(cv_mod, "busy_elsewhere", lambda: 0)
        assert cv_mod.cpu_contention_note("cpu") is None  # an idle machine
    finally:
        torch.set_num_threads(before)


def test_busy_elsewhere_counts_a_spinning_process():
    import subprocess
    import sys

    from aivh_ens.system import busy_elsewhere

    if busy_elsewhere() is None:
        pytest.skip("no /proc/loadavg here")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_elsewhere(samples=3, interval=0.2) >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_folds_in_separate_invocations_assemble_oof_once(tmp_path, data):
    r1 = cv(tmp_path, data, "--epochs", "1", "--fold", "0", "--name", "s")
    assert r1.exit_code == 0 and "OOF not written yet: fold(s) 1, 2" in r1.output
    assert not (tmp_path / "oof" / "s.csv").exists()
    r2 = cv(tmp_path, data, "--epochs", "1", "--fold", "1,2", "--name", "s")
    assert r2.exit_code == 0, r2.output
    assert r2.output.count("oof/s.csv (120 rows)") == 1
    assert len(pd.read_csv(tmp_path / "oof" / "s.csv")) == 120


def test_changed_config_and_fold_file_are_refused(tmp_path, data):
    assert cv(tmp_path, data, "--epochs", "1", "--fold", "0", "--name", "c").exit_code == 0
    assert_user_error(cv(tmp_path, data, "--epochs", "2", "--fold", "0", "--name", "c"), "epochs", "--force")
    fold_file = tmp_path / "folds" / "k3_s42_gpairs.csv"
    df = pd.read_csv(fold_file)
    df.loc[[0, 1], "fold"] = (df.loc[[0, 1], "fold"] + 1) % 3
    df.to_csv(fold_file, index=False)
    assert_user_error(
        cv(tmp_path, data, "--epochs", "1", "--fold", "0", "--name", "c"), "fold file", "changed"
    )


def test_live_lock_refused_and_stale_lock_taken_over(tmp_path, data):
    lock = tmp_path / "runs" / "l" / "fold0.lock"
    lock.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        res = cv(tmp_path, data, "--epochs", "1", "--fold", "0", "--name", "l")
        assert_user_error(res, "locked by PID", str(sleeper.pid), "fold0.lock")
    finally:
        sleeper.kill()
        sleeper.wait()
    res = cv(tmp_path, data, "--epochs", "1", "--fold", "0", "--name", "l")  # the PID is dead now: stale
    assert res.exit_code == 0, res.output
    assert not lock.exists()


def test_fold_time_ends_a_fold_on_time_with_its_schedule_run_out(tmp_path, data):
    """A fold out of time trains one more epoch as its schedule's last (validated, the learning rate at the
    end of its cosine, as a run planned for that many epochs ends); a fold with time to spare trains exactly
    what it would without ``--fold-time``."""
    args = ("--fold", "0", "--name", "r", "--validate-last", "1")
    assert cv(tmp_path / "two", data, *args, "--epochs", "2").exit_code == 0
    res = cv(tmp_path / "short", data, *args, "--epochs", "4", "--fold-time", "0.001")
    assert res.exit_code == 0, res.output
    assert "fold 0: 2 epochs fit --fold-time 0.001s (of at most 4)" in res.output
    assert "fold 0 epoch 1/4:" in res.output and "fold 0 epoch 2/2:" in res.output
    m = pd.read_csv(tmp_path / "short/runs/r/fold0/metrics.csv")
    two = pd.read_csv(tmp_path / "two/runs/r/fold0/metrics.csv")
    assert list(m["epoch"]) == [1, 2] and m["val_f1"].isna().tolist() == [True, False]
    assert m["lr"].iloc[-1] == pytest.approx(two["lr"].iloc[-1], rel=1e-9)
    assert m["lr"].iloc[0] > two["lr"].iloc[0]  # epoch 1 ran on the 4-epoch schedule it started under
    assert (m["train_seconds"] > 0).all() and (m["seconds"] >= m["train_seconds"]).all()
    res = cv(tmp_path / "long", data, *args, "--epochs", "2", "--fold-time", "1e6")
    assert res.exit_code == 0, res.output
    a, b = (pd.read_csv(w / "runs/r/fold0/oof.csv") for w in (tmp_path / "two", tmp_path / "long"))
    np.testing.assert_array_equal(a["prob"].to_numpy(), b["prob"].to_numpy())


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--model", "efficientnet_b44"], ["unknown timm model", "efficientnet_b4"]),
        (["--recipe", "tinyy"], ["unknown recipe", "tiny"]),
        (["--folds", "1"], ["--folds", "at least 2"]),
        (["--validate-last", "0"], ["--validate-last", "at least 1"]),
        (["--fold-time", "0"], ["--fold-time", "more than 0 seconds"]),
        (["--folds", "70"], ["smallest class"]),
        (["--fold", "7"], ["--fold 7", "0..2"]),
        (["--group", "site"], ["site"]),
        (["--device", "cuda"], ["no CUDA device"]),
        (["--train-csv", "nope.csv"], ["nope.csv"]),
    ],
)
def test_bad_cv_input_is_one_line_exit_2(tmp_path, data, args, needles):
    res = cv(tmp_path, data, "--epochs", "1", *args)
    assert_user_error(res, *needles)
    assert not list((tmp_path / "oof").glob("*.csv")) if (tmp_path / "oof").exists() else True
    assert no_temp_files(tmp_path)


def test_corrupt_image_stops_or_is_skipped(tmp_path, data):
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    victim = pd.read_csv(bad_data / "train.csv")["file_name"][5]
    raw = (bad_data / victim).read_bytes()
    (bad_data / victim).write_bytes(raw[: len(raw) // 3])  # truncated JPEG: header fine, pixels missing
    res = cv(tmp_path / "w1", bad_data, "--epochs", "1", "--fold", "0")
    assert_user_error(res, victim, "--on-bad-image skip")
    res = cv(tmp_path / "w2", bad_data, "--epochs", "1", "--on-bad-image", "skip", "--name", "sk")
    assert res.exit_code == 0, res.output
    skipped = pd.read_csv(tmp_path / "w2" / "runs" / "sk" / "skipped.csv")
    assert skipped["file_name"].tolist() == [victim]
    oof = pd.read_csv(tmp_path / "w2" / "oof" / "sk.csv")
    assert len(oof) == 119 and victim not in set(oof["file_name"])


def test_cli_help_lists_examples():
    res = CliRunner().invoke(main, ["cv", "--help"])
    assert res.exit_code == 0 and "aivh-ens cv --recipe tiny" in res.output and "--resume" in res.output


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_console_script_exit_code_for_bad_input(tmp_path):
    exe = Path(sys.executable).with_name("aivh-ens")
    res = subprocess.run(
        [str(exe), "cv", "--model", "test_efficientnet", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and "train.csv" in res.stderr
    assert "Traceback" not in res.stderr


def _pairs_table(n: int, alternate: bool) -> pd.DataFrame:
    labels = [1, 0] * (n // 2) if alternate else [1, 1, 0, 0] * (n // 4)
    return pd.DataFrame({"file_name": [f"{i}.jpg" for i in range(n)], "label": labels})


def test_pair_layout_hint_names_the_flag(tmp_path):
    from aivh_ens.config import resolve_config
    from aivh_ens.train.cv import pair_layout_hint

    data = tmp_path / "d"
    data.mkdir()
    cfg = resolve_config("tiny", data=str(data))
    hint = pair_layout_hint(cfg, _pairs_table(40, alternate=True), tmp_path)
    assert hint and "labels alternate" in hint and hint.endswith("--group pairs") and "\n" not in hint
    assert pair_layout_hint(cfg, _pairs_table(40, alternate=False), tmp_path) is None
    grouped = resolve_config("tiny", data=str(data), group="pairs")
    assert pair_layout_hint(grouped, _pairs_table(40, alternate=True), tmp_path) is None
    # inspect's verdict on the images wins over the labels when it checked this data
    doc = {"data": str(data.resolve()), "n_train": 40, "findings": [{"key": "pairs", "level": "warn"}]}
    (tmp_path / "runs" / "inspect").mkdir(parents=True)
    (tmp_path / "runs" / "inspect" / "inspect.json").write_text(json.dumps(doc))
    hint = pair_layout_hint(cfg, _pairs_table(40, alternate=False), tmp_path)
    assert hint and "inspect.json found rows 2k and 2k+1" in hint and "--group pairs" in hint
    doc["findings"] = [{"key": "pairs", "level": "ok"}]
    (tmp_path / "runs" / "inspect" / "inspect.json").write_text(json.dumps(doc))
    assert pair_layout_hint(cfg, _pairs_table(40, alternate=True), tmp_path) is None


def test_cv_without_group_on_the_pair_layout_says_so(tmp_path, data):
    res = CliRunner().invoke(
        main,
        ["cv", *tiny_cv(folds=3, epochs=1, pairs=False), "--fold", "0", "--data", str(data),
         "--workdir", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sum("pass --group pairs" in ln for ln in res.output.splitlines()) == 1
