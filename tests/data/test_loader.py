"""Tests for aivh_ens.data.loader: replayable randomness, the sampler, worker counts, the ring's depth, the
background copy thread, and loaders with workers giving exactly the in-process batches."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch

from aivh_ens.config import resolve_config
from aivh_ens.data.loader import (
    MAX_WORKERS,
    SHM_SHARE,
    EpochSampler,
    FileSource,
    ImageDataset,
    close_loaders,
    default_workers,
    derive_seed,
    make_loader,
    prefetch_factor,
    ring_prefetch,
)
from aivh_ens.data.ring import LoaderStalled
from aivh_ens.data.transforms import storage_step, train_transform
from aivh_ens.errors import UserError

CPU = torch.device("cpu")


def test_derive_seed_is_stable_and_separates_parts():
    assert derive_seed(42, 0, "init") == derive_seed(42, 0, "init")
    seeds = {derive_seed(42, f, e) for f in range(5) for e in range(10)}
    assert len(seeds) == 50  # no two (fold, epoch) pairs share a seed
    assert derive_seed(1, 23) != derive_seed(12, 3)  # the parts are separated, not concatenated
    assert all(0 <= s < 2**31 for s in seeds)


class _Sized(torch.utils.data.Dataset):
    accepts_epoch_keys = True

    def __init__(self, n: int, epoch: int = 0):
        self.n, self.epoch = n, epoch

    def __len__(self) -> int:
        return self.n


def test_epoch_sampler_orders_by_seed_and_carries_the_epoch():
    ds = _Sized(50, epoch=3)
    a = list(EpochSampler(ds, shuffle=True, seed=7))
    assert a == list(EpochSampler(ds, shuffle=True, seed=7))
    assert [i for i, _ in a] != [i for i, _ in EpochSampler(ds, shuffle=True, seed=8)]
    assert sorted(i for i, _ in a) == list(range(50)) and {e for _, e in a} == {3}
    assert [i for i, _ in EpochSampler(ds, shuffle=False)] == list(range(50))


def test_worker_counts_and_prefetch_bounds():
    assert default_workers(CPU, None) == 0  # the CPU model and the decoder share the cores
    assert default_workers(CPU, 3) == 3 and default_workers(CPU, -1) == 0
    assert 1 <= default_workers(torch.device("cuda"), None) <= MAX_WORKERS
    for workers in (1, 2, 8, 16):
        for batch_bytes in (1, 10**6, 2 * 10**8):
            assert 2 <= prefetch_factor(workers, batch_bytes) <= 8
    assert prefetch_factor(16, 2 * 10**8, budget=10**9) == 2  # a big batch is capped by the budget


@pytest.fixture(scope="module")
def small(demo_data):
    root = demo_data(n=40, n_test=10, seed=11)
    names = pd.read_csv(root / "train.csv")["file_name"].tolist()[:24]
    return root, names


def test_workers_give_the_in_process_batches_from_files(small):
    root, names = small
    cfg = resolve_config("tiny", img_size=32, rotate=10.0)
    src = FileSource(root, names, storage_step(cfg, 32))
    labels = np.arange(len(names)) % 2

    def one_epoch(workers: int, epoch: int) -> list[torch.Tensor]:
        ds = ImageDataset(src, np.arange(len(names)), labels, train_transform(cfg, 32), 32, seed=5)
        ds.set_epoch(epoch)
        loader = make_loader(ds, 8, train=True, device=CPU, workers=workers, seed=epoch)
        batches = list(loader)
        close_loaders(ds)
        return [torch.cat([b[i] for b in batches]) for i in range(4)]

    ref = one_epoch(0, 1)
    assert ref[0].dtype == torch.uint8 and ref[0].shape == (len(names), 3, 32, 32)
    for x, y in zip(ref, one_epoch(2, 1), strict=True):
        assert torch.equal(x, y)  # same rows, same augmentation draws, whichever process made them
    assert not torch.equal(ref[0], one_epoch(0, 2)[0])  # another epoch draws anew


def test_a_read_that_never_returns_stops_the_loader_after_its_timeout(small, tmp_path):
    root, names = small
    names = names[:7]
    for name in names:  # a folder of its own: a FIFO in the shared demo data could stall another test
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, tmp_path / name)
    os.mkfifo(tmp_path / "stalled.png")  # opening it for reading blocks, as a read on a stalled mount does
    cfg = resolve_config("tiny", img_size=32)
    src = FileSource(tmp_path, ["stalled.png", *names], storage_step(cfg, 32))
    ds = ImageDataset(src, np.arange(len(names) + 1), None, train_transform(cfg, 32), 32)
    loader = make_loader(ds, 4, train=False, device=CPU, workers=1, timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(LoaderStalled, match=r"no batch from the 1 image loader workers in 2 s"):
        list(loader)
    assert time.monotonic() - t0 < 60  # the timeout, not a wait for ever
    close_loaders(ds)  # the hung worker is stopped


def test_background_producer_yields_stops_and_raises():
    from aivh_ens.data.ring import _in_background

    cpu = torch.device("cpu")
    assert list(_in_background(lambda: iter(range(10)), 2, cpu)) == list(range(10))
    gen = _in_background(lambda: iter(range(1000)), 2, cpu)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()  # stops and joins the thread

    def boom():
        yield 1
        raise ValueError("worker failed")

    with pytest.raises(ValueError, match="worker failed"):
        list(_in_background(boom, 2, cpu))


@pytest.mark.parametrize("workers", [1, 4, 15])
@pytest.mark.parametrize("batch", [8, 64])
def test_ring_fits_the_shared_memory_free(workers, batch):
    """Ample room: the usual depth. Less: a shallower ring that fits. Too little: one line naming the fix."""
    one = batch * 3 * 224 * 224  # bytes of one uint8 batch
    usual = prefetch_factor(workers, one)
    assert ring_prefetch(workers, batch, 224, free=None) == usual
    assert ring_prefetch(workers, batch, 224, free=1 << 50) == usual
    for room in range(workers + 1, (workers * usual + 1) + 1):
        free = int(room * one / SHM_SHARE) + 1  # exactly `room` batches fit
        p = ring_prefetch(workers, batch, 224, free=free)
        assert 1 <= p <= usual and (workers * p + 1) <= room
        assert p == usual or workers * (p + 1) + 1 > room  # the deepest ring that fits
    with pytest.raises(UserError, match=r"/dev/shm.*--shm-size.*--workers or --batch-size"):
        ring_prefetch(workers, batch, 224, free=int(workers * one / SHM_SHARE))


def test_jobs_at_once_share_the_whole_shared_memory(monkeypatch):
    """A sweep's concurrent jobs each size their ring to their part of /dev/shm, not to what is free when
    each starts; a part too small for one batch a worker stops at once, naming the fixes."""
    from aivh_ens import system

    one = 8 * 3 * 224 * 224  # bytes of one uint8 batch
    total = int(20 * one / SHM_SHARE) + 8  # room for 20 batches in all
    monkeypatch.setattr(system, "shm_total", lambda: total)
    assert ring_prefetch(3, 8, 224, free=total, jobs=1) == prefetch_factor(3, one)  # alone: the usual depth
    assert ring_prefetch(3, 8, 224, free=total, jobs=4) == 1  # 5 batches each: 3 workers x 1 + 1
    with pytest.raises(UserError, match=r"shared by 8 jobs at once.*--shm-size.*fewer jobs at once"):
        ring_prefetch(3, 8, 224, free=total, jobs=8)  # 2.5 batches each, 4 needed
    monkeypatch.setenv(system.JOBS_AT_ONCE_ENV, "8")  # what the local backend sets in its job processes
    assert system.jobs_at_once() == 8
    with pytest.raises(UserError, match="shared by 8 jobs"):
        ring_prefetch(3, 8, 224, free=total)
