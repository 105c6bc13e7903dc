"""The plan of an ``auto`` call: a new one from the timed candidates, an earlier one resumed or extended for a
larger limit, and the top-up that adds runs when the plan ends early.

The reserve for blend, submit and report comes from those stages' own estimates
(:func:`aivh_ens.blend.stage.expected_seconds`, :func:`aivh_ens.infer.cost.expected_seconds`,
:func:`aivh_ens.report.page.expected_seconds`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aivh_ens.auto.budget import SWEEP_OVERHEAD_S, Speed, format_duration, minimum_s, prepare_s
from aivh_ens.auto.candidates import Candidate, choose_candidates, findings_to_settings
from aivh_ens.auto.gate import PROCESS_START_S, Clock, kind_ratios, ratio_for
from aivh_ens.auto.plan import AutoPlan, AutoRun, choose_runs, extension, last_only, read_plan, train_seconds
from aivh_ens.errors import UserError
from aivh_ens.layout import auto_dir

Log = Callable[[str], None]
BLEND_TRIALS = 100
SUBMIT_BY = 0.5
"""The share of the limit by which a call should have a submission on disk (a session may end at any time):
when the plan's first run would come later, a short scout run goes first (:func:`with_scout`)."""
TOP_UP_SHARE = 0.85
"""The share of the time left that a top-up plans for: its runs are timed by the speeds other runs measured,
which carry over imperfectly from one model to another."""


def finish_seconds(
    n_train: int, n_test: int, runs: Sequence[AutoRun], folds: int, speeds: dict[str, Speed]
) -> float:
    """Seconds of blend, submit (every fold model over the test set) and report for ``runs``, as those stages
    estimate them."""
    from aivh_ens.blend.stage import expected_seconds as blend_s
    from aivh_ens.infer.cost import RunCost
    from aivh_ens.infer.cost import expected_seconds as submit_s
    from aivh_ens.report.page import expected_seconds as report_s

    costs = [RunCost(folds, sp.views, sp.eval_img_s) for sp in (speed_of(r.name, speeds) for r in runs)]
    return blend_s(n_train, len(runs), BLEND_TRIALS) + submit_s(n_test, costs) + report_s(len(runs))


def speed_of(name: str, speeds: dict[str, Speed]) -> Speed:
    """The probe that applies to a run: its candidate's (a longer run ``<candidate>-e<N>`` is timed as its
    candidate), else the slowest one measured."""
    while name not in speeds and "-e" in name:
        name = name.rsplit("-e", 1)[0]
    return speeds.get(name) or min(speeds.values(), key=lambda s: s.eval_img_s)


def step_inspect(data: Path, log: Log) -> tuple[Any, Any]:
    """The audit (nothing written yet) and the plan settings its findings recommend."""
    from aivh_ens.inspect.stage import audit_dataset

    log(f"inspect: reading {data} (image sizes, duplicates, shortcuts)...")
    audit = audit_dataset(data, progress=False, log=lambda _m: None)
    short = int(audit.train[["width", "height"]].min(axis=1).median())
    facts = findings_to_settings(audit.findings, short)
    log(f"inspect: {len(audit.train_table)} train images, median shorter side {short} px; "
        + ("; ".join(facts.used) if facts.used else "no finding changes the plan"))  # fmt: skip
    return audit, facts


def speeds_of(timings: dict[str, Any], candidates: Sequence[Candidate], data: str) -> dict[str, Speed]:
    """Each timed candidate's speed, with the TTA views its run will score with."""
    views = {c.name: tta_views(c, data) for c in candidates}
    # a cached timing of a candidate not offered now plans nothing; its views count as the recipes' hflip
    return {k: Speed(v["train_img_s"], v["eval_img_s"], views.get(k, 2)) for k, v in timings.items()}


def tta_views(c: Candidate, data: str) -> int:
    """The TTA views a candidate's run scores each OOF row and test image with (its ``tta``, else its
    recipe's)."""
    from aivh_ens.config import resolve_config
    from aivh_ens.score.tta import own_spec

    values = {k: v for k, v in c.settings.items() if k != "recipe"}
    return own_spec(
        resolve_config(c.settings.get("recipe", "none"), name=c.name, data=data, **values)
    ).n_views


