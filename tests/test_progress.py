"""Progress off a terminal: no bar, at most one plain line per interval; on a terminal: the bar."""

from __future__ import annotations

import io
import time
import types

import pytest

from aivh_ens.progress import Progress, on_terminal


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_terminal_follows_the_stream() -> None:
    assert on_terminal(_Tty()) and not on_terminal(io.StringIO())
    closed = io.StringIO()
    closed.close()
    assert not on_terminal(closed)


def test_off_a_terminal_a_short_loop_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    assert list(Progress(range(1000), "epoch 1/1 train", log=lines.append, terminal=False)) == list(
        range(1000)
    )
    assert lines == [] and capsys.readouterr().err == ""


def test_off_a_terminal_a_long_loop_prints_one_line_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock of its own (a busy machine's sleeps overrun): 0.03 s per item, one line per 0.05 s or more."""
    import aivh_ens.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    lines: list[str] = []
    bar = Progress(range(6), "oof", unit="batch", log=lines.append, every=0.05, terminal=False)
    for _ in bar:
        bar.set_postfix(loss="0.5")
        now[0] += 0.03
    assert len(lines) == 3  # due after items 2, 4 and 6 (0.06, 0.12 and 0.18 s)
    assert lines[0].startswith("oof: ") and "/6 batch in " in lines[0] and "batch/s, loss 0.5)" in lines[0]


def test_disabled_prints_nothing_anywhere() -> None:
    lines: list[str] = []
    for _ in Progress(range(5), "x", log=lines.append, every=0.0, enabled=False, terminal=False):
        time.sleep(0.001)
    assert lines == []


def test_on_a_terminal_it_draws_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[dict] = []

    class FakeBar:  # tqdm itself is disabled in the tests (TQDM_DISABLE, read when tqdm is imported)
        def __init__(self, iterable, **kw):
            self.iterable = iterable
            drawn.append(kw)

        def __iter__(self):
            return iter(self.iterable)

        def close(self) -> None:
            drawn.append({"closed": True})

    monkeypatch.setattr("tqdm.auto.tqdm", FakeBar)
    lines: list[str] = []
    bar = Progress(range(3), "scan", unit="img", log=lines.append, every=0.0, terminal=True)
    assert list(bar) == [0, 1, 2]
    bar.close()
    assert lines == [] and drawn == [
        {"desc": "scan", "total": 3, "unit": "img", "leave": False, "dynamic_ncols": True},
        {"closed": True},
    ]


def test_update_use_off_a_terminal() -> None:
    lines: list[str] = []
    with Progress(
        None, "blend search", total=4, unit="trial", log=lines.append, every=0.0, terminal=False
    ) as p:
        for _ in range(4):
            p.set_postfix(best="f1 0.9")
            p.update()
    assert (
        len(lines) == 4 and lines[-1].startswith("blend search: 4/4 trial in ") and "best f1 0.9" in lines[-1]
    )
