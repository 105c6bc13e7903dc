"""Synthetic projects for the blend and reliability tests: OOF files and run configs as `cv` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from aivh_ens.io import sha256_text

FOLD_SHA = sha256_text("folds/k5_s42_gpairs.csv")
N = 2000


def write_run(
    root: Path,
    name: str,
    prob: np.ndarray,
    *,
    y: np.ndarray | None = None,
    folds: np.ndarray | None = None,
    files: list[str] | None = None,
    fold_sha: str = FOLD_SHA,
    config: bool = True,
    prob_logit: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> None:
    """oof/<name>.csv and runs/<name>/config.json as the cv stage writes them (``prob_logit``: the TTA views
    averaged as logits; ``groups``: grouped folds' ``group`` column)."""
    n = len(prob)
    y = (np.arange(n) % 2 == 0).astype(int) if y is None else y  # pairs: row 2k AI, 2k+1 human
    folds = (np.arange(n) // 2) % 5 if folds is None else folds
    files = [f"train/{i:05d}.jpg" for i in range(n)] if files is None else files
    (root / "oof").mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"file_name": files, "label": y, "fold": folds, "prob": prob})
    if prob_logit is not None:
        df["prob_logit"] = prob_logit
    if groups is not None:
        df["group"] = groups
    df.to_csv(root / "oof" / f"{name}.csv", index=False)
    if config:
        cfg = {
            "name": name,
            "model": "resnet18",
            "fold_file": "folds/k5_s42_gpairs.csv",
            "fold_sha256": fold_sha,
        }
        (root / "runs" / name).mkdir(parents=True, exist_ok=True)
        (root / "runs" / name / "config.json").write_text(json.dumps(cfg))


def complementary(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Runs a and b are each sharp on one half of the images (a hidden source) and vague on the other;
    noise knows nothing. Together a and b are far better than either."""
    rng = np.random.default_rng(seed)
    sign = 2.0 * (np.arange(n) % 2 == 0) - 1.0
    half = rng.random(n) < 0.5
    logit = {
        "a": np.where(half, 3.0, 0.3) * sign + rng.normal(0, 1, n),
        "b": np.where(half, 0.3, 3.0) * sign + rng.normal(0, 1, n),
    }
    probs = {k: np.round(1 / (1 + np.exp(-v)), 6) for k, v in logit.items()}
    probs["noise"] = np.round(rng.random(n), 6)
    return probs


def make_project(root: Path, n: int = N) -> Path:
    for name, prob in complementary(n).items():
        write_run(root, name, prob)
    return root
