"""When the test set is not the training set: threshold modes and the ``auto`` rule (numpy; sklearn lazily).

A blend's threshold is tuned on OOF scores. It transfers to the test scores only as far as they look like
the OOF scores: :func:`aivh_ens.blend.shift_diag.diagnose` measures how far they do, and how sure that is.

:func:`choose_threshold` turns a threshold mode (:func:`parse_threshold`) into the threshold for the test
scores: ``oof`` (as fitted), ``share:P`` (the top P of test rows are AI), ``prior:P`` (the exact metric
sweep on OOF rows re-weighted to AI share P), ``auto`` (:data:`AUTO_RULE`) or a number.

Every score here is a blended score in [0, 1] (the blend's output, label 1 when ``score >= threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aivh_ens.blend.shift_diag import AUTO, BBSE, EM, MIXTURE, AutoRule, Estimate, ShiftDiagnosis, diagnose
from aivh_ens.blend.shift_stats import ks_distance, logits
from aivh_ens.errors import UserError
from aivh_ens.metrics import check_metric, weighted_threshold_sweep

AUTO_RULE = (
    "auto: when the test scores fit the OOF classes re-weighted to the EM estimate of the test AI share (KS "
    "within what sampling alone reaches for this many test images), keep the OOF threshold unless EM's share "
    f"differs from the training share by more than {AUTO.z:g} standard errors and agrees with confusion-matrix "
    "inversion"
    + (
        " (and with the two-lump mixture, when the test logits form two lumps)"
        if AUTO.prior_agree_mixture
        else ""
    )
    + f", then prior:<estimate> with the share's odds moved at most {AUTO.odds_cap:g}x; when the scores "
    f"themselves moved and the test set has at least {AUTO.share_min_n} images whose logits form two real lumps "
    "(BIC and separation), share:<the two-lump mixture's estimate>; otherwise oof"
)
"""The rule ``--threshold auto`` follows, as ``submit`` prints it (constants: :class:`AutoRule`)."""


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
    rule: AutoRule = AUTO,
) -> ThresholdChoice:
    """The threshold for ``test_scores`` under ``mode`` (:func:`parse_threshold`), with a one-line reason;
    ``auto`` follows ``rule`` (:data:`AUTO_RULE`) on ``diagnosis`` (made here when None)."""
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
    inner, why = auto_mode(d, rule)
    c = choose_threshold(inner, oof_scores, y, test_scores, oof_threshold, metric, d)
    return ThresholdChoice("auto", c.resolved, c.threshold, f"auto -> {inner.text}: {why}; {c.reason}")


def _agree(a: float, se_a: float | None, b: float | None, se_b: float | None, z: float) -> bool:
    """Whether estimates ``a`` and ``b`` differ by at most ``z`` standard errors of their difference."""
    return b is not None and abs(a - b) <= z * math.hypot(se_a or 0.0, se_b or 0.0)


def auto_mode(d: ShiftDiagnosis, rule: AutoRule = AUTO) -> tuple[ThresholdMode, str]:
    """:data:`AUTO_RULE` as code: the mode ``auto`` resolves to, and why."""
    crit = d.ks_critical(rule)
    fit = f"KS {d.ks_label_shift:.3f} after re-weighting, sampling alone reaches {crit:.3f} for {d.n_test} images"
    if d.ks_label_shift > crit:
        return _moved(d, rule, f"the scores themselves moved ({fit})")
    em, se = d.estimate(EM), d.se(EM) or 0.0
    why = f"the test scores fit the OOF classes ({fit})"
    if em is None or abs(em - d.train_share) <= rule.z * se:
        share = "n/a" if em is None else f"{em:.1%} +- {se:.1%}"
        return ThresholdMode("oof"), f"{why} and EM's AI share {share} is within {rule.z:g} SE of training's"
    bb, se_bb = d.estimate(BBSE), d.se(BBSE)
    if not _agree(em, se, bb, se_bb, rule.z):
        bb_text = "n/a" if bb is None else f"{bb:.1%} +- {(se_bb or 0):.1%}"
        return ThresholdMode("oof"), (
            f"{why}, but EM's AI share {em:.1%} +- {se:.1%} and confusion-matrix inversion's {bb_text} disagree: "
            "the classes may score differently from OOF in a way KS does not see"
        )
    mix, se_mix = d.estimate(MIXTURE), d.se(MIXTURE)
    if (
        rule.prior_agree_mixture
        and d.two_lumps(rule)
        and mix is not None
        and not _agree(em, se, mix, se_mix, rule.z)
    ):
        return ThresholdMode("oof"), (
            f"{why}, but the test logits form two lumps whose AI share {mix:.1%} +- {(se_mix or 0):.1%} disagrees "
            f"with EM's {em:.1%} +- {se:.1%}: AI images may score as human (an unseen generator, or a move too "
            "small for KS at this size) rather than be fewer"
        )
    p = capped_share(em, d.train_share, rule.odds_cap)
    why = (
        f"{why} re-weighted to EM's AI share {em:.1%} +- {se:.1%}, which confusion-matrix inversion confirms"
    )
    if p != em:
        why += (
            f"; moved only to {p:.1%} (odds at most {rule.odds_cap:g}x the training odds): a lower AI share "
            "with unchanged score shape is also what an unseen generator looks like"
        )
    return ThresholdMode("prior", float(np.clip(p, 0.01, 0.99))), why


def capped_share(share: float, train_share: float, odds_cap: float) -> float:
    """``share`` with its odds kept within a factor ``odds_cap`` of ``train_share``'s odds."""
    lo, hi = (
        math.log(train_share / (1 - train_share)) - math.log(odds_cap),
        math.log(train_share / (1 - train_share)) + math.log(odds_cap),
    )
    z = math.log(max(share, 1e-9) / max(1 - share, 1e-9))
    return share if lo <= z <= hi else float(1.0 / (1.0 + math.exp(-min(max(z, lo), hi))))


