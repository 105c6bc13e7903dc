"""The blend stage: validate the OOF files, search, score every method in and out of sample, pick, write.

Reads ``oof/<run>.csv`` and ``runs/<run>/config.json``; writes ``runs/blend/blend.json``, the Optuna study
(``runs/blend/study.db`` unless another storage is given) and two plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aivh_ens.blend.artifact import BLEND_VERSION, RANK_REFERENCE, _check_blend_doc
from aivh_ens.blend.core import spaces
from aivh_ens.blend.methods import Fit, all_ai, methods, nested_cv
from aivh_ens.blend.oof import OOFSet, load_oof
from aivh_ens.blend.report import plot_threshold_curves, plot_weights
from aivh_ens.blend.search import _completed, default_storage, open_study, optimize, study_name
from aivh_ens.errors import UserError
from aivh_ens.io import write_json
from aivh_ens.layout import blend_dir
from aivh_ens.metrics import check_metric

if TYPE_CHECKING:
    pass


BOOTSTRAPS = 500
"""Bootstrap samples of the BBC-CV estimate (Tsamardinos et al. 2018)."""

ALL_AI_MARGIN = 0.02
"""blend warns when the shipped nested score is within this of predicting every row AI."""

ALL_AI_SHARE = 0.9
"""blend warns when the shipped threshold labels more than this share of OOF rows AI."""


@dataclass(frozen=True)
class MethodResult:
    """A method fitted on all OOF rows plus its nested-CV scores (one per fold)."""

    name: str
    complexity: int
    fit: Fit
    per_fold: tuple[float, ...]
    pred: np.ndarray | None = None  # (N,) bool nested-CV labels, each row from the fit that did not see it

    @property
    def nested_mean(self) -> float:
        return float(np.mean(self.per_fold))

    @property
    def nested_std(self) -> float:
        return float(np.std(self.per_fold))


@dataclass(frozen=True)
class BlendResult:
    """What :func:`run_blend` produced: the blend.json content, every method's result and the choice."""

    blend: dict[str, Any]
    methods: tuple[MethodResult, ...]
    picked: MethodResult
    reason: str
    written: tuple[Path, ...]
    all_ai: MethodResult | None = None  # predicting every row AI: the floor, not a candidate
    warnings: tuple[str, ...] = ()


