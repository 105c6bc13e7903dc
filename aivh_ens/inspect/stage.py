"""The inspect stage: validate the tables, scan every image, run the audits, state the findings, write.

Writes ``runs/inspect/inspect.json`` and ``runs/inspect/report.html`` under the work dir, both atomically
and only after every check has run (bad input writes nothing).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aivh_ens import __version__
from aivh_ens.data import DEFAULT_TEST_CSV, DEFAULT_TRAIN_CSV, read_test_table, read_train_table
from aivh_ens.inspect import audit
from aivh_ens.inspect.scan import FEATURES, scan_images
from aivh_ens.io import write_json, write_text
from aivh_ens.layout import inspect_dir

__all__ = [
    "Audit",
    "Finding",
    "InspectResult",
    "audit_dataset",
    "format_findings",
    "run_inspect",
    "write_audit",
]

INSPECT_VERSION = 1
Log = Callable[[str], None]

# What a model learns from a feature family, and the flag that takes it away (or None: fix the data).
# What a model learns from a feature family, the flag that takes it away (None: fix the data), and why.
_FAMILIES = {
    "size": (
        ("width", "height", "aspect", "megapixels"),
        "image size (through resize artefacts) instead of generator traces",
        "--mode crop",
        "crop mode trains on native pixels, so a size difference no longer changes what the model sees",
    ),
    "compression": (
        ("format", "kbytes", "bytes_per_pixel", "jpeg_quality", "subsampling"),
        "the compression (format, quality, file size) instead of generator traces",
        "--jpeg-p 0.5",
        "JPEG re-compression in training makes the model less sensitive to how a file was compressed",
    ),
    "source": (
        ("mode", "exif", "icc"),
        "the capture pipeline (colour mode, EXIF, ICC) of each source",
        None,
        "the files come from other pipelines; check what test's sources are",
    ),
}


def _family(feature: str) -> tuple[str, str | None, str]:
    """(what a model would learn, the recommended flag, why it helps) for a feature."""
    return next((learn, flag, why) for feats, learn, flag, why in _FAMILIES.values() if feature in feats)


@dataclass(frozen=True)
class Finding:
    """One line of the summary.

    Attributes:
        key: a stable name (``shortcut``, ``shift``, ``pairs``, ``train_duplicates``, ...).
        level: ``warn`` (act on it), ``note`` (worth knowing) or ``ok`` (checked, nothing found).
        value: the finding's number (an AUC, a count, a share).
        message: the finding in words, with its numbers.
        flag: the recommended flag or action, if any.
    """

    key: str
    level: str
    value: float
    message: str
    flag: str | None = None


@dataclass(frozen=True)
class InspectResult:
    """What :func:`run_inspect` found and wrote (``doc`` is the content of inspect.json)."""

    doc: dict[str, Any]
    findings: tuple[Finding, ...]
    written: tuple[Path, ...]
    img_per_s: float


def format_findings(findings: tuple[Finding, ...] | list[Finding]) -> str:
    """One line per finding: level, message and the recommended flag."""
    return "\n".join(
        f"{f.level + ':':<6} {f.message}" + (f"  -> {f.flag}" if f.flag else "") for f in findings
    )


def _shortcut(train: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None) -> tuple[dict, Finding]:
    """The shortcut check: metadata against the label (cross-validated AUC, features by strength)."""
    auc = audit.cv_auc(audit.matrix(train), y, groups)
    strength = audit.feature_strength(train, y)
    doc = {"auc": auc, "threshold": audit.SHORTCUT_AUC, "features": strength.to_dict("records")}
    if not auc > audit.SHORTCUT_AUC:
        msg = f"file properties do not predict the label: cross-validated AUC {auc:.3f} from metadata alone"
        return doc, Finding("shortcut", "ok", auc, msg)
    top = strength.head(3)
    named = "; ".join(f"{r.feature} (AUC {r.auc:.2f}: {r.difference})" for r in top.itertuples())
    learn, flag, _ = _family(top.iloc[0]["feature"])
    msg = (
        f"labels can be predicted from file properties alone: cross-validated AUC {auc:.3f}; strongest: "
        f"{named}; a model would learn {learn}"
    )
    return doc, Finding("shortcut", "warn", auc, msg, flag or "fix the data: make both classes share it")


def _shift(train: pd.DataFrame, test: pd.DataFrame) -> tuple[dict, Finding]:
    """Adversarial validation: metadata separating test from train, and how the features differ."""
    both = pd.concat([train, test], ignore_index=True)
    is_test = np.r_[np.zeros(len(train), int), np.ones(len(test), int)]
    auc = audit.cv_auc(audit.matrix(both), is_test)
    table = audit.feature_shift(train, test)
    doc = {"auc": auc, "threshold": audit.SHIFT_AUC, "features": table.to_dict("records")}
    if not auc > audit.SHIFT_AUC:
        msg = f"test looks like train by its file properties: adversarial AUC {auc:.3f}"
        return doc, Finding("shift", "ok", auc, msg)
    top = table.head(3)
    named = "; ".join(f"{r.difference} ({r.kind.upper()} {r.distance:.2f})" for r in top.itertuples())
    _, flag, why = _family(top.iloc[0]["feature"])
    msg = (
        f"test differs from train: adversarial AUC {auc:.3f} (metadata tells them apart); most "
        f"different: {named}; expect validation scores to overstate the leaderboard; {why}"
    )
    return doc, Finding("shift", "warn", auc, msg, flag)


def _pairs_finding(p: audit.Pairs) -> Finding:
    """The pair-layout finding, with its shares."""
    facts = (
        f"{p.same_size:.0%} share a size, {p.close:.0%} are within {audit.PAIR_BITS} pHash bits (random "
        f"pairs: {p.close_random:.0%}), labels differ in {p.opposite_labels:.0%}"
    )
    if p.detected:
        msg = f"rows 2k and 2k+1 are {p.n_pairs} pairs of the same content ({facts}): random folds leak"
        return Finding("pairs", "warn", p.close, msg, "--group pairs")
    return Finding("pairs", "ok", p.close, f"no pair layout in rows 2k, 2k+1 ({facts})")


def _duplicate_findings(d: audit.Duplicates, n_test: int | None) -> list[Finding]:
    """The findings on copies within train and between test and train."""
    out = []
    conf = len(d.train_exact_conflicts)
    if d.train_exact:
        n = sum(len(g) for g in d.train_exact)
        msg = (
            f"{len(d.train_exact)} groups of byte-identical train images ({n} rows), {conf} of them with "
            f"conflicting labels; copies in different folds inflate validation"
        )
        fix = (
            "remove the conflicting rows from train.csv"
            if conf
            else "keep copies in one fold (--group COLUMN)"
        )
        out.append(Finding("train_duplicates", "warn", len(d.train_exact), msg, fix))
    else:
        out.append(Finding("train_duplicates", "ok", 0, "no byte-identical train images (sha256)"))
    if d.n_train_near:
        msg = (
            f"{d.n_train_near} near-duplicate train pairs (within {audit.NEAR_BITS} pHash bits, not "
            f"byte-identical), {d.train_near_conflicts} with conflicting labels"
        )
        out.append(
            Finding(
                "train_near_duplicates",
                "warn" if d.train_near_conflicts else "note",
                d.n_train_near,
                msg,
                "check them in report.html; keep them in one fold",
            )
        )
    if n_test is not None:
        if d.test_exact or d.n_test_near:
            msg = (
                f"train/test leak: {len(d.test_exact)} test images are byte-identical to train images and "
                f"{d.n_test_near} more are near-duplicates (within {audit.NEAR_BITS} pHash bits)"
            )
            out.append(
                Finding(
                    "test_leaks",
                    "warn",
                    len(d.test_exact) + d.n_test_near,
                    msg,
                    "their train labels are known: check them in report.html",
                )
            )
        else:
            out.append(
                Finding("test_leaks", "ok", 0, "no test image duplicates a train image (sha256, pHash)")
            )
    return out


def _read_tables(
    data: Path, train_csv: str, test_csv: str | None, file_col: str, label_col: str, id_col: str
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The validated tables (same checks and messages as cv); test only when its CSV exists or was named."""
    train = read_train_table(data, train_csv, file_col=file_col, label_col=label_col)
    if test_csv is None:
        test_csv = DEFAULT_TEST_CSV if (Path(data) / DEFAULT_TEST_CSV).is_file() else None
    test = read_test_table(data, test_csv, id_col=id_col) if test_csv else None
    return train, test


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and numpy scalars as Python ones (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _doc(
    data: Path,
    train: pd.DataFrame,
    test: pd.DataFrame | None,
    parts: dict[str, Any],
    findings: list[Finding],
    seconds: float,
    rate: float,
) -> dict[str, Any]:
    """The content of inspect.json (strict JSON: NaN as null)."""
    return _finite(
        {
            "version": INSPECT_VERSION,
            "aivh_ens": __version__,
            "data": str(Path(data).resolve()),
            "n_train": len(train),
            "n_test": None if test is None else len(test),
            "train_ai_rate": float(train["label"].mean()),
            "seconds": seconds,
            "img_per_s": rate,
            "features": list(FEATURES),
            **parts,
            "findings": [dataclasses.asdict(f) for f in findings],
        }
    )


@dataclass(frozen=True)
class Audit:
    """Everything the audits found, before anything is written (what :func:`audit_dataset` returns).

    Attributes:
        doc: the content of inspect.json.
        findings: one per check, in summary order.
        train_table, test_table: the validated tables (test None without test.csv).
        train, test: the scanned metadata, one row per image in table order.
        img_per_s: scanning speed.
    """

    doc: dict[str, Any]
    findings: tuple[Finding, ...]
    train_table: pd.DataFrame
    test_table: pd.DataFrame | None
    train: pd.DataFrame
    test: pd.DataFrame | None
    img_per_s: float


def audit_dataset(
    data: str | Path,
    *,
    train_csv: str = DEFAULT_TRAIN_CSV,
    test_csv: str | None = None,
    file_col: str = "file_name",
    label_col: str = "label",
    id_col: str = "id",
    jobs: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> Audit:
    """Validate the tables, scan every image and run every audit; writes nothing (see :func:`run_inspect`)."""
    t0 = time.perf_counter()
    data = Path(data)
    train_t, test_t = _read_tables(data, train_csv, test_csv, file_col, label_col, id_col)
    files = list(train_t["file_name"]) + ([] if test_t is None else list(test_t["id"]))
    meta, rate = scan_images(data, files, jobs=jobs, progress=progress, desc="inspect: scan", log=log)
    log(f"scanned {len(files)} images in {time.perf_counter() - t0:.1f}s ({rate:.0f} img/s)")
    train = meta.iloc[: len(train_t)].reset_index(drop=True)
    test = None if test_t is None else meta.iloc[len(train_t) :].reset_index(drop=True)
    y = train_t["label"].to_numpy()

    pair = audit.pairs(train, y)
    groups = np.arange(len(y)) // 2 if pair.detected else None
    shortcut_doc, shortcut = _shortcut(train, y, groups)
    findings = [shortcut]
    parts: dict[str, Any] = {"shortcut": shortcut_doc, "pairs": dataclasses.asdict(pair)}
    if test is not None and len(test) >= 5:
        parts["shift"], shift = _shift(train, test)
        findings.append(shift)
    findings.append(_pairs_finding(pair))
    dups = audit.duplicates(train, y, test, pair.detected)
    findings += _duplicate_findings(dups, None if test is None else len(test))
    parts["duplicates"] = _named_duplicates(dups, train_t, test_t)
    doc = _doc(data, train_t, test_t, parts, findings, time.perf_counter() - t0, rate)
    return Audit(doc, tuple(findings), train_t, test_t, train, test, rate)


def run_inspect(data: str | Path, workdir: str | Path = ".", **options: Any) -> InspectResult:
    """Audit a data set before training and write ``runs/inspect/inspect.json`` and ``report.html``.

    Args:
        data: the dataset folder (``--data``) holding the CSVs and images.
        workdir: project folder; results go to ``runs/inspect/``.
        **options: :func:`audit_dataset`'s keywords: ``train_csv``, ``test_csv`` (default ``test.csv`` when it
            exists), ``file_col``, ``label_col``, ``id_col``, ``jobs``, ``progress``, ``log``.

    Raises:
        UserError: a bad table or image (the same one-line messages as ``cv``); nothing is written.
    """
    return write_audit(audit_dataset(data, **options), data, workdir)


def write_audit(a: Audit, data: str | Path, workdir: str | Path = ".") -> InspectResult:
    """Write an :func:`audit_dataset` result as ``runs/inspect/inspect.json`` and ``report.html``."""
    from aivh_ens.inspect.html import inspect_page

    page = inspect_page(a.doc, Path(data), a.train_table, a.test_table, a.train, a.test)
    out = inspect_dir(workdir)
    written = (write_json(out / "inspect.json", a.doc), write_text(out / "report.html", page))
    return InspectResult(a.doc, a.findings, written, a.img_per_s)


def _named_duplicates(d: audit.Duplicates, train: pd.DataFrame, test: pd.DataFrame | None) -> dict[str, Any]:
    """The duplicates with file names instead of row numbers, for inspect.json."""
    tf = train["file_name"].tolist()
    sf = [] if test is None else test["id"].tolist()
    return {
        "train_exact": [[tf[i] for i in g] for g in d.train_exact],
        "train_exact_conflicts": [[tf[i] for i in g] for g in d.train_exact_conflicts],
        "train_near": [{"a": tf[i], "b": tf[j], "bits": b} for i, j, b in d.train_near],
        "n_train_near": d.n_train_near,
        "train_near_conflicts": d.train_near_conflicts,
        "test_exact": [{"test": sf[i], "train": tf[j]} for i, j in d.test_exact],
        "test_near": [{"test": sf[i], "train": tf[j], "bits": b} for i, j, b in d.test_near],
        "n_test_near": d.n_test_near,
    }
