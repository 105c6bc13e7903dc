"""`cv --pseudo`: confident test rows train in every fold and never validate; the source is frozen and hashed;
a changed source is refused by name; the probe path and the sweep path train on the pseudo rows too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_checks import assert_user_error, tiny_cv
from click.testing import CliRunner
from safetensors.torch import save_file
from sweep_plans import write_plan

from aivh_ens.cli import main
from aivh_ens.config import resolve_config
from aivh_ens.train import fold as fold_mod
from aivh_ens.train.loop import FoldContext, _forward_backward
from aivh_ens.train.pseudo import select_pseudo

FAST = tiny_cv()
N_PICKED = 24  # rows of the pseudo file the project fixture marks confident


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def scores_file(data: Path, path: Path, n_confident: int = N_PICKED) -> Path:
    """An ``id,prob`` file over every test image: ``n_confident`` confident rows, half AI (0.99) and half
    human (0.01) by solution.csv, the first of each class; the rest 0.5."""
    sol = pd.read_csv(data / "solution.csv", dtype={"id": str})
    prob = np.full(len(sol), 0.5)
    for label, p in ((1, 0.99), (0, 0.01)):
        prob[np.flatnonzero(sol["label"].to_numpy() == label)[: n_confident // 2]] = p
    pd.DataFrame({"id": sol["id"], "prob": prob}).to_csv(path, index=False)
    return path


def confident_ids(src: Path) -> set[str]:
    df = pd.read_csv(src, dtype={"id": str})
    return set(df["id"][df["prob"] != 0.5])


def record_splits(monkeypatch) -> list[tuple[int, set[str], set[str]]]:
    """(fold, train file names, validation file names) of every fold the process trains."""
    seen: list[tuple[int, set[str], set[str]]] = []
    split = fold_mod._split_rows

    def recording(job):
        labels, tr, va = split(job)
        names = job.fold_table["file_name"].to_numpy()
        seen.append((job.fold, set(names[tr]), set(names[va])))
        return labels, tr, va

    monkeypatch.setattr(fold_mod, "_split_rows", recording)
    return seen


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_data):
    """(data, workdir, pseudo file, picked ids, cv output, train/val splits) of a 3-fold pseudo run ``p``."""
    root = tmp_path_factory.mktemp("pseudo")
    data, work = demo_data(n=120, n_test=40, seed=5), root / "work"
    src = scores_file(data, root / "scores.csv")
    picked = confident_ids(src)
    mp = pytest.MonkeyPatch()
    seen = record_splits(mp)
    try:
        res = invoke("cv", *FAST, "--data", data, "--workdir", work, "--name", "p", "--pseudo", src)
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return data, work, src, picked, res.output, seen


def test_pseudo_rows_train_in_every_fold_and_never_validate(project):
    data, work, src, picked, out, seen = project
    n_train = len(pd.read_csv(data / "train.csv"))
    assert sorted(k for k, _, _ in seen) == [0, 1, 2]
    for k, train, val in seen:
        assert picked <= train, f"fold {k} did not train on every pseudo row"
        assert not picked & val, f"fold {k} validated on pseudo rows"
        done = json.loads((work / "runs" / "p" / f"fold{k}" / "done.json").read_text())
        assert done["n_pseudo"] == N_PICKED
        assert done["n_train"] + done["n_val"] == n_train + N_PICKED
        fold_oof = pd.read_csv(work / "runs" / "p" / f"fold{k}" / "oof.csv", dtype={"file_name": str})
        assert not picked & set(fold_oof["file_name"])
    oof = pd.read_csv(work / "oof" / "p.csv", dtype={"file_name": str})
    assert sorted(oof["file_name"]) == sorted(
        pd.read_csv(data / "train.csv", dtype={"file_name": str})["file_name"]
    )
    assert "pseudo-labels: 24 of 40 test rows" in out and "no longer measure test performance" in out


def test_the_config_records_the_frozen_copy_and_its_hash(project):
    data, work, src, picked, _, _ = project
    doc = json.loads((work / "runs" / "p" / "config.json").read_text())
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert doc["config"]["pseudo_sha256"] == sha == doc["pseudo"]["sha256"]
    assert (work / "runs" / "p" / "pseudo.csv").read_bytes() == src.read_bytes()
    assert doc["pseudo"]["rows"] == {"ai": N_PICKED // 2, "human": N_PICKED // 2}
    assert doc["pseudo"]["min_conf"] == 0.95 and doc["pseudo"]["weight"] == 1.0


def test_a_changed_source_is_refused_by_name_and_the_copy_is_what_jobs_read(project, tmp_path):
    data, work, src, _, _, _ = project
    changed = scores_file(data, tmp_path / "scores.csv", n_confident=10)
    res = invoke(
        "cv", *FAST, "--data", data, "--workdir", work, "--name", "p", "--pseudo", changed, "--resume"
    )
    assert_user_error(res, "pseudo_sha256", "runs/p/pseudo.csv")
    assert (work / "runs" / "p" / "pseudo.csv").read_bytes() == src.read_bytes()
    # the same file again: every fold is done, nothing is retrained
    res = invoke("cv", *FAST, "--data", data, "--workdir", work, "--name", "p", "--pseudo", src)
    assert res.exit_code == 0, res.output
    assert res.output.count("already done") == 3


def _bad_sources(data: Path, tmp: Path) -> dict[str, tuple[str, list[str]]]:
    test_ids = pd.read_csv(data / "test.csv", dtype={"id": str})["id"].tolist()
    train_ids = pd.read_csv(data / "train.csv", dtype={"file_name": str})["file_name"].tolist()
    return {
        "not-in-test": (
            f"id,prob\n{test_ids[0]},0.99\nelsewhere/x.png,0.01\n",
            ["elsewhere/x.png", "test.csv"],
        ),
        "above-1": (f"id,prob\n{test_ids[0]},1.5\n", ["line 2", "1.5", "[0, 1]"]),
        "nan": (f"id,prob\n{test_ids[0]},0.9\n{test_ids[1]},nan\n", ["line 3", "nan", "[0, 1]"]),
        "no-prob": (f"id,label\n{test_ids[0]},1\n", ["no column 'prob'", "id,prob"]),
        "train-id": (f"id,prob\n{train_ids[3]},0.99\n", [train_ids[3], "train"]),
    }


@pytest.mark.parametrize("case", ["not-in-test", "above-1", "nan", "no-prob", "train-id"])
def test_bad_pseudo_files_are_one_line_and_write_nothing(tmp_path, demo_data, case):
    data = demo_data(n=120, n_test=40, seed=5)
    text, needles = _bad_sources(data, tmp_path)[case]
    src = tmp_path / "bad.csv"
    src.write_text(text)
    work = tmp_path / "work"
    assert_user_error(
        invoke("cv", *FAST, "--data", data, "--workdir", work, "--pseudo", src), "bad.csv", *needles
    )
    assert not work.exists()


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--pseudo-min-conf", "0.4", "(0.5, 1]"),
        ("--pseudo-max-share", "0", "> 0"),
        ("--pseudo-weight", "-1", "> 0"),
    ],
)
def test_bad_pseudo_options_are_one_line(tmp_path, demo_data, flag, value, needle):
    res = invoke(
        "cv", *FAST, "--data", demo_data(n=120, n_test=40, seed=5), "--workdir", tmp_path / "w", flag, value
    )
    assert_user_error(res, flag, needle)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "probs,conf,share,balance,train_ai,expect",
    [
        (
            [0.99, 0.01, 0.5, 0.96, 0.04, 0.951],
            0.95,
            1.0,
            False,
            50,
            [(0, 1), (1, 0), (3, 1), (4, 0), (5, 1)],
        ),
        ([0.99, 0.01, 0.5, 0.96, 0.04, 0.951], 0.95, 1.0, True, 50, [(0, 1), (1, 0), (3, 1), (4, 0)]),
        ([0.99, 0.01, 0.5, 0.96, 0.04], 0.98, 1.0, False, 50, [(0, 1), (1, 0)]),
        ([0.97, 0.001, 0.5, 0.999, 0.03], 0.95, 0.02, False, 50, [(1, 0), (3, 1)]),  # cap 2: most confident
        ([0.6, 0.4], 0.6, 1.0, True, 50, [(0, 1), (1, 0)]),
        # balance to the train share: 1 AI per 3 human rows; all 3 confident humans stay beside the 1 AI
        ([0.99, 0.98, 0.01, 0.02, 0.03, 0.97], 0.95, 1.0, True, 25, [(0, 1), (2, 0), (3, 0), (4, 0)]),
        ([0.01, 0.02, 0.03], 0.95, 1.0, True, 50, []),  # no confident AI row: nothing to balance against
    ],
)
def test_select_pseudo_table(probs, conf, share, balance, train_ai, expect):
    cfg = resolve_config(
        model="test_efficientnet", pseudo_min_conf=conf, pseudo_max_share=share, pseudo_balance=balance
    )
    scores = pd.DataFrame({"id": [f"t{i}" for i in range(len(probs))], "prob": probs})
    got = select_pseudo(scores, cfg, np.r_[np.ones(train_ai), np.zeros(100 - train_ai)])
    assert list(zip(got["id"], got["label"], strict=True)) == [(f"t{i}", y) for i, y in expect]


def test_weighted_loss_is_a_weighted_mean_and_unit_weights_change_nothing():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    cfg = resolve_config(model="test_efficientnet")
    ctx = FoldContext(cfg, torch.device("cpu"), lambda t: t, str, set())
    plain = _forward_backward(model, x, y, ctx, None)
    ones = _forward_backward(model, x, y, ctx, None, torch.ones(3))
    assert torch.allclose(plain, ones)
    only_last = _forward_backward(model, x, y, ctx, None, torch.tensor([0.0, 0.0, 2.0]))
    assert torch.allclose(only_last, _forward_backward(model, x[2:], y[2:], ctx, None))
    assert fold_mod.row_weights(pd.DataFrame({"weight": [1.0, 1.0]})) is None
    assert fold_mod.row_weights(pd.DataFrame({"weight": [1.0, 0.5]})).tolist() == [1.0, 0.5]


def test_pseudo_blend_is_fold_consistent_student_fold_k_learns_from_teacher_fold_k(
    project, tmp_path, monkeypatch
):
    """``--pseudo blend`` with the blend's fold file: the frozen copy holds the blend's test scores (what
    ``submit --proba`` writes) and, per fold k, the blend of the teachers' fold k models alone (their cached
    per-fold test scores); student fold k trains on the rows chosen from that column only, so no label of a
    fold k validation row reaches it through a pseudo-label. blend.json and the table flag pseudo runs."""
    from aivh_ens.data.folds import read_fold_file
    from aivh_ens.layout import is_pseudo, read_run_config, read_run_doc
    from aivh_ens.train.pseudo import training_table

    data, work, _, _, _, _ = project
    res = invoke("blend", "--workdir", work, "--trials", "5", "--quiet")
    assert res.exit_code == 0, res.output
    blend = json.loads((work / "runs" / "blend" / "blend.json").read_text())
    assert [r.get("pseudo") for r in blend["runs"]] == ["every-fold"] and is_pseudo(blend["runs"][0])
    assert "p: pseudo-labelled from models that saw every fold's rows" in res.output
    out = tmp_path / "sub.csv"
    res = invoke("submit", "--workdir", work, "--out", out, "--proba", "--quiet")
    assert res.exit_code == 0, res.output
    seen: list[tuple[int, pd.DataFrame, np.ndarray]] = []  # (fold, its training table, its train rows)
    split = fold_mod._split_rows

    def recording(job):
        labels, tr, va = split(job)
        seen.append((job.fold, job.fold_table, tr))
        return labels, tr, va

    monkeypatch.setattr(fold_mod, "_split_rows", recording)
    res = invoke("cv", *FAST, "--data", data, "--workdir", work, "--name", "pb", "--pseudo", "blend",
                 "--pseudo-min-conf", "0.5001", "--no-pseudo-balance", "--pseudo-weight", "0.5")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "fold-consistent pseudo-labels" in res.output and "no longer measure" not in res.output
    frozen = pd.read_csv(work / "runs" / "pb" / "pseudo.csv", dtype={"id": str})
    proba = pd.read_csv(tmp_path / "sub_proba.csv", dtype={"id": str})
    assert frozen["id"].tolist() == proba["id"].tolist()
    np.testing.assert_allclose(frozen["prob"], proba["prob"], atol=1e-6)
    (cache,) = (work / "runs" / "p" / "test").glob("*.csv")  # the teacher's cached per-fold test scores
    teacher = pd.read_csv(cache, dtype={"id": str})
    cfg, _ = read_run_config(work, "pb")
    assert read_run_doc(work, "pb")["pseudo"]["fold_consistent"]
    fold_table = read_fold_file(work / read_run_doc(work, "pb")["fold_file"])
    table = training_table(cfg, work, fold_table)
    for k in range(3):
        np.testing.assert_allclose(frozen[f"fold{k}"], teacher[f"fold{k}"], atol=1e-6)  # teacher fold k alone
        mine = table[table["only_fold"] == k]
        conf = frozen.set_index("id")[f"fold{k}"]
        chosen = conf[(conf - 0.5).abs() >= 0.0001]
        assert sorted(mine["file_name"]) == sorted(chosen.index)
        assert (mine["label"].to_numpy() == (chosen[mine["file_name"]] >= 0.5).to_numpy()).all()
    assert not np.allclose(frozen["fold0"], frozen["fold1"])  # the folds' teachers differ
    assert sorted(k for k, _, _ in seen) == [0, 1, 2]
    for k, t, tr in seen:
        only = t["only_fold"].to_numpy()
        assert set(only[tr]) == {-1, k} and (t["fold"].to_numpy()[tr] != k).all()  # its own pseudo rows only
        done = json.loads((work / "runs" / "pb" / f"fold{k}" / "done.json").read_text())
        assert done["n_pseudo"] == int((only == k).sum()) > 0


def test_pseudo_blend_from_other_folds_trains_every_fold_and_warns(project, tmp_path):
    """A run made from another fold file than the blend's (here another seed) cannot take fold k's labels from
    models that never saw fold k: the copy holds the averaged scores only, and the OOF warning stands."""
    data, work, _, _, _, _ = project
    if not (work / "runs" / "blend" / "blend.json").is_file():
        assert invoke("blend", "--workdir", work, "--trials", "5", "--quiet").exit_code == 0
    res = invoke("cv", *FAST, "--data", data, "--workdir", work, "--name", "po", "--pseudo", "blend", "--fold", "0",
                 "--seed", "7", "--pseudo-min-conf", "0.5001", "--no-pseudo-balance")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (
        "made from fold file folds/k3_s42" in res.output
        and "no longer measure test performance" in res.output
    )
    frozen = pd.read_csv(work / "runs" / "po" / "pseudo.csv", dtype={"id": str})
    assert list(frozen.columns) == ["id", "prob"]
    assert (
        json.loads((work / "runs" / "po" / "config.json").read_text())["pseudo"]["fold_consistent"] is False
    )


def test_is_pseudo_and_its_kind():
    from aivh_ens.layout import is_pseudo, pseudo_kind

    assert not is_pseudo({}) and pseudo_kind({"pseudo": None}) is None
    assert is_pseudo({"pseudo": {"fold_consistent": False}}) and is_pseudo({"pseudo": "fold-consistent"})
    assert pseudo_kind({"pseudo": {"fold_consistent": True}}) == "fold-consistent"
    assert pseudo_kind({"pseudo": {"source": "x.csv"}}) == "every-fold"


def test_a_probe_head_trains_on_the_pseudo_rows(tmp_path, demo_data, monkeypatch):
    import timm

    from aivh_ens.train import probe as probe_mod

    data = demo_data(n=120, n_test=40, seed=5)
    torch.manual_seed(0)
    weights = tmp_path / "test_vit.safetensors"
    save_file(
        {k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(weights)
    )
    src = scores_file(data, tmp_path / "scores.csv")
    fitted: list[tuple[int, np.ndarray]] = []
    fit = probe_mod.fit_linear

    def recording(X, y, groups, seed, weights=None):
        fitted.append((len(y), weights))
        return fit(X, y, groups, seed, weights)

    monkeypatch.setattr(probe_mod, "fit_linear", recording)
    res = invoke("cv", "--model", "test_vit", "--img-size", "32", "--folds", "3", "--group", "pairs", "--quiet",
                 "--head", "linear", "--weights", weights, "--data", data, "--workdir", tmp_path / "w",
                 "--pseudo", src, "--pseudo-weight", "0.25")  # fmt: skip
    assert res.exit_code == 0, res.output
    n_train = len(pd.read_csv(data / "train.csv"))
    assert len(fitted) == 3
    for n, w in fitted:  # each head: the other folds' labelled rows plus every pseudo row, at weight 0.25
        assert (w == 0.25).sum() == N_PICKED and (w == 1).sum() == n - N_PICKED < n_train
    oof = pd.read_csv(tmp_path / "w" / "oof" / "test_vit.csv")
    assert len(oof) == n_train


def test_a_sweep_reads_the_frozen_copy_and_refuses_a_changed_source(tmp_path, demo_data):
    data = demo_data(n=120, n_test=40, seed=5)
    src = scores_file(data, tmp_path / "scores.csv")
    plan = write_plan(
        tmp_path / "plan.toml", data, [{"name": "s", "model": "test_efficientnet", "pseudo": "scores.csv"}]
    )
    work = tmp_path / "w"
    res = CliRunner().invoke(
        main, ["sweep", str(plan), "--workdir", str(work), "--devices", "cpu", "--threads", "1"]
    )
    assert res.exit_code == 0, res.output
    picked = confident_ids(src)
    for k in range(3):
        done = json.loads((work / "runs" / "s" / f"fold{k}" / "done.json").read_text())
        assert done["n_pseudo"] == N_PICKED
    assert not picked & set(pd.read_csv(work / "oof" / "s.csv", dtype={"file_name": str})["file_name"])
    scores_file(data, src, n_confident=10)  # a later submit overwrites the source
    res = CliRunner().invoke(main, ["sweep", str(plan), "--workdir", str(work), "--devices", "cpu"])
    assert_user_error(res, "run s", "pseudo_sha256")
    rows = json.loads((work / "runs" / "s" / "config.json").read_text())["pseudo"]["rows"]
    assert rows["ai"] + rows["human"] == N_PICKED  # the run still describes the copy it trained on
