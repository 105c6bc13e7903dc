"""The blend stage: input checks through the CLI, the numpy core, the methods, nested CV, blend.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from oof_project import FOLD_SHA, N, complementary, make_project, write_run
from scipy.stats import rankdata

from aivh_ens.blend import artifact as bartifact
from aivh_ens.blend import core as bcore
from aivh_ens.blend import methods as bmethods
from aivh_ens.blend import oof as boof
from aivh_ens.blend import search as bsearch
from aivh_ens.blend import stage as bstage
from aivh_ens.cli import main
from aivh_ens.errors import UserError
from aivh_ens.io import sha256_text
from aivh_ens.metrics import best_threshold, f1


def invoke(root: Path, *args: str):
    return CliRunner().invoke(main, ["blend", "--workdir", str(root), "--quiet", *args])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A project blended once through the CLI (30 trials), shared by the read-only tests below."""
    root = make_project(tmp_path_factory.mktemp("fitted"))
    result = invoke(root, "--trials", "30", "--nested-trials", "10")
    assert result.exit_code == 0, result.output
    return root


# ---- point 1: input checks ----------------------------------------------------------------------------


def _bad(root: Path, case: str) -> list[str]:
    """Set up one broken project; return extra CLI args."""
    probs = complementary(200)
    if case == "no_oof":
        (root / "oof").mkdir()
        return []
    for name in ("a", "b"):
        write_run(root, name, probs[name])
    p = probs["b"].copy()
    if case == "unknown_run":
        return ["--runs", "a,zzz"]
    if case == "runs_twice":
        return ["--runs", "a,a,b"]
    if case == "nan":
        p[7] = np.nan
        write_run(root, "b", p)
    elif case == "above_one":
        p[3] = 1.5
        write_run(root, "b", p)
    elif case == "negative":
        p[3] = -0.01
        write_run(root, "b", p)
    elif case == "no_config":
        write_run(root, "c", probs["noise"], config=False)
    elif case == "fold_sha":
        write_run(root, "b", p, fold_sha=sha256_text("another fold file"))
    elif case == "row_order":
        files = [f"train/{i:05d}.jpg" for i in range(200)]
        files[10], files[11] = files[11], files[10]
        write_run(root, "b", p, files=files)
    elif case == "row_count":
        write_run(root, "b", p[:-2], folds=((np.arange(198) // 2) % 5))
    elif case == "labels":
        y = (np.arange(200) % 2 == 0).astype(int)
        y[5] = 1 - y[5]
        write_run(root, "b", p, y=y)
    elif case == "folds":
        folds = (np.arange(200) // 2) % 5
        folds[0] = 4
        write_run(root, "b", p, folds=folds)
    elif case == "column":
        (root / "oof" / "b.csv").write_text("file_name,label,fold\nx.jpg,1,0\n")
    elif case == "bad_label":
        y = (np.arange(200) % 2 == 0).astype(int)
        y[9] = 2
        write_run(root, "b", p, y=y)
    elif case == "bad_config":
        (root / "runs" / "b" / "config.json").write_text("{not json")
    return []


ERRORS = [  # (case, words the one-line message must contain)
    ("no_oof", ["no OOF files", "aivh-ens cv"]),
    ("unknown_run", ["'zzz'", "available runs: a, b"]),
    ("runs_twice", ["a more than once"]),
    ("nan", ["oof/b.csv", "NaN", "line 9"]),
    ("above_one", ["oof/b.csv", "outside [0, 1]", "line 5"]),
    ("negative", ["oof/b.csv", "outside [0, 1]"]),
    ("no_config", ["'c'", "runs/c/config.json"]),
    ("bad_config", ["runs/b/config.json", "not valid JSON"]),
    ("fold_sha", ["'b'", "same fold file", "--runs"]),
    ("row_order", ["oof/b.csv", "file_name", "line 12"]),
    ("row_count", ["oof/b.csv", "198 rows"]),
    ("labels", ["oof/b.csv", "label", "line 7"]),
    ("folds", ["oof/b.csv", "fold", "line 2"]),
    ("column", ["oof/b.csv", "lacks column(s) prob"]),
    ("bad_label", ["oof/b.csv", "label other than 0 or 1"]),
]


@pytest.mark.parametrize(("case", "words"), ERRORS, ids=[c for c, _ in ERRORS])
def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, case, words):
    args = _bad(tmp_path, case)
    result = invoke(tmp_path, "--trials", "5", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "runs" / "blend").exists()


def test_bad_storage_url_is_a_user_error(tmp_path):
    make_project(tmp_path, 200)
    result = invoke(tmp_path, "--trials", "2", "--storage", "nosuchdb://x")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot open Optuna storage")
    assert not (tmp_path / "runs" / "blend").exists()


def test_load_oof_stacks_runs_in_order(tmp_path):
    make_project(tmp_path, 100)
    oof = boof.load_oof(tmp_path, ["noise", "a"])
    assert oof.runs == ("noise", "a") and oof.P.shape == (2, 100) and oof.P.flags.c_contiguous
    expected = pd.read_csv(tmp_path / "oof" / "a.csv")["prob"].to_numpy()
    assert np.array_equal(oof.P[1], expected)
    assert oof.fold_sha256 == FOLD_SHA and oof.y.sum() == 50


def test_each_space_is_fitted_on_the_oof_views_averaged_as_submit_averages_them(tmp_path):
    """A run's OOF file holds its TTA views averaged as probabilities (prob) and as logits (prob_logit): the
    logit space (logit blends, the stack) comes from prob_logit, the prob and rank spaces from prob, in the
    blend, in nested CV and when the shipped blend is re-applied to the OOF rows."""
    rng = np.random.default_rng(3)
    y = (np.arange(200) % 2 == 0).astype(int)
    prob = np.round(np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.2, 200), 0.01, 0.99), 6)
    prob_logit = np.round(np.clip(prob + rng.normal(0, 0.1, 200), 0.01, 0.99), 6)  # another average
    write_run(tmp_path, "a", prob, y=y, prob_logit=prob_logit)
    write_run(tmp_path, "b", prob[::-1].copy(), y=y)  # one view: prob serves both
    oof = boof.load_oof(tmp_path)
    assert np.array_equal(oof.P_logit, np.stack([prob_logit, prob[::-1]]))
    S = bcore.spaces(oof.P, oof.P_logit)
    assert np.array_equal(S["logit"], bcore.to_space(oof.P_logit, "logit"))
    assert np.array_equal(S["prob"], oof.P) and np.array_equal(S["rank"], bcore.to_space(oof.P, "rank"))
    mean_logit = [m for m in bmethods.methods(oof.runs, "f1", 1) if m.name == "mean_logit"]
    with_views = bmethods.nested_cv(oof.P, oof.y, oof.folds, "f1", mean_logit, P_logit=oof.P_logit)
    direct = bmethods.nested_cv(oof.P_logit, oof.y, oof.folds, "f1", mean_logit)
    assert np.array_equal(with_views.pred["mean_logit"], direct.pred["mean_logit"])
    doc = {"space": "logit", "runs": [{"name": r, "oof": f"oof/{r}.csv"} for r in "ab"],
           "weights": {"a": 0.5, "b": 0.5}}  # fmt: skip
    assert np.array_equal(bartifact.oof_probs(tmp_path, doc)["a"], prob_logit)
    for space in ("prob", "rank"):
        assert np.array_equal(bartifact.oof_probs(tmp_path, {**doc, "space": space})["a"], prob)
    assert np.array_equal(bartifact.rank_reference(tmp_path, doc)["a"], prob)  # ranks: among prob


# ---- point 2: the numpy core --------------------------------------------------------------------------

probs_matrix = st.integers(1, 4).flatmap(
    lambda m: st.integers(1, 25).flatmap(
        lambda n: st.lists(
            st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.5, 0.9, 1.0, 0.33]), min_size=n, max_size=n),
            min_size=m,
            max_size=m,
        )
    )
)


