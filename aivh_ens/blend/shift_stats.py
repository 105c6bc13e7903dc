"""The statistics behind the shift diagnosis, each with its own noise (numpy; scikit-learn lazily).

A statistic computed on a test set is only as sure as the test set is large. Every estimate here comes with
what sampling alone would make of it: the KS distance with its critical value for the actual sizes (test
images, and the Kish effective size of the re-weighted OOF rows), the two label-shift estimates of the test
AI share with their standard errors, and the two-component mixture of test logits with a test of whether two
lumps are there at all (BIC of one component against two, and how far apart the two are).

Test scores may come as views (V, N): the same N images scored by V single fold models. Views of one image are
correlated, so they never count as more than one sample: sizes and standard errors are per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOGIT_CLIP = 1e-6
"""Scores are clipped to [c, 1 - c] before taking logits (mixture and calibration)."""


def logits(s: np.ndarray) -> np.ndarray:
    """``log(s / (1 - s))`` of scores (N,) clipped to [:data:`LOGIT_CLIP`, 1 - :data:`LOGIT_CLIP`]."""
    q = np.clip(np.asarray(s, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(q) - np.log1p(-q)


def ks_distance(a: np.ndarray, b: np.ndarray, b_weights: np.ndarray | None = None) -> float:
    """Two-sample Kolmogorov-Smirnov distance ``max |F_a - F_b|``, with optional non-negative weights on b."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.asarray(b, dtype=np.float64)
    wb = np.ones(len(b)) if b_weights is None else np.asarray(b_weights, dtype=np.float64)
    order = np.argsort(b, kind="stable")
    b, cw = b[order], np.cumsum(wb[order]) / wb.sum()
    grid = np.concatenate([a, b])  # the CDFs only jump at these points
    fa = np.searchsorted(a, grid, side="right") / len(a)
    idx = np.searchsorted(b, grid, side="right")
    fb = np.where(idx > 0, cw[np.maximum(idx - 1, 0)], 0.0)
    return float(np.max(np.abs(fa - fb)))


