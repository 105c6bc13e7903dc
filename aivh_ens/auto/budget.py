"""Time budgets: ``--time-limit`` parsing, the cost model of a run, and the plan that fits a budget.

Pure Python (no torch): a run's cost comes from its candidate's measured images per second, so the
planning is testable in microseconds. :func:`schedule_s` simulates the sweep engine (each job on the next
free device) to say how long a plan takes.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from aivh_ens.errors import UserError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SWEEP_OVERHEAD_S = 18.0
"""One sweep call: the input checks, the fold files, a fresh process per device (torch's import)."""
JOB_OVERHEAD_S = 3.0
"""One (run, fold) job beyond its epochs: the model, the loaders, the OOF pass's set-up, the files."""
LOADER_FACTOR = 1.3
"""Real epochs against the probe's synthetic batches: reading the cache, augmentation, validation, and the
device's jobs running side by side (two ``aivh_res_s`` jobs at once train about 1.25x slower than the probe
reads alone: docs/benchmarks-history.md, "auto"). Folds end on time whatever it is (``fold_time`` and the
deadline); the gate corrects the rest with the speeds the jobs measure (:mod:`aivh_ens.auto.gate`)."""
FOLD_CHOICES = (5, 4, 3, 2)
"""The folds :func:`choose_folds` picks from."""


def parse_time_limit(value: str | float | int) -> float:
    """Seconds in ``20m``, ``8h``, ``1h30m``, ``90s``, ``1.5h`` or a plain number of seconds.

    Raises:
        UserError: anything else, or a limit that is not more than 0, naming ``--time-limit``.
    """
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    elif text and re.fullmatch(r"(\d+(\.\d+)?[smhd])+", text):
        seconds = sum(float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", text))
    else:
        raise UserError(
            f"time_limit={value!r} (--time-limit) is not a duration; give seconds or a number with a unit, "
            "e.g. 90s, 20m, 8h or 1h30m"
        )
    if not seconds > 0:
        raise UserError(f"time_limit={value!r} (--time-limit) must be more than 0 seconds, e.g. 20m or 8h")
    return seconds


def format_duration(seconds: float) -> str:
    """``45s``, ``12.5m`` or ``2.25h``: how a budget is printed."""
    if seconds < 120:
        return f"{math.ceil(seconds)}s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


@dataclass(frozen=True)
class Speed:
    """A candidate's measured speed on this device: training and evaluation images per second."""

    train_img_s: float
    eval_img_s: float
    views: int = 1
    """The TTA views its run scores each OOF row and test image with: its OOF pass and submit's passes over the
    test images cost that many forward passes per image."""


def validated_epochs(epochs: int) -> int:
    """The epochs a run that validates only at its end (``validate_last``) validates: the last quarter, at
    least 2 (all of them in a shorter run)."""
    return min(epochs, max(2, math.ceil(epochs / 4)))


def job_s(speed: Speed, n_train: int, folds: int, epochs: int, last_only: bool = False) -> float:
    """Seconds of one fold job: its :func:`epochs_s`, the OOF pass over its own rows (every TTA view) and the
    set-up."""
    return (
        JOB_OVERHEAD_S
        + epochs_s(speed, n_train, folds, epochs, last_only)
        + LOADER_FACTOR * (speed.views * n_train / folds / speed.eval_img_s)
    )


def epochs_s(speed: Speed, n_train: int, folds: int, epochs: int, last_only: bool = False) -> float:
    """Seconds of a fold job's epochs (a run's ``fold_time``): ``epochs`` over the other folds' rows, validating
    its own rows after each (after the last :func:`validated_epochs` with ``last_only``)."""
    n_val = n_train / folds
    checks = validated_epochs(epochs) if last_only else epochs
    train = epochs * (n_train - n_val) / speed.train_img_s
    return LOADER_FACTOR * (train + checks * n_val / speed.eval_img_s)


def prepare_s(n_images: int, decode_s: float | None = None) -> float:
    """Seconds a sweep spends on its images before the first job, as the sweep estimates it
    (:func:`aivh_ens.scale.sweep.expected_prepare_seconds`; ``decode_s``: one image's decode time here)."""
    from aivh_ens.scale.sweep import expected_prepare_seconds

    return expected_prepare_seconds(n_images, decode_s)


def schedule_s(jobs: Sequence[float], devices: int) -> float:
    """Wall seconds of a sweep of ``jobs`` (each job's seconds) on ``devices``, in the given order (the plan's:
    the sweep runs ``auto``'s jobs so), each on the next free device."""
    if not jobs:
        return 0.0
    free = [0.0] * max(1, devices)
    for j in jobs:
        heapq.heapreplace(free, free[0] + j)
    return SWEEP_OVERHEAD_S + max(free)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a plan: its candidate (by index), epochs and estimated seconds per fold job."""

    candidate: int
    epochs: int
    job_s: float


@dataclass(frozen=True)
class Fit:
    """What :func:`fit_plan` chose: folds, the runs, and the plan's estimated wall seconds."""

    folds: int
    runs: tuple[PlannedRun, ...]
    seconds: float


def _runs(
    speeds: Sequence[Speed],
    chosen: Sequence[int],
    epochs: Sequence[int],
    n: int,
    k: int,
    last_only: Sequence[bool] = (),
) -> list[PlannedRun]:
    return [
        PlannedRun(c, e, job_s(speeds[c], n, k, e, _checks_last(last_only, c)))
        for c, e in zip(chosen, epochs, strict=True)
    ]


def _checks_last(last_only: Sequence[bool], c: int) -> bool:
    """Whether candidate ``c`` validates only its last epochs (candidates ``last_only`` does not reach do not)."""
    return c < len(last_only) and last_only[c]


def plan_seconds(runs: Sequence[PlannedRun], folds: int, devices: int) -> float:
    """Wall seconds of a plan: every run's ``folds`` jobs on ``devices``."""
    return schedule_s([r.job_s for r in runs for _ in range(folds)], devices)


def stretch(runs: Sequence[PlannedRun], folds: int, devices: int, budget_s: float) -> float:
    """The factor (at least 1) by which every job of a plan may take longer and the plan still fit
    ``budget_s``: the time its whole epochs leave over (the sweep's wall time is its jobs' seconds on the
    busiest device, so it scales with them)."""
    planned = plan_seconds(runs, folds, devices)
    return max(1.0, (budget_s - SWEEP_OVERHEAD_S) / max(1e-9, planned - SWEEP_OVERHEAD_S))


def fit_plan(
    speeds: Sequence[Speed],
    epoch_range: Sequence[tuple[int, int]],
    n_train: int,
    devices: int,
    budget_s: float,
    folds: int | None = None,
    last_only: Sequence[bool] = (),
) -> Fit | None:
    """The plan that fits ``budget_s``: the first candidate on the folds :func:`choose_folds` picks, with the
    most epochs that fit (up to the most of its range); then every further candidate that still fits (in
    order), with the most epochs the time left gives them.

    The first candidate's epochs come before further candidates: training the best model longer was worth
    more than averaging weaker ones in every measured plan (docs/benchmarks-history.md, "auto").

    Args:
        speeds: each candidate's measured speed, in priority order.
        epoch_range: each candidate's (least, most) epochs worth training.
        n_train: training rows.
        devices: jobs that run at once.
        budget_s: wall seconds the training may take.
        folds: a fixed number of folds (a plan being extended keeps its fold file); None: :func:`choose_folds`.
        last_only: per candidate, whether its runs validate only their last epochs (:func:`validated_epochs`);
            missing ones validate every epoch.

    Returns:
        None when no candidate fits with 2 folds and its least epochs.
    """
    choices = (folds,) if folds else FOLD_CHOICES
    for lead in range(len(speeds)):  # a candidate that does not fit at all gives way to the next one
        lead_last = _checks_last(last_only, lead)
        pick = choose_folds(speeds[lead], epoch_range[lead], n_train, devices, budget_s, choices, lead_last)
        if pick is None:
            continue
        k, first = pick
        chosen, least = [lead], [first]
        for c in range(lead + 1, len(speeds)):
            trial = [*least, epoch_range[c][0]]
            runs = _runs(speeds, [*chosen, c], trial, n_train, k, last_only)
            if plan_seconds(runs, k, devices) <= budget_s:
                chosen, least = [*chosen, c], trial
        ranges = [(first, first), *(epoch_range[c] for c in chosen[1:])]
        picked = [speeds[c] for c in chosen]
        checks = [_checks_last(last_only, c) for c in chosen]
        epochs = _most_epochs(picked, ranges, range(len(chosen)), n_train, k, devices, budget_s, checks)
        runs = _runs(speeds, chosen, epochs or least, n_train, k, last_only)
        return Fit(k, tuple(runs), plan_seconds(runs, k, devices))
    return None


def slot_share(folds: int, devices: int) -> Fraction:
    """What a fold choice gives each fold model: the share of rows it trains on ((k - 1) / k) times the share
    of the device slots the run's jobs fill (k / (rounds * devices)). 5 folds on 2 devices run in 3 rounds
    of 2 slots, the last one half idle: 4/6; 4 folds fill 2 rounds: 3/4."""
    return Fraction(folds - 1, math.ceil(folds / devices) * devices)


def choose_folds(
    speed: Speed,
    epochs: tuple[int, int],
    n_train: int,
    devices: int,
    budget_s: float,
    choices: Sequence[int] = FOLD_CHOICES,
    last_only: bool = False,
) -> tuple[int, int] | None:
    """Folds for the first candidate, and its most epochs there: the first of ``choices`` when it trains the
    most of its epochs there; else the choice of the largest :func:`slot_share` (more folds on a tie). On 2
    devices that is 4 folds (2 full rounds; 5 folds leave one device idle for a third of the time), on 1
    device 5, on 4 devices 4. None when it does not fit with its least epochs on any of ``choices``."""
    fits = {}
    for k in choices:
        most = _most_epochs([speed], [epochs], [0], n_train, k, devices, budget_s, [last_only])
        if most is not None:
            fits[k] = most[0]
    if not fits:
        return None
    if fits.get(choices[0], 0) >= epochs[1]:
        return choices[0], fits[choices[0]]
    k = max(fits, key=lambda k: (slot_share(k, devices), k))
    return k, fits[k]


def _most_epochs(
    speeds: Sequence[Speed],
    epoch_range: Sequence[tuple[int, int]],
    chosen: Sequence[int],
    n: int,
    k: int,
    devices: int,
    budget_s: float,
    last_only: Sequence[bool] = (),
) -> list[int] | None:
    """The epochs of the ``chosen`` runs raised by the same share of each range while the plan fits; None
    when even the least epochs do not fit."""
    lo = [epoch_range[c][0] for c in chosen]
    hi = [epoch_range[c][1] for c in chosen]
    if plan_seconds(_runs(speeds, chosen, lo, n, k, last_only), k, devices) > budget_s:
        return None
    best = lo
    for step in range(1, 101):
        share = step / 100
        epochs = [max(a, round(a + share * (b - a))) for a, b in zip(lo, hi, strict=True)]
        if plan_seconds(_runs(speeds, chosen, epochs, n, k, last_only), k, devices) > budget_s:
            break
        best = epochs
    return best


def minimum_s(
    speeds: Sequence[Speed],
    epoch_range: Sequence[tuple[int, int]],
    n_train: int,
    devices: int,
    last_only: Sequence[bool] = (),
) -> float:
    """Wall seconds of the smallest plan: the cheapest candidate, 2 folds, its least epochs."""
    return min(
        plan_seconds(_runs(speeds, [c], [epoch_range[c][0]], n_train, 2, last_only), 2, devices)
        for c in range(len(speeds))
    )