def test_blend_stays_in_unit_interval_under_rounding():
    """Weights that sum to 1 only up to rounding must not carry a blend of 1.0s above 1 (found by hypothesis)."""
    P = np.array([[0.0, 0.0, 0.1, 0.0]] * 3)
    for w in ([0.981, 0.689, 0.654], [0.1, 0.7, 0.2], [1 / 3, 1 / 3, 1 / 3]):
        for space in bcore.SPACES:
            s = bcore.blend(P, np.array(w), space)
            assert np.all((s >= 0) & (s <= 1)), (w, space, s.max() - 1)


@settings(max_examples=80, deadline=None)
@given(P=probs_matrix, data=st.data())
def test_blend_properties(P, data):
    P = np.array(P)
    m = len(P)
    w = np.array(data.draw(st.lists(st.floats(0.01, 1.0), min_size=m, max_size=m)))
    for space in bcore.SPACES:
        s = bcore.blend(P, w, space)
        assert s.shape == (P.shape[1],) and np.all((s >= 0) & (s <= 1))
        assert np.allclose(bcore.blend(P, 3 * w, space), s)  # weights are normalised
        perm = np.arange(m)[::-1]
        assert np.allclose(bcore.blend(P[perm], w[perm], space), s)  # runs are exchangeable
    one_hot = np.eye(m)[0]
    assert np.array_equal(bcore.blend(P, one_hot, "prob"), P[0])
    assert np.allclose(bcore.blend(P, one_hot, "logit"), np.clip(P[0], bcore.LOGIT_EPS, 1 - bcore.LOGIT_EPS))
    n = P.shape[1]
    expected_rank = (rankdata(P[0]) - 1) / (n - 1) if n > 1 else np.array([0.5])
    assert np.allclose(bcore.blend(P, one_hot, "rank"), expected_rank)