def paired_se(a: Sequence[float], b: Sequence[float], holdout_ratio: float | None = None) -> float:
    """Standard error of the mean per-fold difference ``a - b`` (the same K folds), with Nadeau and Bengio's
    (2003) correction for folds whose training sets overlap: ``sqrt(var(d, ddof=1) * (1/K + n_test/n_train))``.

    The naive ``std / sqrt(K)`` treats the K fold scores as independent; every pair of folds shares most of its
    training rows, so it is about 1.5x too small at K = 5. ``holdout_ratio``: n_test / n_train of a fold
    (:func:`holdout_ratio`); default ``1 / (K - 1)``, that of K equal folds.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return 0.0
    ratio = 1.0 / (len(d) - 1) if holdout_ratio is None else holdout_ratio
    return float(np.sqrt(np.var(d, ddof=1) * (1.0 / len(d) + ratio)))


def holdout_ratio(folds: np.ndarray) -> float:
    """The mean n_test / n_train over the folds of ``folds`` (N,): the overlap term of :func:`paired_se`."""
    _, n = np.unique(folds, return_counts=True)
    return float(np.mean(n / (len(folds) - n)))


def pick_method(
    results: Sequence[MethodResult], metric: str, test_train: float | None = None
) -> tuple[MethodResult, str]:
    """The method to ship by the one-standard-error rule: the simplest method whose nested-CV mean is within
    one paired standard error (over the outer folds, corrected for their overlap: :func:`paired_se` with
    ``test_train`` as its ratio) of the best method's.

    A difference smaller than that is noise of the fold split, so a more complex method must earn its place.

    Returns:
        ``(result, reason)`` with a one-sentence reason.
    """
    top = max(results, key=lambda r: (r.nested_mean, -r.complexity))
    se = {r.name: paired_se(top.per_fold, r.per_fold, test_train) for r in results}
    close = [r for r in results if top.nested_mean - r.nested_mean <= se[r.name]]
    picked = min(close, key=lambda r: (r.complexity, -r.nested_mean))
    reason = (
        f"picked {picked.name}: nested {metric} {picked.nested_mean:.4f} ± {picked.nested_std:.4f} "
        f"(in-sample {picked.fit.score:.4f})"
    )
    if picked is top:
        reason += f", the best nested score of the {len(results)} methods"
    else:
        reason += (
            f"; {top.name} scores {top.nested_mean:.4f} nested, {top.nested_mean - picked.nested_mean:.4f} more, "
            f"within one paired standard error ({se[picked.name]:.4f}), so the simpler method ships"
        )
    in_sample = max(results, key=lambda r: r.fit.score)
    if in_sample.name != picked.name:
        reason += (
            f"; {in_sample.name} has the best in-sample score ({in_sample.fit.score:.4f}) but tuning weights and "
            "threshold on the rows it is scored on is optimistic"
        )
    return picked, reason


def bootstrap_rows(
    rng: np.random.Generator, n: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One bootstrap draw of ``n`` rows: ``(drawn row indices, with repeats; (n,) bool out-of-bag)``.

    With ``groups`` (N,) whole groups are drawn with replacement (every row of a drawn group, as often as the
    group is drawn): rows that folds keep together (AI/human pairs) are not independent, and drawing them one
    by one would understate the spread and let a row's pair sit out of bag while it is drawn."""
    if groups is None:
        idx = rng.integers(0, n, n)
        oob = np.ones(n, dtype=bool)
        oob[idx] = False
        return idx, oob
    _, inv = np.unique(np.asarray(groups), return_inverse=True)  # (N,) group index of each row
    g = int(inv.max()) + 1
    times = np.bincount(rng.integers(0, g, g), minlength=g)[inv]  # (N,) how often each row's group is drawn
    return np.repeat(np.arange(n), times), times == 0


def bbc_score(
    results: Sequence[MethodResult],
    y: np.ndarray,
    metric: str,
    n_boot: int = BOOTSTRAPS,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float] | None:
    """Bootstrap bias-corrected nested score (BBC-CV, Tsamardinos et al. 2018): ``(mean, std)`` over bootstraps.

    Each bootstrap draws rows with replacement (whole groups with ``groups``, :func:`bootstrap_rows`), picks
    the method that scores best on the drawn rows (from
    their nested-CV labels) and scores it on the rows not drawn. Choosing the best of several candidates on
    the same rows it is reported on is what makes the raw best nested mean optimistic; this removes that.
    None when no method kept its per-row labels.
    """
    from aivh_ens.metrics import METRICS

    cands = [r for r in results if r.pred is not None]
    if not cands:
        return None
    score = METRICS[metric]
    y = np.asarray(y, dtype=bool)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx, oob = bootstrap_rows(rng, len(y), groups)
        if not oob.any() or y[oob].all() or not y[oob].any():
            continue
        best = max(cands, key=lambda r: score(y[idx], r.pred[idx]))  # type: ignore[index]
        out.append(score(y[oob], best.pred[oob]))  # type: ignore[index]
    return (float(np.mean(out)), float(np.std(out))) if out else None


