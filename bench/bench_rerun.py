"""Benchmark a re-run of ``cv``: time from the call to the first training batch, first call vs second call.

Run: ``python bench/bench_rerun.py [--n 20000] [--size 256] [--data ../shared/data/cifake-dev.tar.gz] [--smoke]``
(``--smoke``: 40 demo images (``aivh-ens demo-data``) upscaled to 64 px instead of cifake-dev, for the test suite).

Builds, in a temporary folder, a copy of cifake-dev (32 px CIFAKE images) upscaled to ``--size`` px and saved
as JPEG q95, then calls ``run_cv`` twice on it, each time up to its first training batch: the first call
decodes every image for the input check and builds the image cache; the second reuses the decode verdicts
(``runs/cache/verdicts-*.json``) and the cache.

The last line reads ``bench rerun: <second s> vs <first s> = <ratio>x``.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifake-dev.tar.gz"


class FirstBatch(Exception):
    """Raised by the patched epoch once the first training batch is in hand."""


def extract(archive: Path, out: Path) -> Path:
    """The cifake-dev folder, extracted under ``out``."""
    with tarfile.open(archive) as tf:
        tf.extractall(out, filter="data")
    return out / "cifake-dev"


def build_upscaled(root: Path, out: Path, n: int, size: int) -> Path:
    """``out/data``: the first ``n`` train rows of the data folder ``root``, each image upscaled to ``size`` px."""
    table = pd.read_csv(root / "train.csv").head(n)
    data = out / "data"
    (data / "train_data").mkdir(parents=True)

    def one(name: str) -> None:
        with Image.open(root / name) as im:
            im.convert("RGB").resize((size, size), Image.BICUBIC).save(data / name, quality=95)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as ex:
        list(ex.map(one, table["file_name"]))
    table.to_csv(data / "train.csv", index=False)
    return data


def time_to_first_batch(cfg, workdir: Path) -> float:
    """Seconds from ``run_cv`` to its first training batch."""
    from aivh_ens.train import cv, fold

    def first_batch(model, loader, *a, **k):
        next(iter(loader))
        raise FirstBatch

    real = fold.train_one_epoch
    fold.train_one_epoch = first_batch
    t0 = time.perf_counter()
    try:
        cv.run_cv(cfg, workdir, fold_spec="0", progress=False, log=lambda s: None)
    except FirstBatch:
        return time.perf_counter() - t0
    finally:
        fold.train_one_epoch = real
    raise RuntimeError("cv finished without a training batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifake-dev.tar.gz")
    ap.add_argument("--n", type=int, default=20_000, help="train images to use")
    ap.add_argument("--size", type=int, default=256, help="upscaled side in px")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.size = 40, 64

    import torch

    from aivh_ens.config import resolve_config

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.smoke:
            from aivh_ens.synth import make_demo_dataset

            src = make_demo_dataset(Path(tmp) / "src", n=args.n, n_test=2)["root"]
        else:
            src = extract(args.data.resolve(), Path(tmp) / "src")
        data = build_upscaled(src, Path(tmp), args.n, args.size)
        print(f"built {args.n} images of {args.size} px in {time.perf_counter() - t0:.1f}s")
        cfg = resolve_config(
            "tiny",
            data=str(data),
            img_size=args.size if args.smoke else 224,
            batch_size=32,
            folds=5,
            device="cpu",
            cache="on",
            name="rerun",
        )
        work = Path(tmp) / "work"
        first = time_to_first_batch(cfg, work)
        second = time_to_first_batch(cfg, work)
    print(f"first call: {first:.2f}s (decode check + cache build); second call: {second:.2f}s")
    print(f"bench rerun: {second:.2f}s vs {first:.2f}s = {first / second:.1f}x")


if __name__ == "__main__":
    main()
