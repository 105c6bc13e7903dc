"""The submit stage: every fold model of every blended run, TTA, the fitted blend -> ``submission.csv``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aivh_ens.blend.artifact import apply_blend, load_blend, oof_probs, rank_reference
from aivh_ens.blend.shift import (
    AUTO_RULE,
    ShiftDiagnosis,
    ThresholdChoice,
    ThresholdMode,
    choose_threshold,
    diagnose,
    parse_threshold,
)
from aivh_ens.data.tables import read_test_table
from aivh_ens.errors import UserError
from aivh_ens.infer.scores import PredictOptions, RunScores, run_test_scores
from aivh_ens.io import write_csv, write_json
from aivh_ens.layout import BLEND_DIR
from aivh_ens.score import resolve_device
from aivh_ens.score.runs import Log, RunInfo, check_run, fold_average, run_spec, view_average
from aivh_ens.score.tta import TTASpec, parse_tta

RATE_WARN = 0.15  # warn when the predicted AI rate differs from the training rate by more than this


@dataclass(frozen=True)
class SubmitResult:
    """What :func:`submit` wrote and what it predicted."""

    out: Path
    proba: Path | None
    n: int
    ai_rate: float  # share of label 1 in the submission
    train_rate: float  # share of label 1 in the OOF (training) labels
    warning: str | None
    space: str
    threshold: float  # the threshold applied to the test scores
    runs: list[RunScores]
    choice: ThresholdChoice | None = None  # the threshold mode, its threshold and why
    diagnosis: ShiftDiagnosis | None = None  # how far the test scores are from the OOF scores
    record: Path | None = None  # <out>.json: how the labels were cut
    oof_threshold: float | None = None  # the blend's threshold (blend.json)
    adapted_bn: bool = False  # whether the scores come from BatchNorm statistics re-estimated on the test set


def default_blend_path(workdir: str | Path) -> Path:
    return Path(workdir) / BLEND_DIR / "blend.json"


def _resolve_data(infos: Sequence[RunInfo], data: str | Path | None) -> Path:
    if data is not None:
        return Path(data)
    dirs = sorted({str(i.doc.get("data") or i.cfg.data) for i in infos})
    if len(dirs) > 1:
        raise UserError(
            f"the blended runs were trained on different data folders ({', '.join(dirs)}); "
            "pass --data DIR with the folder holding test.csv"
        )
    return Path(dirs[0])


def validate_submission(path: str | Path, ids: Sequence[str]) -> pd.DataFrame:
    """Check a submission file: columns ``id,label``, the test ids in order, labels 0/1; UserError if not."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != ["id", "label"]:
        raise UserError(f"{path}: expected columns id,label, got {','.join(df.columns)}")
    if len(df) != len(ids):
        raise UserError(f"{path}: {len(df)} rows, but the test table has {len(ids)}")
    if df["id"].tolist() != list(ids):
        missing = sorted(set(ids) - set(df["id"]))
        what = f"lacks id {missing[0]}" if missing else "has the ids in another order or repeated"
        raise UserError(f"{path} {what}; expected the ids of the test table, in its order")
    bad = ~df["label"].isin(["0", "1"])
    if bad.any():
        raise UserError(
            f"{path}: label {df['label'][bad].iloc[0]!r} of id {df['id'][bad].iloc[0]}; labels must be 0 or 1"
        )
    return df


def blended_runs(workdir: Path, blend_path: str | Path | None) -> tuple[dict[str, Any], list[RunInfo]]:
    """The checked blend document and its runs with weight > 0 (config, finished fold weights), made from the
    fold file the blend was fitted on."""
    bpath = Path(blend_path) if blend_path is not None else default_blend_path(workdir)
    doc = load_blend(bpath, workdir)  # also checks every run's config and OOF sha256
    names = [r["name"] for r in doc["runs"] if doc["weights"][r["name"]] > 0]
    infos = [check_run(workdir, n) for n in names]
    for info in infos:
        if info.doc.get("fold_sha256") != doc["fold_sha256"]:
            raise UserError(
                f"run {info.name} was re-trained on another fold file since {bpath} was fitted; "
                "re-fit with `aivh-ens blend`"
            )
    return doc, infos


