"""Torch datasets and loaders over an image source (files, the decode-once cache, or any ``get(i)``).

Randomness is a function of (seed, fold, epoch, row), never of worker count or process history, so a
resumed fold replays exactly the batches an uninterrupted one would have seen (on CPU, bit for bit).

Throughput: workers are persistent (one set per dataset, kept across epochs; the epoch travels with each
index, see :class:`EpochSampler`), each keeps ``prefetch_factor`` batches in flight (sized to the cores and
a memory budget) and writes them into a ring of shared-memory slots made once (:class:`RingLoader`);
batches are uint8 (4x fewer bytes than float), pinned on CUDA, and normalised on the device; their labels
and rows travel as NumPy arrays inside the message (a torch tensor gets a shared-memory segment each).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from aivh_ens import system
from aivh_ens.data.images import BadImageError, load_image
from aivh_ens.data.ring import LOADER_TIMEOUT_S, RingLoader, _Slotted
from aivh_ens.data.transforms import FastGeometry, StorageStep, reseed, to_chw
from aivh_ens.errors import UserError

PREFETCH_BUDGET = 1 << 30  # bytes of uint8 batches in flight across all workers of one loader
MAX_WORKERS = 16


class ImageSource(Protocol):
    """Random access to decoded images: (H, W, 3) uint8 RGB."""

    def __len__(self) -> int: ...

    def get(self, i: int) -> np.ndarray: ...

    def describe(self, i: int) -> str: ...


class FileSource:
    """Decode image files on demand (paths relative to ``root``, already validated).

    Args:
        root: folder the paths are relative to.
        rel_paths: image paths.
        storage: the pipeline's storage step (:func:`aivh_ens.data.transforms.storage_step`), applied after the
            decode exactly as the image cache applies it; None returns the decoded image as is.
    """

    def __init__(self, root: str | Path, rel_paths: Sequence[str], storage: StorageStep | None = None):
        self.root = Path(root)
        self.rel_paths = list(rel_paths)
        self.storage = storage

    def __len__(self) -> int:
        return len(self.rel_paths)

    def get(self, i: int) -> np.ndarray:
        path = self.root / self.rel_paths[i]
        return self.storage.load(path) if self.storage is not None else load_image(path)

    def describe(self, i: int) -> str:
        return self.rel_paths[i]


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from any parts (hash-based: independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


class ImageDataset(Dataset):
    """Rows of a source through a transform. Items: (uint8 (3, S, S) image, label, row, ok).

    An item is asked for by position ``i`` (augmented for :attr:`epoch`) or by ``(i, epoch)``, which is how
    :class:`EpochSampler` reaches persistent workers, whose copy of the dataset never sees ``set_epoch``.

    A bad image does not raise inside a worker (the message would arrive wrapped in a traceback):
    it yields ``ok=False`` and a blank image, and the training loop decides (stop or skip).
    """

    accepts_epoch_keys = True  # EpochSampler may send (i, epoch) keys

    def __init__(
        self,
        source: ImageSource,
        rows: np.ndarray,
        labels: np.ndarray | None,
        transform,
        img_size: int,
        seed: int = 0,
    ):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)  # (N,) indices into source
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)  # (N,)
        self.transform = transform
        self.img_size = img_size
        self.seed = seed
        self.epoch = 0
        self.fast = FastGeometry.of(transform)  # geometry-only pipelines skip albumentations' machinery

    def set_epoch(self, epoch: int) -> None:
        """Augment for ``epoch`` from now on (loaders from :func:`make_loader` pick it up at their next pass)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: Sequence[Any]) -> list[Any]:
        # Called by the DataLoader with a whole batch of keys; a batch bound for a ring slot keeps its tag.
        items = [self[k] for k in keys]
        slot = getattr(keys, "slot", None)
        return items if slot is None else _Slotted(items, slot)

    def __getitem__(self, key: int | tuple[int, int]):
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        row = int(self.rows[i])
        label = -1 if self.labels is None else int(self.labels[i])
        try:
            # The fast path only reads the image: a read-only view of the cache spares a copy.
            view = getattr(self.source, "view", None) if self.fast is not None else None
            img = view(row) if view is not None else self.source.get(row)
        except BadImageError:
            blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
            return blank, label, row, False
        seed = derive_seed(self.seed, epoch, row)
        if self.fast is not None:
            return torch.from_numpy(self.fast(img, seed)), label, row, True
        reseed(self.transform, seed)
        out = self.transform(image=img)["image"]  # (S, S, 3) uint8
        return torch.from_numpy(to_chw(out)), label, row, True


