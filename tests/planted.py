"""Small data sets in the Kaggle layout with planted problems, written in well under a second each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

Spec = Callable[[int, int, np.random.Generator], tuple[tuple[int, int], str, int]]


def _pixels(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth random content (a 4x4 colour grid upsampled, plus grain): every image its own pHash."""
    grid = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def save(path: Path, rgb: np.ndarray, fmt: str, quality: int) -> None:
    """Write ``rgb`` as JPEG (at ``quality``) or PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(rgb).save(path, fmt, **kw)


def _same(i: int, label: int, rng: np.random.Generator) -> tuple[tuple[int, int], str, int]:
    """Both classes from one distribution: size 40-72 px, JPEG quality 70-95."""
    return (int(rng.integers(40, 73)), int(rng.integers(40, 73))), "JPEG", int(rng.integers(70, 96))


def make(
    root: Path,
    n: int = 120,
    n_test: int = 40,
    train_spec: Spec = _same,
    test_spec: Spec = _same,
    seed: int = 0,
) -> Path:
    """A data set: ``n`` train rows with shuffled 0/1 labels and ``n_test`` test rows; specs choose each
    image's (size, format, quality) from (index, label, rng)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    rows = []
    for i, lab in enumerate(labels):
        (w, h), fmt, q = train_spec(i, int(lab), rng)
        name = f"train_data/{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        save(root / name, _pixels(rng, w, h), fmt, q)
        rows.append((name, int(lab)))
    pd.DataFrame(rows, columns=["file_name", "label"]).to_csv(root / "train.csv", index=False)
    ids = []
    for i in range(n_test):
        (w, h), fmt, q = test_spec(i, -1, rng)
        name = f"test_data_v2/{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        save(root / name, _pixels(rng, w, h), fmt, q)
        ids.append(name)
    pd.DataFrame({"id": ids}).to_csv(root / "test.csv", index=False)
    return root


def findings(audit) -> dict[str, object]:
    """{key: Finding} of an Audit."""
    return {f.key: f for f in audit.findings}
