"""The audits over scanned metadata: shortcut check, adversarial validation, pairs, duplicates.

Pure computation on the tables :func:`aivh_ens.inspect.scan.scan_images` returns (no file access), so each
audit is testable on a hand-made table. The classifier is scikit-learn's ``HistGradientBoostingClassifier``
(missing values and categories handled natively), scored by cross-validated ROC AUC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from aivh_ens.inspect.scan import CATEGORICAL, FEATURES, NUMERIC, UNITS, hamming
from aivh_ens.metrics import roc_auc

__all__ = [
    "NEAR_BITS",
    "PAIR_BITS",
    "SHIFT_AUC",
    "SHORTCUT_AUC",
    "Duplicates",
    "Pairs",
    "cv_auc",
    "duplicates",
    "feature_strength",
    "feature_shift",
    "matrix",
    "pairs",
]

SHORTCUT_AUC = 0.6  # metadata predicting the label above this is a shortcut a model can take
SHIFT_AUC = 0.7  # metadata telling test from train above this is a shift to plan for
NEAR_BITS = 4  # pHash bits (of 64) within which two images count as near-duplicates
PAIR_BITS = 12  # pHash bits within which rows 2k and 2k+1 count as the same content
_FOLDS = 5
# Ties in strength go to the cause before its effects: a format decides the quality field and file size.
_PRIORITY = (
    "format",
    "mode",
    "subsampling",
    "jpeg_quality",
    "width",
    "height",
    "megapixels",
    "aspect",
    "exif",
    "icc",
    "kbytes",
    "bytes_per_pixel",
)
# Below this many rows one OpenMP thread is faster: on a shared machine the threads of a small fit spend
# their time waiting for each other (16 s instead of 1 s for five 500-row fits on 2 busy cores).
_ONE_THREAD_ROWS = 50_000
_MAX_LISTED = 200  # duplicate pairs kept in inspect.json


def matrix(meta: pd.DataFrame) -> np.ndarray:
    """(N, F) float features for :func:`cv_auc`: categories as integer codes, in :data:`FEATURES` order."""
    cols = [meta[c].astype(np.float64).to_numpy() for c in NUMERIC]
    for c in CATEGORICAL:
        codes = pd.Categorical(meta[c].astype(str)).codes.astype(np.float64)
        cols.append(np.where(codes < 0, np.nan, codes))
    return np.column_stack(cols)


def cv_auc(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> float:
    """Cross-validated ROC AUC of gradient boosting predicting ``y`` (N,) from ``X`` (N, F).

    Out-of-fold probabilities from 5 stratified folds (grouped when ``groups`` is given, so the two rows of a
    pair never sit on both sides), scored together. NaN when a class has fewer than 5 rows.
    """
    y = np.asarray(y).astype(int)
    if min(np.bincount(y, minlength=2)) < _FOLDS:
        return float("nan")
    cat = np.array([f in CATEGORICAL for f in FEATURES])
    model = HistGradientBoostingClassifier(
        categorical_features=cat, max_iter=200, early_stopping=True, random_state=seed
    )
    if groups is None:
        cv: Any = StratifiedKFold(_FOLDS, shuffle=True, random_state=seed)
    else:
        cv = StratifiedGroupKFold(_FOLDS, shuffle=True, random_state=seed)
    with threadpool_limits(1 if len(y) < _ONE_THREAD_ROWS else None, user_api="openmp"):
        p = cross_val_predict(model, X, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    return roc_auc(y, p)


_SIZE_WORDS = {"width": "width", "height": "height", "megapixels": "area"}


def _describe(feature: str, a: pd.Series, b: pd.Series, names: tuple[str, str]) -> str:
    """How ``feature`` differs between two sets, in words: medians for numbers, shares for categories."""
    if feature in CATEGORICAL:
        top = pd.concat([a, b]).astype(str).value_counts().index[0]
        sa, sb = (a.astype(str) == top).mean(), (b.astype(str) == top).mean()
        return f"{feature} {top} in {sa:.0%} of {names[0]} vs {sb:.0%} of {names[1]}"
    if feature in ("exif", "icc"):
        return f"{feature.upper()} present in {a.mean():.0%} of {names[0]} vs {b.mean():.0%} of {names[1]}"
    xa, xb = a.to_numpy(float), b.to_numpy(float)
    xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    if not len(xa) or not len(xb):
        sa, sb = len(xa) / max(1, len(a)), len(xb) / max(1, len(b))
        return f"{feature} known for {sa:.0%} of {names[0]} vs {sb:.0%} of {names[1]} images"
    ma, mb = float(np.median(xa)), float(np.median(xb))
    unit = UNITS[feature]
    if ma == mb:
        return f"{names[0]} and {names[1]} images share the median {feature}: {ma:.4g} {unit}"
    if feature in _SIZE_WORDS:
        word = "larger" if ma > mb else "smaller"
        return f"{names[0]} images are {word}: median {_SIZE_WORDS[feature]} {ma:.4g} vs {mb:.4g} {unit}"
    word = "higher" if ma > mb else "lower"
    return f"{names[0]} images have {word} {feature}: median {ma:.4g} vs {mb:.4g} {unit}"


def feature_strength(meta: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
    """Each feature alone against the label: its AUC, folded to >= 0.5, and the difference in words.

    A number is scored as it is (NaN lowest); a category by its share of label 1 (the best any model can do
    with that feature alone). Sorted strongest first.
    """
    y = np.asarray(y).astype(bool)
    rows = []
    for f in FEATURES:
        col = meta[f]
        if f in CATEGORICAL:
            score = (
                col.astype(str).map(pd.Series(y).groupby(col.astype(str).to_numpy()).mean()).to_numpy(float)
            )
        else:
            score = np.nan_to_num(col.to_numpy(float), nan=-1e12)
        auc = roc_auc(y, score)
        auc = max(auc, 1 - auc) if np.isfinite(auc) else 0.5
        rows.append({"feature": f, "auc": auc, "difference": _describe(f, col[y], col[~y], ("AI", "human"))})
    return _strongest_first(pd.DataFrame(rows), "auc")


def feature_shift(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Each feature's distance between train and test, largest first.

    Numbers: the two-sample Kolmogorov-Smirnov statistic (``ks``); categories: the total variation distance
    of their shares (``tv``, the KS statistic's analogue without an order). Both lie in [0, 1].
    """
    rows = []
    for f in FEATURES:
        a, b = train[f], test[f]
        if f in CATEGORICAL:
            pa, pb = a.astype(str).value_counts(normalize=True), b.astype(str).value_counts(normalize=True)
            dist, kind = 0.5 * float(pa.sub(pb, fill_value=0).abs().sum()), "tv"
        else:
            xa, xb = a.to_numpy(float), b.to_numpy(float)
            xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
            dist = float(ks_2samp(xa, xb).statistic) if len(xa) and len(xb) else float(len(xa) != len(xb))
            kind = "ks"
        rows.append(
            {
                "feature": f,
                "distance": dist,
                "kind": kind,
                "difference": _describe(f, b, a, ("test", "train")),
            }
        )
    return _strongest_first(pd.DataFrame(rows), "distance")


