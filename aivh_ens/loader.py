"""Torch datasets and loaders over an image source (files now; any object with ``get(i)``).

Randomness is a function of (seed, fold, epoch, row), never of worker count or process history, so a
resumed fold replays exactly the batches an uninterrupted one would have seen (on CPU, bit for bit).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from aivh_ens.data import BadImageError, load_image


class ImageSource(Protocol):
    """Random access to decoded images: (H, W, 3) uint8 RGB."""

    def __len__(self) -> int: ...

    def get(self, i: int) -> np.ndarray: ...

    def describe(self, i: int) -> str: ...


class FileSource:
    """Decode image files on demand (paths relative to ``root``, already validated)."""

    def __init__(self, root: str | Path, rel_paths: Sequence[str]):
        self.root = Path(root)
        self.rel_paths = list(rel_paths)

    def __len__(self) -> int:
        return len(self.rel_paths)

    def get(self, i: int) -> np.ndarray:
        return load_image(self.root / self.rel_paths[i])

    def describe(self, i: int) -> str:
        return self.rel_paths[i]


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from any parts (hash-based: independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


class ImageDataset(Dataset):
    """Rows of a source through a transform. Items: (uint8 (3, S, S) image, label, row, ok).

    A bad image does not raise inside a worker (the message would arrive wrapped in a traceback):
    it yields ``ok=False`` and a blank image, and the training loop decides (stop or skip).
    """

    def __init__(self, source: ImageSource, rows: np.ndarray, labels: np.ndarray | None, transform,
                 img_size: int, seed: int = 0):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)  # (N,) indices into source
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)  # (N,)
        self.transform = transform
        self.img_size = img_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        label = -1 if self.labels is None else int(self.labels[i])
        try:
            img = self.source.get(row)
        except BadImageError:
            blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
            return blank, label, row, False
        self.transform.set_random_seed(derive_seed(self.seed, self.epoch, row))
        out = self.transform(image=img)["image"]  # (S, S, 3) uint8
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1), label, row, True


def default_workers(device: torch.device, requested: int | None) -> int:
    """DataLoader workers: as requested, else one per core up to 8 on CUDA, none on CPU.

    On a CPU-only machine the model and the decoder share the same cores; extra worker processes mostly
    add start-up and IPC cost for the small images CPU runs use.
    """
    if requested is not None:
        return max(0, requested)
    if device.type == "cuda":
        return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return 0


def make_loader(ds: ImageDataset, batch_size: int, *, train: bool, device: torch.device, workers: int,
                seed: int = 0) -> DataLoader:
    """A DataLoader: seeded shuffling for training, pinned memory on CUDA, persistent workers."""
    if train:
        g = torch.Generator()
        g.manual_seed(seed)
        sampler = RandomSampler(ds, generator=g)
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=train and len(ds) > batch_size,  # a 1-sample batch breaks BatchNorm
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


class Normalizer:
    """uint8 (B, 3, H, W) -> normalised float on the device (done per batch, on the GPU when there is one)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
