"""Generate a folder of photo-sized JPEGs (noise textures) in the Kaggle layout, for the loader benchmarks.

Run: ``python bench/make_jpegs.py [--n 2000] [--width 768] [--height 512] [--out DIR]``.

Each image is a smooth random colour field (a few octaves of upsampled noise: large structures like a
photo's) plus fine grain, saved as JPEG quality 90, so decoding costs what a real 768x512 photo costs. The
folder gets ``train.csv`` (``file_name,label``). A set is made once per (n, size, seed) under
``/tmp/aivh-ens-bench/`` and reused by later runs (a ``done`` marker says it is complete).

``--smoke`` (for the test suite): 16 images into a temporary folder, then the line
``bench jpegs: <n> JPEGs WxH in <seconds>s = <images/s> img/s``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

BENCH_ROOT = Path(tempfile.gettempdir()) / "aivh-ens-bench"
_DONE = "done"


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: octaves of upsampled noise (1/f-like structure) plus per-pixel grain.

    The octaves are summed at quarter resolution and upsampled once; the grain is a random window of a
    shared noise tile. Cheap to make (a few ms), as costly to decode as a photo of the same size.
    """
    qh, qw = max(2, h // 4), max(2, w // 4)
    field = np.zeros((qh, qw, 3), np.float32)
    for cells, amp in ((4, 0.45), (16, 0.25), (48, 0.15)):
        small = rng.normal(0, 1, (max(2, cells * h // w), cells, 3)).astype(np.float32)
        field += amp * cv2.resize(small, (qw, qh), interpolation=cv2.INTER_CUBIC)
    img = cv2.resize(128 + 60 * field, (w, h), interpolation=cv2.INTER_LINEAR)
    tile = _grain_tile(h, w)
    y, x = int(rng.integers(0, tile.shape[0] - h + 1)), int(rng.integers(0, tile.shape[1] - w + 1))
    return np.clip(img + tile[y : y + h, x : x + w], 0, 255).astype(np.uint8)


_TILES: dict[tuple[int, int], np.ndarray] = {}


def _grain_tile(h: int, w: int) -> np.ndarray:
    key = (h, w)
    if key not in _TILES:
        _TILES[key] = np.random.default_rng(12345).normal(0, 8, (h + 64, w + 64, 3)).astype(np.float32)
    return _TILES[key]


def _write_one(out: Path, i: int, h: int, w: int, seed: int) -> str:
    rng = np.random.default_rng([seed, i])
    name = f"img/{i:06d}.jpg"
    ok, buf = cv2.imencode(".jpg", texture(rng, h, w)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for image {i}")
    (out / name).write_bytes(buf.tobytes())
    return name


def make_jpegs(
    n: int = 2000,
    width: int = 768,
    height: int = 512,
    seed: int = 0,
    out: str | Path | None = None,
    workers: int | None = None,
) -> Path:
    """The folder of ``n`` JPEGs (made now, or reused when a complete one exists); returns its path."""
    out = Path(out) if out else BENCH_ROOT / f"jpegs-{width}x{height}-n{n}-s{seed}"
    if (out / _DONE).exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img").mkdir(parents=True)
    workers = workers or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(workers) as ex:  # cv2 releases the GIL while encoding
        names = list(ex.map(lambda i: _write_one(tmp, i, height, width, seed), range(n)))
    pd.DataFrame({"file_name": names, "label": np.arange(n) % 2}).to_csv(tmp / "train.csv", index=False)
    (tmp / _DONE).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def link_copies(src: Path, copies: int, out: Path | None = None) -> Path:
    """A folder listing every image of ``src`` ``copies`` times (hard links: distinct names, no new bytes)."""
    out = out or src.with_name(f"{src.name}-x{copies}")
    if (out / _DONE).exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img").mkdir(parents=True)
    table = pd.read_csv(src / "train.csv")
    rows = []
    for c in range(copies):
        for name, label in zip(table["file_name"], table["label"], strict=True):
            new = f"img/c{c}_{Path(name).name}"
            os.link(src / name, tmp / new)
            rows.append((new, label))
    pd.DataFrame(rows, columns=["file_name", "label"]).to_csv(tmp / "train.csv", index=False)
    (tmp / _DONE).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="16 images in a temporary folder (see above)")
    a = ap.parse_args()
    if a.smoke:
        with tempfile.TemporaryDirectory(prefix="jpegs-smoke-") as tmp:
            t0 = time.perf_counter()
            make_jpegs(16, a.width, a.height, a.seed, Path(tmp) / "jpegs")
            s = time.perf_counter() - t0
        print(f"bench jpegs: 16 JPEGs {a.width}x{a.height} in {s:.2f}s = {16 / s:.0f} img/s")
    else:
        print(make_jpegs(a.n, a.width, a.height, a.seed, a.out))