def first_plan(
    clock: Clock, base: AutoPlan, candidates: Sequence[Candidate], speeds: dict[str, Speed]
) -> AutoPlan:
    """The runs that fit the time left, with blend, submit and report reserved.

    Raises:
        UserError: not even one run fits; the message gives the smallest --time-limit that would.
    """
    sp = [speeds[c.name] for c in candidates]
    devices = len(base.devices)
    finish = finish_seconds(base.n_train, base.n_test, [as_run(candidates[0])], 2, speeds)
    images_s = prepare_s(base.n_train + base.n_test, base.decode_s)
    for _ in range(5):  # the reserve depends on the runs chosen, which depend on the reserve
        chosen = choose_runs(candidates, sp, base.n_train, devices, clock.left() - finish - images_s)
        if chosen is None:
            checks = last_only(candidates)
            smallest = minimum_s(sp, [c.epochs for c in candidates], base.n_train, devices, checks)
            least = clock.elapsed() + smallest + finish + images_s
            raise UserError(
                f"time_limit={format_duration(clock.limit_s)} (--time-limit) is too small for even one run here: "
                f"the smallest plan (2 folds, the fastest candidate, blend, submit and report) needs about "
                f"{format_duration(least)}; give --time-limit {format_duration(least * 1.1)} or more"
            )
        folds, runs = chosen
        need = finish_seconds(base.n_train, base.n_test, runs, folds, speeds)
        if need <= finish:
            break
        finish = need
    runs, finish = with_scout(clock, base, candidates, speeds, folds, runs, finish)
    return dataclasses.replace(base, folds=folds, runs=tuple(runs), finish_s=finish,
                               train_s=train_seconds(runs, folds, devices))  # fmt: skip


def first_submission_s(
    clock: Clock, base: AutoPlan, run: AutoRun, folds: int, speeds: dict[str, Speed]
) -> float:
    """Seconds from the call's start at which ``run``, trained first, is expected to be submitted: the images
    prepared, its folds in rounds on the devices, then its blend alone and submit."""
    devices = len(base.devices)
    start = (
        clock.elapsed()
        + prepare_s(base.n_train + base.n_test, base.decode_s)
        + SWEEP_OVERHEAD_S
        + PROCESS_START_S
    )
    return (start + math.ceil(folds / devices) * run.job_s
            + finish_seconds(base.n_train, base.n_test, [run], folds, speeds))  # fmt: skip


def with_scout(
    clock: Clock,
    base: AutoPlan,
    candidates: Sequence[Candidate],
    speeds: dict[str, Speed],
    folds: int,
    runs: list[AutoRun],
    finish: float,
) -> tuple[list[AutoRun], float]:
    """``runs`` and their reserve, with a short scout run put first when the first run would be submitted
    after :data:`SUBMIT_BY` of the limit: the first candidate that fits, with the most of its least epochs that
    let its submission come by then (``<candidate>-e<epochs>``); the other runs re-fitted to the time left.
    Unchanged when no scout fits or the runs no longer fit beside it."""
    by = SUBMIT_BY * clock.limit_s
    if first_submission_s(clock, base, runs[0], folds, speeds) <= by:
        return runs, finish
    devices, n = len(base.devices), base.n_train
    for c in candidates:
        for e in range(c.epochs[0], 0, -1):
            short = dataclasses.replace(c, name=f"{c.name}-e{e}", epochs=(e, e))
            scout = choose_runs([short], [speeds[c.name]], n, devices, math.inf, folds)[1][0]
            if first_submission_s(clock, base, scout, folds, speeds) > by:
                continue
            spent = math.ceil(folds / devices) * scout.job_s
            everything = finish_seconds(n, base.n_test, [scout, *runs], folds, speeds)
            budget = clock.left() - everything - prepare_s(n + base.n_test, base.decode_s) - spent
            sp = [speeds[x.name] for x in candidates]
            chosen = choose_runs(candidates, sp, n, devices, budget, folds)
            if chosen is None:
                return runs, finish
            kept = [scout, *chosen[1]]
            return kept, finish_seconds(n, base.n_test, kept, folds, speeds)
    return runs, finish


def as_run(c: Candidate) -> AutoRun:
    return AutoRun(c.name, c.kind, dict(c.settings), c.epochs[0])


def extended(
    clock: Clock,
    prev: AutoPlan,
    candidates: Sequence[Candidate],
    speeds: dict[str, Speed],
    log: Log,
    owed_s: float | None = None,
    share: float = 1.0,
) -> AutoPlan:
    """``prev`` with the runs the time left buys, its own runs unchanged (nothing of them is retrained).

    ``owed_s``: seconds the plan's own unfinished runs still need (default: all of them, as in a new call).
    ``share``: of the time left (after those and blend, submit and report), the share the new runs may take.
    """
    devices = len(prev.devices)
    if owed_s is None:
        owed_s = train_seconds(prev.runs, prev.folds, devices) - SWEEP_OVERHEAD_S
        owed_s += prepare_s(prev.n_train + prev.n_test, prev.decode_s)
    extra, sp = extension(candidates, [speeds[c.name] for c in candidates], prev.runs)
    everything = [*prev.runs, *(as_run(c) for c in extra)]  # the reserve as if every extra run were added
    finish = finish_seconds(prev.n_train, prev.n_test, everything, prev.folds, speeds)
    spare = share * (clock.left() - finish - owed_s)
    chosen = choose_runs(extra, sp, prev.n_train, devices, spare, prev.folds) if extra else None
    if chosen is None:
        log(f"plan: the limit ({format_duration(clock.limit_s)}) buys no further run; resuming the plan")
        return dataclasses.replace(prev, limit_s=clock.limit_s)
    runs = (*prev.runs, *chosen[1])
    finish = finish_seconds(prev.n_train, prev.n_test, runs, prev.folds, speeds)
    log(f"plan: extended for {format_duration(clock.limit_s)} with " + ", ".join(r.name for r in chosen[1]))
    return dataclasses.replace(prev, limit_s=clock.limit_s, runs=runs, finish_s=finish,
                               train_s=train_seconds(runs, prev.folds, devices))  # fmt: skip


