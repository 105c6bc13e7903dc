"""Probe runs: the feature store, the heads, leakage, the CLI (cv --head) and its refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from cli_checks import assert_user_error
from click.testing import CliRunner
from safetensors.torch import save_file

from aivh_ens.cli import main
from aivh_ens.config import resolve_config
from aivh_ens.data.loader import FileSource
from aivh_ens.data.transforms import eval_transform, storage_step
from aivh_ens.errors import UserError
from aivh_ens.infer.submission import validate_submission
from aivh_ens.recipes import RECIPES
from aivh_ens.train import features as features_mod
from aivh_ens.train import probe as probe_mod
from aivh_ens.train.features import (
    FeatureExtractor,
    build_extractor,
    probe_data_config,
    read_store,
    store_key,
    store_path,
    write_store,
)
from aivh_ens.train.probe import ProbeHead, fit_linear, fit_mlp, probe_probs

PROBE = ["--model", "test_vit", "--img-size", "32", "--folds", "3", "--group", "pairs", "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Local safetensors weights for timm's test_vit (seeded; what --weights loads)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, demo_data, weights) -> tuple[Path, Path, str]:
    """(data, workdir, cv output) of a finished 3-fold linear probe run named p (test_vit, --weights)."""
    data, work = demo_data(n=120, n_test=20, seed=5), tmp_path_factory.mktemp("probe") / "work"
    res = invoke("cv", *PROBE, "--head", "linear", "--weights", weights, "--name", "p", "--data", data,
                 "--workdir", work)  # fmt: skip
    assert res.exit_code == 0, res.output
    return data, work, res.output


def test_stored_features_equal_a_direct_forward_pass(probe_run, weights):
    data, work, _ = probe_run
    cfg = resolve_config(
        "none", model="test_vit", img_size=32, head="linear", weights=str(weights), data=str(data)
    )
    names = pd.read_csv(work / "folds" / "k3_s42_gpairs.csv")["file_name"].tolist()
    dc = probe_data_config(cfg)
    store = read_store(
        store_path(work / "runs" / "features", key := store_key(cfg, 32, dc.mean, dc.std, data, names)), key
    )
    assert store is not None and store.features.dtype == np.float16 and store.features.shape[0] == len(names)
    model = timm.create_model(  # timm's own loading (position embeddings resampled to 32 px)
        "test_vit", num_classes=0, img_size=32, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}
    ).eval()
    src, tf = FileSource(data, names[:6], storage_step(cfg, 32)), eval_transform(cfg, 32)
    x = torch.stack([torch.from_numpy(tf(image=src.get(i))["image"]).permute(2, 0, 1) for i in range(6)])
    x = (x.float() / 255 - torch.tensor(dc.mean)[:, None, None]) / torch.tensor(dc.std)[:, None, None]
    with torch.no_grad():
        direct = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(store.features[:6].astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    assert build_extractor(cfg).num_features == direct.shape[1]


def test_probe_run_writes_the_files_of_a_fine_tuned_run_and_says_what_it_cost(probe_run):
    _, work, out = probe_run
    for k in range(3):
        fdir = work / "runs" / "p" / f"fold{k}"
        assert {p.name for p in fdir.iterdir()} >= {"best.safetensors", "metrics.csv", "oof.csv", "done.json"}
        assert json.loads((fdir / "done.json").read_text())["head"] == "linear"
    assert json.loads((work / "runs" / "p" / "config.json").read_text())["config"]["head"] == "linear"
    oof = pd.read_csv(work / "oof" / "p.csv")
    assert list(oof.columns)[:4] == ["file_name", "label", "fold", "prob"] and len(oof) == 120
    assert "img/s" in out and "MB" in out and "head (C=" in out and "fit in" in out
    assert len(list((work / "runs" / "features").glob("*.feats"))) == 1


def test_a_second_cv_reuses_the_features_and_skips_finished_folds(probe_run):
    data, work, _ = probe_run
    cfg = json.loads((work / "runs" / "p" / "config.json").read_text())["config"]
    before = (work / "oof" / "p.csv").read_bytes()
    res = invoke("cv", *PROBE, "--head", "linear", "--weights", cfg["weights"], "--name", "p", "--data", data,
                 "--workdir", work, "--fold", "1")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "reused" in res.output and "fold 1: already done" in res.output
    assert (work / "oof" / "p.csv").read_bytes() == before


def test_oof_row_comes_from_a_head_that_never_saw_it(probe_run, monkeypatch):
    """Re-fit each fold with a spy: the rows a head is fitted on never include the rows it scores."""
    _, work, _ = probe_run
    folds = pd.read_csv(work / "folds" / "k3_s42_gpairs.csv")
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real_fit, real_probs = probe_mod.fit_linear, probe_mod.probe_probs

    def spy_fit(X, y, groups, seed, weights=None):
        seen.append(("fit", np.asarray(X, dtype=np.float32).copy()))
        return real_fit(X, y, groups, seed, weights)

    def spy_probs(head, X, batch=8192):
        seen.append(("score", np.asarray(X, dtype=np.float32).copy()))
        return real_probs(head, X, batch)

    monkeypatch.setattr(probe_mod, "fit_linear", spy_fit)
    monkeypatch.setattr(probe_mod, "probe_probs", spy_probs)
    cfg = json.loads((work / "runs" / "p" / "config.json").read_text())["config"]
    res = invoke("cv", *PROBE, "--head", "linear", "--weights", cfg["weights"], "--name", "p", "--data",
                 cfg["data"], "--workdir", work, "--force")  # fmt: skip
    assert res.exit_code == 0, res.output
    fits = [x for kind, x in seen if kind == "fit"]
    scored = [x for kind, x in seen if kind == "score"][1::2]  # per fold: train rows, then validation rows
    assert len(fits) == len(scored) == 3
    for k, (fx, vx) in enumerate(zip(fits, scored, strict=True)):
        assert len(vx) == int((folds["fold"] == k).sum())
        fit_rows = {r.tobytes() for r in fx}
        assert not any(r.tobytes() in fit_rows for r in vx), f"fold {k}: a scored row was in the fit"


def test_linear_head_is_near_perfect_on_separable_features_and_chance_on_noise():
    rng = np.random.default_rng(0)
    n, d = 600, 32
    y = (np.arange(n) % 2).astype(np.int64)
    X = rng.normal(size=(n, d))
    Xs = X.copy()
    Xs[:, 3] += 3.0 * (2 * y - 1)  # one direction separates the classes
    tr, te = np.arange(n) < 400, np.arange(n) >= 400
    for fit in (
        lambda X, y: fit_linear(X, y, None, 0)[0],
        lambda X, y: fit_mlp(X, y, _mlp_cfg(), 0, torch.device("cpu"))[0],
    ):
        acc_sep = ((probe_probs(fit(Xs[tr], y[tr]), Xs[te]) >= 0.5) == y[te]).mean()
        acc_noise = ((probe_probs(fit(X[tr], y[tr]), X[te]) >= 0.5) == y[te]).mean()
        assert acc_sep >= 0.98 and 0.35 <= acc_noise <= 0.65, (acc_sep, acc_noise)


def _mlp_cfg():
    return resolve_config("none", model="test_vit", head="mlp", pretrained=True, weight_decay=0.05)


def test_store_is_never_read_half_written_and_key_changes_make_another_file(tmp_path):
    key = {"backbone": "test_vit", "n": 3}
    path = store_path(tmp_path, key)
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_store(path, key, ["a", "b", "c"], feats, {}, {})
    store = read_store(path, key)
    assert store is not None and np.array_equal(store.features, feats.astype(np.float16))
    assert read_store(path, {**key, "n": 4}) is None and store_path(tmp_path, {**key, "n": 4}) != path
    blob = path.read_bytes()
    for cut in (5, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        assert read_store(path, key) is None


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--head", "linear"], ["--pretrained", "--weights"]),
        (["--head", "mlp", "--model", "test_vit+test_vit", "--pretrained"], ["(--head)", "one backbone"]),
        (["--head", "ridge"], ["--head"]),
    ],
)
def test_bad_probe_options_stop_before_anything_is_written(tmp_path, demo_data, args, needles):
    data = demo_data(n=120, n_test=20, seed=5)
    res = invoke("cv", "--model", "test_vit", "--data", data, "--workdir", tmp_path / "w", *args)
    if "ridge" in args:
        assert res.exit_code == 2 and "--head" in res.output
    else:
        assert_user_error(res, *needles)
    assert not (tmp_path / "w").exists()


def test_fine_tuned_plus_probe_run_blend_and_submit_end_to_end(probe_run, tmp_path, monkeypatch):
    data, work, _ = probe_run
    ft = ["--recipe", "tiny", "--img-size", "32", "--batch-size", "16", "--epochs", "1", "--folds", "3"]
    res = invoke("cv", *ft, "--group", "pairs", "--name", "ft", "--data", data, "--workdir", work, "--quiet")
    assert res.exit_code == 0, res.output
    res = invoke("blend", "--workdir", work, "--trials", "10", "--nested-trials", "3", "--quiet")
    assert res.exit_code == 0, res.output
    assert re.search(r"^stack\s", res.output, re.M), res.output  # the table's stack row
    out = tmp_path / "submission.csv"
    res = invoke("submit", "--workdir", work, "--data", data, "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    ids = pd.read_csv(data / "test.csv", dtype=str)["id"].tolist()
    sub = validate_submission(out, ids)
    assert len(sub) == len(ids) and set(sub["label"]) <= {"0", "1"}
    assert len(list((work / "runs" / "features").glob("*.feats"))) == 2  # train and test features

    # A second submit reads the cached test features: no extraction, no image batch for the probe run.
    def no_images(*a, **k):
        raise AssertionError("extracted features again")

    monkeypatch.setattr(features_mod, "extract_features", no_images)
    out2 = tmp_path / "again.csv"
    res = invoke("submit", "--workdir", work, "--data", data, "--out", out2, "--quiet")
    assert res.exit_code == 0, res.output
    assert out2.read_text() == out.read_text()


def test_predict_scores_a_probe_run_like_its_stored_features(probe_run):
    from aivh_ens.infer.predict import predict_images
    from aivh_ens.score.probe import probe_test_scores
    from aivh_ens.score.runs import check_run

    data, work, _ = probe_run
    ids = pd.read_csv(data / "test.csv", dtype=str)["id"].tolist()[:4]
    preds, _ = predict_images([data / i for i in ids], work, run="p", tta="none", device="cpu")
    info = check_run(work, "p")
    P = probe_test_scores(info.cfg, info.weights, work, data, ids, torch.device("cpu"), progress=False)
    np.testing.assert_allclose([p.prob for p in preds], P.mean(axis=0), atol=5e-3)


@pytest.mark.parametrize(
    "name", sorted(n for n in RECIPES if RECIPES[n].get("head", "finetune") != "finetune")
)
def test_every_probe_recipe_builds_its_extractor_and_head(name):
    """Real backbones (random init: no downloads): pooled features, then a head, give (B, 2) logits; without
    weights the recipe is refused."""
    cfg = resolve_config(name)
    assert cfg.pretrained and cfg.head in ("linear", "mlp")
    with pytest.raises(UserError, match=re.escape("(--pretrained")):
        resolve_config(name, pretrained=False)
    torch.manual_seed(0)
    backbone = timm.create_model(cfg.backbones[0], pretrained=False, num_classes=0, img_size=cfg.img_size)
    extractor = FeatureExtractor(backbone)
    dc = probe_data_config(cfg)
    feats = extractor(torch.randn(2, 3, dc.img_size, dc.img_size))
    assert feats.shape == (2, extractor.num_features) and torch.isfinite(feats).all()
    out = ProbeHead(extractor.num_features, probe_mod.head_hidden(cfg))(feats)
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_a_probe_run_in_a_sweep_fits_heads_and_matches_plain_cv(probe_run):
    """``cv --devices cpu`` runs the folds as sweep jobs: they read the same feature store and fit the same
    heads, so the OOF equals the plain run's."""
    data, work, _ = probe_run
    cfg = json.loads((work / "runs" / "p" / "config.json").read_text())["config"]
    res = invoke("cv", *PROBE, "--head", "linear", "--weights", cfg["weights"], "--name", "ps", "--data", data,
                 "--workdir", work, "--devices", "cpu")  # fmt: skip
    assert res.exit_code == 0, res.output
    a, b = pd.read_csv(work / "oof" / "p.csv"), pd.read_csv(work / "oof" / "ps.csv")
    assert a["file_name"].tolist() == b["file_name"].tolist()
    np.testing.assert_allclose(a["prob"], b["prob"], atol=1e-6)
    assert json.loads((work / "runs" / "ps" / "fold0" / "done.json").read_text())["head"] == "linear"
