"""When the test set is not the training set: shift diagnosis and threshold modes (numpy; scikit-learn lazily).

A blend's threshold is tuned on OOF scores. It transfers to the test scores only as far as they look like
the OOF scores. :func:`diagnose` measures how far they do, from the two score vectors alone (no test labels):

- the share of test rows the OOF threshold labels AI, against the training share;
- the KS distance between the OOF and the test score distributions, and the KS distance left once the OOF
  classes are re-weighted to the test AI share estimated under label shift. A small remainder means the test
  set differs from train by its AI share only; a large one means the scores themselves moved. Each OOF row
  is scored by one model per run (the fold model that did not train on it), while a test row's score averages
  every fold model, which separates the classes further than any one of them: on an unshifted CIFAKE split
  that difference alone gave a KS of 0.067. So the comparison, and the label-shift estimates, take the test
  scores one fold model per run at a time (``test_views``), pooled: like with like;
- three estimates of the test AI share, each under its own assumption: EM on calibrated scores (Saerens et
  al. 2002) and confusion-matrix inversion (black-box shift estimation, Lipton et al. 2018) assume label
  shift (the class-conditional score distributions did not move); a two-component Gaussian mixture on the
  test logits assumes only that the test scores form one lump per class.

:func:`choose_threshold` turns a threshold mode (:func:`parse_threshold`) into the threshold for the test
scores: ``oof`` (as fitted), ``share:P`` (the top P of test rows are AI), ``prior:P`` (the exact metric
sweep on OOF rows re-weighted to AI share P), ``auto`` (:data:`AUTO_RULE`) or a number.

Every score here is a blended score in [0, 1] (the blend's output, label 1 when ``score >= threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from aivh_ens.errors import UserError
from aivh_ens.metrics import check_metric, weighted_threshold_sweep

LOGIT_CLIP = 1e-6
"""Scores are clipped to [c, 1 - c] before taking logits (mixture and calibration)."""

KS_TOLERANCE = 0.04
"""KS distance between test scores and the OOF scores re-weighted to the estimated test AI share below which
``auto`` treats the shift as label shift only (see :data:`AUTO_RULE`); set by ``bench/bench_shift.py``, one
fold model at a time: its unshifted and AI-share-shifted CIFAKE sets read 0.013-0.019 (two 20-minute ``auto``
runs' unshifted sets 0.020-0.022), its upscaled, blurred and unseen-generator sets 0.048-0.174. (It was 0.06
while the averaged test scores were compared, which read 0.067-0.076 on unshifted sets.)"""

PRIOR_SNAP = 0.02
"""``auto`` keeps the OOF threshold when the label-shift estimate is within this of the training AI share."""

AUTO_RULE = (
    "auto: when the test scores match the OOF scores re-weighted to the EM estimate of the test AI share "
    f"(KS <= {KS_TOLERANCE}), the shift is in the AI share alone: keep the OOF threshold if that estimate is "
    f"within {PRIOR_SNAP} of the training share, else prior:<estimate>; when the scores themselves moved, "
    "label the share the two-component mixture of test logits estimates (share:<estimate>)"
)
"""The rule ``--threshold auto`` follows, as ``submit`` prints it."""


@dataclass(frozen=True)
class ThresholdMode:
    """A parsed ``--threshold``: ``kind`` in oof | share | prior | auto | value, ``value`` for the last three."""

    kind: str
    value: float | None = None

    @property
    def text(self) -> str:
        if self.kind in ("share", "prior"):
            return f"{self.kind}:{self.value:g}"
        return f"{self.value:g}" if self.kind == "value" else self.kind


def parse_threshold(text: str | float | ThresholdMode) -> ThresholdMode:
    """Parse ``oof | share:P | prior:P | auto | <number in [0, 1]>`` (P strictly between 0 and 1).

    Raises:
        UserError: naming ``--threshold``, the value received and the accepted forms.
    """
    if isinstance(text, ThresholdMode):
        return text
    raw = str(text).strip()
    forms = "oof, share:P, prior:P (0 < P < 1), auto, or a number in [0, 1]"

    def bad(why: str) -> UserError:
        return UserError(f"threshold={raw!r} (--threshold) {why}; expected {forms}")

    if raw in ("oof", "auto"):
        return ThresholdMode(raw)
    kind, sep, rest = raw.partition(":")
    if sep:
        if kind not in ("share", "prior"):
            return _raise(bad(f"has an unknown mode {kind!r}"))
        p = _number(rest)
        if p is None or not 0.0 < p < 1.0:
            return _raise(bad(f"needs {kind}:P with P a number strictly between 0 and 1, got {rest!r}"))
        return ThresholdMode(kind, p)
    v = _number(raw)
    if v is None or not 0.0 <= v <= 1.0:
        return _raise(bad("is neither a mode nor a number in [0, 1]"))
    return ThresholdMode("value", v)


def _raise(e: UserError) -> ThresholdMode:
    raise e


def _number(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def logits(s: np.ndarray) -> np.ndarray:
    """``log(s / (1 - s))`` of scores (N,) clipped to [:data:`LOGIT_CLIP`, 1 - :data:`LOGIT_CLIP`]."""
    q = np.clip(np.asarray(s, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(q) - np.log1p(-q)


def ks_distance(a: np.ndarray, b: np.ndarray, b_weights: np.ndarray | None = None) -> float:
    """Two-sample Kolmogorov-Smirnov distance ``max |F_a - F_b|``, with optional non-negative weights on b."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.asarray(b, dtype=np.float64)
    wb = np.ones(len(b)) if b_weights is None else np.asarray(b_weights, dtype=np.float64)
    order = np.argsort(b, kind="stable")
    b, cw = b[order], np.cumsum(wb[order]) / wb.sum()
    grid = np.concatenate([a, b])  # the CDFs only jump at these points
    fa = np.searchsorted(a, grid, side="right") / len(a)
    idx = np.searchsorted(b, grid, side="right")
    fb = np.where(idx > 0, cw[np.maximum(idx - 1, 0)], 0.0)
    return float(np.max(np.abs(fa - fb)))


