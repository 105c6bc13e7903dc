"""The shared-memory ring an image loader's workers write their batches into (:class:`RingLoader`), its
per-batch timeout (:class:`LoaderStalled`), and the thread that pins batches ahead of a CUDA training step."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

LOADER_TIMEOUT_S = 600.0
"""Seconds a loader with workers waits for one batch (worker start-up included) before it stops with
:class:`LoaderStalled`: a batch of even 1024 px images decodes in seconds, so only a hang reaches it (a read
stalled on a network mount, a wedged worker)."""


class LoaderStalled(RuntimeError):
    """No batch came from a loader's workers within its timeout."""


class _Slotted(list):
    """A list (a batch of sampler keys, or of the items they gave) and the ring slot of its images."""

    def __init__(self, items: Sequence[Any], slot: int):
        super().__init__(items)
        self.slot = slot

    def __reduce__(self):
        return _Slotted, (list(self), self.slot)


class _SlotBatchSampler(Sampler):
    """Batches of keys from ``sampler``, the k-th of a pass tagged with ring slot k mod ``slots``."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, slots: int):
        self.sampler, self.batch_size, self.drop_last, self.slots = sampler, batch_size, drop_last, slots

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[_Slotted]:
        batch: list[Any] = []
        k = 0
        for key in self.sampler:
            batch.append(key)
            if len(batch) == self.batch_size:
                yield _Slotted(batch, k % self.slots)
                batch, k = [], k + 1
        if batch and not self.drop_last:
            yield _Slotted(batch, k % self.slots)


class _RingCollate:
    """In a worker: stack a batch's images into its ring slot; the batch sent back carries (slot, n)."""

    def __init__(self, ring: torch.Tensor):
        self.ring = ring  # (R, B, 3, S, S) uint8, shared memory

    def __call__(self, items: _Slotted):
        n = len(items)
        torch.stack([it[0] for it in items], out=self.ring[items.slot, :n])
        # NumPy arrays travel pickled inside the message; a torch tensor would get a shared-memory segment
        # and a file descriptor of its own (~0.1 ms on each side, four times a batch).
        labels = np.array([it[1] for it in items], dtype=np.int64)
        rows = np.array([it[2] for it in items], dtype=np.int64)
        ok = np.array([it[3] for it in items], dtype=bool)
        return (items.slot, n), labels, rows, ok


class RingLoader(DataLoader):
    """A DataLoader over an :class:`~aivh_ens.data.loader.ImageDataset` whose persistent workers write uint8 batches into a ring of
    shared-memory slots, allocated once (a new segment per batch costs a page fault per 4 KiB on both
    sides, every batch). Yields (uint8 (B, 3, S, S), labels, rows, ok) like the plain loader; the images
    are copied out of the ring, so a batch stays valid after the next one. On CUDA a background thread copies
    them into pinned memory ahead of the training step, as the DataLoader's own pin-memory thread would.

    The ring has ``workers * prefetch + 1`` slots. A DataLoader primes ``workers * prefetch`` batches and
    sends one more index each time it hands a batch over, so when batch k arrives here (and is copied out of
    its slot) the batches in flight are k + 1 .. k + workers * prefetch: with k, one batch per slot.
    Between passes, the DataLoader's reset waits for every stale task before the new pass starts.
    """

    def __init__(
        self,
        ds: Dataset,  # an aivh_ens.data.loader.ImageDataset (its img_size sizes the ring)
        sampler: Sampler,  # its EpochSampler
        batch_size: int,
        drop_last: bool,
        workers: int,
        prefetch: int,
        device: torch.device,
        timeout: float = LOADER_TIMEOUT_S,
    ):
        slots = workers * prefetch + 1
        shape = (slots, batch_size, 3, ds.img_size, ds.img_size)
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        self.ring = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)  # pages fault in on first use
        self.epoch_sampler = sampler
        self.device = device
        super().__init__(
            ds,
            batch_sampler=_SlotBatchSampler(sampler, batch_size, drop_last, slots),
            num_workers=workers,
            collate_fn=_RingCollate(self.ring),
            pin_memory=False,
            persistent_workers=True,
            prefetch_factor=prefetch,
            timeout=timeout,
        )

    def _batches(self) -> Iterator[Any]:
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if not str(e).startswith("DataLoader timed out"):
                    raise
                raise LoaderStalled(
                    f"no batch from the {self.num_workers} image loader workers in {self.timeout:g} s: a read of "
                    f"the images stalled (a network mount?) or a worker hung; the fold stops (run it again to "
                    "resume from its last finished epoch)"
                ) from None
            yield batch

    def _copied(self) -> Iterator[Any]:
        pin = self.device.type == "cuda"
        for (slot, n), *meta in self._batches():
            src = self.ring[slot, :n]  # (n, 3, S, S) view of the slot
            x = torch.empty(src.shape, dtype=torch.uint8, pin_memory=pin).copy_(src)
            labels, rows, ok = (torch.from_numpy(a) for a in meta)
            if pin:
                labels, rows, ok = labels.pin_memory(), rows.pin_memory(), ok.pin_memory()
            yield x, labels, rows, ok

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.device.type != "cuda":
            return self._copied()
        return _in_background(self._copied, depth=2, device=self.device)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _in_background(make: Any, depth: int, device: torch.device) -> Iterator[Any]:
    """The items of the iterator ``make()`` returns, produced ``depth`` ahead by a thread (bound to ``device``,
    so pinning creates no context on another GPU). Stopping early stops the thread before returning."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()
    # The caller's current device when "cuda" names none (set_device needs an index); read in this thread.
    index = (
        (device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else None
    )

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            if index is not None:
                torch.cuda.set_device(index)
            for item in make():
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failure(e))

    thread = threading.Thread(target=work, name="ring-pin", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
