"""Micro-batching for the event loop: items that arrive together share one call of a batch function.

The first item opens a collection window (``window_s``); items arriving within it join, up to ``max_batch``.
The batch function runs in one dedicated thread, so the event loop keeps accepting and decoding uploads
while the models work, and items that arrive meanwhile form the next batch. The queue is bounded
(``max_queue``): past it, :class:`QueueFull` at once, so an overloaded server answers instead of queueing for
ever. A batch whose call raises is scored again item by item, so only the items that fail alone fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher stopped before an item was scored (the server is shutting down)."""


class QueueFull(RuntimeError):
    """More items wait than ``max_queue`` allows (the server is overloaded: retry later)."""


@dataclass
class _Pending:
    value: Any
    future: asyncio.Future


class Batcher(Generic[T, R]):
    """Collect items from concurrent callers into batches for ``fn`` (a list in, a list of results out).

    Args:
        fn: the batch function; runs in a single worker thread; returns one result per item, in order.
        max_batch: the most items per call (1 turns batching off).
        window_s: how long the first item of a batch waits for others.
        max_queue: the most items waiting for a batch (None: no bound).

    Attributes:
        batches, items: calls of ``fn`` so far and the items they took.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int,
        window_s: float,
        max_queue: int | None = None,
    ):
        if max_batch < 1 or window_s < 0 or (max_queue is not None and max_queue < 1):
            raise ValueError(
                f"need max_batch >= 1, window_s >= 0, max_queue >= 1; got {max_batch}, {window_s}, {max_queue}"
            )
        self.fn, self.max_batch, self.window_s, self.max_queue = fn, max_batch, window_s, max_queue
        self.batches = self.items = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._current: list[_Pending] = []  # the batch being scored
        self._since: float | None = None  # when the running call of the batch function began
        self._thread: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start collecting (call from the event loop that will submit)."""
        self._queue, self._arrived = asyncio.Queue(), asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aivh-ens-batch")
        self._task = asyncio.create_task(self._run(), name="aivh-ens-batcher")

    async def stop(self) -> None:
        """Stop collecting; queued items and the running batch's fail with :class:`BatcherClosed`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        left = list(self._current)
        while self._queue is not None and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for p in left:
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the server is shutting down"))
        if self._thread is not None:  # the running batch ends; the loop runs on meanwhile
            await asyncio.to_thread(self._thread.shutdown, wait=True)
        self._queue = self._arrived = self._task = self._thread = None
        self._current = []

    async def submit(self, values: Sequence[T]) -> list[R]:
        """Results for ``values`` (they may be split over several batches and share them with others).

        Raises:
            QueueFull: ``values`` would take the queue past ``max_queue`` (none of them is queued).
            Exception: what the batch function raised for an item scored alone.
        """
        return list(await asyncio.gather(*self.enqueue(values)))

    def enqueue(self, values: Sequence[T]) -> list[asyncio.Future]:
        """Queue every one of ``values`` or none of them; one future per value, for its result.

        Raises:
            QueueFull: ``values`` would take the queue past ``max_queue``.
            BatcherClosed: the batcher is not running (stopped, or its task died).
        """
        if self._queue is None or self._arrived is None:
            raise RuntimeError("Batcher.start() was not called")
        if not self.alive:
            raise BatcherClosed("the scoring loop is not running")
        if self.max_queue is not None and self._queue.qsize() + len(values) > self.max_queue:
            raise QueueFull(
                f"{self._queue.qsize()} images are waiting to be scored (--max-queue {self.max_queue})"
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(v, loop.create_future()) for v in values]
        for p in pending:
            self._queue.put_nowait(p)
        self._arrived.set()
        return [p.future for p in pending]

    @property
    def alive(self) -> bool:
        """Whether the collecting task runs (it never ends on its own: done means it died)."""
        return self._task is not None and not self._task.done()

    @property
    def busy_s(self) -> float:
        """Seconds the batch being scored has run so far (0 when idle): a stuck forward pass shows here."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    async def _collect(self) -> list[_Pending]:
        """The next batch: the first item, then whatever arrives within the window, up to ``max_batch``."""
        assert self._queue is not None and self._arrived is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.window_s
        while len(batch) < self.max_batch:
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            left = deadline - asyncio.get_running_loop().time()
            if len(batch) >= self.max_batch or left <= 0:
                break
            self._arrived.clear()  # set again by the next submit; waiting on it never loses an item
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return batch

    async def _run(self) -> None:
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]  # skip callers that left
            if not batch:
                continue
            self._current = batch
            try:
                results = await self._call([p.value for p in batch])
            except Exception as e:
                if len(batch) == 1:
                    self._settle(batch, error=e)
                    continue
                await self._one_by_one(batch)  # one bad item must not fail the others
                continue
            self.batches += 1
            self.items += len(batch)
            self._settle(batch, results)

    async def _call(self, values: list[Any]) -> Sequence[Any]:
        self._since = time.monotonic()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._thread, self.fn, values)
        finally:
            self._since = None
        if len(results) != len(values):
            raise RuntimeError(f"the batch function returned {len(results)} results for {len(values)} items")
        return results

    async def _one_by_one(self, batch: list[_Pending]) -> None:
        for p in batch:
            if p.future.done():
                continue
            try:
                result = await self._call([p.value])
            except Exception as e:
                self._settle([p], error=e)
                continue
            self.batches += 1
            self.items += 1
            self._settle([p], [result[0]])

    @staticmethod
    def _settle(batch: list[_Pending], results: Sequence[Any] = (), error: Exception | None = None) -> None:
        for i, p in enumerate(batch):
            if p.future.done():
                continue
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(results[i])
