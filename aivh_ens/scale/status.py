"""``aivh-ens status``: the state of every (run, fold) job from the files alone, and the end-table format.

A fold is ``done`` (its done.json), ``running`` (a live lock: host:pid, epoch, ETA from the epochs so far),
``failed`` (failed.json, its one-line error), ``interrupted`` (a resume state but no live lock) or ``pending``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pandas as pd

from aivh_ens.errors import UserError
from aivh_ens.layout import RESERVED_RUN_NAMES, fold_dir, run_dir, runs_dir
from aivh_ens.liveness import same_space
from aivh_ens.locks import GRACE_S, beat_path, read_owner, stale_reason
from aivh_ens.scale.jobs import FAILED, read_json

COLUMNS = ("run", "fold", "state", "host", "minutes", "f1", "error")


def _epochs(fdir: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(fdir / "metrics.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return None


def fold_status(workdir: Path, run: str, k: int, epochs: int) -> dict[str, Any]:
    """One row of the status table for fold ``k`` of ``run``."""
    fdir = fold_dir(workdir, run, k)
    row: dict[str, Any] = {
        "run": run,
        "fold": k,
        "state": "pending",
        "host": "",
        "minutes": None,
        "f1": None,
        "error": "",
    }
    done = read_json(fdir / "done.json")
    if done is not None:
        return row | {
            "state": "done",
            "host": done.get("host", ""),
            "minutes": done.get("minutes"),
            "f1": done.get("val_f1"),
        }
    lock = run_dir(workdir, run) / f"fold{k}.lock"
    owner = read_owner(lock)
    hist = _epochs(fdir)
    if owner is not None and stale_reason(owner) is None and not _silent(lock, owner):
        n = 0 if hist is None else len(hist)
        eta = ""
        if n:
            left = (epochs - n) * float(hist["seconds"].mean()) / 60
            eta = f", ETA {left:.1f} min"
        minutes = (time.time() - float(owner.get("time", time.time()))) / 60
        return row | {
            "state": f"running (epoch {n}/{epochs}{eta})",
            "host": f"{owner.get('host')}:{owner.get('pid')}",
            "minutes": minutes,
        }
    failed = read_json(fdir / FAILED)
    if failed is not None:
        return row | {"state": "failed", "host": failed.get("host", ""), "error": failed.get("error", "")}
    if (fdir / "state.pt").exists():
        return row | {"state": f"interrupted (epoch {0 if hist is None else len(hist)}/{epochs})"}
    return row


def _silent(lock: Path, owner: dict[str, Any]) -> bool:
    """Whether another host's lock has had no heartbeat for twice its grace period, by the shared storage's
    file times (a dead host's lock; a contender would take it over). Locks of this host are judged by PID."""
    if same_space(owner):
        return False
    times = []
    for f in (lock, beat_path(lock, str(owner.get("token")))):
        with contextlib.suppress(OSError):
            times.append(f.stat().st_mtime)
    grace = float(owner.get("grace", GRACE_S))
    return bool(times) and time.time() - max(times) > 2 * grace


def status_rows(workdir: str | Path = ".", runs: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows for every fold of the given runs (default: every run under ``runs/``).

    Raises:
        UserError: a named run does not exist.
    """
    from aivh_ens.layout import read_run_config

    workdir = Path(workdir)
    if runs is None:
        root = runs_dir(workdir)
        runs = (
            sorted(
                p.name
                for p in root.glob("*")
                if p.name not in RESERVED_RUN_NAMES and (p / "config.json").exists()
            )
            if root.exists()
            else []
        )
    rows = []
    for run in runs:
        cfg, _ = read_run_config(workdir, run, missing_hint="see `aivh-ens status` for the runs there are")
        rows.extend(fold_status(workdir, run, k, cfg.epochs) for k in range(cfg.folds))
    if not rows and runs:
        raise UserError(f"no folds found for runs {runs}")
    return rows


def format_table(rows: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> str:
    """The end-of-sweep table: run, fold, state, host, minutes, best F1, the error's one line."""
    if not rows:
        return "no runs"
    cells = [
        [
            str(r["run"]),
            str(r["fold"]),
            str(r["state"]),
            str(r.get("host") or "-"),
            "-" if r.get("minutes") is None else f"{r['minutes']:.2f}",
            "-" if r.get("f1") is None else f"{r['f1']:.4f}",
            str(r.get("error") or ""),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), *(line(c) for c in cells)])
