"""Metrics against scikit-learn, and the exact threshold sweep against a brute force over every threshold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from aivh_ens.errors import UserError
from aivh_ens.metrics import (
    METRICS,
    accuracy,
    average_ranks,
    best_threshold,
    check_metric,
    f1,
    macro_f1,
    roc_auc,
    summary_at,
    threshold_sweep,
)

SKLEARN = {
    "f1": lambda y, pred: f1_score(y, pred, zero_division=0),
    "macro_f1": lambda y, pred: f1_score(y, pred, average="macro", labels=[0, 1], zero_division=0),
    "accuracy": accuracy_score,
}

CASES = [  # (y, pred)
    ([1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]),
    ([1, 1, 1, 0], [1, 1, 1, 1]),
    ([0, 0, 0, 0], [0, 0, 0, 0]),  # no positive at all: F1 of class 1 is 0 by convention
    ([0, 1, 0, 1], [1, 0, 1, 0]),
    ([1], [1]),
]


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize(("y", "pred"), CASES)
def test_metrics_match_sklearn(metric, y, pred):
    assert METRICS[metric](np.array(y), np.array(pred)) == pytest.approx(SKLEARN[metric](y, pred), abs=1e-12)


def test_named_functions_are_the_registry():
    assert (METRICS["f1"], METRICS["macro_f1"], METRICS["accuracy"]) == (f1, macro_f1, accuracy)


@pytest.mark.parametrize(
    ("y", "p"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),
        ([0, 1, 0, 1, 1], [0.5, 0.5, 0.2, 0.9, 0.5]),  # ties across classes count half
        ([1, 0], [0.3, 0.3]),
    ],
)
def test_roc_auc_matches_sklearn(y, p):
    assert roc_auc(np.array(y), np.array(p)) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_roc_auc_nan_with_one_class():
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.9])))


def test_summary_at_threshold():
    y, p = np.array([1, 0, 1, 0]), np.array([0.9, 0.6, 0.4, 0.1])
    out = summary_at(y, p, threshold=0.5)
    assert out == pytest.approx({"f1": 0.5, "acc": 0.5, "auc": 0.75})


@given(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]), min_size=1, max_size=40))
def test_average_ranks_match_scipy(p):
    assert np.array_equal(average_ranks(np.array(p)), rankdata(p, method="average"))


def test_check_metric_lists_the_valid_names():
    with pytest.raises(UserError, match="expected one of f1, macro_f1, accuracy"):
        check_metric("auc")


# ---- the exact threshold sweep ----------------------------------------------------------------------

# Scores from a small grid make ties within and across classes common; floats cover the general case.
# Scores in [0, 1] take the packed-key sort, others (e.g. logits) the argsort: both must be exact.
tied_scores = st.sampled_from([-0.0, 0.0, 0.05, 0.3, 0.3000000000000001, 0.5, 0.7, 1.0])
any_scores = st.floats(0.0, 1.0, allow_nan=False)
wide_scores = st.one_of(st.floats(-20.0, 20.0, allow_nan=False), st.sampled_from([-1.0, 0.0, 1.5]))


@st.composite
def labelled_scores(draw, scores=any_scores):
    n = draw(st.integers(1, 30))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    p = np.array(draw(st.lists(scores, min_size=n, max_size=n)), dtype=np.float64)
    return y, p


def brute_force(y: np.ndarray, p: np.ndarray, metric: str) -> dict[float, float]:
    """scikit-learn's metric at every candidate threshold (each distinct score), predicting 1 when p >= t."""
    return {float(t): SKLEARN[metric](y, (p >= t).astype(int)) for t in np.unique(p)}


@pytest.mark.parametrize("metric", list(METRICS))
@settings(max_examples=100, deadline=None)
@given(data=st.one_of(labelled_scores(), labelled_scores(tied_scores), labelled_scores(wide_scores)))
def test_best_threshold_is_the_brute_force_optimum(metric, data):
    y, p = data
    t, score = best_threshold(y, p, metric)
    brute = brute_force(y, p, metric)
    assert score == pytest.approx(max(brute.values()), abs=1e-12)
    # The threshold reproduces the score on these rows and lies within the scores' range.
    assert SKLEARN[metric](y, (p >= t).astype(int)) == pytest.approx(score, abs=1e-12)
    assert p.min() <= t <= p.max()


@pytest.mark.parametrize("metric", list(METRICS))
@settings(max_examples=30, deadline=None)
@given(data=st.one_of(labelled_scores(tied_scores), labelled_scores(wide_scores)))
def test_sweep_scores_every_distinct_threshold(metric, data):
    y, p = data
    thresholds, scores = threshold_sweep(y, p, metric)
    brute = brute_force(y, p, metric)
    assert thresholds.tolist() == sorted(brute)
    assert scores == pytest.approx([brute[t] for t in thresholds.tolist()], abs=1e-12)


def test_threshold_is_a_midpoint_between_neighbouring_scores():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.6, 0.8, 0.4, 0.6])
    t, score = best_threshold(y, p)
    assert (t, score) == (pytest.approx(0.5), 1.0)  # between 0.4 (last negative) and 0.6 (first positive)


def test_threshold_stays_on_the_score_when_neighbours_are_adjacent_floats():
    hi = 0.5
    lo = np.nextafter(hi, 0.0)  # no float strictly between them
    t, score = best_threshold(np.array([0, 1]), np.array([lo, hi]))
    assert (t, score) == (hi, 1.0)


def test_ties_across_classes_are_one_candidate():
    # Three rows share 0.5: they are predicted together, never split.
    y, p = np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.1])
    thresholds, scores = threshold_sweep(y, p, "f1")
    assert thresholds.tolist() == [0.1, 0.5]
    assert scores.tolist() == pytest.approx([2 * 2 / (4 + 2), 2 * 2 / (3 + 2)])


@pytest.mark.parametrize(
    ("y", "p", "error"),
    [([0, 1], [0.2, np.nan], "NaN"), ([0, 1, 1], [0.2, 0.3], "same shape"), ([], [], "N >= 1")],
)
def test_sweep_rejects_bad_input(y, p, error):
    with pytest.raises(ValueError, match=error):
        best_threshold(np.array(y), np.array(p, dtype=np.float64))