def calibrate(oof_scores: np.ndarray, y: np.ndarray):
    """Platt scaling fitted on the OOF rows: a function mapping scores (N,) to calibrated P(AI) (N,).

    The OOF scores come from models that did not see their rows, so calibrating on them is honest."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=1000).fit(logits(oof_scores)[:, None], np.asarray(y, dtype=int))
    return lambda s: lr.predict_proba(logits(s)[:, None])[:, 1]


def em_prior(posteriors: np.ndarray, train_share: float, max_iter: int = 500, tol: float = 1e-7) -> float:
    """Saerens et al. (2002): the test AI share that makes calibrated posteriors (N,) self-consistent."""
    p = np.clip(np.asarray(posteriors, dtype=np.float64), 1e-9, 1 - 1e-9)
    pi0, pi = train_share, train_share
    for _ in range(max_iter):
        a, b = (pi / pi0) * p, ((1 - pi) / (1 - pi0)) * (1 - p)
        new = float(np.mean(a / (a + b)))
        if abs(new - pi) < tol:
            return new
        pi = new
    return pi


def bbse_prior(
    oof_scores: np.ndarray, y: np.ndarray, test_scores: np.ndarray, threshold: float
) -> float | None:
    """Lipton et al. (2018): invert the OOF confusion matrix at ``threshold``; None when it is singular."""
    y = np.asarray(y, dtype=bool)
    tpr = float(np.mean(oof_scores[y] >= threshold))
    fpr = float(np.mean(oof_scores[~y] >= threshold))
    if tpr - fpr < 1e-3:
        return None
    q = float(np.mean(np.asarray(test_scores) >= threshold))
    return float(np.clip((q - fpr) / (tpr - fpr), 0.0, 1.0))


def mixture(test_scores: np.ndarray, seed: int = 0) -> tuple[float, float] | None:
    """A two-component Gaussian mixture on the test logits: ``(AI share, cut between the lumps)``.

    The AI lump is the one with the higher mean. The cut is the score where the two weighted components'
    posteriors cross (between the means). None when the fit is degenerate (fewer than 20 rows, one lump)."""
    from sklearn.mixture import GaussianMixture

    z = logits(test_scores)
    if len(z) < 20 or np.ptp(z) <= 0:
        return None
    gm = GaussianMixture(2, random_state=seed, n_init=3, reg_covar=1e-3).fit(z[:, None])
    means = gm.means_[:, 0]
    hi, lo = int(np.argmax(means)), int(np.argmin(means))
    if hi == lo:
        return None
    grid = np.linspace(means[lo], means[hi], 2001)
    post = gm.predict_proba(grid[:, None])[:, hi]
    cut = float(grid[int(np.argmin(np.abs(post - 0.5)))])
    return float(gm.weights_[hi]), float(1.0 / (1.0 + math.exp(-cut)))


@dataclass(frozen=True)
class Estimate:
    """One estimate of the test AI share, with its method and the assumption it rests on."""

    method: str
    share: float | None
    assumption: str


@dataclass(frozen=True)
class ShiftDiagnosis:
    """How far the test scores are from the OOF scores (see the module docstring)."""

    n_oof: int
    n_test: int
    train_share: float  # AI share of the OOF (training) labels
    oof_threshold: float
    predicted_share: float  # share of test rows the OOF threshold labels AI
    oof_predicted_share: float  # share of OOF rows it labels AI
    ks: float  # KS distance, OOF vs test blended scores (of single fold models when n_views > 1)
    ks_label_shift: float  # KS distance, OOF re-weighted to the EM share vs test
    estimates: tuple[Estimate, ...] = field(default_factory=tuple)
    n_views: int = 1  # how many single-model views of the test scores were pooled (1: the averaged scores)

    def estimate(self, method: str) -> float | None:
        return next((e.share for e in self.estimates if e.method == method), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShiftDiagnosis:
        """The inverse of :meth:`to_dict` (what ``<submission>.json`` holds)."""
        return cls(**{**d, "estimates": tuple(Estimate(**e) for e in d.get("estimates", ()))})

    def lines(self) -> list[str]:
        """One line per finding, plus what it means for the threshold."""
        out = [
            f"predicted AI share {self.predicted_share:.1%} at the OOF threshold {self.oof_threshold:.4f} "
            f"(training share {self.train_share:.1%}; on OOF rows it labels {self.oof_predicted_share:.1%})",
            f"score shift: KS {self.ks:.3f} between OOF and test scores{self._views()}, {self.ks_label_shift:.3f} "
            f"once the OOF classes are re-weighted to the EM share ({self.moved()})",
        ]
        for e in self.estimates:
            share = "n/a" if e.share is None else f"{e.share:.1%}"
            out.append(f"test AI share {share} by {e.method} (assumes {e.assumption})")
        return out

    def _views(self) -> str:
        return f" (each of {self.n_views} fold models' own, pooled)" if self.n_views > 1 else ""

    def moved(self) -> str:
        if self.ks_label_shift <= KS_TOLERANCE:
            return "the test set differs from train by its AI share at most; the OOF classes still fit"
        return "the scores themselves moved: a threshold tuned on OOF rows may not transfer"


def diagnose(
    oof_scores: np.ndarray,
    y: np.ndarray,
    test_scores: np.ndarray,
    threshold: float,
    seed: int = 0,
    test_views: np.ndarray | None = None,
) -> ShiftDiagnosis:
    """Compare blended OOF scores (N_oof,) with labels ``y`` to blended test scores (N_test,) at ``threshold``.

    ``test_views`` (V, N_test): the same test rows scored as the OOF rows were, by one fold model per run
    (view v blends fold v of every run). The KS distances and the two label-shift estimates use them, pooled;
    the predicted share and the mixture use ``test_scores``, which the threshold cuts. None: ``test_scores``
    stand in for both (scores of single models, or a test set scored as the OOF rows were)."""
    s, t, yb = (np.asarray(oof_scores, dtype=np.float64), np.asarray(test_scores, dtype=np.float64),
                np.asarray(y, dtype=bool))  # fmt: skip
    views = t[None] if test_views is None else np.asarray(test_views, dtype=np.float64)
    if views.ndim != 2 or views.shape[1] != len(t):
        raise ValueError(f"test_views has shape {views.shape}; expected (V, {len(t)})")
    pooled = views.ravel()
    pi0 = float(yb.mean())
    em = em_prior(calibrate(s, yb)(pooled), pi0)
    w = np.where(yb, em / pi0, (1 - em) / (1 - pi0))  # OOF rows re-weighted to the EM share
    mix = mixture(t, seed)
    estimates = (
        Estimate("EM on calibrated scores (Saerens 2002)", em, "label shift: each class scores as in OOF"),
        Estimate(
            "confusion-matrix inversion (Lipton 2018)",
            bbse_prior(s, yb, pooled, threshold),
            "label shift: the OOF true/false positive rates hold on test",
        ),
        Estimate(
            "two-component mixture on test logits",
            None if mix is None else mix[0],
            "the test scores form one lump per class",
        ),
    )
    return ShiftDiagnosis(
        n_oof=len(s),
        n_test=len(t),
        train_share=pi0,
        oof_threshold=float(threshold),
        predicted_share=float(np.mean(t >= threshold)),
        oof_predicted_share=float(np.mean(s >= threshold)),
        ks=ks_distance(pooled, s),
        ks_label_shift=ks_distance(pooled, s, w),
        estimates=estimates,
        n_views=len(views),
    )


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold applied to the test scores, the mode that chose it and why."""

    mode: str  # the mode as given (e.g. "auto")
    resolved: str  # the mode it resolved to (auto -> oof | prior:P | share:P)
    threshold: float
    reason: str