def top_up(
    call: Any, plan: AutoPlan, sweep: Any, weights_dir: Path | None, models: Sequence[str]
) -> AutoPlan | None:
    """When the plan is done with time to spare (its estimates were cautious), the plan extended with the runs
    the time left buys, each candidate timed at the speed this call's runs of its kind measured; None when
    nothing more fits."""
    from aivh_ens.auto.candidates import DataFacts
    from aivh_ens.auto.timing import timed_settings

    timings = old_timings(call.workdir)
    if sweep.unfinished or not timings:
        return None  # the clock stopped jobs already, or nothing was timed (a resumed plan)
    ratios = kind_ratios(call.workdir, plan)
    facts = DataFacts(plan.short_side, plan.shared, plan.used)
    candidates = timed_settings(choose_candidates(facts, call.slots[0], weights_dir, models), timings)
    kinds = {c.name: c.kind for c in candidates}
    speeds = {}
    for k, v in speeds_of(timings, candidates, plan.data).items():
        ratio = ratio_for(ratios, kinds.get(k, ""))
        speeds[k] = dataclasses.replace(v, train_img_s=v.train_img_s / ratio, eval_img_s=v.eval_img_s / ratio)
    candidates = [c for c in candidates if c.name in speeds]
    if not candidates:
        return None
    more = extended(call.clock, plan, candidates, speeds, lambda _m: None, owed_s=0.0, share=TOP_UP_SHARE)
    if len(more.runs) == len(plan.runs):
        return None
    added = ", ".join(r.name for r in more.runs[len(plan.runs) :])
    measured = ", ".join(f"{k} {v:.2f}x" for k, v in sorted(ratios.items())) or "nothing measured"
    call.log(f"plan: done with {format_duration(call.clock.left())} left (epochs took {measured} their "
             f"estimate); adding {added}")  # fmt: skip
    return more


def step_plan(
    clock: Clock,
    data: Path,
    workdir: Path,
    devices: Sequence[str],
    weights_dir: Path | None,
    threads: int | None,
    log: Log,
    models: Sequence[str] = (),
    shared: dict[str, Any] | None = None,
) -> tuple[AutoPlan, dict[str, Any], Any]:
    """The plan of this call: an earlier call's (resumed as it is, or extended for a larger limit), else a new
    one from the audit and the timed candidates. Returns the plan, the timings and the audit (None if reused).
    ``shared``: plan ``[shared]`` settings the caller adds (``--on-bad-image``).

    Raises:
        UserError: the budget is too small for one run (nothing is written).
    """
    from aivh_ens.auto.candidates import DataFacts
    from aivh_ens.auto.timing import decode_seconds, step_time, timed_settings

    prev = read_plan(workdir, data)
    if prev is not None and prev.limit_s >= clock.limit_s:
        log(f"plan: resuming {auto_dir(workdir) / 'plan.toml'} ({len(prev.runs)} runs, made for "
            f"{format_duration(prev.limit_s)})")  # fmt: skip
        return prev, {}, None
    audit = None
    if prev is None:
        audit, facts = step_inspect(data, log)
        n_train, n_test = len(audit.train_table), len(audit.test_table) if audit.test_table is not None else 0
    else:
        facts = DataFacts(prev.short_side, prev.shared, prev.used)
        n_train, n_test = prev.n_train, prev.n_test
    candidates = choose_candidates(facts, devices[0], weights_dir, models)
    log(f"timing: {len(candidates)} candidates on {devices[0]}: " + ", ".join(c.name for c in candidates))
    timings = step_time(candidates, devices[0], threads, workdir, str(data.resolve()), log)
    candidates = timed_settings(candidates, timings)
    speeds = speeds_of(timings, candidates, str(data.resolve()))
    if prev is not None:
        return extended(clock, prev, candidates, speeds, log), timings, None
    decode_s = decode_seconds(data, audit.train_table["file_name"])  # the user's own images, not a constant
    base = AutoPlan(str(data.resolve()), clock.limit_s, tuple(devices), 2, {**facts.shared, **(shared or {})},
                    short_side=facts.short_side, used=facts.used, n_train=n_train, n_test=n_test,
                    decode_s=decode_s)  # fmt: skip
    return first_plan(clock, base, candidates, speeds), timings, audit


def old_timings(workdir: Path) -> dict[str, Any]:
    """The candidates' timings an earlier call wrote (``runs/auto/timings.json``), or none."""
    import json

    path = auto_dir(workdir) / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}