class EpochSampler(Sampler):
    """Positions of a dataset, shuffled by ``seed`` (``torch.randperm``, as ``RandomSampler`` draws them) or
    in order; yields ``(i, epoch)`` for datasets that take such keys, so the epoch reaches every worker.

    ``seed`` is set per pass by :func:`make_loader`; the epoch is read from the dataset when a pass starts.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int = 0):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.with_epoch = bool(getattr(dataset, "accepts_epoch_keys", False))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if not self.with_epoch:
            yield from order
            return
        epoch = int(getattr(self.dataset, "epoch", 0))
        for i in order:
            yield (i, epoch)


def default_workers(device: torch.device, requested: int | None) -> int:
    """DataLoader workers: as requested, else one per core but one (up to 16) on CUDA, none on CPU.

    On CUDA the main process keeps a core for the training loop. On a CPU-only machine the model and the
    decoder share the same cores; extra worker processes mostly add start-up and IPC cost for the small
    images CPU runs use.
    """
    if requested is not None:
        return max(0, requested)
    if device.type == "cuda":
        return max(1, min(MAX_WORKERS, system.cores() - 1))
    return 0


def prefetch_factor(workers: int, batch_bytes: int, budget: int = PREFETCH_BUDGET) -> int:
    """Batches each worker keeps in flight: 2 to 8, at least ~2 per core over all workers, within ``budget``.

    More workers need fewer batches each to hide a slow sample; the budget bounds pinned memory for large
    batches (e.g. 256 x 3 x 512 x 512 uint8 = 200 MB a batch).
    """
    want = max(2, math.ceil(2 * system.cores() / max(1, workers)))
    fit = budget // max(1, workers * batch_bytes)
    return int(max(2, min(8, want, fit)))


SHM_SHARE = 0.45  # of its free space, the most one loader's ring takes (a fold holds two: train, validation)


def ring_prefetch(
    workers: int, batch_size: int, img_size: int, free: int | None = None, jobs: int | None = None
) -> int:
    """Batches each worker keeps in flight, within the memory budget and within the shared memory free.

    The ring takes ``(workers * prefetch + 1)`` batches of shared memory at once. A container's ``/dev/shm``
    is often small (Docker gives 64 MiB unless told ``--shm-size``), and touching a page beyond it kills the
    worker with SIGBUS. So the prefetch depth shrinks (down to one batch a worker) to fit ``SHM_SHARE`` of
    what is free, and where even that does not fit this stops with a :class:`UserError` naming the fix.

    Jobs that run at once on the machine (a sweep's, :func:`aivh_ens.system.jobs_at_once`) share it: each
    sizes its rings to its part of the whole, not to what happens to be free when it starts, so the last job
    to start is not the one that dies.

    Args:
        free: bytes free in shared memory (default: :data:`aivh_ens.system.SHM_DIR` now; None: no check).
        jobs: jobs sharing it (default: :func:`aivh_ens.system.jobs_at_once`).
    """
    batch_bytes = batch_size * 3 * img_size * img_size
    prefetch = prefetch_factor(workers, batch_bytes)
    free = system.shm_free() if free is None else free
    if free is None:
        return prefetch
    jobs = jobs or system.jobs_at_once()
    total = system.shm_total() if jobs > 1 else None
    share = min(free, total // jobs) if total else free
    budget = int(share * SHM_SHARE)
    while prefetch > 1 and (workers * prefetch + 1) * batch_bytes > budget:
        prefetch -= 1
    need = (workers + 1) * batch_bytes
    if need > budget:
        shared = f", shared by {jobs} jobs at once ({share / 2**20:.0f} MiB each)" if jobs > 1 else ""
        raise UserError(
            f"shared memory ({system.SHM_DIR}) has {free / 2**20:.0f} MiB free{shared}, and {workers} loader "
            f"workers need {need / SHM_SHARE / 2**20:.0f} MiB ({workers + 1} batches of {batch_size} images at "
            f"{img_size} px, uint8): give the container more (docker run --shm-size=8g), or lower --workers or "
            "--batch-size" + (", or run fewer jobs at once (--devices)" if jobs > 1 else "")
        )
    return prefetch


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    train: bool,
    device: torch.device,
    workers: int,
    seed: int = 0,
    timeout: float = LOADER_TIMEOUT_S,
) -> DataLoader:
    """A DataLoader: seeded shuffling for training, pinned memory on CUDA, persistent workers.

    With ``workers > 0`` the loader (and its worker processes) is made once per (dataset, batch size,
    train, device, workers) and handed out again by later calls with the next ``seed`` for as long as the
    caller holds it (a training loop's ``loader = make_loader(...)`` each epoch does): a new epoch reuses
    the running workers (start-up costs seconds per worker on big machines). When the last reference goes,
    the loader is freed and its workers stop (the dataset keeps only a weak reference). The epoch is read
    from ``ds.epoch`` when a pass starts and sent with each index, so persistent workers augment for it.

    For an :class:`ImageDataset` the workers write their uint8 batches into a ring of shared-memory slots
    made once per loader (:class:`RingLoader`), instead of a new shared-memory segment per batch.

    Making a loader with workers sets OpenCV to one thread in this process (see ``_single_threaded_cv2``).
    Its workers have ``timeout`` seconds for each batch; then an :class:`ImageDataset`'s loader raises
    :class:`LoaderStalled` (another dataset's, torch's RuntimeError).
    """
    pin = device.type == "cuda"
    sampler = EpochSampler(ds, shuffle=train, seed=seed)
    drop_last = _drop_last(ds, batch_size, train)
    if workers <= 0:
        return DataLoader(
            ds, batch_size=batch_size, sampler=sampler, num_workers=0, pin_memory=pin, drop_last=drop_last
        )
    key = (batch_size, train, str(device), workers, timeout)
    pool: _LoaderPool = ds.__dict__.setdefault("_persistent_loaders", _LoaderPool())
    ref = pool.get(key)
    loader = ref() if ref is not None else None
    if loader is None:
        img = int(getattr(ds, "img_size", 224))
        if isinstance(ds, ImageDataset):
            prefetch = ring_prefetch(workers, batch_size, img)
            loader = RingLoader(ds, sampler, batch_size, drop_last, workers, prefetch, device, timeout)
        else:
            prefetch = prefetch_factor(workers, batch_size * 3 * img * img)
            loader = DataLoader(
                ds,
                batch_size=batch_size,
                sampler=sampler,
                num_workers=workers,
                pin_memory=pin,
                drop_last=drop_last,
                persistent_workers=True,
                prefetch_factor=prefetch,
                timeout=timeout,
            )
            loader.epoch_sampler = sampler  # type: ignore[attr-defined]
        system.set_cv2_single_threaded()
        pool[key] = weakref.ref(loader)
    loader.epoch_sampler.seed = seed  # type: ignore[attr-defined]
    return loader


class _LoaderPool(dict):
    """Weak references to a dataset's persistent loaders (a strong one would make a reference cycle that keeps
    their workers alive until the garbage collector runs); pickles as empty, for spawned workers."""

    def __reduce__(self):
        return _LoaderPool, ()


def _drop_last(ds: Dataset, batch_size: int, train: bool) -> bool:
    return train and len(ds) > batch_size  # type: ignore[arg-type]  # a 1-sample batch breaks BatchNorm


def close_loaders(ds: Dataset) -> None:
    """Stop the persistent workers :func:`make_loader` started for ``ds`` now (they also stop when the loader
    is freed)."""
    for ref in ds.__dict__.pop("_persistent_loaders", {}).values():
        loader = ref()
        if loader is None:
            continue
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        loader._iterator = None


class Normalizer:
    """uint8 (B, 3, H, W) -> normalised float on the device (done per batch, on the GPU when there is one)."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool = False
    ):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(
            memory_format=self.memory_format
        )  # uint8: 4x cheaper
        # A new float tensor (never the caller's), normalised in place: the values of (x - mean) / std.
        if x.device.type == "cpu" and x.is_contiguous():
            # NumPy's uint8 -> float32 cast is ~3x faster than torch's on one CPU thread; same values.
            f = torch.from_numpy(x.numpy().astype(np.float32))
        else:
            f = x.to(torch.float32, copy=True)
        return f.sub_(self.mean).div_(self.std)
