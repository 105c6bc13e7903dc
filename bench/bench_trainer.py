"""Benchmark training throughput: the model alone against the model fed by the full input pipeline.

Run: ``python bench/bench_trainer.py [--n 2000] [--epochs 3] [--recipe tiny] [--img-size 64] [--threads 1]
[--smoke]`` (``--smoke``: 64 images at 32 px, 2 epochs, for the test suite).

The same model and training loop (:func:`aivh_ens.train.train_one_epoch`: normalisation, forward, backward,
optimizer step) on the CPU here (on CUDA where one is available, with ``--device cuda``):

- baseline, the ceiling: batches of synthetic uint8 tensors already in memory (no loading at all);
- ours: the full pipeline as ``cv`` runs it, on ``--n`` generated 768x512 JPEGs (``bench/make_jpegs.py``):
  the decode-once cache, augmentation, loader with the run's default workers (none on a CPU), epochs 2+;
- for reference, the same pipeline without the cache (decode + storage step every epoch).

The last line reads ``bench trainer: <ours> vs <baseline> = <ratio>x`` (images/s). Ours cannot beat the
ceiling: a ratio near 1 says the input pipeline keeps the model busy; well below 1, that it is the
bottleneck. On a CPU the loader and the model share the same cores, so some gap is expected there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_jpegs import make_jpegs  # noqa: E402

from aivh_ens.config import resolve_config
from aivh_ens.data.cache import ensure_cache, model_img_size
from aivh_ens.data.loader import (
    FileSource,
    ImageDataset,
    Normalizer,
    close_loaders,
    default_workers,
    make_loader,
)
from aivh_ens.data.transforms import storage_step, train_transform
from aivh_ens.train.loop import FoldContext, create_optimizer, resolve_device, train_one_epoch
from aivh_ens.train.models import build_model


class Synthetic:
    """``batches`` batches of random uint8 images (made once), in the loader's item layout."""

    def __init__(self, batches: int, batch: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.items = [
            (
                torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
                torch.arange(batch) % 2,
                torch.arange(batch),
                torch.ones(batch, dtype=torch.bool),
            )
            for _ in range(batches)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def run_epochs(cfg, model, opt, ctx, make, epochs: int) -> list[float]:
    """img/s of ``epochs`` calls of train_one_epoch over the loader ``make(epoch)`` returns."""
    out, step = [], 0
    total = 10**6  # the schedule's length does not matter here
    for epoch in range(epochs):
        loader = make(epoch)  # held across epochs, as fit_fold holds it: persistent workers stay up
        tr, step = train_one_epoch(
            model,
            loader,
            opt,
            ctx,
            epoch=epoch,
            step=step,
            total_steps=total,
            scaler=None,
            ema=None,
            progress=False,
        )
        out.append(tr["img_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on the CPU (1: OpenMP threads spinning at barriers on a shared machine "
        "can make 2 threads 4x slower than 1)",
    )
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: as cv picks them)")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    a = ap.parse_args()
    if a.smoke:
        a.n, a.epochs, a.img_size = 64, 2, 32
    torch.set_num_threads(a.threads)

    data = make_jpegs(a.n)
    names = pd.read_csv(data / "train.csv")["file_name"].tolist()
    cfg = resolve_config(a.recipe, img_size=a.img_size, device=a.device, data=str(data), workers=a.workers)
    device = resolve_device(cfg.device)
    size = model_img_size(cfg)
    torch.manual_seed(0)
    model, dc = build_model(cfg)
    model.to(device)
    opt = create_optimizer(cfg, model)
    ctx = FoldContext(cfg, device, Normalizer(dc.mean, dc.std, device), lambda i: names[i], set())
    workers = default_workers(device, cfg.workers)
    bs = cfg.batch_size
    print(
        f"model {cfg.model} at {size} px, batch {bs}, device {device}, torch threads {torch.get_num_threads()}, "
        f"loader workers {workers}; {len(names)} JPEGs 768x512 in {data}"
    )

    syn = Synthetic(len(names) // bs, bs, size)
    base = run_epochs(cfg, model, opt, ctx, lambda e: syn, a.epochs)

    storage = storage_step(cfg, size)
    labels = np.arange(len(names)) % 2
    with tempfile.TemporaryDirectory(prefix="aivh-bench-cache-") as tmp:
        t0 = time.perf_counter()
        src = ensure_cache(
            data, names, storage, tmp, jobs=None, progress=False, log=lambda s: print("  " + s)
        )
        build = time.perf_counter() - t0
        results = {}
        for label, source in (("cached", src), ("uncached", FileSource(data, names, storage))):
            ds = ImageDataset(source, np.arange(len(names)), labels, train_transform(cfg, size), size, seed=0)

            def make(epoch: int, ds: ImageDataset = ds):
                ds.set_epoch(epoch)
                return make_loader(ds, bs, train=True, device=device, workers=workers, seed=epoch)

            results[label] = run_epochs(cfg, model, opt, ctx, make, a.epochs)
            close_loaders(ds)

    def fmt(xs: list[float]) -> str:
        return ", ".join(f"{x:.0f}" for x in xs)

    syn_s = statistics.median(base[1:])
    ours = statistics.median(results["cached"][1:])
    unc = statistics.median(results["uncached"][1:])
    print(f"baseline (synthetic uint8 batches, model only): {fmt(base)} img/s per epoch -> {syn_s:.0f} img/s")
    print(
        f"ours (cached full pipeline): cache build {build:.1f}s, then {fmt(results['cached'])} img/s per epoch "
        f"-> {ours:.0f} img/s (epochs 2+)"
    )
    print(
        f"reference (uncached: decode + storage step every epoch): {fmt(results['uncached'])} img/s -> "
        f"{unc:.0f} img/s; the cache gives {ours / unc:.2f}x"
    )
    print(f"bench trainer: {ours:.0f} img/s vs {syn_s:.0f} img/s = {ours / syn_s:.2f}x")


if __name__ == "__main__":
    main()
