"""`aivh-ens submit` / `predict` end to end on generated data: cv -> blend -> submit, the cache, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_checks import assert_user_error, tiny_cv
from cli_checks import run as run_cli
from click.testing import CliRunner

from aivh_ens.blend.artifact import apply_blend
from aivh_ens.blend.core import rank01, rank_against
from aivh_ens.blend.shift import ShiftDiagnosis, ks_distance
from aivh_ens.cli import main
from aivh_ens.errors import UserError
from aivh_ens.infer import predict as predict_mod
from aivh_ens.infer.scores import RunScores
from aivh_ens.infer.submission import fold_views, oof_blend, validate_submission
from aivh_ens.score import runs as runs_mod
from aivh_ens.score.runs import fold_average
from aivh_ens.train.models import build_model

FAST = tiny_cv()


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_data) -> tuple[Path, Path]:
    """(data, workdir) with two finished 3-fold runs (a: test_efficientnet, b: test_convnext) and a blend."""
    root = tmp_path_factory.mktemp("submit")
    data, work = demo_data(n=120, n_test=30, seed=5), root / "work"
    for extra in (["--name", "a"], ["--model", "test_convnext", "--name", "b"]):
        res = invoke("cv", *FAST, "--data", data, "--workdir", work, *extra)
        assert res.exit_code == 0, res.output
    res = invoke("blend", "--workdir", work, "--trials", "20", "--nested-trials", "5", "--quiet")
    assert res.exit_code == 0, res.output
    return data, work


@pytest.fixture
def copy(project, tmp_path) -> tuple[Path, Path]:
    """A private copy of the project (tests below modify data, runs and caches)."""
    data, work = project
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(work, tmp_path / "work")
    cfg_files = (tmp_path / "work" / "runs").glob("*/config.json")
    for f in cfg_files:  # point the copied runs at the copied data
        doc = json.loads(f.read_text())
        doc["data"] = str(tmp_path / "data")
        f.write_text(json.dumps(doc))
    return tmp_path / "data", tmp_path / "work"


def _count_builds(monkeypatch) -> list[int]:
    calls: list[int] = []

    def counting(cfg):
        calls.append(1)
        return build_model(cfg)

    monkeypatch.setattr(runs_mod, "build_model", counting)
    return calls


def two_run_blend(work: Path, space: str = "prob") -> dict:
    """On data this small the fitted blend may ship one run alone; give both runs weight so both are used."""
    blend_path = work / "runs" / "blend" / "blend.json"
    doc = json.loads(blend_path.read_text())
    doc["weights"] = {"a": 0.6, "b": 0.4}
    doc["space"] = space  # prob: views and folds averaged as probabilities (hflip.csv)
    doc.pop("rank_reference", None)
    if space == "rank":
        doc["rank_reference"] = "oof"
    if doc.pop("stack", None) is not None:  # a stack's weights follow its coefficients: make it a plain blend
        doc["method"] = "hand-set"
    blend_path.write_text(json.dumps(doc))
    return doc


def test_submit_end_to_end_and_its_cache(copy, monkeypatch):
    data, work = copy
    two_run_blend(work)
    builds = _count_builds(monkeypatch)
    out = work / "sub.csv"
    res = invoke(
        "submit",
        "--workdir",
        work,
        "--out",
        out,
        "--proba",
        "--quiet",
        "--threshold",
        "oof",
        "--adapt-bn",
        "off",
    )
    assert res.exit_code == 0, res.output
    assert "OOF rows were scored with TTA" not in res.output  # each run's own TTA: the OOF rows' too
    assert len(builds) == 6  # 2 runs x 3 folds, each fold model built once
    test_ids = pd.read_csv(data / "test.csv", dtype=str)["id"].tolist()
    sub = validate_submission(out, test_ids)
    assert sub["label"].isin(["0", "1"]).all() and len(sub) == 30
    assert "predicted AI rate" in res.output and "training rate 50.0%" in res.output

    # The submission is the fitted blend applied to the fold-averaged cached scores, threshold unchanged.
    blend_doc = json.loads((work / "runs" / "blend" / "blend.json").read_text())
    scores = {}
    for run in ("a", "b"):
        cache = pd.read_csv(work / "runs" / run / "test" / "hflip.csv", dtype={"id": str})
        assert cache["id"].tolist() == test_ids
        P = cache[["fold0", "fold1", "fold2"]].to_numpy().T  # (K, N)
        np.testing.assert_allclose(cache["prob"], P.mean(axis=0), atol=1e-8)
        assert json.loads((work / "runs" / run / "test" / "hflip.json").read_text())["key"]["tta"] == "hflip"
        scores[run] = fold_average(P, blend_doc["space"])
    probs, labels = apply_blend(blend_doc, scores)
    np.testing.assert_array_equal(sub["label"].astype(int), labels)
    proba = pd.read_csv(work / "sub_proba.csv", dtype={"id": str})
    assert proba["id"].tolist() == test_ids
    np.testing.assert_allclose(proba["prob"], probs, atol=1e-7)

    # Second submit: no model is built, the same file comes out.
    def no_build(cfg):
        raise AssertionError("a model was built although the cache is valid")

    monkeypatch.setattr(runs_mod, "build_model", no_build)
    first = out.read_bytes()
    res = invoke(
        "submit", "--workdir", work, "--out", out, "--quiet", "--threshold", "oof", "--adapt-bn", "off"
    )
    assert res.exit_code == 0, res.output
    assert "cached" in res.output and out.read_bytes() == first

    # A new blend (another threshold) also costs no inference, and its threshold is applied as is.
    blend_doc["threshold"] = 1.0
    (work / "runs" / "blend" / "blend.json").write_text(json.dumps(blend_doc))
    res = invoke(
        "submit",
        "--workdir",
        work,
        "--out",
        work / "t1.csv",
        "--quiet",
        "--threshold",
        "oof",
        "--adapt-bn",
        "off",
    )
    assert res.exit_code == 0, res.output
    expected = apply_blend(blend_doc, scores)[1]
    np.testing.assert_array_equal(pd.read_csv(work / "t1.csv")["label"], expected)
    assert expected.sum() <= 1  # so the predicted rate is far below the training rate: a warning, exit 0
    assert "warning: the predicted AI rate" in res.output
    assert "training rate 50.0% by more than 15 points" in res.output

    # A changed test image invalidates the cache: the models are built again and the key changes.
    builds = _count_builds(monkeypatch)
    key_before = json.loads((work / "runs" / "a" / "test" / "hflip.json").read_text())["key"]
    (data / test_ids[0]).write_bytes((data / test_ids[1]).read_bytes())
    res = invoke("submit", "--workdir", work, "--out", out, "--quiet", "--adapt-bn", "off")
    assert res.exit_code == 0, res.output
    assert len(builds) == 6
    key_after = json.loads((work / "runs" / "a" / "test" / "hflip.json").read_text())["key"]
    assert key_after["files_sha256"] != key_before["files_sha256"]
    assert key_after["weights_sha256"] == key_before["weights_sha256"]
    cache = pd.read_csv(work / "runs" / "a" / "test" / "hflip.csv")
    assert cache.loc[0, "prob"] == pytest.approx(cache.loc[1, "prob"], abs=1e-6)  # now the same image


def _no_submission(work: Path) -> bool:
    return not (work / "submission.csv").exists() and not list(work.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing_run", ["'b'", "runs/b/config.json", "aivh-ens blend"]),
        ("missing_fold", ["run a: fold 1", "best.safetensors", "--resume"]),
        ("late_weights", ["run a: fold 1", "not the file its done.json vouches for", "--fold 1 --force"]),
        ("oof_changed", ["oof/a.csv", "changed", "aivh-ens blend"]),
        ("unknown_test_id", ["not_here.jpg"]),
        ("corrupt_test_image", ["unreadable test image", "every test id"]),
        ("bad_tta", ["'flip'", "valid forms", "crops:N"]),
        ("no_blend", ["no blend file", "aivh-ens blend"]),
        ("blend_version", ["blend.json", "version 2"]),
        ("blend_unknown_key", ["blend.json", "unknown key(s) tuned_by"]),
        ("blend_threshold", ["blend.json", "threshold must be a number in [0, 1]"]),
        ("blend_weights", ["blend.json", "sum to 1"]),
        ("threshold_share_high", ["--threshold", "'share:1.5'", "between 0 and 1"]),
        ("threshold_prior_negative", ["--threshold", "'prior:-1'", "between 0 and 1"]),
        ("threshold_share_text", ["--threshold", "'share:abc'", "share:P"]),
        ("threshold_unknown", ["--threshold", "'median'", "oof, share:P"]),
    ],
)
def test_submit_refusals(copy, monkeypatch, case, needles):
    data, work = copy
    args = ["submit", "--workdir", work, "--quiet"]
    if case == "missing_run":
        shutil.rmtree(work / "runs" / "b")
    elif case == "missing_fold":
        two_run_blend(work)  # run a in the blend, whatever weight the fitted one gave it
        (work / "runs" / "a" / "fold1" / "best.safetensors").unlink()
    elif case == "late_weights":  # a process that had lost the fold's lock renamed its weights in at last
        two_run_blend(work)
        shutil.copy(work / "runs" / "a" / "fold0" / "best.safetensors", work / "runs" / "a" / "fold1")
    elif case == "oof_changed":
        with open(work / "oof" / "a.csv", "a") as f:
            f.write("\n")
    elif case == "unknown_test_id":
        with open(data / "test.csv", "a") as f:
            f.write("test_data_v2/not_here.jpg\n")
    elif case == "corrupt_test_image":
        first = pd.read_csv(data / "test.csv")["id"][3]
        (data / first).write_bytes(b"definitely not a jpeg")
    elif case == "bad_tta":
        args += ["--tta", "flip"]
    elif case.startswith("threshold_"):
        value = {"share_high": "share:1.5", "prior_negative": "prior:-1", "share_text": "share:abc"}
        args += ["--threshold", value.get(case.removeprefix("threshold_"), "median")]
    elif case == "no_blend":
        (work / "runs" / "blend" / "blend.json").unlink()
    elif case.startswith("blend_"):  # a hand-edited or downloaded blend.json
        path = work / "runs" / "blend" / "blend.json"
        doc = json.loads(path.read_text())
        first = next(iter(doc["weights"]))
        edits = {
            "blend_version": {"version": 2},
            "blend_unknown_key": {"tuned_by": "someone"},
            "blend_threshold": {"threshold": -0.1},
            "blend_weights": {"weights": {**doc["weights"], first: doc["weights"][first] + 0.5}},
        }
        path.write_text(json.dumps({**doc, **edits[case]}))

    def no_build(cfg):
        raise AssertionError("inference started before the inputs were checked")

    monkeypatch.setattr(runs_mod, "build_model", no_build)
    assert_user_error(invoke(*args), *needles)
    assert _no_submission(work)


def test_predict_scores_good_images_and_reports_bad_ones(project, tmp_path):
    data, work = project
    ids = pd.read_csv(data / "test.csv")["id"].tolist()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    images = [data / ids[0], bad, data / ids[1]]
    blend_doc = json.loads((work / "runs" / "blend" / "blend.json").read_text())

    res = invoke("predict", *images, "--workdir", work)  # the blend, a table
    assert res.exit_code == 2, res.output
    rows = [ln.split() for ln in res.stdout.splitlines()[1:] if ln.strip()]  # p_ai, label, (AI|human), image
    assert [r[-1] for r in rows] == [str(images[0]), str(images[2])]
    for r in rows:
        assert 0.0 <= float(r[0]) <= 1.0
        near = abs(float(r[0]) - blend_doc["threshold"]) < 1e-4  # the table rounds to 4 decimals
        assert int(r[1]) == int(float(r[0]) >= blend_doc["threshold"]) or near
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]

    res = invoke("predict", *images, "--workdir", work, "--run", "b", "--json")  # one run, threshold 0.5
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["run"] == "b" and doc["space"] == "prob" and doc["threshold"] == 0.5
    results = doc["results"]
    assert [r["image"] for r in results] == [str(p) for p in images]
    assert results[1]["prob"] is None and results[1]["label"] is None and "broken.jpg" in results[1]["error"]
    for r in (results[0], results[2]):
        assert 0.0 <= r["prob"] <= 1.0 and r["error"] is None and r["label"] == int(r["prob"] >= 0.5)
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1

    assert_user_error(
        invoke("predict", images[0], "--workdir", work, "--run", "nope"), "runs/nope/config.json"
    )
    assert_user_error(invoke("predict", images[0], "--workdir", work, "--tta", "d8"), "valid forms")
    assert_user_error(
        invoke("predict", images[0], "--workdir", work, "--run", "a", "--blend", "x.json"),
        "either --blend or --run",
    )


def test_submit_tta_option_and_predict_agree(copy):
    data, work = copy
    two_run_blend(work)
    res = invoke("submit", "--workdir", work, "--tta", "d4+crops:3", "--quiet")
    assert res.exit_code == 0, res.output
    # Both runs resize the whole image: the crops do not apply, and the log says so.
    assert "crops:3 does not apply; using d4" in res.output
    # Their OOF rows were scored with hflip: the blend was fitted on other scores than d4 gives.
    for run in ("a", "b"):
        assert json.loads((work / "runs" / run / "fold2" / "done.json").read_text())["oof_tta"] == "hflip"
        assert (f"note: run {run}'s OOF rows were scored with TTA hflip, the test images now with d4: the "
                "blend's weights and threshold were fitted on other scores than they cut; use --tta hflip, or "
                "re-run cv with --tta d4") in res.output  # fmt: skip
    # The runs trained with hflip and no rotation: d4's rotations are outside what they saw.
    assert res.output.count("never saw rotated (90/180/270 degrees) or upside-down images") == 2
    assert (work / "submission.csv").is_file() and not (work / "runs" / "a" / "test" / "hflip.csv").exists()
    cache = pd.read_csv(work / "runs" / "a" / "test" / "d4.csv")
    ids = cache["id"].tolist()[:3]
    preds, source = predict_mod.predict_images([data / i for i in ids], work, run="a", tta="d4")
    np.testing.assert_allclose([p.prob for p in preds], cache["prob"][:3], atol=1e-6)
    assert source == {"run": "a", "space": "prob", "threshold": 0.5}


# ---- pure helpers ----------------------------------------------------------------------------------------


def test_unseen_views_names_what_training_never_produced():
    from aivh_ens.config import RunConfig
    from aivh_ens.score.tta import parse_tta

    flip_only = RunConfig(hflip=0.5, rotate=0.0)
    assert runs_mod.unseen_views(parse_tta("hflip"), flip_only) is None
    assert runs_mod.unseen_views(parse_tta("none"), RunConfig(hflip=0.0)) is None
    assert runs_mod.unseen_views(parse_tta("hflip"), RunConfig(hflip=0.0)) == "mirrored images"
    assert runs_mod.unseen_views(parse_tta("d4"), flip_only) == (
        "rotated (90/180/270 degrees) or upside-down images"
    )
    assert runs_mod.unseen_views(parse_tta("d4"), RunConfig(hflip=0.0)) == (
        "rotated (90/180/270 degrees) or upside-down images or mirrored images"
    )
    assert runs_mod.unseen_views(parse_tta("d4"), RunConfig(hflip=0.5, rotate=90.0)) is None


def test_validate_submission_catches_each_defect(tmp_path):
    ids = ["x/1.jpg", "x/2.jpg", "x/3.jpg"]
    cases = {
        "ok": "id,label\nx/1.jpg,0\nx/2.jpg,1\nx/3.jpg,1\n",
        "columns": "id,target\nx/1.jpg,0\nx/2.jpg,1\nx/3.jpg,1\n",
        "rows": "id,label\nx/1.jpg,0\nx/2.jpg,1\n",
        "missing id": "id,label\nx/1.jpg,0\nx/2.jpg,1\nx/4.jpg,1\n",
        "order": "id,label\nx/2.jpg,0\nx/1.jpg,1\nx/3.jpg,1\n",
        "nan": "id,label\nx/1.jpg,0\nx/2.jpg,\nx/3.jpg,1\n",
        "float": "id,label\nx/1.jpg,0\nx/2.jpg,1.0\nx/3.jpg,1\n",
        "two": "id,label\nx/1.jpg,0\nx/2.jpg,2\nx/3.jpg,1\n",
    }
    for name, text in cases.items():
        (tmp_path / "s.csv").write_text(text)
        if name == "ok":
            assert len(validate_submission(tmp_path / "s.csv", ids)) == 3
        else:
            with pytest.raises(UserError):
                validate_submission(tmp_path / "s.csv", ids)


def test_fold_average_by_space():
    P = np.array([[0.9, 0.2], [0.5, 0.2]])  # (K=2, N=2)
    np.testing.assert_allclose(fold_average(P, "prob"), [0.7, 0.2])
    np.testing.assert_allclose(fold_average(P, "rank"), [0.7, 0.2])  # ranks come later, from the mean
    logit = np.log(P / (1 - P)).mean(axis=0)
    np.testing.assert_allclose(fold_average(P, "logit"), 1 / (1 + np.exp(-logit)))


def test_rank_against_reference():
    ref = np.array([0.1, 0.2, 0.2, 0.3])  # rank01: 0, 0.5, 0.5, 1
    # below every score: 0; a tied score: their mean rank; between 0.2 and 0.3: the mean of their ranks
    np.testing.assert_allclose(rank_against(ref, np.array([0.0, 0.2, 0.25, 1.0])), [0.0, 0.5, 5 / 6, 1.0])
    rng = np.random.default_rng(0)
    r = rng.integers(0, 20, 200) / 20.0  # many ties
    np.testing.assert_allclose(rank_against(r, r), rank01(r))  # the OOF rows keep their rank01 scores


def test_killed_submit_never_leaves_a_partial_submission(copy):
    data, work = copy
    args = ["submit", "--workdir", work, "--quiet", "--batch-size", "8"]
    sub = work / "submission.csv"
    code, out = run_cli(args, "infer-batch@2")  # mid-inference of the first run
    assert code == -9, out
    assert not sub.exists() and not list((work / "runs").glob("*/test/*.csv"))
    code, out = run_cli(
        args, "write:submission.csv"
    )  # every score cached, the file fully written, not renamed
    assert code == -9, out
    assert not sub.exists() and list(work.glob(".submission.csv.*.tmp"))
    code, out = run_cli(args)
    assert code == 0 and "cached test scores" in out and "predicting" not in out, out
    assert not list(work.glob(".submission.csv.*.tmp"))  # the killed writer's temp file is swept
    first = sub.read_bytes()
    validate_submission(sub, pd.read_csv(data / "test.csv")["id"].tolist())
    # A kill while replacing a submission leaves the previous one whole.
    code, out = run_cli([*args, "--tta", "none"], "write:submission.csv")
    assert code == -9 and "predicting" in out, out
    assert sub.read_bytes() == first


def _stack_blend(work: Path) -> dict:
    doc = two_run_blend(work, "logit")
    coef = {"a": 1.5, "b": -0.5}
    doc.update(method="stack", stack={"coef": coef, "intercept": 0.2, "C": 1.0, "features": "logit"},
               weights={"a": 0.75, "b": 0.25})  # fmt: skip
    (work / "runs" / "blend" / "blend.json").write_text(json.dumps(doc))
    return doc


@pytest.mark.parametrize("space", ["prob", "logit", "rank", "stack"])
def test_submit_predict_and_serve_give_one_label_per_image(copy, space):
    """One score mapping everywhere: the same image gets the same blended score and label from submit, from
    predict and from the served ensemble, in every blend space (rank blends place scores among the OOF's)."""
    from aivh_ens.serve import Ensemble

    data, work = copy
    doc = _stack_blend(work) if space == "stack" else two_run_blend(work, space)
    # AdaBN is a whole-test-set procedure: predict and serve score single images with the saved statistics
    res = invoke("submit", "--workdir", work, "--proba", "--quiet", "--threshold", "oof", "--adapt-bn", "off")
    assert res.exit_code == 0, res.output
    proba = pd.read_csv(work / "submission_proba.csv", dtype={"id": str})
    sub = pd.read_csv(work / "submission.csv", dtype={"id": str})
    ids = proba["id"].tolist()[:8]
    preds, source = predict_mod.predict_images([data / i for i in ids], work, device="cpu")
    assert source["threshold"] == doc["threshold"]
    ens = Ensemble.load(work, device="cpu")
    served = ens.score([ens.decode((data / i).read_bytes(), i) for i in ids])
    np.testing.assert_allclose([p.prob for p in preds], proba["prob"][:8], atol=1e-6)
    np.testing.assert_allclose([s.prob for s in served], proba["prob"][:8], atol=1e-6)
    assert [p.label for p in preds] == [s.label for s in served] == sub["label"][:8].tolist()
    # a logit-space blend (a stack too) averages TTA views and folds as logits: its cache says so
    logit = space in ("logit", "stack")
    assert (work / "runs" / "a" / "test" / ("hflip_logit.csv" if logit else "hflip.csv")).is_file()


def test_submit_writes_how_it_cut_and_every_mode_reuses_the_scores(copy, monkeypatch):
    data, work = copy
    two_run_blend(work)
    res = invoke("submit", "--workdir", work, "--proba", "--quiet")
    assert res.exit_code == 0, res.output
    # the diagnosis is printed, one line each, and recorded with the mode next to the submission
    for words in ("predicted AI share", "score shift: KS", "by EM on calibrated scores", "Lipton 2018",
                  "two-component mixture", "threshold", "--threshold auto"):  # fmt: skip
        assert words in res.output, words
    rec = json.loads((work / "submission.json").read_text())
    assert rec["threshold_mode"] == "auto" and rec["resolved_mode"] in res.output
    assert rec["diagnosis"]["n_test"] == 30 and len(rec["diagnosis"]["estimates"]) == 3
    # its KS compares like with like: each OOF row is one fold model's score, so the test side is each fold
    # model's own test scores (fold k of run a blended with fold k of run b), pooled; not their average
    doc = json.loads((work / "runs" / "blend" / "blend.json").read_text())
    folds = {r: pd.read_csv(work / "runs" / r / "test" / "hflip.csv") for r in ("a", "b")}
    views = [0.6 * folds["a"][f"fold{k}"] + 0.4 * folds["b"][f"fold{k}"] for k in range(3)]
    oof_scores = oof_blend(work, doc)[0]
    assert rec["diagnosis"]["n_views"] == 3 and "each of 3 fold models' own, pooled" in res.output
    assert rec["diagnosis"]["ks"] == pytest.approx(ks_distance(np.concatenate(views), oof_scores), abs=1e-6)
    probs = pd.read_csv(work / "submission_proba.csv")["prob"].to_numpy()
    labels = pd.read_csv(work / "submission.csv")["label"].to_numpy()
    np.testing.assert_array_equal(labels, probs >= rec["threshold"])
    # the report shows the same diagnosis and cut
    res = invoke("report", "--workdir", work)
    assert res.exit_code == 0, res.output
    page = (work / "runs" / "report.html").read_text()
    assert "Submission: train/test shift" in page and "by --threshold auto" in page
    assert "two-component mixture on test logits" in page
    assert 'alt="test scores over the OOF classes re-weighted to the estimated AI share"' in page

    def no_build(cfg):
        raise AssertionError("a threshold mode re-ran the models")

    monkeypatch.setattr(runs_mod, "build_model", no_build)
    for mode, share in (("share:0.3", 0.3), ("0.5", None), ("prior:0.2", None)):
        res = invoke("submit", "--workdir", work, "--quiet", "--threshold", mode, "--out", work / "m.csv")
        assert res.exit_code == 0, res.output
        rec = json.loads((work / "m.json").read_text())
        got = pd.read_csv(work / "m.csv")["label"].to_numpy()
        np.testing.assert_array_equal(got, probs >= rec["threshold"])
        assert rec["threshold_mode"] == mode and rec["oof_threshold"] == pytest.approx(
            json.loads((work / "runs" / "blend" / "blend.json").read_text())["threshold"]
        )
        if share is not None:
            assert got.mean() == pytest.approx(share, abs=1 / 30)


def test_adapt_bn_rescores_without_touching_the_weights(copy):
    data, work = copy
    two_run_blend(work)
    weights = {p: p.read_bytes() for p in (work / "runs").glob("*/fold*/best.safetensors")}
    res = invoke("submit", "--workdir", work, "--proba", "--quiet", "--threshold", "oof", "--adapt-bn", "on")
    assert res.exit_code == 0, res.output
    # test_efficientnet has BatchNorm (3 folds adapted); test_convnext has LayerNorm only
    assert "run a: BatchNorm statistics re-estimated on the 30 test images in 3 of 3" in res.output
    assert "run b: BatchNorm statistics re-estimated on the 30 test images in 0 of 3" in res.output
    adapted = pd.read_csv(work / "runs" / "a" / "test" / "hflip_adabn.csv")
    res = invoke("submit", "--workdir", work, "--quiet", "--threshold", "oof", "--out", work / "plain.csv",
                 "--adapt-bn", "off")  # fmt: skip
    assert res.exit_code == 0, res.output
    plain = pd.read_csv(work / "runs" / "a" / "test" / "hflip.csv")
    assert not np.allclose(adapted["prob"], plain["prob"], atol=1e-4)  # the statistics did change
    b_ad = pd.read_csv(work / "runs" / "b" / "test" / "hflip_adabn.csv")["prob"]
    np.testing.assert_allclose(
        b_ad, pd.read_csv(work / "runs" / "b" / "test" / "hflip.csv")["prob"], atol=1e-6
    )
    assert all(p.read_bytes() == b for p, b in weights.items())
    assert json.loads((work / "submission.json").read_text())["adapt_bn"] == "on -> True"


def test_one_run_cv_blend_submit(tmp_path, demo_data):
    """The first thing a newcomer tries: one cv run, blend, submit."""
    data, work = demo_data(n=120, n_test=30, seed=5), tmp_path / "work"
    res = invoke("cv", *FAST, "--data", data, "--workdir", work, "--name", "only")
    assert res.exit_code == 0, res.output
    res = invoke("blend", "--workdir", work, "--quiet")
    assert res.exit_code == 0, res.output
    assert "picked single:only" in res.output
    res = invoke("submit", "--workdir", work, "--quiet")
    assert res.exit_code == 0, res.output
    ids = pd.read_csv(data / "test.csv", dtype=str)["id"].tolist()
    assert len(validate_submission(work / "submission.csv", ids)) == 30


def test_adapt_bn_auto_rescores_only_when_the_scores_moved(copy, monkeypatch):
    data, work = copy
    two_run_blend(work)
    builds = _count_builds(monkeypatch)
    # 30 test images: whatever KS they show is within what sampling alone reaches, so no second pass
    res = invoke("submit", "--workdir", work, "--quiet", "--threshold", "oof", "--adapt-bn", "auto")
    assert res.exit_code == 0, res.output
    rec = json.loads((work / "submission.json").read_text())
    d = ShiftDiagnosis.from_dict(rec["diagnosis"])
    assert not d.scores_moved() and d.ks_critical() > 0.25 and rec["adapt_bn"] == "auto -> False"
    assert "the test scores moved" not in res.output and len(builds) == 6
    # the demo test set is built unlike train (sizes, cameras, a new generator): on a test set large enough to
    # show it (here: a critical value of 0) the scores moved, so a second pass with adapted statistics scores
    # the submission, and both passes are cached
    monkeypatch.setattr(ShiftDiagnosis, "ks_critical", lambda self, rule=None: 0.0)
    res = invoke("submit", "--workdir", work, "--quiet", "--threshold", "oof", "--adapt-bn", "auto")
    assert res.exit_code == 0, res.output
    rec = json.loads((work / "submission.json").read_text())
    assert "the test scores moved" in res.output and rec["adapt_bn"] == "auto -> True"
    assert (
        len(builds) == 12 and "scores from BatchNorm statistics re-estimated on the test images" in res.output
    )
    for stem in ("hflip", "hflip_adabn"):
        assert len(pd.read_csv(work / "runs" / "a" / "test" / f"{stem}.csv")) == 30
    # off (the default): one pass, never adapted
    res = invoke("submit", "--workdir", work, "--quiet", "--threshold", "oof")
    assert res.exit_code == 0 and "scoring again with BatchNorm" not in res.output
    assert json.loads((work / "submission.json").read_text())["adapt_bn"] == "off -> False"


def test_fold_views_blend_one_fold_model_per_run_and_cycle_a_run_with_fewer_folds(copy):
    doc = two_run_blend(copy[1])  # weights a 0.6, b 0.4, views and folds averaged as probabilities
    a = RunScores("a", np.array([[0.1, 0.9], [0.3, 0.7], [0.5, 0.5]]), "none", True, 0.0)  # 3 folds
    # 2 folds: view 2 takes b's fold 0
    b = RunScores("b", np.array([[0.2, 0.8], [0.4, 0.6]]), "none", True, 0.0)
    views = fold_views(doc, [a, b], {})
    expected = [[0.14, 0.86], [0.34, 0.66], [0.38, 0.62]]
    np.testing.assert_allclose(views, expected)


@pytest.mark.parametrize("space", ["prob", "logit", "rank", "stack"])
def test_oof_and_test_views_are_averaged_in_the_blend_space(copy, space):
    """The OOF scores a blend is fitted and diagnosed on are each fold model's TTA views averaged the way
    submit averages a test image's views for that blend (as logits for logit blends and stacks): fold 1's
    OOF rows, re-scored by fold 1's weights through submit's own scoring call, give exactly those scores."""
    import torch

    from aivh_ens.blend.artifact import oof_probs
    from aivh_ens.blend.core import blend, view_average
    from aivh_ens.data.loader import FileSource
    from aivh_ens.data.transforms import storage_step

    data, work = copy
    doc = _stack_blend(work) if space == "stack" else two_run_blend(work, space)
    average = view_average(doc["space"])
    assert average == ("logit" if space in ("logit", "stack") else "prob")
    info = runs_mod.check_run(work, "a")
    models, dc = runs_mod.load_models(info, torch.device("cpu"))
    oof = pd.read_csv(work / "oof" / "a.csv", dtype={"file_name": str})
    mine = (oof["fold"] == 1).to_numpy()
    names = oof["file_name"][mine].tolist()
    source = FileSource(data, names, storage_step(info.cfg, dc.img_size))
    spec = runs_mod.run_spec(info, None)
    assert spec.name == "hflip" and spec.n_views == 2
    P, bad = runs_mod.predict_folds(
        [models[1]], dc, info.cfg, source, range(len(names)), spec, torch.device("cpu"), average=average
    )
    assert not bad
    np.testing.assert_allclose(oof_probs(work, doc)["a"][mine], P[0], atol=2e-6)
    # the blend's OOF scores (the shift diagnosis' and threshold modes' reference) come from the same columns
    oof_b = pd.read_csv(work / "oof" / "b.csv")
    col = "prob_logit" if average == "logit" else "prob"
    if space in ("prob", "logit"):
        expected = blend(np.stack([oof[col], oof_b[col]]), np.array([0.6, 0.4]), space)
        np.testing.assert_allclose(oof_blend(work, doc)[0], expected, atol=1e-12)


class _Oriented(torch.nn.Module):
    """A fold model whose logit is ``2 + 4 * (left half - right half)`` of the image: a mirrored view moves
    it far, so the mean probability of two views and the sigmoid of their mean logit differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        z = 2.0 + 4.0 * (x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3)))
        return torch.stack([torch.zeros_like(z), z], dim=1)


def test_one_pass_gives_each_view_average_as_predict_folds_does(demo_data):
    """A fold's OOF pass (predict_fold_averages) and submit's scoring call (predict_folds) average a row's views
    the same way for each space: mean probability, or sigmoid of the mean logit."""
    from aivh_ens.config import resolve_config
    from aivh_ens.data.loader import FileSource
    from aivh_ens.data.transforms import storage_step
    from aivh_ens.score.tta import parse_tta

    data = demo_data(n=20, n_test=4, seed=1)
    names = pd.read_csv(data / "train.csv")["file_name"].tolist()[:6]
    cfg = resolve_config("tiny", img_size=32)
    _, dc = build_model(cfg)
    source = FileSource(data, names, storage_step(cfg, dc.img_size))
    args = ([_Oriented()], dc, cfg, source, range(len(names)), parse_tta("hflip"), torch.device("cpu"))
    both, _ = runs_mod.predict_fold_averages(*args)
    one = {a: runs_mod.predict_folds(*args, average=a)[0] for a in ("prob", "logit")}
    plain, _ = runs_mod.predict_folds(*args[:5], parse_tta("none"), args[6])
    for a in ("prob", "logit"):
        np.testing.assert_array_equal(both[a], one[a])
    z = np.log(plain) - np.log1p(-plain)  # the plain view's logit; the mirrored view's is 4 - z
    np.testing.assert_allclose(both["prob"], (plain + 1 / (1 + np.exp(z - 4))) / 2, atol=1e-5)
    np.testing.assert_allclose(both["logit"], np.full_like(plain, 1 / (1 + np.exp(-2.0))), atol=1e-5)
    assert np.abs(both["prob"] - both["logit"]).max() > 0.01