@pytest.mark.parametrize(
    ("w", "error"),
    [
        ([1.0], "2 finite"),
        ([0.5, -0.1], "non-negative"),
        ([0.0, 0.0], "positive sum"),
        ([np.nan, 1], "finite"),
    ],
)
def test_blend_rejects_bad_weights(w, error):
    with pytest.raises(ValueError, match=error):
        bcore.blend(np.full((2, 3), 0.5), np.array(w))


def test_blend_rejects_unknown_space():
    with pytest.raises(UserError, match="expected one of prob, logit, rank"):
        bcore.blend(np.full((2, 3), 0.5), np.ones(2), "geometric")


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_dirichlet_weights_sum_to_one(u):
    w = bcore.dirichlet_weights(np.array(u))
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)


def test_dirichlet_weights_favour_small_uniforms():
    w = bcore.dirichlet_weights(np.array([0.01, 0.99]))
    assert w[0] > 0.99


# ---- methods ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    probs = complementary()
    runs = list(probs)
    P = np.stack([probs[r] for r in runs])
    y = np.arange(N) % 2 == 0
    return runs, P, y, bcore.spaces(P)


@pytest.mark.parametrize("method", ["caruana", "hill_climb", "optuna"])
def test_pure_noise_run_gets_near_zero_weight(data, method):
    runs, _, y, S = data
    fit = {
        "caruana": lambda: bmethods.fit_caruana(S, y, "f1"),
        "hill_climb": lambda: bmethods.fit_hill_climb(S, y, "f1"),
        "optuna": lambda: bsearch.fit_optuna(S, y, "f1", runs, n_trials=60, seed=0),
    }[method]()
    w = dict(zip(runs, fit.weights, strict=True))
    assert w["noise"] < 0.1, w
    assert fit.weights.sum() == pytest.approx(1.0)
    # The fit reports the exact best threshold of its own blend.
    assert (fit.threshold, fit.score) == pytest.approx(
        best_threshold(y, bcore.blend(data[1], fit.weights, fit.space))
    )


def test_caruana_counts_rounds_with_replacement(data):
    runs, _, y, S = data
    fit = bmethods.fit_caruana(S, y, "f1", rounds=4)
    # Weights are counts over the best prefix of rounds: integers once multiplied by its length.
    assert any(np.allclose(fit.weights * k, np.round(fit.weights * k)) for k in range(1, 5))
    assert fit.score >= max(bmethods.fit_single(S, y, "f1", i).score for i in range(len(runs)))
    assert bmethods.fit_caruana(S, y, "f1", rounds=1).weights.tolist() == [
        1.0,
        0.0,
        0.0,
    ]  # round 1: the best run


