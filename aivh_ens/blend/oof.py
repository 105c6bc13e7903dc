"""Read and cross-check the OOF files of one or more runs (``oof/<run>.csv`` + each run's config.json)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from aivh_ens import layout
from aivh_ens.errors import UserError
from aivh_ens.io import sha256_file

if TYPE_CHECKING:
    pass


OOF_COLUMNS: tuple[str, ...] = ("file_name", "label", "fold", "prob")
"""Every OOF file has these; runs trained on grouped folds (``--group``) add ``group``, fine-tuned runs scored through
several TTA views add ``prob_logit`` (the views averaged as logits, as submit averages them for logit blends)."""


@dataclass(frozen=True)
class OOFSet:
    """The validated OOF predictions of M runs over the same N rows."""

    workdir: Path
    runs: tuple[str, ...]
    file_names: np.ndarray  # (N,) str
    y: np.ndarray  # (N,) int8 labels
    folds: np.ndarray  # (N,) int64
    P: np.ndarray  # (M, N) float64 probs, each row's TTA views averaged as probabilities
    fold_file: str
    fold_sha256: str
    oof_sha256: tuple[str, ...]
    groups: np.ndarray | None = None  # (N,) group of each row (grouped folds), else None
    P_logit: np.ndarray | None = None  # (M, N) the same with the views averaged as logits (P where one view)
    pseudo: dict[str, str] = field(default_factory=dict)  # {run: layout.pseudo_kind} of pseudo-labelled runs


def _run_names(oof_dir: Path, runs: Sequence[str] | None) -> list[str]:
    available = sorted(p.stem for p in oof_dir.glob("*.csv") if not p.name.startswith("."))
    if runs is None:
        if not available:
            raise UserError(
                f"no OOF files in {oof_dir}; train runs first with `aivh-ens cv --model NAME --folds K`"
            )
        names = available
    else:
        names = [r.strip() for r in runs if r.strip()]
        dupes = sorted({r for r in names if names.count(r) > 1})
        if dupes:
            raise UserError(f"--runs lists {', '.join(dupes)} more than once; list each run once")
        for r in names:
            if r not in available:
                raise UserError(
                    f"run {r!r} has no OOF file {oof_dir / (r + '.csv')}; available runs: "
                    f"{', '.join(available) or 'none'} (a run's OOF appears when all its folds are done)"
                )
    return names


def _read_oof(run: str, path: Path) -> pd.DataFrame:
    rerun = f"re-train the run (`aivh-ens cv --name {run} --force ...`) or leave it out with --runs"
    try:
        df = pd.read_csv(path, dtype={"file_name": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"oof/{run}.csv is not a readable CSV ({e}); {rerun}") from e
    missing = [c for c in OOF_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(
            f"oof/{run}.csv lacks column(s) {', '.join(missing)}; expected {','.join(OOF_COLUMNS)}"
        )
    if df.empty:
        raise UserError(f"oof/{run}.csv has no rows; {rerun}")

    def first_bad(bad: np.ndarray, what: str) -> None:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(
                f"oof/{run}.csv has {int(bad.sum())} row(s) with {what} (first: line {i + 2}, "
                f"file_name {df['file_name'].iloc[i]!r}); {rerun}"
            )

    prob = pd.to_numeric(df["prob"], errors="coerce").to_numpy(dtype=np.float64)
    first_bad(np.isnan(prob), "a missing or NaN prob")
    first_bad((prob < 0) | (prob > 1), "a prob outside [0, 1]")
    prob_logit = prob  # one view, or a run written before views were averaged both ways
    if "prob_logit" in df.columns:
        prob_logit = pd.to_numeric(df["prob_logit"], errors="coerce").to_numpy(dtype=np.float64)
        first_bad(np.isnan(prob_logit) | (prob_logit < 0) | (prob_logit > 1), "a prob_logit outside [0, 1]")
    for col in ("label", "fold"):
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        first_bad(~np.isfinite(v) | (v != np.round(v)), f"a non-integer {col}")
    first_bad(~df["label"].isin([0, 1]).to_numpy(), "a label other than 0 or 1")
    first_bad(df["file_name"].isna().to_numpy(), "an empty file_name")
    out = pd.DataFrame(
        {
            "file_name": df["file_name"].astype(str).to_numpy(dtype=object),
            "label": df["label"].to_numpy(dtype=np.int8),
            "fold": df["fold"].to_numpy(dtype=np.int64),
            "prob": prob,
            "prob_logit": prob_logit,
        }
    )
    if "group" in df.columns:
        out["group"] = df["group"].astype(str).to_numpy(dtype=object)
    return out


def _read_config(workdir: Path, run: str) -> dict[str, Any]:
    cfg = layout.read_run_doc(
        workdir,
        run,
        missing_hint=f"it has oof/{run}.csv, so the fold file it was made from is unknown; restore runs/{run}/ "
        f"or re-train with `aivh-ens cv --name {run}`",
    )
    if not isinstance(cfg.get("fold_sha256"), str):
        raise UserError(f"runs/{run}/config.json has no fold_sha256; it must record the fold file's sha256")
    return cfg


def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.flatnonzero(a != b)[0])


def _reference_fold_file(names: Sequence[str], configs: Mapping[str, dict[str, Any]]) -> tuple[str, str, str]:
    """``(run, fold file, sha256)`` of the fold file most runs share; a UserError names the first run that
    was made from another one."""
    shas = [configs[r]["fold_sha256"] for r in names]
    ref_sha = max(dict.fromkeys(shas), key=shas.count)
    ref = names[shas.index(ref_sha)]
    ref_file = configs[ref].get("fold_file", "?")
    for r in names:
        if configs[r]["fold_sha256"] != ref_sha:
            raise UserError(
                f"run {r!r} was made from fold file {configs[r].get('fold_file', '?')} "
                f"(sha256 {configs[r]['fold_sha256'][:12]}) but {ref!r} from {ref_file} (sha256 {ref_sha[:12]}); "
                f"blend only runs made from the same fold file: re-train {r} on {ref_file} or leave it out with --runs"
            )

    return ref, str(ref_file), ref_sha


def _check_same_rows(frames: Mapping[str, pd.DataFrame], ref: str) -> None:
    """Every run lists the reference run's rows (file, label, fold) in its order."""
    base = frames[ref]
    fix = (
        "every run must list the fold file's rows in its order; re-train {} on that fold file or leave it out"
    )
    for r, df in frames.items():
        if len(df) != len(base):
            raise UserError(
                f"oof/{r}.csv has {len(df)} rows but oof/{ref}.csv has {len(base)}; " + fix.format(r)
            )
        for col in ("file_name", "label", "fold"):
            a, b = df[col].to_numpy(), base[col].to_numpy()
            if not np.array_equal(a, b):
                i = _first_diff(a, b)
                raise UserError(
                    f"oof/{r}.csv differs from oof/{ref}.csv in {col} at line {i + 2} ({a[i]!r} vs {b[i]!r}); "
                    + fix.format(r)
                )