def _write_submission(
    out_path: Path, ids: list[str], labels: np.ndarray, probs: np.ndarray | None
) -> Path | None:
    """``id,label`` (validated after writing), and ``id,prob`` beside it when ``probs`` is given."""
    write_csv(out_path, pd.DataFrame({"id": ids, "label": labels.astype(np.int64)}))
    try:
        validate_submission(out_path, ids)
    except UserError as e:  # our own output failed its check: a bug, never leave the file behind
        out_path.unlink(missing_ok=True)
        raise RuntimeError(f"the written submission failed validation: {e}") from e
    if probs is None:
        return None
    proba_path = out_path.with_name(f"{out_path.stem}_proba.csv")
    write_csv(proba_path, pd.DataFrame({"id": ids, "prob": probs}), float_format="%.8g")
    return proba_path


def _rate_warning(train_rate: float, ai_rate: float, choice: ThresholdChoice) -> str | None:
    """A warning when the predicted AI rate differs from the training rate by more than RATE_WARN."""
    if abs(ai_rate - train_rate) <= RATE_WARN:
        return None
    return (
        f"the predicted AI rate {ai_rate:.1%} differs from the training rate {train_rate:.1%} by more than "
        f"{RATE_WARN * 100:.0f} points (threshold {choice.threshold:.4f}, mode {choice.resolved}): read the "
        "shift diagnosis above before trusting this threshold"
    )