def test_nested_cv_fits_on_other_folds_only(data):
    _, P, y, _ = data
    folds = (np.arange(N) // 2) % 5
    seen: list[int] = []

    def spy(S, y_train, seed, groups=None):
        seen.append(len(y_train))
        return bmethods.Fit("spy", "prob", np.array([1.0, 0, 0]), 2.0, 0.0)  # threshold above every score

    nested = bmethods.nested_cv(P, y, folds, "f1", [bmethods.Method("spy", 0, spy)])
    assert seen == [N - np.sum(folds == k) for k in range(5)]
    # The fitted threshold is the one applied: nothing reaches 2.0, so F1 is 0 on every held-out fold.
    assert nested.per_fold == {"spy": [0.0] * 5}
    assert not nested.pred["spy"].any()  # every row kept its held-out label


def _result(name: str, complexity: int, per_fold, score: float = 0.9) -> bstage.MethodResult:
    per_fold = (per_fold, per_fold) if np.isscalar(per_fold) else tuple(per_fold)
    return bstage.MethodResult(name, complexity, bmethods.Fit(name, "prob", np.ones(1), 0.5, score), per_fold)


_BASE = np.array([0.90, 0.92, 0.88, 0.91, 0.89])  # per-fold scores of the simple method


@pytest.mark.parametrize(
    ("gain", "picked"),
    [
        # the complex method wins on every fold by 0.010 +- 0.002: SE 0.0011, so it earns its place
        (np.array([0.010, 0.012, 0.008, 0.011, 0.009]), "optuna"),
        # it wins by 0.004 on average but by -0.02..+0.03 per fold: SE 0.0139 > 0.004, so the simple one ships
        (np.array([0.030, -0.020, 0.020, -0.010, 0.000]), "mean_prob"),
        # exactly equal on every fold: SE 0, a tie, the simple one ships
        (np.zeros(5), "mean_prob"),
    ],
)
def test_pick_method_one_standard_error_rule(gain, picked):
    results = [_result("mean_prob", 1, _BASE), _result("optuna", 4, _BASE + gain)]
    chosen, reason = bstage.pick_method(results, "f1")
    assert chosen.name == picked
    assert reason.startswith(f"picked {picked}: nested f1")
    se = bstage.paired_se(_BASE + gain, _BASE)
    assert se == pytest.approx(np.std(gain, ddof=1) * np.sqrt(1 / 5 + 1 / 4))  # Nadeau-Bengio, 5 equal folds
    assert (picked == "optuna") == (gain.mean() > se)
    if picked == "mean_prob" and gain.mean() > 0:
        assert "within one paired standard error" in reason


def test_paired_se_is_corrected_for_overlapping_training_folds():
    """Nadeau and Bengio (2003): var(d) * (1/K + n_test/n_train), about 1.5x the naive SE at K = 5; the ratio
    comes from the fold sizes, so unequal folds count too."""
    a, b = np.array([0.90, 0.93, 0.88, 0.91, 0.86]), np.array([0.89, 0.90, 0.89, 0.88, 0.87])
    d = a - b
    naive = np.std(d, ddof=1) / np.sqrt(5)
    assert bstage.paired_se(a, b) == pytest.approx(np.sqrt(np.var(d, ddof=1) * (0.2 + 0.25)))
    assert bstage.paired_se(a, b) / naive == pytest.approx(1.5, abs=0.01)
    assert bstage.holdout_ratio(np.repeat(np.arange(5), 20)) == pytest.approx(0.25)
    folds = np.r_[np.zeros(10), np.ones(30)]  # 10 and 30 rows: 10/30 and 30/10
    assert bstage.holdout_ratio(folds) == pytest.approx((1 / 3 + 3) / 2)
    assert bstage.paired_se(a, b, 1.0) == pytest.approx(np.sqrt(np.var(d, ddof=1) * 1.2))
    # a gain of 1.2 naive SEs no longer earns the complex method its place
    gain = np.array([0.010, 0.030, -0.010, 0.020, -0.005])
    assert naive_gap(gain) == pytest.approx(1.2, abs=0.01) and gain.mean() < bstage.paired_se(
        _BASE + gain, _BASE
    )
    results = [_result("mean_prob", 1, _BASE), _result("optuna", 4, _BASE + gain)]
    assert bstage.pick_method(results, "f1")[0].name == "mean_prob"


def naive_gap(gain: np.ndarray) -> float:
    return float(gain.mean() / (np.std(gain, ddof=1) / np.sqrt(len(gain))))


def test_bootstrap_rows_draws_whole_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 2)  # AI/human pairs
    for _ in range(20):
        idx, oob = bstage.bootstrap_rows(rng, 100, groups)
        times = np.bincount(idx, minlength=100)
        assert len(idx) == 100 and np.array_equal(times[0::2], times[1::2])  # a pair is drawn whole
        assert np.array_equal(oob, times == 0)
    idx, oob = bstage.bootstrap_rows(rng, 100)
    assert len(idx) == 100 and np.array_equal(oob, np.bincount(idx, minlength=100) == 0)