def load_oof(workdir: str | Path, runs: Sequence[str] | None = None) -> OOFSet:
    """Read and cross-check the OOF files of ``runs`` (default: every ``oof/*.csv``) before any work.

    Raises:
        UserError: no run, an unreadable file, NaN or out-of-range probabilities, a missing
            run config, runs made from different fold files, or rows/labels/folds that differ between runs.
    """
    workdir = Path(workdir)
    names = _run_names(layout.oof_dir(workdir), runs)
    frames = {r: _read_oof(r, layout.oof_path(workdir, r)) for r in names}
    configs = {r: _read_config(workdir, r) for r in names}

    ref, ref_file, ref_sha = _reference_fold_file(names, configs)
    base = frames[ref]
    _check_same_rows(frames, ref)
    y = base["label"].to_numpy(dtype=np.int8)
    if y.min() == y.max():
        raise UserError(f"every label in oof/{ref}.csv is {int(y[0])}; tuning a threshold needs both classes")
    folds = base["fold"].to_numpy(dtype=np.int64)
    if len(np.unique(folds)) < 2:
        raise UserError(
            f"oof/{ref}.csv has a single fold; nested CV needs at least two (make folds with --folds K)"
        )
    return OOFSet(
        workdir=workdir,
        runs=tuple(names),
        file_names=base["file_name"].to_numpy(),
        y=y,
        folds=folds,
        P=np.ascontiguousarray(np.stack([frames[r]["prob"].to_numpy() for r in names])),
        fold_file=ref_file,
        fold_sha256=ref_sha,
        oof_sha256=tuple(sha256_file(layout.oof_path(workdir, r)) for r in names),
        groups=base["group"].to_numpy() if "group" in base.columns else None,
        P_logit=np.ascontiguousarray(np.stack([frames[r]["prob_logit"].to_numpy() for r in names])),
        pseudo={r: k for r in names if (k := layout.pseudo_kind(configs[r])) is not None},
    )
