"""Pure numpy classification metrics (no torch import): label 1 = AI-generated is the positive class.

Besides the metrics of hard predictions, :func:`best_threshold` finds the exact metric-optimal threshold of
scores with one sort and a cumulative sweep over every distinct score (predict 1 when ``p >= t``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from aivh_ens.errors import UserError


def _confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    tp = int(np.sum(y & pred))
    fp = int(np.sum(~y & pred))
    fn = int(np.sum(y & ~pred))
    tn = int(np.sum(~y & ~pred))
    return tp, fp, fn, tn


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    """F1 of the positive class (label 1). 0.0 when there is no true or predicted positive."""
    tp, fp, fn, _ = _confusion(y, pred)
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean of the F1 of class 1 and the F1 of class 0."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    return 0.5 * (f1(y, pred) + f1(~y, ~pred))


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of rows where ``pred == y``."""
    y = np.asarray(y).astype(bool)
    return float(np.mean(y == np.asarray(pred).astype(bool))) if len(y) else 0.0


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half. NaN if one class is absent."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(p)  # (N,) 1-based
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(p: np.ndarray) -> np.ndarray:
    """1-based ranks of ``p`` (N,), ties given the mean of their ranks (scipy's ``rankdata`` "average")."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # Average ranks over ties: (first + last) / 2 of each run of equal scores, 1-based.
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(p)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def summary_at(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """F1, accuracy and AUC of probabilities ``p`` (N,) against labels ``y`` (N,), predicting 1 when p >= t."""
    pred = np.asarray(p) >= threshold
    return {"f1": f1(y, pred), "acc": accuracy(y, pred), "auc": roc_auc(y, p)}


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "f1": f1,
    "macro_f1": macro_f1,
    "accuracy": accuracy,
}
"""Metrics a threshold can be tuned for, by name (``--metric``): each maps (labels, 0/1 predictions) to a score."""


def check_metric(metric: str) -> str:
    """Return ``metric`` if it names a tunable metric, else raise a UserError listing the valid names."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # 0 where the denominator is 0, like f1() above (no true and no predicted member of the class).
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def _scores_from_counts(metric: str, tp: np.ndarray, pred_pos: np.ndarray, n: int, n_pos: int) -> np.ndarray:
    """Metric at each candidate from (K,) true positives and (K,) predicted positives.

    The same integer ratios as the functions above (2tp+fp+fn = predicted + actual positives), so the
    floats agree with them and with scikit-learn.
    """
    # Every candidate predicts at least one positive, so the class-1 denominator is never 0.
    if metric == "f1":
        return 2.0 * tp / (pred_pos + n_pos)
    n_neg = n - n_pos
    tn = n_neg - (pred_pos - tp)
    if metric == "macro_f1":
        return 0.5 * (2.0 * tp / (pred_pos + n_pos) + _safe_ratio(2.0 * tn, (n - pred_pos) + n_neg))
    if metric == "accuracy":
        return (tp + tn) / float(n)
    check_metric(metric)
    raise AssertionError("unreachable")