def test_bbc_spread_counts_groups_not_rows():
    """Rows of a group are right or wrong together: resampling rows one by one understates the spread; BBC-CV
    over whole groups shows it (about sqrt(group size) wider)."""
    rng = np.random.default_rng(1)
    n, size = 2000, 10
    groups = np.repeat(np.arange(n // size), size)
    y = np.arange(n) % 2 == 0
    right = np.repeat(rng.random(n // size) < 0.8, size)  # (N,) correct or not, per group
    res = bstage.MethodResult("m", 0, bmethods.Fit("m", "prob", np.ones(1), 0.5, 0.8), (0.8, 0.8),
                              pred=np.where(right, y, ~y))  # fmt: skip
    _, by_row = bstage.bbc_score([res], y, "accuracy", n_boot=200)
    _, by_group = bstage.bbc_score([res], y, "accuracy", n_boot=200, groups=groups)
    assert by_group / by_row == pytest.approx(np.sqrt(size), rel=0.35)


def test_pick_method_simplest_of_those_within_one_se():
    results = [
        _result("single:a", 0, _BASE - 0.05),  # clearly worse: never picked
        _result("caruana", 2, _BASE + np.array([0.01, -0.01, 0.0, 0.01, -0.005])),
        _result("optuna", 4, _BASE + 0.004),
        _result("mean_prob", 1, _BASE),
    ]
    chosen, _ = bstage.pick_method(results, "f1")
    # optuna beats mean_prob by 0.004 on every fold (SE 0): real. caruana trails optuna by 0.003 with SE
    # 0.004: noise. So the simplest method within one SE of optuna is caruana.
    assert chosen.name == "caruana"


def test_pick_method_ignores_in_sample_score():
    results = [
        _result("optuna", 4, [0.90, 0.91], score=0.999),
        _result("mean_prob", 1, [0.92, 0.93], score=0.93),
    ]
    chosen, reason = bstage.pick_method(results, "f1")
    assert chosen.name == "mean_prob" and "optimistic" in reason


# ---- the stage end to end -----------------------------------------------------------------------------


def test_complementary_blend_beats_best_single_run_nested(fitted):
    doc = json.loads((fitted / "runs" / "blend" / "blend.json").read_text())
    rows = {b["method"]: b for b in doc["baselines"]}
    best_single = max(rows[f"single:{r}"]["nested_mean"] for r in ("a", "b", "noise"))
    assert doc["nested_score"]["mean"] > best_single + 0.05
    assert not doc["method"].startswith("single:")
    assert doc["weights"]["noise"] < 0.1
    # Every method appears once, each with finite scores; the shipped one has the best nested mean (± tie).
    assert list(rows) == ["single:a", "single:b", "single:noise", "mean_prob", "mean_logit", "mean_rank",
                          "caruana", "hill_climb", "optuna", "stack"]  # fmt: skip
    best = max(rows.values(), key=lambda b: b["nested_mean"])
    se = bstage.paired_se(best["per_fold"], doc["nested_score"]["per_fold"])
    assert doc["nested_score"]["mean"] >= best["nested_mean"] - se  # the 1-SE rule
    assert 0.0 < doc["nested_score"]["bbc_mean"] <= 1.0
    assert len(doc["nested_score"]["per_fold"]) == 5
    assert (fitted / "runs" / "blend" / "threshold.png").stat().st_size > 0
    assert (fitted / "runs" / "blend" / "weights.png").stat().st_size > 0


def test_blend_json_round_trips_through_load_blend(fitted):
    path = fitted / "runs" / "blend" / "blend.json"
    doc = bartifact.load_blend(path)
    assert doc == json.loads(path.read_text())
    assert doc["version"] == 1 and doc["trials"] == 30 and doc["seed"] == 42 and doc["metric"] == "f1"
    assert sum(doc["weights"].values()) == pytest.approx(1.0, abs=1e-9)
    assert [r["oof"] for r in doc["runs"]] == ["oof/a.csv", "oof/b.csv", "oof/noise.csv"]


def _oof_scores(root: Path) -> dict[str, np.ndarray]:
    return {r: pd.read_csv(root / "oof" / f"{r}.csv")["prob"].to_numpy() for r in ("a", "b", "noise")}


@pytest.mark.parametrize("space", bcore.SPACES)
def test_apply_blend_reproduces_the_oof_blend(fitted, space):
    doc = bartifact.load_blend(fitted / "runs" / "blend" / "blend.json")
    scores = _oof_scores(fitted)
    P = np.stack(list(scores.values()))
    w = np.array([0.5, 0.3, 0.2])
    t, score = best_threshold(np.arange(N) % 2 == 0, bcore.blend(P, w, space))
    doc = {**doc, "space": space, "weights": dict(zip(scores, w.tolist(), strict=True)), "threshold": t}
    doc.pop("rank_reference", None)
    probs, labels = bartifact.apply_blend(doc, scores)
    assert np.array_equal(probs, bcore.blend(P, w, space))
    assert f1(np.arange(N) % 2 == 0, labels) == score


def test_apply_blend_of_the_shipped_blend(fitted):
    doc = bartifact.load_blend(fitted / "runs" / "blend" / "blend.json")
    probs, labels = bartifact.apply_blend(doc, _oof_scores(fitted))
    assert f1(np.arange(N) % 2 == 0, labels) == doc["oof_score"]


def test_runs_in_any_order_round_trip(tmp_path):
    """blend.json is written with sorted keys: --runs in non-alphabetical order must still load and apply."""
    root = make_project(tmp_path, 400)
    res = invoke(root, "--runs", "noise,b,a", "--trials", "10", "--nested-trials", "3")
    assert res.exit_code == 0, res.output
    doc = bartifact.load_blend(root / "runs" / "blend" / "blend.json")
    assert [r["name"] for r in doc["runs"]] == ["noise", "b", "a"]
    scores = {r: pd.read_csv(root / "oof" / f"{r}.csv")["prob"].to_numpy() for r in ("a", "b", "noise")}
    _, labels = bartifact.apply_blend(doc, scores)
    assert f1(np.arange(400) % 2 == 0, labels) == doc["oof_score"]


@pytest.mark.parametrize("space", bcore.SPACES)
def test_apply_blend_without_zero_weight_runs(fitted, space):
    doc = bartifact.load_blend(fitted / "runs" / "blend" / "blend.json")
    doc = {**doc, "space": space, "weights": {"a": 0.7, "b": 0.3, "noise": 0.0}}
    doc.pop("rank_reference", None)
    scores = _oof_scores(fitted)
    full = bartifact.apply_blend(doc, scores)
    without = bartifact.apply_blend(doc, {r: scores[r] for r in ("a", "b")})
    assert np.array_equal(full[0], without[0]) and np.array_equal(full[1], without[1])


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: s.pop("a"), "needs scores of run(s) a"),
        (lambda s: s.update(zzz=np.zeros(N)), "zzz"),
        (lambda s: s.update(a=np.zeros(5)), "one common length"),
        (lambda s: s.update(a=np.full(N, 2.0)), "run 'a'"),
    ],
)
def test_apply_blend_rejects_bad_scores(fitted, change, error):
    doc = bartifact.load_blend(fitted / "runs" / "blend" / "blend.json")
    doc = {**doc, "weights": {"a": 0.5, "b": 0.5, "noise": 0.0}}
    scores = _oof_scores(fitted)
    change(scores)
    with pytest.raises(UserError, match=re.escape(error)):
        bartifact.apply_blend(doc, scores)


BAD_DOCS = [  # (edit of a valid blend.json, words in the error)
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(extra=1), "unknown key(s) extra"),
    (lambda d: d.pop("threshold"), "lacks key(s) threshold"),
    (lambda d: d.update(threshold=1.5), "threshold must be a number in [0, 1]"),
    (lambda d: d.update(weights={"a": 0.5, "b": 0.4, "noise": 0.0}), "sum to 1"),
    (lambda d: d.update(weights={"a": 0.5, "b": 0.5}), "weights must map each run"),
    (lambda d: d.update(space="median"), "space must be one of"),
    (lambda d: d["runs"][0].update(extra="x"), "runs[0] has unknown key(s) extra"),
    (lambda d: d["nested_score"].pop("std"), "nested_score lacks key(s) std"),
    (lambda d: d.update(rank_reference="test_quantiles"), "rank_reference"),
]


