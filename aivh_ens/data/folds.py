"""Fold assignment: scikit-learn's StratifiedKFold / StratifiedGroupKFold, written once and shared.

Every run made with the same (k, seed, group) reads the same ``folds/k{K}_s{seed}[_g{group}].csv``, so their
out-of-fold predictions line up row for row and can be blended.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from aivh_ens.errors import UserError
from aivh_ens.io import sha256_file, write_csv
from aivh_ens.layout import folds_dir


def fold_file_name(k: int, seed: int, group: str | None) -> str:
    """``k5_s42.csv`` or ``k5_s42_gpairs.csv`` (the group name made folder-safe)."""
    suffix = f"_g{re.sub(r'[^A-Za-z0-9]+', '-', group)}" if group else ""
    return f"k{k}_s{seed}{suffix}.csv"


def group_labels(table: pd.DataFrame, group: str | None) -> np.ndarray | None:
    """Group id per row: None, ``pairs`` (row // 2, the Kaggle train.csv pairs) or the ``group`` column."""
    if group is None:
        return None
    if group == "pairs":
        return np.arange(len(table)) // 2
    if "group" not in table.columns:
        raise UserError(
            f"--group {group}: train.csv has no column {group!r} (use --group pairs or a column name)"
        )
    return pd.factorize(table["group"])[0]


def assign_folds(labels: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(N,) fold index in [0, k) per row: stratified by label, groups never split across folds."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=2)
    if k < 2:
        raise UserError(f"--folds must be at least 2 (got {k})")
    if counts.min() < k:
        raise UserError(
            f"--folds {k} is larger than the smallest class ({counts.min()} rows of label {counts.argmin()}); "
            f"use --folds {max(2, int(counts.min()))} or fewer"
        )
    fold = np.full(len(labels), -1, dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(labels)), labels)
    else:
        n_groups = len(np.unique(groups))
        if n_groups < k:
            raise UserError(f"--folds {k} is larger than the number of groups ({n_groups}); use fewer folds")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(labels)), labels, groups)
    for i, (_, val_idx) in enumerate(splits):
        fold[val_idx] = i
    assert (fold >= 0).all(), "every row gets exactly one validation fold"
    return fold


def group_splits(
    y: np.ndarray, groups: np.ndarray | None, k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` inner (train, test) index splits of rows ``y`` (N,): stratified, or whole groups dealt to random
    folds when ``groups`` (N,) is given (AI/human pairs are balanced by themselves; scikit-learn's
    StratifiedGroupKFold takes minutes for tens of thousands of groups)."""
    if groups is None:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(y, y))
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    fold_of = np.empty(inv.max() + 1, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(len(fold_of))] = np.arange(len(fold_of)) % k
    f = fold_of[inv]  # (N,) inner fold of each row
    return [(np.flatnonzero(f != j), np.flatnonzero(f == j)) for j in range(k)]


def make_fold_table(table: pd.DataFrame, k: int, seed: int, group: str | None) -> pd.DataFrame:
    """``file_name,label,fold[,group]`` for a validated train table."""
    groups = group_labels(table, group)
    out = pd.DataFrame({"file_name": table["file_name"], "label": table["label"].astype(np.int64)})
    out["fold"] = assign_folds(out["label"].to_numpy(), k, seed, groups)
    if groups is not None:
        out["group"] = groups
    return out


def read_fold_file(path: str | Path) -> pd.DataFrame:
    """Read and sanity-check a fold file."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"file_name": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"cannot read fold file {path}: {e}; delete it to have it rebuilt") from None
    missing = {"file_name", "label", "fold"} - set(df.columns)
    if missing:
        raise UserError(f"fold file {path} lacks columns {sorted(missing)}; delete it to have it rebuilt")
    return df


def ensure_fold_file(
    workdir: str | Path, table: pd.DataFrame, k: int, seed: int, group: str | None
) -> tuple[Path, str, pd.DataFrame, bool]:
    """Create ``folds/<name>.csv`` if missing, else check it still matches ``table``.

    Returns (path, sha256, fold table, created).
    """
    path = folds_dir(workdir) / fold_file_name(k, seed, group)
    created = False
    if path.exists():
        folds = read_fold_file(path)
        same = (
            len(folds) == len(table)
            and (folds["file_name"].to_numpy() == table["file_name"].to_numpy()).all()
            and (folds["label"].to_numpy() == table["label"].to_numpy()).all()
        )
        if not same:
            raise UserError(
                f"fold file {path} was made from a different train.csv (rows, order or labels differ); "
                f"delete it to rebuild it, or use another --seed (runs made from the old file can't be blended "
                f"with new ones)"
            )
    else:
        folds = make_fold_table(table, k, seed, group)
        write_csv(path, folds)
        created = True
    return path, sha256_file(path), folds, created
