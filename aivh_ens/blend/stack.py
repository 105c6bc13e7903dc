"""The ``stack`` blend method: L2 logistic regression on the runs' OOF logits (scikit-learn).

Unlike the convex blends, a stack may give a run a negative coefficient and an intercept, so a run that is
informative only against another (its errors correlate with theirs) can still help. Everything is fitted
on the rows it is given, which in the nested CV are the outer training folds only:

1. For each C in :data:`C_GRID`: an inner stratified K-fold over those rows (whole groups per fold when the
   OOF files carry the fold file's groups) gives inner-OOF stacked scores;
   C is the one with the lowest inner log loss.
2. The threshold is the exact best one on the inner-OOF scores of that C, never on scores of a model that
   saw the rows (scikit-learn's ``TunedThresholdClassifierCV`` warns against that).
3. The final model is fitted on all the rows with that C.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aivh_ens.blend.core import stack_scores
from aivh_ens.blend.methods import Fit
from aivh_ens.metrics import METRICS, best_threshold

C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
"""Inverse L2 strengths the inner CV chooses from."""
INNER_FOLDS = 5
FEATURES = "logit"
"""What the stack regresses on: each run's OOF probability as a logit (clipped as in the logit space)."""


def _logistic(X: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """``(coef (M,), intercept)`` of an L2 logistic regression on ``X`` (N, M)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, max_iter=1000).fit(X, y)
    return lr.coef_[0].astype(np.float64), float(lr.intercept_[0])


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def fit_stack(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, seed: int = 0, groups: np.ndarray | None = None
) -> Fit:
    """Stack the runs of ``S`` (precomputed spaces, (M, N) each) on labels ``y`` (N,).

    ``groups`` (N,): the rows' groups (grouped folds); the inner folds then keep each group whole, so an
    AI/human pair never has one image in the inner training rows and the other in the inner test rows.

    Returns:
        A :class:`Fit` with ``coef`` and ``intercept``; ``threshold`` tuned on inner-OOF scores, ``score`` the
        metric of the final model on these rows at that threshold, ``weights`` the shares of ``|coef|``.
    """
    from aivh_ens.data.folds import group_splits

    L = np.asarray(S[FEATURES], dtype=np.float64)  # (M, N)
    y = np.asarray(y, dtype=bool)
    X = L.T  # (N, M)
    k = int(min(INNER_FOLDS, y.sum(), (~y).sum()))
    splits = group_splits(y, groups, max(k, 2), seed)
    best: tuple[float, float, np.ndarray] | None = None  # (inner log loss, C, inner-OOF scores)
    for C in C_GRID:
        inner = np.empty(len(y))  # (N,)
        for tr, te in splits:
            coef, b = _logistic(X[tr], y[tr], C)
            inner[te] = stack_scores(L[:, te], coef, b)
        loss = _log_loss(y, inner)
        if best is None or loss < best[0]:
            best = (loss, C, inner)
    assert best is not None
    _, C, inner = best
    threshold, _ = best_threshold(y, inner, metric)
    coef, b = _logistic(X, y, C)
    score = float(METRICS[metric](y, stack_scores(L, coef, b) >= threshold))
    total = np.abs(coef).sum()
    weights = np.abs(coef) / total if total > 0 else np.full(len(coef), 1.0 / len(coef))
    return Fit("stack", FEATURES, weights, float(threshold), score, coef=coef, intercept=b, C=float(C))