@pytest.mark.parametrize(("edit", "error"), BAD_DOCS)
def test_load_blend_rejects_invalid_documents(fitted, tmp_path, edit, error):
    doc = json.loads((fitted / "runs" / "blend" / "blend.json").read_text())
    doc["weights"] = {"a": 0.5, "b": 0.5, "noise": 0.0}
    edit(doc)
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape(error)):
        bartifact.load_blend(path, workdir=fitted)


def test_load_blend_checks_run_files(fitted, tmp_path):
    doc = json.loads((fitted / "runs" / "blend" / "blend.json").read_text())
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(doc))
    assert bartifact.load_blend(path, workdir=fitted)["method"] == doc["method"]
    with pytest.raises(UserError, match="does not exist"):
        bartifact.load_blend(path, workdir=tmp_path)  # no runs/ there
    bartifact.load_blend(path, workdir=tmp_path, check_files=False)  # data only
    with pytest.raises(UserError, match="no blend file"):
        bartifact.load_blend(tmp_path / "missing.json")
    path.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        bartifact.load_blend(path)


def test_changed_oof_file_makes_the_blend_stale(tmp_path):
    root = make_project(tmp_path, 200)
    assert invoke(root, "--trials", "3", "--nested-trials", "2").exit_code == 0
    write_run(root, "a", complementary(200, seed=1)["a"])
    with pytest.raises(UserError, match="oof/a.csv changed"):
        bartifact.load_blend(root / "runs" / "blend" / "blend.json")


