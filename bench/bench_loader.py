"""Benchmark the training input pipeline: images/s delivered as normalised 224 px batches, and memory.

Run: ``python bench/bench_loader.py [--n 2000] [--epochs 6] [--workers CORES] [--smoke]`` (``--smoke``: 64
images, 2 epochs, for the test suite).

On ``--n`` generated 768x512 JPEGs (``bench/make_jpegs.py``; made once, kept under /tmp), batch 32, the same
workers on both sides (default: every core):

- baseline, the naive pipeline: PIL decode + torchvision Resize(255) / RandomHorizontalFlip /
  RandomRotation(20) / RandomResizedCrop(224) / ToTensor / Normalize in a torch DataLoader (shuffle);
- ours, the ``effnet-b4-adam`` recipe (the same augmentations) as ``cv`` runs it: the decode-once cache
  (storage: shorter side 255), fused geometry on uint8, persistent workers, and normalisation of the uint8
  batch (here on the CPU, in the main process; on the GPU in real runs).

Reports the cold first epoch (ours: cache build included) and the median of epochs 2+ (cache warm), then
the peak resident memory of a loader pass over a 2k-image cache and an 8k-image cache (the same images
listed four times under other names: hard links, and a cache file written from the 2k one), each in a
fresh process: the main process and its workers separately.

The last line reads ``bench loader: <ours> vs <baseline> = <ratio>x`` (images/s, epochs 2+; > 1: ours
delivers more).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
from make_jpegs import link_copies, make_jpegs  # noqa: E402

from aivh_ens.config import resolve_config
from aivh_ens.data.cache import ensure_cache
from aivh_ens.data.cache_format import CachedSource, CacheWriter, _stat, cache_key, cache_stem, version_file
from aivh_ens.data.loader import ImageDataset, Normalizer, close_loaders, make_loader
from aivh_ens.data.transforms import storage_step, train_transform
from aivh_ens.io import atomic_path  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 32
SIZE = 224


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- baseline ------------------------------------------------------------------------------------------


class NaiveDataset(torch.utils.data.Dataset):
    """PIL + torchvision transforms, the way many competition notebooks load images."""

    def __init__(self, paths: list[Path], size: int = SIZE):
        import torchvision.transforms as T

        self.paths = paths
        self.tf = T.Compose(
            [
                T.Resize(round(size * 255 / 224)),
                T.RandomHorizontalFlip(),
                T.RandomRotation(20),
                T.RandomResizedCrop(size),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), i % 2


def naive_epoch(ds: NaiveDataset, workers: int) -> float:
    """Seconds for one epoch of the naive pipeline (a fresh DataLoader per epoch, as its scripts do)."""
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True
    )
    t0 = time.perf_counter()
    n = 0
    for x, _y in loader:
        n += len(x)
    return time.perf_counter() - t0


# ---- ours ----------------------------------------------------------------------------------------------


def our_dataset(data: Path, cache_dir: Path, workers: int, log=print) -> tuple[ImageDataset, float]:
    """The effnet-b4-adam training dataset over the image cache; returns it and the cache build seconds."""
    cfg = resolve_config("effnet-b4-adam", img_size=SIZE, cache="on", data=str(data))
    names = pd.read_csv(data / "train.csv")["file_name"].tolist()
    t0 = time.perf_counter()
    src = ensure_cache(data, names, storage_step(cfg, SIZE), cache_dir, jobs=workers, progress=False, log=log)
    build = time.perf_counter() - t0
    labels = np.arange(len(names)) % 2
    ds = ImageDataset(src, np.arange(len(names)), labels, train_transform(cfg, SIZE), SIZE, seed=0)
    return ds, build


_HELD: dict[int, object] = {}  # the loader of each dataset, held between epochs as a training loop holds it


def our_epoch(ds: ImageDataset, epoch: int, workers: int, norm: Normalizer) -> float:
    """Seconds for one epoch: uint8 batches from persistent workers, normalised to float in this process."""
    ds.set_epoch(epoch)
    loader = make_loader(ds, BATCH, train=True, device=torch.device("cpu"), workers=workers, seed=epoch)
    _HELD[id(ds)] = loader
    t0 = time.perf_counter()
    n = 0
    for x, _y, _rows, _ok in loader:
        n += len(norm(x))
    return time.perf_counter() - t0


# ---- memory --------------------------------------------------------------------------------------------


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def replicate_cache(src: CachedSource, big: Path, cache_dir: Path, copies: int) -> None:
    """Write the cache of ``big`` (``src``'s images listed ``copies`` times) by copying ``src``'s stored
    images instead of decoding them again: this measures reading, not building."""
    names = pd.read_csv(big / "train.csv")["file_name"].tolist()
    storage = storage_step(resolve_config("effnet-b4-adam", img_size=SIZE), SIZE)
    key, stem = cache_key(big, storage), cache_stem(cache_dir, big, storage)
    staging = stem.with_name(stem.name + ".staging")
    with atomic_path(staging) as tmp, open(tmp, "wb") as f:
        w = CacheWriter(f, key)
        for j, name in enumerate(names):
            i = j % len(src)
            w.add(name, src.get(i), tuple(src.shapes[i]), _stat(big / name))
        digest = w.finish()
    staging.rename(version_file(stem, digest))  # a version, named by its index as a build names it


def rss_child(data: str, cache_dir: str, workers: int) -> None:
    """One loader pass over a built cache in this (fresh) process; prints peak RSS as JSON."""
    ds, _ = our_dataset(Path(data), Path(cache_dir), workers, log=lambda s: None)
    cache_bytes = os.path.getsize(ds.source.path)  # type: ignore[attr-defined]
    loader = make_loader(ds, BATCH, train=True, device=torch.device("cpu"), workers=workers, seed=0)
    it = iter(loader)
    n = 0
    for x, *_ in it:
        n += len(x)
    pids = [w.pid for w in getattr(loader._iterator, "_workers", [])]
    workers_status = [_status(p) for p in pids]
    main = _status()
    close_loaders(ds)
    print(json.dumps({"images": n, "cache_bytes": cache_bytes, "main": main, "workers": workers_status}))


def measure_rss(data: Path, cache_dir: Path, workers: int) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(data), str(cache_dir), str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 else str(n)


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---- main ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=6, help="epochs per side (the first is the cold one)")
    ap.add_argument("--workers", type=int, default=cores())
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    a = ap.parse_args()
    if a.smoke:
        a.n, a.epochs = 64, 2
    # The main process only consumes batches (and normalises them, on the GPU in real runs): one thread, so
    # that OpenMP threads spinning at barriers do not fight the workers for the cores.
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    data = make_jpegs(a.n)
    paths = [data / p for p in pd.read_csv(data / "train.csv")["file_name"]]
    print(
        f"images: {len(paths)} JPEGs 768x512 in {data} ({time.perf_counter() - t0:.1f}s to make or find); "
        f"batch {BATCH}, {a.workers} workers, {cores()} cores, torch {torch.__version__}"
    )

    with tempfile.TemporaryDirectory(prefix="aivh-bench-cache-") as tmp:
        cache_dir = Path(tmp)
        norm = Normalizer(MEAN, STD, torch.device("cpu"))
        naive = NaiveDataset(paths)
        # Cold: ours builds the cache, then runs epoch 1; then the two sides alternate epoch by epoch, so
        # both see the same load from whatever else runs on the machine.
        ds, build = our_dataset(data, cache_dir, a.workers, log=lambda s: print("  " + s))
        ours, base = [our_epoch(ds, 0, a.workers, norm)], [naive_epoch(naive, a.workers)]
        for epoch in range(1, a.epochs):
            ours.append(our_epoch(ds, epoch, a.workers, norm))
            base.append(naive_epoch(naive, a.workers))
        close_loaders(ds)
        n_ours = len(ds) // BATCH * BATCH
        n_base = len(paths) // BATCH * BATCH
        ours_warm = n_ours / statistics.median(ours[1:])
        base_warm = n_base / statistics.median(base[1:])
        ours_cold = n_ours / (build + ours[0])
        base_cold = n_base / base[0]
        print(
            f"baseline (PIL + torchvision): epoch 1 {base[0]:.2f}s = {base_cold:.0f} img/s; epochs 2+ "
            f"{', '.join(f'{s:.2f}s' for s in base[1:])} -> median {base_warm:.0f} img/s"
        )
        print(
            f"ours (cache + fused uint8 aug): cache build {build:.2f}s + epoch 1 {ours[0]:.2f}s = "
            f"{ours_cold:.0f} img/s cold; epochs 2+ {', '.join(f'{s:.2f}s' for s in ours[1:])} -> median "
            f"{ours_warm:.0f} img/s"
        )
        print(
            f"cold first epoch: ours {ours_cold:.0f} vs baseline {base_cold:.0f} img/s = "
            f"{ours_cold / base_cold:.2f}x"
        )

        if not a.skip_rss:
            big = link_copies(data, 4)
            t1 = time.perf_counter()
            replicate_cache(ds.source, big, cache_dir, 4)  # type: ignore[arg-type]
            print(
                f"memory: {4 * len(paths)}-image cache written in {time.perf_counter() - t1:.1f}s (the "
                f"{len(paths)} stored images x4); one pass each, {a.workers} workers, fresh process:"
            )
            for label, d in ((count(len(paths)), data), (count(4 * len(paths)), big)):
                r = measure_rss(d, cache_dir, a.workers)
                w = r["workers"]
                print(
                    f"  {label} images, cache {r['cache_bytes'] / 1e9:.2f} GB: main peak RSS "
                    f"{mb(r['main']['VmHWM'])} (file-backed now {mb(r['main']['RssFile'])}); workers peak "
                    f"{', '.join(mb(s['VmHWM']) for s in w) or '-'} (file-backed now "
                    f"{', '.join(mb(s['RssFile']) for s in w) or '-'})"
                )
    print(f"bench loader: {ours_warm:.0f} img/s vs {base_warm:.0f} img/s = {ours_warm / base_warm:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