def oof_blend(workdir: Path, doc: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(blended OOF scores (N_oof,), OOF labels (N_oof,), {run: OOF probs}``): the blend applied to the rows
    it was fitted on, exactly as it is applied to test rows, each run's views averaged in the blend's space
    (:func:`aivh_ens.blend.artifact.oof_probs`); the third item is the rank-space reference."""
    ref = rank_reference(workdir, doc)
    first = workdir / doc["runs"][0]["oof"]
    y = pd.read_csv(first, usecols=["label"])["label"].to_numpy(dtype=np.int8)
    return apply_blend(doc, oof_probs(workdir, doc), ref)[0], y, ref


def _record(
    path: Path, doc: dict[str, Any], choice: ThresholdChoice, diag: ShiftDiagnosis, scores: list[RunScores],
    adapt_bn: str, ai_rate: float,
) -> Path:  # fmt: skip
    """``<out>.json``: how the labels were cut, so the submission can be reproduced."""
    return write_json(
        path,
        {
            "threshold_mode": choice.mode,
            "resolved_mode": choice.resolved,
            "threshold": choice.threshold,
            "reason": choice.reason,
            "oof_threshold": float(doc["threshold"]),
            "space": doc["space"],
            "method": doc["method"],
            "predicted_ai_share": ai_rate,
            "adapt_bn": adapt_bn,
            "tta": {s.name: s.tta for s in scores},
            "diagnosis": diag.to_dict(),
            "auto_rule": AUTO_RULE,
        },
    )


ADAPT_BN = ("off", "auto", "on")
"""``submit --adapt-bn`` (default ``off``): ``auto`` re-scores with AdaBN only when the diagnosis finds that
the scores themselves moved: the KS distance left after re-weighting exceeds what sampling alone reaches for
this many test images (:meth:`aivh_ens.blend.shift.ShiftDiagnosis.scores_moved`, the test ``auto`` uses).
In ``bench/bench_shift.py`` it recovered most of the ranking lost to upscaling and blur on CIFAKE, hurt under
a pure change of the AI share when forced on, and lowered the demo data's F1 (README)."""


def check_adapt_bn(value: str | bool) -> str:
    """``auto | on | off`` (True/False for on/off); UserError naming ``--adapt-bn`` otherwise."""
    v = (
        {True: "on", False: "off"}.get(value, value)
        if isinstance(value, bool)
        else str(value).strip().lower()
    )
    if v not in ADAPT_BN:
        raise UserError(f"adapt_bn={value!r} (--adapt-bn) must be one of {', '.join(ADAPT_BN)}")
    return v


DEFAULT_THRESHOLD = "auto"
"""``submit --threshold`` default: the mode with the smallest mean gap to the best threshold across the
shifted test sets of ``bench/bench_shift.py`` (README: "When the test set differs from train")."""


def _blended_test(
    workdir: Path,
    doc: dict[str, Any],
    infos: Sequence[RunInfo],
    specs: dict[str, TTASpec],
    test: tuple[Path, str, Sequence[str]],
    ref: dict[str, np.ndarray],
    o: PredictOptions,
    adapt: bool,
) -> tuple[list[RunScores], np.ndarray]:
    """Every run's test scores (cached, or predicted) and the blend of them (N,); ``test``: the data folder,
    its test CSV and the ids; ``ref``: the runs' OOF scores that rank blends place test scores among."""
    data_dir, test_csv, ids = test
    s = run_test_scores(
        workdir, infos, specs, data_dir, test_csv, ids, o.device, batch_size=o.batch_size, workers=o.workers,
        progress=o.progress, log=o.log, average=o.average, adapt_bn=adapt,
    )  # fmt: skip
    return s, apply_blend(doc, {r.name: fold_average(r.P, doc["space"]) for r in s}, ref)[0]


def fold_views(doc: dict[str, Any], runs: Sequence[RunScores], ref: dict[str, np.ndarray]) -> np.ndarray:
    """(V, N): the test rows scored as the OOF rows were, by one fold model per run: view v blends fold
    ``v % K`` of each run of K folds, V the most folds of any run. What the shift diagnosis compares with the
    OOF scores (:func:`aivh_ens.blend.shift.diagnose`)."""
    v = max(len(r.P) for r in runs)
    return np.stack([apply_blend(doc, {r.name: r.P[k % len(r.P)] for r in runs}, ref)[0] for k in range(v)])


def blend_test_scores(
    workdir: str | Path,
    *,
    data: str | Path | None = None,
    device: str | None = None,
    progress: bool = False,
    log: Log = print,
) -> pd.DataFrame:
    """The current blend's scores of the test images, ``id,prob`` in test.csv order: what ``submit --proba``
    writes with its defaults (each run's TTA, no AdaBN), from the runs' cached test scores where they exist;
    then ``fold<k>``: the blend of each run's fold k model alone (:func:`fold_views`), the scores of models
    that never trained on fold k's rows (fold-consistent pseudo-labels, :mod:`aivh_ens.train.pseudo`).

    Raises:
        UserError: as :func:`submit`, when the blend, its runs or the test table are missing or changed.
    """
    workdir = Path(workdir)
    doc, infos = blended_runs(workdir, None)
    specs = {i.name: run_spec(i, None, log) for i in infos}
    data_dir = _resolve_data(infos, data)
    cfg0 = infos[0].cfg
    ids = read_test_table(data_dir, cfg0.test_csv, id_col=cfg0.id_col)["id"].tolist()
    o = PredictOptions(
        resolve_device(device or "auto"), None, None, progress, log, view_average(doc["space"]), False
    )
    ref = oof_blend(workdir, doc)[2]
    s, probs = _blended_test(workdir, doc, infos, specs, (data_dir, cfg0.test_csv, ids), ref, o, False)
    folds = {f"fold{k}": p for k, p in enumerate(fold_views(doc, s, ref))}  # (N,) each
    return pd.DataFrame({"id": ids, "prob": probs, **folds})


def _scored_test(
    workdir: Path,
    doc: dict[str, Any],
    infos: Sequence[RunInfo],
    specs: dict[str, TTASpec],
    data_dir: Path,
    test_csv: str,
    ids: Sequence[str],
    oof: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]],
    bn: str,
    o: PredictOptions,
) -> tuple[list[RunScores], np.ndarray, ShiftDiagnosis, bool]:
    """The runs' test scores, the blended test scores (N,), their shift diagnosis and whether AdaBN made them:
    ``bn`` on always, auto when the first diagnosis finds the scores moved (a second pass), off never."""
    oof_scores, y, ref = oof

    def scored(adapt: bool) -> tuple[list[RunScores], np.ndarray, ShiftDiagnosis]:
        s, p = _blended_test(workdir, doc, infos, specs, (data_dir, test_csv, ids), ref, o, adapt)
        return s, p, diagnose(oof_scores, y, p, float(doc["threshold"]), test_views=fold_views(doc, s, ref))

    adapted = bn == "on"
    scores, probs, diag = scored(adapted)
    if bn == "auto" and diag.scores_moved():
        o.log(
            f"the test scores moved (KS {diag.ks_label_shift:.3f} > {diag.ks_critical():.3f} after re-weighting, "
            f"what sampling alone reaches for {diag.n_test} images): scoring "
            "again with BatchNorm statistics re-estimated on the test images (--adapt-bn auto; off: --adapt-bn off)"
        )
        adapted = True
        scores, probs, diag = scored(True)
    return scores, probs, diag, adapted


