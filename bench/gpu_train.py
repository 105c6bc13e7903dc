"""GPU training throughput: the model fed by synthetic batches, by aivh-ens's pipeline, and by the seed-000
pipeline, on the same machine in one run.

Run on a CUDA machine: ``python bench/gpu_train.py [--model efficientnet_b4] [--batch 64] [--n 4000]``
(about 5 minutes on one H100/H200, most of it compiling; ``--no-compile`` skips the compiled rows).
Smoke run on a CPU (for the test suite): ``python bench/gpu_train.py --smoke`` (test_efficientnet at 64 px,
batch 16, 64 JPEGs: a few batches per row). Without ``--smoke`` and without a CUDA device it stops at once
(exit 2) rather than timing a CPU.

Every row trains with :func:`aivh_ens.train.train_one_epoch`, the loop ``cv`` runs (random init: the speed
does not depend on the weights), for two epochs over ``--n`` generated 768x512 JPEGs
(``bench/make_jpegs.py``); a row reports its second epoch (the first one compiles, warms cuDNN's autotuner
and, for ours, starts the workers) and the peak GPU memory:

- ``synthetic``: uint8 batches already in pinned memory (no decoding, no augmentation): the ceiling;
- ``ours``: the ``effnet-b4-adam`` pipeline as ``cv`` runs it: the decode-once cache (built first, timed
  apart), persistent workers (one per core but one), the pinned ring, normalisation on the GPU; the
  autocast ``--amp auto`` picks (bf16 from compute capability 8.0, fp16 + GradScaler below),
  channels_last and a fused AdamW, eager and ``--compile``;
- ``seed-000``: the pipeline of the public seed-000 notebook: PIL decode + torchvision Resize 255 / flip /
  rotation 20 / RandomResizedCrop 224 / ToTensor / Normalize in a DataLoader (same workers, pinned), and an
  fp32 eager model.

The last lines read ``bench gpu-feed: <ours> vs <synthetic> = <ratio>x`` (eager, then compiled: how close the
pipeline comes to the model's own speed; the goal is >= 0.9) and ``bench gpu: <ours> vs <seed-000> =
<ratio>x`` (images/s, the best of ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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
from bench_loader import NaiveDataset  # noqa: E402
from make_jpegs import make_jpegs  # noqa: E402

from aivh_ens.config import resolve_config
from aivh_ens.data.cache import ensure_cache, model_img_size
from aivh_ens.data.loader import ImageDataset, Normalizer, close_loaders, default_workers, make_loader
from aivh_ens.data.transforms import storage_step, train_transform
from aivh_ens.train.loop import (
    CompileFallback,
    FoldContext,
    create_optimizer,
    resolve_device,
    train_one_epoch,
)
from aivh_ens.train.models import build_model
from aivh_ens.train.precision import resolve_precision, use_channels_last


class Pinned:
    """``batches`` random uint8 batches made once (pinned on CUDA), in the loader's item layout."""

    def __init__(self, batches: int, batch: int, size: int, pin: bool):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(batches):
            x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
            meta = (torch.arange(batch) % 2, torch.arange(batch), torch.ones(batch, dtype=torch.bool))
            self.items.append(tuple(t.pin_memory() if pin else t for t in (x, *meta)))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


class SeedLoader:
    """The seed-000 DataLoader's (float image, label) batches in the loop's (x, y, rows, ok) layout."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x, y, torch.arange(len(y)), torch.ones(len(y), dtype=torch.bool)


class ToDevice:
    """The seed-000 batches are normalised floats already: only the copy to the device remains."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)


