"""The shift diagnosis: how far blended test scores are from the OOF scores, and how sure that is (numpy).

:func:`diagnose` compares the two score vectors alone (no test labels):

- the share of test rows the OOF threshold labels AI, against the training share;
- the KS distance between the OOF and the test score distributions, and the KS distance left once the OOF
  classes are re-weighted to the test AI share estimated under label shift, with the critical value that
  sampling alone reaches for the test set's size and the re-weighted OOF rows' Kish size
  (:meth:`ShiftDiagnosis.ks_critical`). Below it the test set differs from train by its AI share at most;
  above it the scores themselves moved. Each OOF row is scored by one model per run (the fold model that did
  not train on it), while a test row's score averages every fold model, which separates the classes further
  than any one of them. So the comparison and the label-shift estimates take the test scores one fold model
  per run at a time (``test_views``), pooled, counting each image once: like with like;
- three estimates of the test AI share with standard errors, each under its own assumption: EM on calibrated
  scores (Saerens et al. 2002) and confusion-matrix inversion (black-box shift estimation, Lipton et al. 2018)
  assume label shift (the class-conditional score distributions did not move); a two-component Gaussian
  mixture on the test logits assumes only that the test scores form one lump per class, and says whether
  they form two lumps at all (BIC and separation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from aivh_ens.blend.shift_stats import (
    bbse,
    calibrate,
    em_prior,
    em_se,
    histograms,
    kish_n,
    ks_critical,
    ks_distance,
    mixture,
)

EM = "EM on calibrated scores (Saerens 2002)"
BBSE = "confusion-matrix inversion (Lipton 2018)"
MIXTURE = "two-component mixture on test logits"


@dataclass(frozen=True)
class AutoRule:
    """The constants of ``--threshold auto`` and ``--adapt-bn auto`` (:data:`aivh_ens.blend.shift.AUTO_RULE`).

    Each is a statistical convention or was measured by ``bench/bench_shift.py`` (docs/benchmarks.md)."""

    alpha: float = 0.01
    """KS test level: a test set drawn like the OOF rows is called moved once in a hundred."""
    ks_floor: float = 0.02
    """Least KS distance called a move at any size: unshifted CIFAKE sets of 4,000 images read 0.013-0.019
    between OOF rows and fold views of the same models, a difference of scoring, not of the test set."""
    z: float = 3.0
    """Standard errors an estimate must differ by (from the training share, or from another estimate): the rule
    makes up to three such comparisons; bench_shift chose 3 over 1.5 and 2 with each variant left out."""
    share_min_n: int = 200
    """Fewest test images for ``share:``: the old rule lost F1 with it on 50-200 images (bench_shift); below
    this the mixture's share has a standard error near 0.05 or more."""
    bic_margin: float = 10.0
    """BIC gain of two lumps over one needed to call them real ("very strong", Kass & Raftery 1995)."""
    min_separation: float = 2.0
    """Ashman's D two lumps need (Ashman et al. 1994: below 2 two Gaussians do not separate cleanly)."""
    share_agree: bool = False
    """Whether ``share:`` also needs EM or BBSE to confirm the mixture's share within errors: off, since both
    rest on the label shift the KS just rejected (bench_shift: on, the upscaled sets kept ``oof``, gap 0.096)."""
    prior_agree_mixture: bool = False
    """Whether ``prior:`` also needs the mixture's share to agree with EM's when the test logits form two real
    lumps (a mixture reading more AI than EM: AI images scoring as human). Off: on overlapping lumps the
    mixture is biased by several points beyond its standard error, so it refused true label shifts."""
    odds_cap: float = 1.5
    """Most ``prior:`` moves the AI share's odds from the training odds (factor; 0.4-0.6 from a balanced train
    set), since a lower share with an unchanged score shape is also what an unseen generator or upscaled AI
    images look like: bench_shift chose 1.5 of 1-3 and none, with each variant left out."""


AUTO = AutoRule()