def format_table(
    results: Sequence[MethodResult],
    metric: str,
    picked: str | None = None,
    all_ai: MethodResult | None = None,
    pseudo: Mapping[str, str] | None = None,
) -> str:
    """One row per method: in-sample OOF score, nested-CV mean ± std, space and threshold; then the all-AI
    baseline (every row predicted AI) when given; then a line per pseudo-labelled run (``pseudo``:
    ``{run: kind}``, blend.json's ``runs[].pseudo``), whose single row is marked."""
    rows = [*results, *([all_ai] if all_ai else [])]
    width = max(len("method"), *(len(r.name) for r in rows)) + 2
    head = f"{'method':<{width}}{'space':<7}{'oof ' + metric:>14}{'nested ' + metric:>24}{'threshold':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "  <- picked" if r.name == picked else "  (baseline: every row AI)" if r is all_ai else ""
        if r.name.split(":", 1)[-1] in (pseudo or {}) and r.name.startswith("single:"):
            mark += "  (pseudo-labelled)"
        space = "-" if r is all_ai else r.fit.space
        nested = f"{r.nested_mean:.4f} ± {r.nested_std:.4f}"
        lines.append(
            f"{r.name:<{width}}{space:<7}{r.fit.score:>14.4f}{nested:>24}{r.fit.threshold:>11.4f}{mark}"
        )
    for run, kind in (pseudo or {}).items():
        lines.append(f"{run}: {PSEUDO_NOTES[kind]}")
    return "\n".join(lines)


PSEUDO_NOTES = {
    "fold-consistent": "pseudo-labelled, fold-consistent (each fold's labels from models that never saw its "
    "rows): its OOF rows are unseen, its test scores in-sample on its pseudo rows",
    "every-fold": "pseudo-labelled from models that saw every fold's rows: its OOF and nested scores are "
    "optimistic; judge it on a labelled hold-out",
}
"""What a pseudo-labelled run's scores mean, by :func:`aivh_ens.layout.pseudo_kind`."""


def all_ai_result(oof: OOFSet, metric: str) -> MethodResult:
    """Predicting every row AI as a table row: no weights, threshold 0, scored in-sample and per fold."""
    score, per_fold = all_ai(oof.y, oof.folds, metric)
    fit = Fit("all_ai", "prob", np.zeros(len(oof.runs)), 0.0, score)
    return MethodResult("all_ai", -1, fit, tuple(per_fold))


def blend_warnings(
    picked: MethodResult, floor: MethodResult, ai_share: float, metric: str
) -> tuple[str, ...]:
    """Why a blend that barely beats guessing should not be trusted, one sentence each (empty when fine).

    Args:
        picked: the shipped method.
        floor: :func:`all_ai_result`.
        ai_share: the share of OOF rows the shipped blend and threshold label AI.
        metric: the metric's name, for the message.
    """
    out = []
    gap = picked.nested_mean - floor.nested_mean
    if gap < ALL_AI_MARGIN:
        out.append(
            f"the shipped blend's nested {metric} {picked.nested_mean:.4f} is within {ALL_AI_MARGIN} of "
            f"predicting every row AI ({floor.nested_mean:.4f}): the runs barely beat guessing; train "
            "stronger runs (more epochs or data, a larger model) before trusting this blend"
        )
    if ai_share > ALL_AI_SHARE:
        out.append(
            f"threshold {picked.fit.threshold:.4f} ({picked.fit.space} space) labels {ai_share:.0%} of OOF rows "
            f"AI: the {metric}-optimal threshold has drifted towards 'everything is AI', which scores "
            f"{floor.fit.score:.4f} by itself"
        )
    return tuple(out)


def expected_seconds(n_rows: int, n_runs: int, trials: int = 100) -> float:
    """Seconds :func:`run_blend` is expected to take on ``n_rows`` OOF rows of ``n_runs`` runs: one run blends
    as itself; two or more run the Optuna search and the nested CV (measured at 100 trials on 2 CPU cores,
    about 10 s for two runs and 2 s per further run)."""
    search = (10.0 + 2.0 * (n_runs - 2)) * trials / 100 if n_runs > 1 else 0.0
    return 1.0 + search + 2e-4 * n_rows * n_runs


