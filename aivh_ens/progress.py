"""Progress that suits where the output goes: a bar on a terminal, a few plain lines anywhere else.

A redrawn bar written to a file (Kaggle's notebook log, ``nohup``, CI) becomes one line per redraw: a tiny
CIFAKE epoch wrote ~50 kB of them. Off a terminal, :class:`Progress` draws no bar and instead prints one
line per ``every`` seconds of a long loop (and nothing for a short one); the caller prints its own line per
epoch or per stage.

Every item counted (a batch, an image, a trial) also advances this process's :func:`beats` counter, which a
fold's lock publishes with its heartbeat and the local sweep watches: a job whose counter stops is hung.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

__all__ = ["LINE_EVERY_S", "Progress", "beat", "beats", "count_into", "on_terminal"]

LINE_EVERY_S = 60.0  # seconds between plain progress lines off a terminal


class _Count:
    value = 0


_counter: Any = _Count()  # anything with an integer ``value``: a shared-memory value in a sweep's worker


def count_into(counter: Any) -> None:
    """Count this process's progress into ``counter.value`` (e.g. a ``multiprocessing`` shared value that a
    parent process watches)."""
    global _counter
    counter.value = _counter.value
    _counter = counter


def beat(n: int = 1) -> None:
    """Record that this process made progress (``n`` more items done)."""
    _counter.value += n


def beats() -> int:
    """How many items this process has done so far (it only grows while work progresses)."""
    return int(_counter.value)


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Progress:
    """A tqdm bar on a terminal, or one plain line per ``every`` seconds elsewhere.

    Iterate over it (``for x in Progress(loader, "epoch 1/5 train")``), or use it as a context manager and
    call :meth:`update` (``with Progress(None, "blend search", total=300) as bar: ... bar.update()``).

    Args:
        iterable: what to iterate over (None for :meth:`update` use).
        desc: what is being done, e.g. ``"epoch 2/10 train"``.
        total: number of items (default ``len(iterable)`` where it has one).
        unit: the item's name in the rate, e.g. ``"img"`` or ``"batch"``.
        enabled: False shows nothing at all (``--quiet``).
        log: where plain lines go (default stderr).
        every: seconds between plain lines.
        terminal: force the bar (True) or plain lines (False); default: stderr is a terminal.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
        every: float = LINE_EVERY_S,
        terminal: bool | None = None,
    ):
        self.iterable, self.desc, self.unit, self.enabled, self.every = iterable, desc, unit, enabled, every
        self.total = total if total is not None else getattr(iterable, "__len__", lambda: None)()
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.bar = enabled and (on_terminal() if terminal is None else terminal)
        self.n, self.postfix, self.lines = 0, "", 0
        self._tqdm: Any = None
        self._t0 = self._last = time.perf_counter()

    def _open(self, iterable: Iterable[Any] | None) -> None:
        """Start the tqdm bar (terminal only)."""
        from tqdm.auto import tqdm

        self._tqdm = tqdm(
            iterable, desc=self.desc, total=self.total, unit=self.unit, leave=False, dynamic_ncols=True
        )

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, (
            "Progress(None, ...) counts with update(), it has nothing to iterate"
        )
        if self.bar:
            self._open(self.iterable)
            for item in self._tqdm:
                yield item
                beat()
            return
        self._t0 = self._last = time.perf_counter()
        for item in self.iterable:
            yield item
            self.update()

    def __enter__(self) -> Progress:
        if self.bar:
            self._open(None)
        self._t0 = self._last = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done (the bar moves, or a plain line is due after ``every`` seconds)."""
        beat(n)
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        self.n += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every:
            self._last = now
            self._line(now - self._t0)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (the bar's postfix, or the end of the next plain line)."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._tqdm is not None:
            self._tqdm.set_postfix(refresh=False, **values)

    def close(self) -> None:
        """Remove the bar (plain lines need no closing)."""
        if self._tqdm is not None:
            self._tqdm.close()

    def _line(self, elapsed: float) -> None:
        """One plain progress line: count, elapsed time, rate and postfix."""
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(elapsed, 1e-9)
        extra = f", {self.postfix}" if self.postfix else ""
        self.log(f"{self.desc}: {self.n}{of} {self.unit} in {elapsed:.0f}s ({rate:.1f} {self.unit}/s{extra})")
        self.lines += 1