@dataclass(frozen=True)
class Estimate:
    """One estimate of the test AI share, its standard error, its method and the assumption it rests on."""

    method: str
    share: float | None
    assumption: str
    se: float | None = None


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
    n_eff_oof: float = 0.0  # Kish size of the OOF rows re-weighted to the EM share (0: not recorded)
    bic_gain: float | None = None  # BIC of one Gaussian minus two on the test logits
    separation: float | None = None  # Ashman's D of the two-component fit
    histogram: dict[str, list[float]] | None = None  # shift_stats.histograms, for the report's plot

    def estimate(self, method: str) -> float | None:
        return next((e.share for e in self.estimates if e.method == method), None)

    def se(self, method: str) -> float | None:
        return next((e.se for e in self.estimates if e.method == method), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShiftDiagnosis:
        """The inverse of :meth:`to_dict` (what ``<submission>.json`` holds; older records lack some fields)."""
        return cls(**{**d, "estimates": tuple(Estimate(**e) for e in d.get("estimates", ()))})

    def ks_critical(self, rule: AutoRule = AUTO) -> float:
        """The KS distance sampling alone exceeds with probability ``rule.alpha`` for N test images (one
        sample each, however many views) and the re-weighted OOF rows' Kish size; at least ``ks_floor``."""
        n_oof = self.n_eff_oof if self.n_eff_oof > 0 else float(self.n_oof)
        return max(ks_critical(self.n_test, n_oof, rule.alpha), rule.ks_floor)

    def scores_moved(self, rule: AutoRule = AUTO) -> bool:
        """Whether the test scores differ from the re-weighted OOF classes beyond sampling noise."""
        return self.ks_label_shift > self.ks_critical(rule)

    def two_lumps(self, rule: AutoRule = AUTO) -> bool:
        """Whether the test logits form two real lumps (BIC margin and separation of ``rule``)."""
        if self.bic_gain is None or self.separation is None or self.estimate(MIXTURE) is None:
            return False
        return self.bic_gain > rule.bic_margin and self.separation > rule.min_separation

    def lines(self, rule: AutoRule = AUTO) -> list[str]:
        """One line per finding, plus what it means for the threshold."""
        crit = self.ks_critical(rule)
        out = [
            f"predicted AI share {self.predicted_share:.1%} at the OOF threshold {self.oof_threshold:.4f} "
            f"(training share {self.train_share:.1%}; on OOF rows it labels {self.oof_predicted_share:.1%})",
            f"score shift: KS {self.ks:.3f} between OOF and test scores{self._views()}, {self.ks_label_shift:.3f} "
            f"once the OOF classes are re-weighted to the EM share; sampling alone reaches {crit:.3f} for "
            f"{self.n_test} test images ({self.moved(rule)})",
        ]
        for e in self.estimates:
            share = "n/a" if e.share is None else f"{e.share:.1%}"
            se = "" if e.se is None or e.share is None else f" +- {e.se:.1%}"
            out.append(f"test AI share {share}{se} by {e.method} (assumes {e.assumption})")
        if self.bic_gain is not None and self.separation is not None:
            lumps = "two lumps" if self.two_lumps(rule) else "one lump, as far as they show"
            out.append(
                f"test logits: {lumps} (BIC gain of two Gaussians over one {self.bic_gain:.1f}, needs "
                f"> {rule.bic_margin:g}; separation D {self.separation:.2f}, needs > {rule.min_separation:g})"
            )
        em, se = self.estimate(EM), self.se(EM) or 0.0
        if em is not None and em < self.train_share - rule.z * se and not self.scores_moved(rule):
            out.append(
                "a lower AI share with an unchanged score shape is also what an unseen generator looks like "
                "(new AI images scoring as human): no test statistic tells the two apart"
            )
        return out

    def _views(self) -> str:
        return f" (each of {self.n_views} fold models' own, pooled)" if self.n_views > 1 else ""

    def moved(self, rule: AutoRule = AUTO) -> str:
        if not self.scores_moved(rule):
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
    pi0 = float(yb.mean())
    post = calibrate(s, yb)(views)  # (V, N)
    em = em_prior(post, pi0)
    w = np.where(yb, em / pi0, (1 - em) / (1 - pi0))  # OOF rows re-weighted to the EM share
    mix, bb = mixture(t, seed), bbse(s, yb, views, threshold)
    estimates = (
        Estimate(EM, em, "label shift: each class scores as in OOF", em_se(post, pi0, em)),
        Estimate(
            BBSE, bb and bb.share, "label shift: the OOF true/false positive rates hold on test", bb and bb.se
        ),
        Estimate(MIXTURE, mix and mix.share, "the test scores form one lump per class", mix and mix.se),
    )
    return ShiftDiagnosis(
        n_oof=len(s),
        n_test=len(t),
        train_share=pi0,
        oof_threshold=float(threshold),
        predicted_share=float(np.mean(t >= threshold)),
        oof_predicted_share=float(np.mean(s >= threshold)),
        ks=ks_distance(views, s),
        ks_label_shift=ks_distance(views, s, w),
        estimates=estimates,
        n_views=len(views),
        n_eff_oof=kish_n(w),
        bic_gain=mix and mix.bic_gain,
        separation=mix and mix.separation,
        histogram=histograms(s, yb, views),
    )


__all__ = ["AUTO", "AutoRule", "Estimate", "ShiftDiagnosis", "diagnose"]
