"""Blend methods, each returning weights, a space and the exact best threshold; nested CV to pick one.

``fit_*``: one function per method (single run, equal-weight mean, Caruana selection, hill climbing; the
Optuna search lives in :mod:`aivh_ens.blend.search`). :func:`nested_cv`: per fold, every method fitted on
the other folds and scored on that fold with the weights and threshold it fitted, the honest estimate used
to pick the method to ship."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aivh_ens.blend.core import SPACES, combine, spaces, stack_scores, to_space
from aivh_ens.metrics import METRICS, best_threshold, check_metric

if TYPE_CHECKING:
    pass


CARUANA_ROUNDS = 25


HILL_STEPS: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05, 0.02)
"""Step sizes hill climbing tries: move this fraction of the total weight onto one run."""


# Simplest first: on a nested-CV tie the method with the lower number ships.
_COMPLEXITY = {
    "single": 0,
    "mean_prob": 1,
    "mean_logit": 1,
    "mean_rank": 1,
    "caruana": 2,
    "hill_climb": 3,
    "optuna": 4,
    "stack": 5,
}


@dataclass(frozen=True)
class Fit:
    """A fitted blend: weights (M,) summing to 1 in ``space``, its threshold and its score where fitted.

    A stacked blend (``coef`` set) scores ``sigmoid(intercept + coef @ logits)`` instead; its ``weights`` are
    the shares of ``|coef|`` (what each run contributes, for display and for choosing the runs to predict).
    """

    method: str
    space: str
    weights: np.ndarray
    threshold: float
    score: float
    coef: np.ndarray | None = None  # (M,) logistic-regression coefficients on the runs' logits
    intercept: float = 0.0
    C: float | None = None  # the inverse L2 strength the stack's inner CV chose

    def scores(self, S: Mapping[str, np.ndarray]) -> np.ndarray:
        """The blended scores (N,) in [0, 1] of precomputed spaces ``S`` (:func:`spaces`)."""
        if self.coef is not None:
            return stack_scores(S["logit"], self.coef, self.intercept)
        return combine(S[self.space], self.weights, self.space)


def score_weights(
    S: Mapping[str, np.ndarray], y: np.ndarray, w: np.ndarray, space: str, metric: str
) -> tuple[float, float]:
    """Exact best ``(threshold, score)`` of the blend with weights ``w`` (M,) of precomputed spaces ``S``."""
    return best_threshold(y, combine(S[space], w, space), metric)


def _fit(
    method: str, S: Mapping[str, np.ndarray], y: np.ndarray, w: np.ndarray, space: str, metric: str
) -> Fit:
    t, score = score_weights(S, y, w, space, metric)
    return Fit(method, space, w, t, score)


def fit_single(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, m: int, method: str = "single"
) -> Fit:
    """Run ``m`` alone: weight 1 on it, threshold tuned on its probabilities."""
    w = np.zeros(len(S["prob"]))
    w[m] = 1.0
    return _fit(method, S, y, w, "prob", metric)


def fit_mean(S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, space: str) -> Fit:
    """Equal weights in ``space``, threshold tuned."""
    m = len(S[space])
    return _fit(f"mean_{space}", S, y, np.full(m, 1.0 / m), space, metric)


def fit_caruana(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, rounds: int = CARUANA_ROUNDS, space: str = "prob"
) -> Fit:
    """Greedy ensemble selection with replacement (Caruana et al. 2004, AutoGluon's weighted ensemble).

    Each round adds the run whose inclusion scores best (exact best threshold each time); the weights are
    the counts of the best prefix of rounds, divided by its length. Ties go to the lower run index.
    """
    m = len(S[space])
    counts = np.zeros(m)
    best: tuple[float, float, np.ndarray] | None = None  # (score, threshold, counts)
    for r in range(rounds):
        pick: tuple[float, float, int] | None = None
        for i in range(m):
            trial = counts.copy()
            trial[i] += 1
            t, score = score_weights(S, y, trial / (r + 1), space, metric)
            if pick is None or score > pick[0]:
                pick = (score, t, i)
        assert pick is not None
        counts[pick[2]] += 1
        if best is None or pick[0] > best[0]:
            best = (pick[0], pick[1], counts.copy())
    assert best is not None
    return Fit("caruana", space, best[2] / best[2].sum(), best[1], best[0])


def fit_hill_climb(
    S: Mapping[str, np.ndarray],
    y: np.ndarray,
    metric: str,
    space: str = "prob",
    steps: Sequence[float] = HILL_STEPS,
    max_iter: int = 100,
) -> Fit:
    """Hill climbing from the best single run: move a fraction of the weight onto one run while it helps.

    Every iteration tries each run with each step size in ``steps`` and takes the best strict improvement;
    it stops when none improves the score or after ``max_iter`` moves.
    """
    m = len(S[space])
    start = max((fit_single(S, y, metric, i) for i in range(m)), key=lambda f: f.score)
    w = start.weights
    t, best = score_weights(S, y, w, space, metric)
    for _ in range(max_iter):
        move: tuple[float, float, np.ndarray] | None = None
        for i in range(m):
            for step in steps:
                cand = (1.0 - step) * w
                cand[i] += step
                ct, score = score_weights(S, y, cand, space, metric)
                if score > best and (move is None or score > move[0]):
                    move = (score, ct, cand)
        if move is None:
            break
        best, t, w = move
    return Fit("hill_climb", space, w / w.sum(), t, best)


@dataclass(frozen=True)
class Method:
    """A blend method: its name, how simple it is (lower ships on a tie) and how to fit it."""

    name: str
    complexity: int
    fit: Callable[..., Fit]  # (spaces, labels, seed, groups) -> Fit; groups (N,) or None


def methods(runs: Sequence[str], metric: str, optuna_trials: int) -> list[Method]:
    """Every method in table order: each single run, the three means, Caruana, hill climbing, Optuna, stack.

    One run blends as itself: its ``single`` method alone (every other method would reproduce it)."""
    from aivh_ens.blend.search import fit_optuna  # search imports this module (Fit, score_weights)
    from aivh_ens.blend.stack import fit_stack  # scikit-learn, imported when blending starts

    def single(i: int) -> Callable[..., Fit]:
        return lambda S, y, _seed, _groups=None: fit_single(S, y, metric, i, f"single:{runs[i]}")

    def mean(space: str) -> Callable[..., Fit]:
        return lambda S, y, _seed, _groups=None: fit_mean(S, y, metric, space)

    out = [Method(f"single:{run}", _COMPLEXITY["single"], single(i)) for i, run in enumerate(runs)]
    if len(runs) == 1:
        return out
    out += [Method(f"mean_{space}", _COMPLEXITY[f"mean_{space}"], mean(space)) for space in SPACES]
    out += [
        Method("caruana", _COMPLEXITY["caruana"], lambda S, y, _seed, _g=None: fit_caruana(S, y, metric)),
        Method(
            "hill_climb", _COMPLEXITY["hill_climb"], lambda S, y, _seed, _g=None: fit_hill_climb(S, y, metric)
        ),
        Method(
            "optuna",
            _COMPLEXITY["optuna"],
            lambda S, y, seed, _g=None: fit_optuna(S, y, metric, runs, optuna_trials, seed),
        ),
        Method("stack", _COMPLEXITY["stack"], lambda S, y, seed, g=None: fit_stack(S, y, metric, seed, g)),
    ]
    return out


def all_ai(y: np.ndarray, folds: np.ndarray, metric: str) -> tuple[float, list[float]]:
    """The score of predicting every row 1 (AI) on all rows, and on each fold in sorted fold order.

    The floor any blend must beat. For F1 it is 2p / (1 + p) for a share p of label 1 (0.667 at p = 0.5);
    on weak runs the F1-optimal threshold drifts towards it.
    """
    score = METRICS[check_metric(metric)]
    y = np.asarray(y, dtype=bool)
    ones = np.ones(len(y), dtype=bool)
    return float(score(y, ones)), [float(score(y[folds == f], ones[folds == f])) for f in np.unique(folds)]


@dataclass(frozen=True)
class NestedCV:
    """Nested-CV results: per method, the score on each outer fold and the held-out label of every row."""

    per_fold: dict[str, list[float]]  # {method: [score on each fold, in sorted fold order]}
    pred: dict[str, np.ndarray]  # {method: (N,) bool, each row predicted by the fit that did not see it}


def nested_cv(
    P: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    metric: str,
    candidates: Sequence[Method],
    seed: int = 0,
    progress: bool = False,
    groups: np.ndarray | None = None,
    P_logit: np.ndarray | None = None,
) -> NestedCV:
    """Per fold k: fit every method on the other folds, score fold k with the fitted weights AND threshold.

    Spaces are recomputed on each side of the split. Rank-space scores of the held-out fold are placed among
    the training folds' scores, as test scores are placed among the OOF scores at submission time.

    Args:
        P: (M, N) OOF probabilities.
        y: (N,) labels.
        folds: (N,) fold ids.
        metric: a name in :data:`METRICS`.
        candidates: the methods to fit.
        seed: Optuna methods use ``seed + 1 + fold index``.
        progress: show a progress bar over folds.
        groups: (N,) the rows' groups, handed to methods with inner folds (the stack).
        P_logit: (M, N) the OOF probabilities with TTA views averaged as logits (the logit space's source,
            :func:`aivh_ens.blend.core.spaces`); default ``P``.
    """
    from aivh_ens.progress import Progress

    score = METRICS[check_metric(metric)]
    y = np.asarray(y, dtype=bool)
    per_fold: dict[str, list[float]] = {m.name: [] for m in candidates}
    pred = {m.name: np.zeros(len(y), dtype=bool) for m in candidates}
    for k, fold in enumerate(Progress(np.unique(folds), "nested CV", unit="fold", enabled=progress)):
        test = folds == fold
        L = P if P_logit is None else P_logit
        S_train = spaces(P[:, ~test], L[:, ~test])
        S_test = {**spaces(P[:, test], L[:, test]), "rank": to_space(P[:, test], "rank", P[:, ~test])}
        for m in candidates:
            fit = m.fit(S_train, y[~test], seed + 1 + k, None if groups is None else groups[~test])
            pred[m.name][test] = fit.scores(S_test) >= fit.threshold  # (N_k,)
            per_fold[m.name].append(float(score(y[test], pred[m.name][test])))
    return NestedCV(per_fold, pred)