# ---- point 3: the study --------------------------------------------------------------------------------


def _study_trials(root: Path) -> dict[str, int]:
    url = f"sqlite:///{root / 'runs' / 'blend' / 'study.db'}"
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url, include_best_trial=False)}


def test_each_blend_is_a_fresh_study_unless_resumed(tmp_path):
    root = make_project(tmp_path, 400)
    args = ("--trials", "20", "--nested-trials", "3")
    assert invoke(root, *args).exit_code == 0
    first = json.loads((root / "runs" / "blend" / "blend.json").read_text())
    # A second call scores what it ships: a fresh 20-trial study, the same seed, so the same blend.
    result = invoke(root, *args)
    assert result.exit_code == 0, result.output
    assert "20 trials in the study" in result.stdout
    again = json.loads((root / "runs" / "blend" / "blend.json").read_text())
    assert again["trials"] == 20 and again["weights"] == first["weights"]
    assert list(_study_trials(root).values()) == [20]
    # --resume-study adds the trials to the same study.
    result = invoke(root, *args, "--resume-study")
    assert result.exit_code == 0 and "40 trials in the study" in result.stdout
    doc = json.loads((root / "runs" / "blend" / "blend.json").read_text())
    assert doc["trials"] == 40 and list(_study_trials(root).values()) == [40]
    # Resuming can only find an equal or better in-sample optimum.
    rows = {b["method"]: b["oof_score"] for b in doc["baselines"]}
    assert rows["optuna"] >= {b["method"]: b["oof_score"] for b in first["baselines"]}["optuna"]

    assert invoke(root, "--runs", "a,b", *args).exit_code == 0
    assert invoke(root, "--metric", "accuracy", *args).exit_code == 0
    trials = _study_trials(root)
    assert len(trials) == 3 and sorted(trials.values()) == [20, 20, 40]
    assert any(name.startswith("blend:accuracy:a+b+noise:") for name in trials)