def run_blend(
    workdir: str | Path,
    runs: Sequence[str] | None = None,
    metric: str = "f1",
    trials: int = 100,
    timeout: float | None = None,
    storage: str | None = None,
    seed: int = 42,
    nested_trials: int | None = None,
    resume_study: bool = False,
    progress: bool = False,
) -> BlendResult:
    """The blend stage: validate the OOF files, search, score every method in and out of sample, pick, write.

    Args:
        workdir: project folder holding ``oof/`` and ``runs/`` (``--workdir``).
        runs: run names (``--runs``); default every ``oof/*.csv``.
        metric: a name in :data:`aivh_ens.metrics.METRICS` (``--metric``).
        trials: Optuna trials of the shipped search (``--trials``).
        timeout: stop the search after this many seconds (``--timeout``).
        storage: an Optuna storage URL (``--storage``); default SQLite at ``runs/blend/study.db``.
        seed: seeds the TPE samplers (``--seed``).
        nested_trials: Optuna trials per nested-CV fold (``--nested-trials``); default ``trials``, so what
            ships is searched exactly as what was scored.
        resume_study: add ``trials`` to the study of the same inputs instead of starting a fresh one
            (``--resume-study``).
        progress: show progress bars.
    """
    check_metric(metric)
    nested_trials = trials if nested_trials is None else nested_trials
    if trials < 1 or nested_trials < 1:
        raise UserError(
            f"trials={trials} (--trials) and nested_trials={nested_trials} (--nested-trials) must be "
            "at least 1"
        )
    if timeout is not None and timeout <= 0:
        raise UserError(f"timeout={timeout} (--timeout) must be a positive number of seconds")
    oof = load_oof(workdir, runs)  # every input check happens here, before anything is written
    S = spaces(oof.P, oof.P_logit)  # each space from the OOF views averaged the way submit averages them
    optuna_fit, n_trials = (
        _search(oof, S, metric, trials, timeout, storage, seed, resume_study, progress)
        if len(oof.runs) > 1
        else (None, 0)  # one run blends as itself: nothing to search
    )
    results = _score_methods(oof, S, metric, optuna_fit, nested_trials, seed, progress)
    picked, reason = pick_method(results, metric, holdout_ratio(oof.folds))
    floor = all_ai_result(oof, metric)
    fit = picked.fit
    ai_share = float(np.mean(fit.scores(S) >= fit.threshold))  # OOF rows
    warnings = blend_warnings(picked, floor, ai_share, metric)
    bbc = bbc_score(results, oof.y, metric, seed=seed, groups=oof.groups)
    doc = blend_document(oof, picked, results, metric, n_trials, seed, floor, warnings, bbc)
    written = _write_outputs(oof, S, results, picked, doc)
    return BlendResult(doc, results, picked, reason, written, floor, warnings)


def _search(
    oof: OOFSet,
    S: Mapping[str, np.ndarray],
    metric: str,
    trials: int,
    timeout: float | None,
    storage: str | None,
    seed: int,
    resume: bool,
    progress: bool,
) -> tuple[Fit, int]:
    """Run ``trials`` in a fresh study of these inputs (or add them to it: ``resume``); its best blend and its
    number of trials."""
    y = oof.y.astype(bool)
    store = default_storage(oof.workdir) if storage is None else storage
    try:
        study = open_study(store, study_name(oof, metric), seed, fresh=not resume)
        fit = optimize(study, S, y, metric, oof.runs, trials, timeout, progress)
        return fit, len(_completed(study))
    finally:
        if storage is None:
            store.engine.dispose()  # closes the file (and folds the WAL back into it)


def _score_methods(
    oof: OOFSet,
    S: Mapping[str, np.ndarray],
    metric: str,
    optuna_fit: Fit | None,
    nested_trials: int,
    seed: int,
    progress: bool,
) -> tuple[MethodResult, ...]:
    """Every method fitted on all OOF rows (Optuna: the study's best) and scored by nested CV."""
    y = oof.y.astype(bool)
    candidates = methods(oof.runs, metric, nested_trials)
    in_sample = {
        m.name: (optuna_fit if m.name == "optuna" and optuna_fit else m.fit(S, y, seed, oof.groups))
        for m in candidates
    }
    nested = nested_cv(
        oof.P, y, oof.folds, metric, candidates, seed=seed, progress=progress, groups=oof.groups,
        P_logit=oof.P_logit,
    )  # fmt: skip
    return tuple(
        MethodResult(
            m.name, m.complexity, in_sample[m.name], tuple(nested.per_fold[m.name]), nested.pred[m.name]
        )
        for m in candidates
    )