def _hint(d: ShiftDiagnosis, rule: AutoRule) -> str:
    """What keeping ``oof`` on moved scores risks, when its predicted AI share is far from training's.

    AI images that lost the detail the models look for (blur, heavy downscaling) score as human, so the OOF cut
    labels far too few of them; no statistic of the scores tells that from a test set with fewer AI images
    (bench_shift's detail-loss sets: ``oof`` keeps 0.03-0.2 F1 there, ``share:<training share>`` 0.6-0.7).
    "Far" is the same odds factor that caps ``prior:``'s move."""
    if capped_share(d.predicted_share, d.train_share, rule.odds_cap) == d.predicted_share:
        return ""
    return (
        f"; the OOF cut labels {d.predicted_share:.1%} of test images AI against training's {d.train_share:.1%}: "
        "if the test set's AI share is near training's (AI images that lost detail to blur or resizing score "
        f"as human, and no score statistic tells that from fewer AI images), pass --threshold "
        f"share:{d.train_share:.2g}"
    )


def _moved(d: ShiftDiagnosis, rule: AutoRule, why: str) -> tuple[ThresholdMode, str]:
    """``share:`` when the moved test scores form two real lumps whose share EM or BBSE confirm; else oof."""
    mix, se_mix = d.estimate(MIXTURE), d.se(MIXTURE)
    if d.n_test < rule.share_min_n:
        return ThresholdMode(
            "oof"
        ), f"{why}, but share: needs at least {rule.share_min_n} test images{_hint(d, rule)}"
    if mix is None or not d.two_lumps(rule):
        return ThresholdMode("oof"), f"{why}, but the test logits do not form two real lumps{_hint(d, rule)}"
    others = [(d.estimate(m), d.se(m)) for m in (EM, BBSE)]
    if rule.share_agree and not any(_agree(mix, se_mix, e, s, rule.z) for e, s in others):
        return ThresholdMode("oof"), (
            f"{why}, but the mixture's AI share {mix:.1%} agrees with neither EM nor confusion-matrix inversion"
        )
    return ThresholdMode("share", float(np.clip(mix, 0.01, 0.99))), (
        f"{why}, so the OOF rows no longer set the cut; the test logits form two lumps whose AI share "
        f"{mix:.1%} +- {(se_mix or 0):.1%} sets the share"
    )


def modes_table(
    modes: Sequence[str], oof_scores: np.ndarray, y: np.ndarray, test_scores: np.ndarray, oof_threshold: float
) -> dict[str, ThresholdChoice]:
    """Every mode's choice on one test set (what ``bench/bench_shift.py`` scores)."""
    d = diagnose(oof_scores, y, test_scores, oof_threshold)
    return {m: choose_threshold(m, oof_scores, y, test_scores, oof_threshold, "f1", d) for m in modes}


__all__ = [
    "AUTO",
    "AUTO_RULE",
    "AutoRule",
    "Estimate",
    "ShiftDiagnosis",
    "ThresholdChoice",
    "ThresholdMode",
    "auto_mode",
    "choose_threshold",
    "diagnose",
    "ks_distance",
    "logits",
    "parse_threshold",
    "prior_threshold",
    "share_threshold",
]
