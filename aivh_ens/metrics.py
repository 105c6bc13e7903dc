"""Pure numpy classification metrics (no torch import): label 1 = AI-generated is the positive class."""

from __future__ import annotations

import numpy as np


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
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # Average ranks over ties: (first + last) / 2 of each run of equal scores, 1-based.
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(p)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summary_at(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """F1, accuracy and AUC of probabilities ``p`` (N,) against labels ``y`` (N,), predicting 1 when p >= t."""
    pred = np.asarray(p) >= threshold
    return {"f1": f1(y, pred), "acc": accuracy(y, pred), "auc": roc_auc(y, p)}