def _baseline_row(r: MethodResult) -> dict[str, Any]:
    """One method's scores as blend.json lists them (``baselines`` and ``all_ai``)."""
    return {"method": r.name, "oof_score": r.fit.score, "nested_mean": r.nested_mean,
            "nested_std": r.nested_std, "threshold": r.fit.threshold, "per_fold": list(r.per_fold)}  # fmt: skip


def blend_document(
    oof: OOFSet,
    picked: MethodResult,
    results: Sequence[MethodResult],
    metric: str,
    n_trials: int,
    seed: int,
    all_ai: MethodResult | None = None,
    warnings: Sequence[str] = (),
    bbc: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The blend.json content for the picked method (checked against the schema before it is returned)."""
    fit = picked.fit
    doc: dict[str, Any] = {
        "version": BLEND_VERSION,
        "runs": [
            {
                "name": r,
                "config": f"runs/{r}/config.json",
                "oof": f"oof/{r}.csv",
                "oof_sha256": sha,
                **({"pseudo": oof.pseudo[r]} if r in oof.pseudo else {}),
            }  # trained on pseudo-labelled test rows
            for r, sha in zip(oof.runs, oof.oof_sha256, strict=True)
        ],  # fmt: skip
        "fold_sha256": oof.fold_sha256,
        "space": fit.space,
        "weights": {r: float(w) for r, w in zip(oof.runs, fit.weights, strict=True)},
        "threshold": fit.threshold,
        "metric": metric,
        "method": picked.name,
        "oof_score": fit.score,
        "nested_score": {
            "mean": picked.nested_mean,
            "std": picked.nested_std,
            "per_fold": list(picked.per_fold),
            **({"bbc_mean": bbc[0], "bbc_std": bbc[1]} if bbc is not None else {}),
        },
        "baselines": [_baseline_row(r) for r in results],
        "trials": n_trials,
        "seed": seed,
    }
    if fit.space == "rank" and fit.coef is None:
        doc["rank_reference"] = RANK_REFERENCE
    if all_ai is not None:
        doc["all_ai"] = _baseline_row(all_ai)
    doc["warnings"] = list(warnings)
    if fit.coef is not None:
        doc["stack"] = {
            "coef": {r: float(c) for r, c in zip(oof.runs, fit.coef, strict=True)},
            "intercept": float(fit.intercept),
            "C": float(fit.C or 0.0),
            "features": "logit",
        }
    _check_blend_doc(doc)
    return doc


def _write_outputs(
    oof: OOFSet,
    S: Mapping[str, np.ndarray],
    results: Sequence[MethodResult],
    picked: MethodResult,
    doc: dict[str, Any],
) -> tuple[Path, ...]:
    """The two plots, then blend.json last: its presence means the stage finished."""
    out_dir, fit, y = blend_dir(oof.workdir), picked.fit, oof.y.astype(bool)
    best_single = max((r for r in results if r.name.startswith("single:")), key=lambda r: r.fit.score)
    curves = {
        f"blend ({picked.name}, {fit.space})": (fit.scores(S), fit.threshold),
        best_single.name: (
            oof.P[oof.runs.index(best_single.name.split(":", 1)[1])],
            best_single.fit.threshold,
        ),
    }
    return (
        plot_threshold_curves(out_dir / "threshold.png", y, curves, doc["metric"]),
        plot_weights(out_dir / "weights.png", doc["weights"], f"{picked.name} weights ({fit.space} space)"),
        write_json(out_dir / "blend.json", doc),
    )
