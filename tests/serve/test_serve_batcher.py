"""The micro-batcher on its own: batch sizes, the window, order, failures and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from aivh_ens.serve import Batcher
from aivh_ens.serve.batcher import BatcherClosed, QueueFull


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_items_arriving_together_share_a_batch_and_keep_their_order():
    calls: list[list[int]] = []

    def square(xs: list[int]) -> list[int]:
        calls.append(xs)
        return [x * x for x in xs]

    async def main():
        b = Batcher(square, max_batch=4, window_s=0.2)
        await b.start()
        out = await asyncio.gather(*(b.submit([i]) for i in range(10)), b.submit([20, 21]))
        await b.stop()
        return out, b

    out, b = _run(main())
    assert out == [[i * i] for i in range(10)] + [[400, 441]]
    assert [len(c) for c in calls] == [4, 4, 4] and b.batches == 3 and b.items == 12


def test_a_lone_item_waits_no_longer_than_the_window():
    async def main():
        b = Batcher(lambda xs: xs, max_batch=64, window_s=0.05)
        await b.start()
        t0 = time.perf_counter()
        await b.submit([1])
        dt = time.perf_counter() - t0
        await b.stop()
        return dt

    assert _run(main()) < 1.0


def test_items_arriving_while_a_batch_runs_form_the_next_batch():
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def slow(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        started.set()
        release.wait(10)
        return xs

    async def main():
        b = Batcher(slow, max_batch=16, window_s=0.0)
        await b.start()
        first = asyncio.ensure_future(b.submit([0]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        rest = [asyncio.ensure_future(b.submit([i])) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        out = await asyncio.gather(first, *rest)
        await b.stop()
        return out

    assert _run(main()) == [[i] for i in range(6)]
    assert sizes == [1, 5]


def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs():
    def fn(xs: list[int]) -> list[int]:
        if 13 in xs:
            raise ValueError("unlucky")
        return xs

    async def main():
        b = Batcher(fn, max_batch=1, window_s=0.0)
        await b.start()
        with pytest.raises(ValueError, match="unlucky"):
            await b.submit([13])
        ok = await b.submit([7])
        await b.stop()
        return ok

    assert _run(main()) == [7]


def test_a_failing_batch_is_scored_item_by_item_so_only_the_bad_item_fails():
    calls: list[list[int]] = []

    def fn(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        if 13 in xs:
            raise ValueError("unlucky")
        return [x * 2 for x in xs]

    async def main():
        b = Batcher(fn, max_batch=8, window_s=0.2)
        await b.start()
        out = await asyncio.gather(*(b.submit([x]) for x in (1, 13, 3, 4)), return_exceptions=True)
        await b.stop()
        return out, b.items

    out, items = _run(main())
    assert out[0] == [2] and out[2] == [6] and out[3] == [8]
    assert isinstance(out[1], ValueError) and "unlucky" in str(out[1])
    assert calls == [[1, 13, 3, 4], [1], [13], [3], [4]] and items == 3


def test_past_max_queue_submit_is_refused_at_once():
    release = threading.Event()

    async def main():
        b = Batcher(lambda xs: [release.wait(10) and x for x in xs], max_batch=1, window_s=0.0, max_queue=2)
        await b.start()
        running = asyncio.ensure_future(b.submit([0]))
        while not b._current:  # the first item is being scored; the next two wait in the queue
            await asyncio.sleep(0.01)
        waiting = [asyncio.ensure_future(b.submit([i])) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="--max-queue 2"):
            await b.submit([3])
        with pytest.raises(QueueFull):
            await b.submit([4, 5])
        release.set()
        out = await asyncio.gather(running, *waiting)
        await b.stop()
        return out

    assert _run(main()) == [[0], [1], [2]]


def test_stop_fails_what_is_still_queued():
    release = threading.Event()

    async def main():
        b = Batcher(lambda xs: [release.wait(10) and x for x in xs], max_batch=1, window_s=0.0)
        await b.start()
        futs = [asyncio.ensure_future(b.submit([i])) for i in range(3)]
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0.05)
        release.set()
        await stopping
        return await asyncio.gather(*futs, return_exceptions=True)

    out = _run(main())
    assert all(isinstance(o, BatcherClosed) and "shutting down" in str(o) for o in out)  # the running one too


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch": 0, "window_s": 0.1},
        {"max_batch": 4, "window_s": -1},
        {"max_batch": 4, "window_s": 0.1, "max_queue": 0},
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda xs: xs, **bad)


def test_a_stopped_batcher_starts_again():
    async def main():
        b = Batcher(lambda xs: [x + 1 for x in xs], max_batch=8, window_s=0.0)
        out = []
        for _ in range(2):
            await b.start()
            out.append(await b.submit([1, 2]))
            await b.stop()
        return out

    assert _run(main()) == [[2, 3], [2, 3]]