def submit(
    workdir: str | Path = ".",
    *,
    blend_path: str | Path | None = None,
    data: str | Path | None = None,
    tta: str | None = None,
    out: str | Path | None = None,
    proba: bool = False,
    threshold: str | ThresholdMode = DEFAULT_THRESHOLD,
    adapt_bn: str | bool = "off",
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> SubmitResult:
    """Predict the test set with every run of a fitted blend and write the submission.

    Args:
        workdir: project folder holding runs/ and oof/.
        blend_path: the blend file (default ``runs/blend/blend.json``).
        data: dataset folder with test.csv and the images (default: the folder the runs were trained on).
        tta: TTA spec for every run (see :mod:`aivh_ens.score.tta`); default each run's recipe default.
        out: submission path (default ``<workdir>/submission.csv``); ``<out stem>.json`` records the cut.
        proba: also write the blended scores, ``id,prob``, to ``<out stem>_proba.csv``.
        threshold: ``oof | share:P | prior:P | auto | <number>`` (:mod:`aivh_ens.blend.shift`).
        adapt_bn: ``on``: re-estimate BatchNorm statistics of every fold model on the test images (AdaBN);
            ``auto``: only when the shift diagnosis finds the scores moved (:data:`ADAPT_BN`); ``off``.
        device, batch_size, workers: inference settings (default auto, the run's eval batch, per device).

    Raises:
        UserError: a bad TTA spec or threshold mode, a blend whose runs, fold weights or OOF files are
            missing or changed, a missing or invalid test table, or an unreadable test image; all found
            before anything is written.
    """
    workdir = Path(workdir)
    mode = parse_threshold(threshold)
    bn = check_adapt_bn(adapt_bn)
    forced = parse_tta(tta) if tta is not None else None
    doc, infos = blended_runs(workdir, blend_path)
    specs = {i.name: run_spec(i, forced, log) for i in infos}
    data_dir = _resolve_data(infos, data)
    cfg0 = infos[0].cfg
    ids = read_test_table(data_dir, cfg0.test_csv, id_col=cfg0.id_col)["id"].tolist()
    dev = resolve_device(device or "auto")
    out_path = Path(out) if out is not None else workdir / "submission.csv"
    oof_scores, y, ref = oof_blend(workdir, doc)

    scores, probs, diag, adapted = _scored_test(
        workdir, doc, infos, specs, data_dir, cfg0.test_csv, ids, (oof_scores, y, ref), bn,
        PredictOptions(dev, batch_size, workers, progress, log, view_average(doc["space"]), False),
    )  # fmt: skip
    choice = choose_threshold(mode, oof_scores, y, probs, float(doc["threshold"]), doc["metric"], diag)
    labels = (probs >= choice.threshold).astype(np.int64)

    proba_path = _write_submission(out_path, ids, labels, probs if proba else None)
    train_rate, ai_rate = float(np.mean(y)), float(labels.mean())
    record = _record(out_path.with_suffix(".json"), doc, choice, diag, scores, f"{bn} -> {adapted}", ai_rate)
    return SubmitResult(
        out_path, proba_path, len(ids), ai_rate, train_rate, _rate_warning(train_rate, ai_rate, choice), doc["space"],
        choice.threshold, scores, choice, diag, record, float(doc["threshold"]), adapted,
    )  # fmt: skip