def share_threshold(test_scores: np.ndarray, share: float) -> float:
    """The threshold that labels the top ``share`` of ``test_scores`` (N,) AI (round(share * N) rows, ties
    aside): the midpoint between the last score labelled AI and the next lower one."""
    desc = np.sort(np.asarray(test_scores, dtype=np.float64))[::-1]
    k = int(round(share * len(desc)))
    if k <= 0:
        return float(np.nextafter(desc[0], np.inf))
    if k >= len(desc):
        return float(desc[-1])
    return float(0.5 * (desc[k - 1] + desc[k])) if desc[k] < desc[k - 1] else float(desc[k - 1])


def prior_threshold(oof_scores: np.ndarray, y: np.ndarray, prior: float, metric: str = "f1") -> float:
    """The exact ``metric``-optimal threshold on OOF rows re-weighted so that AI rows make up ``prior``."""
    yb = np.asarray(y, dtype=bool)
    pi0 = float(yb.mean())
    thresholds, scores = weighted_threshold_sweep(
        yb, oof_scores, prior / pi0, (1 - prior) / (1 - pi0), metric
    )
    k = int(np.argmax(scores))
    return float(0.5 * (thresholds[k - 1] + thresholds[k])) if k > 0 else float(thresholds[k])


def choose_threshold(
    mode: str | ThresholdMode,
    oof_scores: np.ndarray,
    y: np.ndarray,
    test_scores: np.ndarray,
    oof_threshold: float,
    metric: str = "f1",
    diagnosis: ShiftDiagnosis | None = None,
) -> ThresholdChoice:
    """The threshold for ``test_scores`` under ``mode`` (:func:`parse_threshold`), with a one-line reason."""
    m = parse_threshold(mode)
    check_metric(metric)
    if m.kind == "oof":
        return ThresholdChoice(
            m.text, "oof", float(oof_threshold), "the threshold tuned on OOF rows (blend.json)"
        )
    if m.kind == "value":
        return ThresholdChoice(m.text, m.text, float(m.value or 0.0), "given as a number")
    if m.kind == "share":
        t = share_threshold(test_scores, float(m.value or 0.0))
        return ThresholdChoice(m.text, m.text, t, f"labels the top {m.value:.1%} of test scores AI")
    if m.kind == "prior":
        t = prior_threshold(oof_scores, y, float(m.value or 0.0), metric)
        return ThresholdChoice(
            m.text, m.text, t, f"the {metric}-optimal threshold on OOF rows re-weighted to {m.value:.1%} AI"
        )
    d = diagnosis or diagnose(oof_scores, y, test_scores, oof_threshold)
    inner = _auto_mode(d)
    c = choose_threshold(inner, oof_scores, y, test_scores, oof_threshold, metric, d)
    return ThresholdChoice("auto", c.resolved, c.threshold, f"{_auto_reason(d, inner)}; {c.reason}")


