"""The clock of an ``auto`` call and the gate that starts a sweep job only when the clock can finish it.

Nothing starts that would end past the limit: a job is admitted only when its estimate, corrected by the
speed this call's jobs of its kind measured, fits the time left before blend, submit and report; a run's first
job only when all its unfinished folds fit. Jobs run under a deadline (:data:`aivh_ens.system.DEADLINE_ENV`)
by which each fold ends its epochs early (:func:`aivh_ens.train.fold.planned_epochs`), so a fold that would
overrun stops at its best epoch so far.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivh_ens.auto.budget import JOB_OVERHEAD_S
from aivh_ens.auto.plan import AutoPlan, AutoRun

PROCESS_START_S = 8.0
"""A sweep device's process start (spawned, torch and timm imported) before its first job."""
RATIO_RANGE = (0.3, 3.0)
"""Measured over planned seconds are clipped to this range (one odd epoch must not swing a plan)."""
FIRST_RUN_SHARE = 0.5
"""Until one run is complete, a job of the first run is admitted when this share of its epochs fits: the
deadline shortens it, and a call that completes no run has nothing to submit."""


@dataclass(frozen=True)
class Clock:
    """The call's time limit: seconds since it started and seconds left."""

    start: float
    limit_s: float

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def wall_deadline(self, reserve_s: float) -> float:
        """The wall time (``time.time()``) ``reserve_s`` before the limit: when the jobs' training must end."""
        return time.time() + self.left() - reserve_s


def _metrics_seconds(fold: Path) -> list[float]:
    """Seconds of each epoch a fold has finished (its ``metrics.csv``); none before its first."""
    import csv

    path = fold / "metrics.csv"
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            return [float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds")]
    except (OSError, ValueError, KeyError):
        return []  # a file being replaced; the next look reads it


def kind_ratios(workdir: Path, plan: AutoPlan, runs: Sequence[AutoRun] | None = None) -> dict[str, float]:
    """Per kind of run (``scratch``, ``finetune``, ``probe``): measured over planned seconds of its epochs so far
    (every fold's ``metrics.csv``, running folds included), else of its finished jobs (``done.json``: probes have
    no epochs). A kind nothing was measured for is absent: a probe's speed says nothing of a fine-tune's."""
    from aivh_ens.layout import fold_dir
    from aivh_ens.scale.jobs import read_json

    sums: dict[str, list[float]] = {}
    for r in plan.runs if runs is None else runs:
        for k in range(plan.folds):
            fdir = fold_dir(workdir, r.name, k)
            seconds = _metrics_seconds(fdir)
            done = read_json(fdir / "done.json") if not seconds else None
            if seconds:
                got, want = sum(seconds), len(seconds) * epoch_seconds(r)
            elif done and "wall_minutes_this_process" in done:
                got, want = 60 * done["wall_minutes_this_process"] + JOB_OVERHEAD_S, r.job_s
            else:
                continue
            acc = sums.setdefault(r.kind, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + got, acc[1] + want
    lo, hi = RATIO_RANGE
    return {k: min(hi, max(lo, got / want)) for k, (got, want) in sums.items() if want > 0}


def epoch_seconds(r: AutoRun) -> float:
    """Planned seconds of one of a run's epochs (its validation passes averaged in), at the probe's speed."""
    if r.epoch_s > 0:
        return r.epoch_s
    return (r.fold_s or r.job_s - JOB_OVERHEAD_S) / max(1, r.epochs)


def ratio_for(ratios: dict[str, float], kind: str) -> float:
    """The correction of a kind: its own measurement; else the slowest other kind's, and never below 1 (an
    unmeasured kind is not assumed faster than planned)."""
    if kind in ratios:
        return ratios[kind]
    return max([1.0, *ratios.values()])


@dataclass
class Gate:
    """The sweep's ``admit``: start a job only when the clock can finish it (see the module docstring).

    ``reserve``: seconds kept at the end for blend, submit and report.
    """

    plan: AutoPlan
    clock: Clock
    workdir: Path
    devices: int = 1
    started: list[Any] = dataclasses.field(default_factory=list)

    def __call__(self, job_file: Path) -> bool:
        from aivh_ens.scale.jobs import read_spec

        spec = read_spec(job_file)
        if self.clock.left() - self.plan.finish_s >= self.need(spec):
            self.started.append(spec)
            return True
        return False

    def run(self, name: str) -> AutoRun:
        return next(r for r in self.plan.runs if r.name == name)

    def need(self, spec: Any) -> float:
        """Seconds the job needs: its set-up and OOF pass at the speed its kind measured, plus its epochs
        (``fold_time`` and the deadline end them on time; a share of them for the first run, see
        :data:`FIRST_RUN_SHARE`); a run's whole unfinished folds, in rounds on the devices, when none of its
        jobs started yet (a half-done run is worth nothing to the blend)."""
        r = self.run(spec.run)
        ratio = ratio_for(kind_ratios(self.workdir, self.plan), r.kind)
        if r.fold_s > 0:
            share = FIRST_RUN_SHARE if self._first_run(spec) else 1.0
            need = (r.job_s - r.fold_s) * ratio + share * r.fold_s
        else:
            need = r.job_s * ratio
        if not any(s.run == spec.run for s in self.started):
            folds = [spec.fold_dir.parent / f"fold{k}" / "done.json" for k in range(self.plan.folds)]
            need *= math.ceil(sum(not f.is_file() for f in folds) / self.devices)
        if len(self.started) < self.devices:  # the device's process starts with its first job
            need += PROCESS_START_S
        return need

    def _first_run(self, spec: Any) -> bool:
        """Whether no run is complete yet and ``spec`` is a job of the first run started (or none started)."""
        from aivh_ens.layout import oof_path

        if any(oof_path(self.workdir, r.name).is_file() for r in self.plan.runs):
            return False
        return not self.started or spec.run == self.started[0].run