def _strongest_first(table: pd.DataFrame, col: str) -> pd.DataFrame:
    """Rows by ``col`` descending (to 3 decimals), ties in :data:`_PRIORITY` order."""
    key = pd.DataFrame({"v": -table[col].round(3), "p": table["feature"].map(_PRIORITY.index)})
    return table.loc[key.sort_values(["v", "p"]).index].reset_index(drop=True)


@dataclass(frozen=True)
class Pairs:
    """The pair-layout check on rows (2k, 2k+1).

    Attributes:
        n_pairs: number of row pairs checked.
        same_size: share of pairs whose two images have the same width and height.
        close: share of pairs within :data:`PAIR_BITS` pHash bits.
        close_random: the same share for random pairings of the rows (what chance gives).
        opposite_labels: share of pairs whose labels differ.
        detected: whether the rows come in pairs of the same content.
    """

    n_pairs: int
    same_size: float
    close: float
    close_random: float
    opposite_labels: float
    detected: bool


def pairs(meta: pd.DataFrame, y: np.ndarray, seed: int = 0) -> Pairs:
    """Whether rows 2k and 2k+1 show the same content: same size and a close perceptual hash, well above
    what random pairings of the same rows give."""
    n = len(meta) // 2
    if n < 2:
        return Pairs(n, 0.0, 0.0, 0.0, 0.0, False)
    h = meta["phash"].to_numpy(np.uint64)
    w, hh = meta["width"].to_numpy(), meta["height"].to_numpy()
    a, b = np.arange(n) * 2, np.arange(n) * 2 + 1
    same = float(np.mean((w[a] == w[b]) & (hh[a] == hh[b])))
    close = float(np.mean(hamming(h[a], h[b]) <= PAIR_BITS))
    perm = np.random.default_rng(seed).permutation(2 * n)
    close_random = float(np.mean(hamming(h[perm[a]], h[perm[b]]) <= PAIR_BITS))
    y = np.asarray(y)
    opposite = float(np.mean(y[a] != y[b]))
    detected = same >= 0.9 and close >= 0.5 and close >= close_random + 0.3
    return Pairs(n, same, close, close_random, opposite, detected)