def _auto_mode(d: ShiftDiagnosis) -> ThresholdMode:
    """:data:`AUTO_RULE` as code."""
    em = d.estimate("EM on calibrated scores (Saerens 2002)")
    if d.ks_label_shift <= KS_TOLERANCE or d.estimate("two-component mixture on test logits") is None:
        if em is None or abs(em - d.train_share) <= PRIOR_SNAP:
            return ThresholdMode("oof")
        return ThresholdMode("prior", float(np.clip(em, 0.01, 0.99)))
    mix = d.estimate("two-component mixture on test logits")
    return ThresholdMode("share", float(np.clip(mix, 0.01, 0.99)))  # type: ignore[arg-type]


def _auto_reason(d: ShiftDiagnosis, m: ThresholdMode) -> str:
    if m.kind == "oof":
        return (
            f"auto -> oof: the test scores fit the OOF classes (KS {d.ks_label_shift:.3f} <= {KS_TOLERANCE}) "
            "and the estimated AI share is near the training share"
        )
    if m.kind == "prior":
        return (
            f"auto -> {m.text}: the test scores fit the OOF classes re-weighted to an AI share of {m.value:.1%} "
            f"(KS {d.ks_label_shift:.3f} <= {KS_TOLERANCE})"
        )
    return (
        f"auto -> {m.text}: the scores themselves moved (KS {d.ks_label_shift:.3f} > {KS_TOLERANCE} after "
        "re-weighting), so the OOF rows no longer set the cut; the test logits' two-lump mixture sets the share"
    )


def modes_table(
    modes: Sequence[str], oof_scores: np.ndarray, y: np.ndarray, test_scores: np.ndarray, oof_threshold: float
) -> dict[str, ThresholdChoice]:
    """Every mode's choice on one test set (what ``bench/bench_shift.py`` scores)."""
    d = diagnose(oof_scores, y, test_scores, oof_threshold)
    return {m: choose_threshold(m, oof_scores, y, test_scores, oof_threshold, "f1", d) for m in modes}


__all__ = [
    "AUTO_RULE",
    "Estimate",
    "ShiftDiagnosis",
    "ThresholdChoice",
    "ThresholdMode",
    "choose_threshold",
    "diagnose",
    "ks_distance",
    "parse_threshold",
    "prior_threshold",
    "share_threshold",
]