def test_any_optuna_storage_url(tmp_path):
    root = make_project(tmp_path, 200)
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert invoke(root, "--trials", "4", "--nested-trials", "2", "--storage", url).exit_code == 0
    assert (
        invoke(root, "--trials", "3", "--nested-trials", "2", "--storage", url, "--resume-study").exit_code
        == 0
    )
    (summary,) = optuna.get_all_study_summaries(url, include_best_trial=False)
    assert summary.n_trials == 7
    assert not (root / "runs" / "blend" / "study.db").exists()


def test_study_name_encodes_runs_metric_and_inputs(tmp_path):
    root = make_project(tmp_path, 100)
    oof = boof.load_oof(root)
    names = {
        bsearch.study_name(oof, "f1"),
        bsearch.study_name(oof, "macro_f1"),
        bsearch.study_name(boof.load_oof(root, ["a", "b"]), "f1"),
    }
    assert len(names) == 3
    assert bsearch.study_name(boof.load_oof(root, ["noise", "b", "a"]), "f1") == bsearch.study_name(oof, "f1")
    write_run(root, "a", complementary(100, seed=3)["a"])  # a re-trained run starts a new study
    assert bsearch.study_name(boof.load_oof(root), "f1") != bsearch.study_name(oof, "f1")


def test_cli_prints_the_table_and_the_choice(fitted):
    result = invoke(fitted, "--trials", "1", "--nested-trials", "2", "--metric", "macro_f1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "oof macro_f1" in out and "nested macro_f1" in out and "<- picked" in out
    assert "picked " in out and "wrote " in out
    for method in ("single:a", "mean_logit", "caruana", "hill_climb", "optuna", "stack"):
        assert method in out


def test_one_run_blends_as_itself(tmp_path):
    p = complementary(400)["a"]
    write_run(tmp_path, "a", p)
    result = invoke(tmp_path, "--trials", "5")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "runs" / "blend" / "blend.json").read_text())
    y = (np.arange(400) % 2 == 0).astype(int)
    assert doc["method"] == "single:a" and doc["weights"] == {"a": 1.0} and doc["trials"] == 0
    assert [b["method"] for b in doc["baselines"]] == ["single:a"]
    # the threshold is the run's own exact best on its OOF rows, and the nested estimate scores it per fold
    assert (doc["threshold"], doc["oof_score"]) == pytest.approx(best_threshold(y, p, "f1"))
    assert len(doc["nested_score"]["per_fold"]) == 5 and doc["nested_score"]["mean"] <= doc["oof_score"]


def test_a_blend_winning_by_less_than_one_se_loses_to_the_simpler_method(tmp_path):
    """Constructed OOF data: two near-copies of one run. Every blend of them can only fit fold noise, so
    whichever method tops the nested table does so by less than one paired SE, and a single run ships."""
    rng = np.random.default_rng(3)
    y = (np.arange(600) % 2 == 0).astype(int)
    base = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.25, 600), 0.001, 0.999)
    write_run(tmp_path, "a", base, y=y)
    write_run(tmp_path, "b", np.clip(base + rng.normal(0, 0.01, 600), 0.001, 0.999), y=y)
    result = invoke(tmp_path, "--trials", "10")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "runs" / "blend" / "blend.json").read_text())
    rows = {b["method"]: b for b in doc["baselines"]}
    top = max(rows.values(), key=lambda b: b["nested_mean"])
    assert doc["method"].startswith("single:") and top["method"] != doc["method"]
    gap = top["nested_mean"] - doc["nested_score"]["mean"]
    assert 0 < gap <= bstage.paired_se(top["per_fold"], doc["nested_score"]["per_fold"])
    assert "within one paired standard error" in result.stdout
    # the bias-corrected estimate of choosing among the methods is reported next to the raw one
    assert "bbc_mean" in doc["nested_score"] and "BBC-CV" in result.stdout