def kish_n(weights: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of weighted rows (N,): N when all weights agree."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / max(float(np.sum(w * w)), 1e-300))


def ks_critical(n_a: float, n_b: float, alpha: float) -> float:
    """The two-sample KS distance that samples of sizes ``n_a`` and ``n_b`` from one distribution exceed
    with probability ``alpha`` (the asymptotic Kolmogorov bound ``sqrt(-ln(alpha / 2) / 2)``, 1.36 at 0.05)."""
    c = math.sqrt(-math.log(alpha / 2.0) / 2.0)
    return c * math.sqrt((n_a + n_b) / (max(n_a, 1.0) * max(n_b, 1.0)))


def calibrate(oof_scores: np.ndarray, y: np.ndarray):
    """Platt scaling fitted on the OOF rows: a function mapping scores (any shape) to calibrated P(AI).

    The OOF scores come from models that did not see their rows, so calibrating on them is honest."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=1000).fit(logits(oof_scores)[:, None], np.asarray(y, dtype=int))
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return lambda s: 1.0 / (1.0 + np.exp(-(a * logits(s) + b)))


def _likelihood_ratio(posteriors: np.ndarray, train_share: float) -> np.ndarray:
    """``f_AI(x) / f_human(x)`` from posteriors calibrated at the training share (Bayes' rule turned round)."""
    p = np.clip(np.asarray(posteriors, dtype=np.float64), 1e-9, 1 - 1e-9)
    return p / (1 - p) * (1 - train_share) / train_share


def em_prior(posteriors: np.ndarray, train_share: float, max_iter: int = 500, tol: float = 1e-7) -> float:
    """Saerens et al. (2002): the test AI share that makes calibrated posteriors (any shape) self-consistent."""
    r = _likelihood_ratio(posteriors, train_share).ravel()
    pi = train_share
    for _ in range(max_iter):
        new = float(np.mean(pi * r / (pi * r + 1 - pi)))
        if abs(new - pi) < tol:
            return new
        pi = new
    return pi


def em_se(posteriors: np.ndarray, train_share: float, share: float) -> float:
    """Standard error of :func:`em_prior` at ``share`` from the Fisher information of the mixture likelihood
    ``prod_i (share r_i + 1 - share)``, with posteriors (V, N) counted once per image (each image's
    information is the mean over its views): what the test images alone can tell, the OOF side's own
    (smaller, N_oof >> N) error left out."""
    p = np.atleast_2d(np.asarray(posteriors, dtype=np.float64))
    r = _likelihood_ratio(p, train_share)
    info = float(np.sum(np.mean(((r - 1) / (share * r + 1 - share)) ** 2, axis=0)))
    return 1.0 / math.sqrt(max(info, 1e-12))


@dataclass(frozen=True)
class BBSE:
    """Black-box shift estimation (Lipton et al. 2018): the test AI share and its standard error."""

    share: float
    se: float


def bbse(oof_scores: np.ndarray, y: np.ndarray, test_views: np.ndarray, threshold: float) -> BBSE | None:
    """Invert the OOF confusion matrix at ``threshold`` for test scores (V, N) or (N,); None when singular.

    The standard error propagates the test share labelled AI (one sample per image: its mean over views) and
    the OOF true and false positive rates (binomial) through ``(q - fpr) / (tpr - fpr)``."""
    yb = np.asarray(y, dtype=bool)
    tpr = float(np.mean(oof_scores[yb] >= threshold))
    fpr = float(np.mean(oof_scores[~yb] >= threshold))
    if tpr - fpr < 1e-3:
        return None
    per_image = np.mean(np.atleast_2d(test_views) >= threshold, axis=0)  # (N,)
    q = float(per_image.mean())
    pi = float(np.clip((q - fpr) / (tpr - fpr), 0.0, 1.0))
    var = (
        float(np.var(per_image)) / len(per_image)
        + pi**2 * tpr * (1 - tpr) / max(int(yb.sum()), 1)
        + (1 - pi) ** 2 * fpr * (1 - fpr) / max(int((~yb).sum()), 1)
    )
    return BBSE(pi, math.sqrt(var) / (tpr - fpr))


@dataclass(frozen=True)
class Mixture:
    """A two-component Gaussian mixture on test logits, and how sure it is of two lumps.

    ``share``: weight of the higher lump; ``cut``: the score where the weighted components' posteriors cross;
    ``se``: the share's standard error (Fisher information, components held fixed); ``bic_gain``: BIC of one
    Gaussian minus BIC of two (positive: two fit better after paying for three more parameters);
    ``separation``: Ashman's D, ``sqrt(2) |mu_1 - mu_2| / sqrt(s_1^2 + s_2^2)``."""

    share: float
    cut: float
    se: float
    bic_gain: float
    separation: float

    def two_lumps(self, bic_margin: float, min_separation: float) -> bool:
        """Whether two lumps are really there: BIC prefers them by ``bic_margin`` and they stand apart."""
        return self.bic_gain > bic_margin and self.separation > min_separation


def mixture(test_scores: np.ndarray, seed: int = 0) -> Mixture | None:
    """Fit one and two Gaussians to the test logits (N,); None when degenerate (under 20 rows, all equal).

    A two-component fit always splits something, even one skewed lump: :attr:`Mixture.bic_gain` and
    :attr:`Mixture.separation` say whether the split is real."""
    from sklearn.mixture import GaussianMixture

    z = logits(test_scores)
    if len(z) < 20 or np.ptp(z) <= 0:
        return None
    x = z[:, None]
    gm = GaussianMixture(2, random_state=seed, n_init=3, reg_covar=1e-3).fit(x)
    one = GaussianMixture(1, reg_covar=1e-3).fit(x)
    means, sds = gm.means_[:, 0], np.sqrt(gm.covariances_.reshape(-1))
    hi, lo = int(np.argmax(means)), int(np.argmin(means))
    if hi == lo:
        return None
    grid = np.linspace(means[lo], means[hi], 2001)
    post = gm.predict_proba(grid[:, None])[:, hi]
    cut = float(grid[int(np.argmin(np.abs(post - 0.5)))])
    share = float(gm.weights_[hi])
    dens = np.exp(-0.5 * ((z[:, None] - means) / sds) ** 2) / sds  # (N, 2), the common 1/sqrt(2 pi) cancels
    mixed = share * dens[:, hi] + (1 - share) * dens[:, lo]
    info = float(np.sum(((dens[:, hi] - dens[:, lo]) / np.maximum(mixed, 1e-300)) ** 2))
    return Mixture(
        share=share,
        cut=float(1.0 / (1.0 + math.exp(-cut))),
        se=1.0 / math.sqrt(max(info, 1e-12)),
        bic_gain=float(one.bic(x) - gm.bic(x)),
        separation=float(
            math.sqrt(2.0) * abs(means[hi] - means[lo]) / math.sqrt(sds[hi] ** 2 + sds[lo] ** 2)
        ),
    )


def histograms(
    oof_scores: np.ndarray, y: np.ndarray, test_views: np.ndarray, bins: int = 40
) -> dict[str, list[float]]:
    """Densities on a shared logit grid, for the report's plot: ``edges`` (bins + 1,), ``test`` (the pooled
    views), ``oof_ai`` and ``oof_human`` (each class alone, each integrating to 1)."""
    s, t, yb = logits(oof_scores), logits(np.asarray(test_views).ravel()), np.asarray(y, dtype=bool)
    lo, hi = np.percentile(np.concatenate([s, t]), [0.5, 99.5])
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)

    def dens(v: np.ndarray) -> list[float]:
        return (
            np.histogram(np.clip(v, edges[0], edges[-1]), edges, density=True)[0].round(5).tolist()
            if len(v)
            else [0.0] * bins
        )

    return {
        "edges": edges.round(5).tolist(),
        "test": dens(t),
        "oof_ai": dens(s[yb]),
        "oof_human": dens(s[~yb]),
    }
