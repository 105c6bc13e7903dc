"""``run_auto``: from a data folder to ``submission.csv`` within a time limit, as named steps over the stages.

inspect (its findings become plan settings) -> candidates and their timed probes -> a plan that fits the
budget (``runs/auto/plan.toml``, a sweep plan; :mod:`aivh_ens.auto.planning`) -> the sweep engine under the
clock (:mod:`aivh_ens.auto.gate`; the first complete run is submitted at once, :mod:`aivh_ens.auto.steps`) ->
blend -> submit (its shift-aware default) -> report -> one final table (``runs/auto/table.txt``). A second call
with the same arguments resumes the plan; a larger ``--time-limit`` adds runs to it without changing (or
retraining) the runs already there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivh_ens.auto.budget import format_duration, parse_time_limit
from aivh_ens.auto.gate import Clock
from aivh_ens.auto.plan import AutoPlan, write_plan
from aivh_ens.auto.planning import old_timings, step_plan, top_up
from aivh_ens.auto.steps import FirstSubmission, step_blend, step_submit, step_sweep, torch_threads
from aivh_ens.auto.table import dry_run_table, final_table, run_rows
from aivh_ens.errors import UserError
from aivh_ens.io import write_json, write_text
from aivh_ens.layout import auto_dir

Log = Callable[[str], None]
TOP_UPS = 2
"""Rounds of runs a call may add when its plan ends early (each costs a sweep's start-up)."""


@dataclass(frozen=True)
class AutoResult:
    """What :func:`run_auto` did: the plan, each run's row, the blend and submission, the time used."""

    plan: AutoPlan
    rows: tuple[dict[str, Any], ...]
    blend: dict[str, Any] | None
    submission: Path | None
    table: str
    used_s: float
    steps: dict[str, float]
    failed: int = 0
    written: tuple[Path, ...] = ()


@dataclass(frozen=True)
class _Call:
    """What every step of one ``auto`` call shares."""

    clock: Clock
    data: Path
    workdir: Path
    slots: tuple[str, ...]
    threads: int | None
    log: Log
    out: Path | None = None


def run_auto(
    data: str | Path,
    workdir: str | Path = ".",
    *,
    time_limit: str | float,
    devices: str | None = None,
    out: str | Path | None = None,
    weights_dir: str | Path | None = None,
    models: Sequence[str] = (),
    threads: int | None = None,
    on_bad_image: str | None = None,
    dry_run: bool = False,
    log: Log = print,
) -> AutoResult:
    """From a data folder to a submission within ``time_limit``: inspect, plan, sweep, blend, submit, report.

    Args:
        data: the dataset folder (``--data``), Kaggle layout.
        workdir: the project folder (``--workdir``); ``runs/auto/`` holds the plan, timings and table.
        time_limit: ``20m``, ``8h``, ``1h30m`` or seconds (``--time-limit``).
        devices: ``cpu,cpu`` or ``cuda:0,cuda:1`` (``--devices``); default every GPU, else one CPU job per core.
        out: the submission (``--out``); default ``<workdir>/submission.csv``.
        weights_dir: timm weights named after their models (``--weights-dir``); default the HF cache.
        models: only these timm models (``--models``): their pretrained candidates, else from scratch.
        threads: torch CPU threads per job (``--threads``); default the cores shared out among the jobs.
        on_bad_image: ``error`` or ``skip`` a corrupt image (``--on-bad-image``); default the runs' ``error``.
        dry_run: inspect, time and plan, then return the candidates and plan as the table; write nothing
            (``--dry-run``).

    Raises:
        UserError: a bad time limit or input, or a limit too small for one run; nothing is written then.
    """
    clock = Clock(time.monotonic(), parse_time_limit(time_limit))
    slots = _devices(devices)
    call = _Call(clock, Path(data), Path(workdir), tuple(slots), _job_threads(slots, threads), log,
                 Path(out) if out else None)  # fmt: skip
    wdir = Path(weights_dir) if weights_dir else None
    shared = {"on_bad_image": on_bad_image} if on_bad_image else {}
    plan, timings, audit = step_plan(
        clock, call.data, call.workdir, slots, wdir, call.threads, log, models, shared
    )
    if dry_run:
        table = dry_run_table(plan, timings or old_timings(call.workdir), clock.elapsed())
        return AutoResult(plan, (), None, None, table, clock.elapsed(), {"inspect + plan": clock.elapsed()})
    steps = {"inspect + plan": clock.elapsed()}
    written = write_plan(call.workdir, plan, timings or old_timings(call.workdir))
    from aivh_ens.auto.timing import write_candidates  # torch: imported once the call trains

    written += write_candidates(call.workdir, timings)
    if audit is not None:
        from aivh_ens.inspect.stage import write_audit

        written += write_audit(audit, call.data, call.workdir).written
    return _train(call, plan, steps, written, wdir, models)


def _train(
    call: _Call,
    plan: AutoPlan,
    steps: dict[str, float],
    written: tuple[Path, ...],
    wdir: Path | None,
    models: Sequence[str],
) -> AutoResult:
    """The plan's sweep (and up to :data:`TOP_UPS` top-ups), then :func:`_finish`."""
    clock, slots, log = call.clock, list(call.slots), call.log
    log(f"plan: {auto_dir(call.workdir) / 'plan.toml'}: {len(plan.runs)} runs x {plan.folds} folds, training "
        f"about {format_duration(plan.train_s)}, then about {format_duration(plan.finish_s)} for blend, submit, "
        "report")  # fmt: skip
    first = FirstSubmission(call.workdir, call.data, call.out, slots[0], call.threads, clock, log)
    sweep = step_sweep(plan, call.workdir, slots, call.threads, clock, log, first)
    for _ in range(TOP_UPS):
        complete = [r.name for r in plan.runs if sweep.oof.get(r.name)]
        if first.sub is None and complete and not sweep.unfinished:  # on disk before any top-up trains
            first.submit(complete, submit_threads(call.slots, call.threads))  # the final step reuses it
        more = top_up(call, plan, sweep, wdir, models)
        if more is None:
            break
        plan = more
        written += write_plan(call.workdir, plan, old_timings(call.workdir))
        sweep = step_sweep(plan, call.workdir, slots, call.threads, clock, log)
    steps["training"] = clock.elapsed() - sum(steps.values())
    return _finish(call, plan, sweep, steps, written, first)


def _finish(
    call: _Call,
    plan: AutoPlan,
    sweep: Any,
    steps: dict[str, float],
    written: tuple[Path, ...],
    first: FirstSubmission | None = None,
) -> AutoResult:
    """Blend, submit and report what the sweep finished; the final table. The submission already on disk (the
    first complete run's) is kept when it holds every complete run, or when the time left cannot pay for the
    final blend and submit."""
    from aivh_ens.report.page import build_report

    clock, workdir = call.clock, call.workdir
    complete = [r.name for r in plan.runs if sweep.oof.get(r.name)]
    if not complete:
        return _nothing_finished(call, plan, sweep, steps, written)
    out = call.out or workdir / "submission.csv"
    need = plan.finish_s * len(complete) / max(1, len(plan.runs))
    blend, sub, note = None, None, ""
    if first is not None and first.sub is not None and tuple(complete) == first.runs:
        blend, sub = step_blend(workdir, complete, call.log), first.sub  # the same blend: reused, not redone
        build_report(workdir, runs=complete, submission=sub.record)
    elif out.is_file() and clock.left() < need:
        note = (f"submission: kept {out} (the first complete run's): {format_duration(max(0.0, clock.left()))} "
                f"left, less than the {format_duration(need)} a final blend and submit of {len(complete)} runs "
                "need")  # fmt: skip
        call.log(note)
    else:
        blend = step_blend(workdir, complete, call.log)
        steps["blend"] = clock.elapsed() - sum(steps.values())
        with torch_threads(submit_threads(call.slots, call.threads)):
            sub = step_submit(workdir, call.data, call.out, call.slots[0], call.log)
        steps["submit"] = clock.elapsed() - sum(steps.values())
        build_report(workdir, runs=complete, submission=sub.record if sub else None)
        steps["report"] = clock.elapsed() - sum(steps.values())
    rows = run_rows(workdir, plan, blend)
    used = clock.elapsed()
    table = final_table(plan, rows, blend, sub, used, clock.limit_s, steps, note)
    doc = {"rows": rows, "steps": steps, "used_s": used, "limit_s": clock.limit_s}
    written += (write_text(auto_dir(workdir) / "table.txt", table + "\n"),
                write_json(auto_dir(workdir) / "table.json", doc))  # fmt: skip
    return AutoResult(
        plan, tuple(rows), blend, sub.out if sub else None, table, used, steps, sweep.failed, written
    )


def _nothing_finished(
    call: _Call, plan: AutoPlan, sweep: Any, steps: dict[str, float], written: tuple[Path, ...]
) -> AutoResult:
    """No run complete: the failures named when jobs failed (a result that exits 1), else the time limit.

    Raises:
        UserError: no job failed; the limit stopped every run (a larger limit resumes them).
    """
    failed = [r for r in sweep.rows if r["state"] == "failed"]
    if not failed:
        raise UserError(
            f"no run finished within --time-limit {format_duration(call.clock.limit_s)}; run the same command "
            "with a larger --time-limit to resume"
        )
    first = failed[0]
    table = (f"no run finished: {len(failed)} jobs FAILED; the first, {first['run']} fold {first['fold']}: "
             f"{first.get('error') or 'see its failed.json'}")  # fmt: skip
    return AutoResult(plan, (), None, None, table, call.clock.elapsed(), steps, len(failed), written)


def _job_threads(slots: Sequence[str], threads: int | None) -> int | None:
    """Torch threads of each CPU job (``--threads``, else the cores shared out): the probe times the candidates
    with them (more threads than cores of one's own collapse on a busy CPU)."""
    from aivh_ens.system import cores

    if threads is None and slots[0] == "cpu":
        return max(1, cores() // len(slots))
    return threads


def submit_threads(slots: Sequence[str], threads: int | None) -> int | None:
    """Torch threads of submit, which scores the test set after the sweep, alone: on the CPU the threads of all
    the jobs together (the cores they shared); on GPUs the jobs' own setting."""
    return threads * len(slots) if threads and slots[0] == "cpu" else threads


def _devices(devices: str | None) -> list[str]:
    """``--devices`` as given; default every GPU, else one CPU job per core (up to 8, one torch thread each)."""
    from aivh_ens.scale.local import parse_devices
    from aivh_ens.system import cores

    slots = parse_devices(devices, None)
    if devices is None and slots == ["cpu"]:
        slots = ["cpu"] * max(1, min(8, cores()))
    return slots
