"""Fold properties, in the manner of scikit-learn's test_split.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aivh_ens.data.folds import assign_folds, ensure_fold_file, fold_file_name, make_fold_table
from aivh_ens.errors import UserError


def _table(n: int = 200, pos_rate: float = 0.5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < pos_rate).astype(np.int64)
    return pd.DataFrame({"file_name": [f"img_{i}.jpg" for i in range(n)], "label": labels})


def _pairs_table(n_pairs: int = 100) -> pd.DataFrame:
    # Kaggle layout: row 2k is AI (1), row 2k+1 its human twin (0).
    labels = np.tile([1, 0], n_pairs)
    return pd.DataFrame(
        {"file_name": [f"p{i // 2}_{i % 2}.jpg" for i in range(2 * n_pairs)], "label": labels}
    )


@pytest.mark.parametrize("group", [None, "pairs"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_row_validated_exactly_once_and_ratios_kept(k, group):
    table = _pairs_table(150) if group else _table(300, pos_rate=0.3)
    folds = make_fold_table(table, k, seed=7, group=group)
    assert sorted(folds["fold"].unique()) == list(range(k))
    assert (folds["fold"] >= 0).all() and len(folds) == len(table)
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 2 + (2 if group else 0)
    overall = table["label"].mean()
    for _, part in folds.groupby("fold"):
        assert abs(part["label"].mean() - overall) < 0.05


def test_pairs_never_split_across_folds():
    folds = make_fold_table(_pairs_table(200), 5, seed=1, group="pairs")
    per_group = folds.groupby("group")["fold"].nunique()
    assert (per_group == 1).all()
    assert (folds["group"].to_numpy() == np.arange(400) // 2).all()


def test_group_column_respected():
    table = _table(240)
    table["group"] = np.arange(240) % 37
    folds = make_fold_table(table, 4, seed=3, group="site")
    assert (folds.groupby("group")["fold"].nunique() == 1).all()


def test_random_kfold_would_split_pairs():
    # Why --group pairs exists: plain stratified k-fold puts twins in different folds.
    folds = make_fold_table(_pairs_table(200), 5, seed=1, group=None)
    split = (folds["fold"].to_numpy()[0::2] != folds["fold"].to_numpy()[1::2]).mean()
    assert split > 0.5


def test_same_seed_identical_file_and_other_seed_differs(tmp_path):
    table = _pairs_table(100)
    p1, sha1, _, created1 = ensure_fold_file(tmp_path / "a", table, 5, 42, "pairs")
    p2, sha2, _, _ = ensure_fold_file(tmp_path / "b", table, 5, 42, "pairs")
    p3, sha3, _, _ = ensure_fold_file(tmp_path / "c", table, 5, 43, "pairs")
    assert created1 and p1.name == "k5_s42_gpairs.csv"
    assert p1.read_bytes() == p2.read_bytes() and sha1 == sha2
    assert sha3 != sha1


def test_existing_fold_file_reused_and_mismatch_refused(tmp_path):
    table = _table(100)
    p, sha, _, created = ensure_fold_file(tmp_path, table, 5, 0, None)
    _, sha_again, _, created_again = ensure_fold_file(tmp_path, table, 5, 0, None)
    assert created and not created_again and sha == sha_again
    changed = table.copy()
    changed.loc[3, "label"] = 1 - changed.loc[3, "label"]
    with pytest.raises(UserError, match="different train.csv"):
        ensure_fold_file(tmp_path, changed, 5, 0, None)


@pytest.mark.parametrize(
    "k,labels,match", [(1, [0, 1] * 10, "at least 2"), (5, [0] * 20 + [1] * 3, "smallest class")]
)
def test_bad_fold_counts(k, labels, match):
    with pytest.raises(UserError, match=match):
        assign_folds(np.array(labels), k, seed=0)


def test_fold_file_names():
    assert fold_file_name(5, 42, None) == "k5_s42.csv"
    assert fold_file_name(3, 1, "pairs") == "k3_s1_gpairs.csv"
    assert fold_file_name(3, 1, "my col") == "k3_s1_gmy-col.csv"