def _sort_with_labels(p: np.ndarray, y8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``p`` (N,) sorted ascending and the int8 labels ``y8`` (N,) in the same order (within ties, any order)."""
    if p.min() >= 0.0 and p.max() <= 1.0:
        # Scores in [0, 1] (every blend): the bits of a non-negative float64 order like its value and fit in
        # 62 bits below 2.0, so (bits << 1) | label is an exact int64 key. One plain sort of it (SIMD) costs
        # about half an argsort plus two gathers, and equal scores keep equal bits, so ties stay ties.
        key = (p + 0.0).view(np.int64) << 1  # + 0.0 turns -0.0 into 0.0
        key |= y8
        key.sort()
        return (key >> 1).view(np.float64), (key & 1).astype(np.int8)
    order = np.argsort(p)
    return p[order], y8[order]


def _sweep_counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``(thresholds, tp, predicted positives, n, n_pos)`` of predicting 1 when ``p >= t``, for every distinct
    score ``t`` in ``p`` (ascending), by one sort."""
    y8 = np.asarray(y, dtype=bool).view(np.int8)
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or y8.shape != p.shape or len(p) == 0:
        raise ValueError(f"expected y and p of the same shape (N,) with N >= 1, got {y8.shape} and {p.shape}")
    if np.isnan(p).any():
        raise ValueError("p contains NaN")
    n = len(p)
    ps, ys = _sort_with_labels(p, y8)  # the one O(N log N) step; (N,) ascending scores, (N,) their labels
    pos_below = np.empty(n + 1, dtype=np.int64 if n >= 2**31 else np.int32)  # positives before index i
    pos_below[0] = 0
    np.cumsum(ys, dtype=pos_below.dtype, out=pos_below[1:])  # int8 -> int32 cumsum is SIMD-fast
    # A threshold equal to a score predicts 1 for the whole suffix from the first row of its tie group.
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(ps[1:], ps[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)  # (K,)
    n_pos = int(pos_below[-1])
    return ps[starts], n_pos - pos_below[starts], n - starts, n, n_pos


def threshold_sweep(y: np.ndarray, p: np.ndarray, metric: str = "f1") -> tuple[np.ndarray, np.ndarray]:
    """Score of predicting 1 when ``p >= t`` for every distinct score ``t`` in ``p``, by one sort.

    Args:
        y: (N,) labels in {0, 1} (any non-zero counts as 1).
        p: (N,) scores, no NaN.
        metric: a name in :data:`METRICS`.

    Returns:
        ``(thresholds, scores)``: the (K,) distinct scores ascending and the (K,) metric at each.
    """
    check_metric(metric)
    thresholds, tp, pred_pos, n, n_pos = _sweep_counts(y, p)
    return thresholds, _scores_from_counts(metric, tp, pred_pos, n, n_pos)


def weighted_threshold_sweep(
    y: np.ndarray, p: np.ndarray, w_pos: float, w_neg: float, metric: str = "f1"
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`threshold_sweep` with every label-1 row counted ``w_pos`` times and every label-0 row ``w_neg``
    times (re-weighting the classes to another prior); same exact sweep, weighted counts."""
    check_metric(metric)
    thresholds, tp, pred_pos, n, n_pos = _sweep_counts(y, p)
    tpw, fpw = w_pos * tp, w_neg * (pred_pos - tp)
    npw, nnw = w_pos * n_pos, w_neg * (n - n_pos)
    if metric == "f1":
        return thresholds, _safe_ratio(2.0 * tpw, tpw + fpw + npw)
    tnw = nnw - fpw
    if metric == "accuracy":
        return thresholds, (tpw + tnw) / (npw + nnw)
    f1_neg = _safe_ratio(2.0 * tnw, (nnw - fpw) + (npw - tpw) + nnw)
    return thresholds, 0.5 * (_safe_ratio(2.0 * tpw, tpw + fpw + npw) + f1_neg)


def best_threshold(y: np.ndarray, p: np.ndarray, metric: str = "f1") -> tuple[float, float]:
    """Exact metric-optimal threshold of scores ``p`` (N,) for labels ``y`` (N,), predicting 1 when p >= t.

    Every distinct score is a candidate (O(N log N): one sort, one cumulative sweep; ties handled). The
    returned threshold is the midpoint between the best score and the next lower distinct score, so the
    predictions on ``p`` are exactly those of the best candidate while new scores get a margin on each
    side. Among equally good candidates the lowest is taken.

    Returns:
        ``(threshold, score)``.
    """
    thresholds, scores = threshold_sweep(y, p, metric)
    k = int(np.argmax(scores))
    t = float(thresholds[k])
    if k > 0:
        below = float(thresholds[k - 1])
        mid = 0.5 * (below + t)
        if below < mid <= t:  # adjacent floats can round the midpoint onto `below`
            t = mid
    return t, float(scores[k])