@dataclass(frozen=True)
class Duplicates:
    """Exact (sha256) and near (pHash) duplicates.

    Attributes:
        train_exact: groups of train rows with identical bytes (lists of row numbers, >= 2 each).
        train_exact_conflicts: those groups whose labels differ.
        train_near: train row pairs ``(i, j, bits)`` within :data:`NEAR_BITS`, not byte-identical and not a
            detected pair (2k, 2k+1); at most 200 listed, ``n_train_near`` counts all.
        train_near_conflicts: how many of all those pairs have different labels.
        test_exact: ``(test row, train row)`` with identical bytes.
        test_near: ``(test row, train row, bits)`` within :data:`NEAR_BITS`, not byte-identical; at most
            200 listed, ``n_test_near`` counts all (each test row once, its closest train row).
    """

    train_exact: list[list[int]]
    train_exact_conflicts: list[list[int]]
    train_near: list[tuple[int, int, int]]
    n_train_near: int
    train_near_conflicts: int
    test_exact: list[tuple[int, int]]
    test_near: list[tuple[int, int, int]]
    n_test_near: int


def _same_key_pairs(ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """(K, 2) int64 every ``(i, j)`` with ``ka[i] == kb[j]``, by one sort of ``kb``."""
    order = np.argsort(kb, kind="stable")
    sorted_kb = kb[order]
    lo = np.searchsorted(sorted_kb, ka, "left")
    counts = np.searchsorted(sorted_kb, ka, "right") - lo  # (len(a),) matches per row of a
    i = np.repeat(np.arange(len(ka)), counts)
    offsets = np.arange(len(i)) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.column_stack([i, order[np.repeat(lo, counts) + offsets]])


def _near(a: np.ndarray, b: np.ndarray, bits: int, upper: bool) -> np.ndarray:
    """(K, 3) int64 ``(i, j, distance)`` of hash pairs within ``bits``; ``upper``: a is b, keep i < j only.

    Multi-index hashing: cut the 64 bits into ``bits + 1`` bands; two hashes within ``bits`` agree exactly on
    at least one band (pigeonhole), so only pairs that share a band are compared. For 80,000 images that is
    a few million comparisons instead of 3.2 billion (the brute force took 4 s for 20,000).
    """
    edges = np.linspace(0, 64, bits + 2).astype(np.uint64)  # bits + 1 bands of 12-13 bits
    found = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        found.append(_same_key_pairs((a >> lo) & mask, (b >> lo) & mask))
    cand = np.concatenate(found)
    if upper:
        cand = cand[cand[:, 1] > cand[:, 0]]
    d = hamming(a[cand[:, 0]], b[cand[:, 1]])
    cand = cand[d <= bits]  # first: most candidates are far apart, and np.unique is the slow step
    code = np.unique(cand[:, 0] * len(b) + cand[:, 1])  # a pair found in several bands once, by (i, j)
    i, j = code // len(b), code % len(b)
    return np.column_stack([i, j, hamming(a[i], b[j]).astype(np.int64)])


def duplicates(
    train: pd.DataFrame, y: np.ndarray, test: pd.DataFrame | None, pair_layout: bool
) -> Duplicates:
    """Exact and near duplicates within train (with label conflicts) and between test and train."""
    y = np.asarray(y)
    groups = [list(map(int, g)) for g in train.groupby("sha256").indices.values() if len(g) > 1]
    groups.sort()
    conflicts = [g for g in groups if len(set(y[g])) > 1]
    h, sha = train["phash"].to_numpy(np.uint64), train["sha256"].to_numpy()
    near = _near(h, h, NEAR_BITS, upper=True)
    near = near[sha[near[:, 0]] != sha[near[:, 1]]]
    if pair_layout:  # the two rows of a pair are near-duplicates with opposite labels by design
        near = near[~(near[:, 0] // 2 == near[:, 1] // 2)]
    near_conf = int(np.sum(y[near[:, 0]] != y[near[:, 1]]))
    test_exact: list[tuple[int, int]] = []
    test_near = np.zeros((0, 3), np.int64)
    if test is not None and len(test):
        first = {s: int(g[0]) for s, g in train.groupby("sha256").indices.items()}
        test_exact = [(i, first[s]) for i, s in enumerate(test["sha256"]) if s in first]
        tn = _near(test["phash"].to_numpy(np.uint64), h, NEAR_BITS, upper=False)
        tn = tn[test["sha256"].to_numpy()[tn[:, 0]] != sha[tn[:, 1]]]
        tn = tn[np.lexsort((tn[:, 2], tn[:, 0]))]
        test_near = tn[np.r_[True, tn[1:, 0] != tn[:-1, 0]]] if len(tn) else tn  # closest per test row
    return Duplicates(
        train_exact=groups,
        train_exact_conflicts=conflicts,
        train_near=[tuple(map(int, r)) for r in near[:_MAX_LISTED]],
        n_train_near=len(near),
        train_near_conflicts=near_conf,
        test_exact=test_exact,
        test_near=[tuple(map(int, r)) for r in test_near[:_MAX_LISTED]],
        n_test_near=len(test_near),
    )