def train_row(cfg, device, loader_for, normalize, epochs: int = 2) -> dict[str, float]:
    """Train a fresh model for ``epochs`` passes; img/s of the last one and the peak GPU memory (GiB)."""
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    model.to(device)
    if use_channels_last(cfg.channels_last, device):
        model.to(memory_format=torch.channels_last)
    opt = create_optimizer(cfg, model)
    run = CompileFallback(model) if cfg.compile and device.type == "cuda" else model
    precision = resolve_precision(cfg.amp, device)  # as fit_fold resolves it: bf16 from sm 8.0, fp16 below
    ctx = FoldContext(cfg, device, normalize, str, set(), precision.amp)
    scaler = precision.scaler()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, img_s = time.perf_counter(), []
    for epoch in range(epochs):
        tr, _ = train_one_epoch(
            run,
            loader_for(epoch),
            opt,
            ctx,
            epoch=epoch,
            step=0,
            total_steps=10**6,
            scaler=scaler,
            ema=None,
            progress=False,
        )
        img_s.append(tr["img_s"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"img_s": img_s[-1], "first": img_s[0], "seconds": time.perf_counter() - t0, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_b4")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=4000, help="generated JPEGs (one epoch)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: as cv picks them)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed-000 row")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, a few batches (see above)")
    a = ap.parse_args()
    if a.smoke:
        a.device, a.model, a.img_size, a.batch, a.n = "cpu", "test_efficientnet", 64, 16, 64
    elif torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(
            f"--device {a.device}: no CUDA device here; this bench times a GPU (--smoke runs it on the CPU)"
        )

    t0 = time.perf_counter()
    data = make_jpegs(a.n)
    names = pd.read_csv(data / "train.csv")["file_name"].tolist()
    cfg = resolve_config(
        "effnet-b4-adam",
        model=a.model,
        pretrained=False,
        img_size=a.img_size,
        device=a.device,
        batch_size=a.batch,
        optimizer="adamw",
        data=str(data),
        workers=a.workers,
    )
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit_fold sets it
    size = model_img_size(cfg)
    workers = default_workers(device, cfg.workers)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{a.model} at {size} px, batch {a.batch}, {gpu}, torch {torch.__version__}, {workers} loader workers "
        f"on {os.cpu_count()} cores; {len(names)} JPEGs 768x512 in {data} ({time.perf_counter() - t0:.1f}s)"
    )

    _, dc = build_model(cfg)
    normalize = Normalizer(dc.mean, dc.std, device, use_channels_last(cfg.channels_last, device))
    pin = device.type == "cuda"
    synthetic = Pinned(len(names) // a.batch, a.batch, size, pin)
    rows: dict[str, dict[str, float]] = {}
    compiled = [False] if a.no_compile else [False, True]

    with tempfile.TemporaryDirectory(prefix="aivh-bench-cache-") as tmp:
        t1 = time.perf_counter()
        src = ensure_cache(
            data,
            names,
            storage_step(cfg, size),
            tmp,
            jobs=None,
            progress=False,
            log=lambda s: print("  " + s),
        )
        print(f"  cache built in {time.perf_counter() - t1:.1f}s")
        labels = np.arange(len(names)) % 2
        ds = ImageDataset(src, np.arange(len(names)), labels, train_transform(cfg, size), size, seed=0)

        def ours(epoch: int) -> object:
            ds.set_epoch(epoch)
            return make_loader(ds, a.batch, train=True, device=device, workers=workers, seed=epoch)

        for comp in compiled:
            c = dataclasses.replace(cfg, compile=comp)
            tag = "compiled" if comp else "eager"
            rows[f"synthetic {tag}"] = train_row(c, device, lambda e: synthetic, normalize)
            rows[f"ours {tag}"] = train_row(c, device, ours, normalize)
            for k in (f"synthetic {tag}", f"ours {tag}"):
                print(f"  {k}: {fmt(rows[k])}", flush=True)
        close_loaders(ds)

    if not a.no_seed:
        naive = NaiveDataset([data / n for n in names], size)
        seed_cfg = dataclasses.replace(cfg, amp="none", channels_last=False, compile=False)
        loader = torch.utils.data.DataLoader(
            naive,
            batch_size=a.batch,
            shuffle=True,
            num_workers=workers,
            pin_memory=pin,
            drop_last=True,
            persistent_workers=workers > 0,
        )
        rows["seed-000"] = train_row(seed_cfg, device, lambda e: SeedLoader(loader), ToDevice(device))
        print(f"  seed-000 (PIL + torchvision, fp32 eager): {fmt(rows['seed-000'])}", flush=True)

    print("row | img/s (epoch 2) | epoch 1 img/s | peak GPU GiB")
    for k, r in rows.items():
        print(f"{k} | {r['img_s']:.0f} | {r['first']:.0f} | {r['peak_gib']:.2f}")
    for comp in compiled:
        tag = "compiled" if comp else "eager"
        o, s = rows[f"ours {tag}"]["img_s"], rows[f"synthetic {tag}"]["img_s"]
        print(f"bench gpu-feed ({tag}): {o:.0f} img/s vs {s:.0f} img/s = {o / s:.2f}x")
    if "seed-000" in rows:
        best = max(rows[f"ours {'compiled' if c else 'eager'}"]["img_s"] for c in compiled)
        s0 = rows["seed-000"]["img_s"]
        print(f"bench gpu: {best:.0f} img/s vs {s0:.0f} img/s = {best / s0:.2f}x")


def fmt(r: dict[str, float]) -> str:
    return (
        f"{r['img_s']:.0f} img/s (epoch 1: {r['first']:.0f}), {r['seconds']:.1f}s, "
        f"peak {r['peak_gib']:.2f} GiB"
    )


if __name__ == "__main__":
    main()
