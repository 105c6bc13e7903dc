"""The numpy core of blending: spaces, weighted combination, Dirichlet weights.

No torch, optuna or matplotlib here (``import aivh_ens.blend.core`` stays cheap; a test checks it).

- :func:`to_space` / :func:`combine` / :func:`blend`: a weighted blend of M runs in probability, logit or
  rank space, ``(M, N) -> (N,)``, always a score in [0, 1] so one threshold rule fits every space.
- ``prob``: ``sum_i w_i p_i``.
- ``logit``: ``sigmoid(sum_i w_i logit(clip(p_i, eps, 1 - eps)))`` with ``eps =`` :data:`LOGIT_EPS`.
- ``rank``: ``sum_i w_i r_i`` with ``r_i = rank / (n - 1)``: the 0-based rank of each of run i's scores
  among the n rows scored together (ties share their mean rank), so 0 for the lowest score, 1 for the
  highest, 0.5 when n == 1 (:func:`rank01`). The OOF blend ranks all OOF rows together. New scores (test
  rows, one uploaded image) are placed among each run's OOF scores by :func:`rank_against`, which gives an
  OOF score exactly its :func:`rank01` value, so one image gets the same blended score in ``submit``,
  ``predict`` and ``serve``, and the test set's AI share is free to differ from the OOF one.

The label is 1 (AI-generated) when the blended score is ``>= threshold``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from aivh_ens.errors import UserError
from aivh_ens.metrics import average_ranks

if TYPE_CHECKING:
    pass


SPACES: tuple[str, ...] = ("prob", "logit", "rank")
"""Blend spaces: average probabilities, average logits, or average normalised ranks."""


LOGIT_EPS = 1e-7
"""Probabilities are clipped to [eps, 1 - eps] before the logit, so 0 and 1 map to about -16 and +16."""


def check_space(space: str) -> str:
    """Return ``space`` if it names a blend space, else raise a UserError listing the valid ones."""
    if space not in SPACES:
        raise UserError(f"unknown blend space {space!r}; expected one of {', '.join(SPACES)}")
    return space


def rank01(p: np.ndarray) -> np.ndarray:
    """Average ranks of ``p`` (N,) scaled to [0, 1]: ``(rank - 1) / (N - 1)``, 0.5 when N == 1."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 1:
        return np.full(1, 0.5)
    return (average_ranks(p) - 1.0) / (len(p) - 1)


def rank_against(reference: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Normalised rank (N,) of scores ``p`` among ``reference`` scores (R,), on :func:`rank01`'s scale.

    A score equal to reference values gets their average rank, so ``rank_against(r, r) == rank01(r)``; a
    score between reference values gets the mean rank of its neighbours, clipped to [0, 1] outside them."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if len(ref) == 1:
        return np.full(len(np.atleast_1d(p)), 0.5)
    p = np.asarray(p, dtype=np.float64)
    lo, hi = np.searchsorted(ref, p, "left"), np.searchsorted(ref, p, "right")  # (N,) counts below / <=
    return np.clip((lo + hi - 1) / (2.0 * (len(ref) - 1)), 0.0, 1.0)


def to_space(
    P: np.ndarray, space: str, reference: Sequence[np.ndarray] | np.ndarray | None = None
) -> np.ndarray:
    """Map probabilities ``P`` (M, N) to the blend space, as a float64 C-contiguous (M, N) array.

    ``reference`` (M, R): for the rank space, each run's reference scores (its OOF probabilities) that new
    scores are ranked among (:func:`rank_against`); without it the N rows are ranked among themselves."""
    check_space(space)
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"expected P of shape (M, N), got {P.shape}")
    if space == "prob":
        return np.ascontiguousarray(P)
    if space == "logit":
        q = np.clip(P, LOGIT_EPS, 1.0 - LOGIT_EPS)
        return np.ascontiguousarray(np.log(q) - np.log1p(-q))
    if reference is not None:
        return np.ascontiguousarray(
            np.stack([rank_against(r, row) for r, row in zip(reference, P, strict=True)])
        )
    return np.ascontiguousarray(np.stack([rank01(row) for row in P]) if len(P) else P)


def view_average(space: str) -> str:
    """How a run's TTA views (and fold models) are averaged for a blend in ``space``, at submit as on OOF rows:
    ``logit`` (sigmoid of the mean logit) for logit-space blends and stacks (fitted on logits), else ``prob``.
    Averaging in the space the blend combines in keeps the OOF rows' scores like the test images'."""
    return "logit" if space == "logit" else "prob"


def spaces(P: np.ndarray, P_logit: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every blend space of ``P`` (M, N), computed once: ``{space: (M, N) float64}``.

    ``P_logit`` (M, N): the same rows with each run's TTA views averaged as logits (:func:`view_average`);
    the logit space is computed from it, the others from ``P`` (views averaged as probabilities)."""
    return {
        space: to_space(P_logit if space == "logit" and P_logit is not None else P, space) for space in SPACES
    }


def combine(S: np.ndarray, w: np.ndarray, space: str) -> np.ndarray:
    """Blend rows already in ``space`` (``S`` (M, N), from :func:`to_space`) with weights ``w`` (M,) -> (N,)."""
    # einsum, not BLAS: a multi-threaded gemv spins for milliseconds on a busy machine, and one fixed
    # summation order keeps apply_blend bit-identical to the OOF blend.
    s = np.einsum("m,mn->n", w, S)  # (N,)
    if space == "logit":
        return 1.0 / (1.0 + np.exp(-s))  # |s| <= ~16.2 because the weights sum to 1: no overflow
    # Weights that sum to 1 only up to rounding can carry an average of values in [0, 1] one ulp outside.
    return np.clip(s, 0.0, 1.0, out=s)


def stack_scores(L: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    """A stacked blend: ``sigmoid(intercept + sum_i coef_i L_i)`` of logits ``L`` (M, N) -> (N,) in [0, 1].

    Unlike :func:`combine`, the coefficients may be negative and need not sum to 1; the sigmoid is computed
    as ``(1 + tanh(s / 2)) / 2``, which cannot overflow.
    """
    s = np.einsum("m,mn->n", np.asarray(coef, dtype=np.float64), np.asarray(L, dtype=np.float64)) + intercept
    return 0.5 * (1.0 + np.tanh(0.5 * s))


def _normalised(w: np.ndarray, m: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (m,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"expected {m} finite non-negative weights with a positive sum, got {w!r}")
    return w / w.sum()


def blend(P: np.ndarray, w: np.ndarray, space: str = "prob") -> np.ndarray:
    """Blend probabilities ``P`` (M, N) with weights ``w`` (M,) (normalised to sum 1) into scores (N,) in [0, 1]."""
    P = np.asarray(P, dtype=np.float64)
    return combine(to_space(P, space), _normalised(w, len(P)), space)


def dirichlet_weights(u: np.ndarray) -> np.ndarray:
    """Weights (M,) from uniforms ``u`` (M,) in [0, 1]: ``x = -log(u)``, normalised (a flat Dirichlet draw)."""
    x = -np.log(np.maximum(np.asarray(u, dtype=np.float64), np.finfo(np.float64).tiny))
    total = x.sum()
    return x / total if total > 0 else np.full(len(x), 1.0 / len(x))
