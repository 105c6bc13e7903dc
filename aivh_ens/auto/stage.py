"""``run_auto``: from a data folder to ``submission.csv`` within a time limit, as named steps over the stages.

inspect (its findings become plan settings) -> candidates and their timed probes -> a plan that fits the
budget (``runs/auto/plan.toml``, a sweep plan) -> the sweep engine, which starts no job that would end past
the limit -> blend -> submit (its shift-aware default) -> report -> one final table (``runs/auto/table.txt``).
A second call with the same arguments resumes the plan; a larger ``--time-limit`` adds runs to it without
changing (or retraining) the runs already there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivh_ens.auto.budget import (
    SWEEP_OVERHEAD_S,
    Speed,
    format_duration,
    minimum_s,
    parse_time_limit,
    prepare_s,
)
from aivh_ens.auto.candidates import Candidate, choose_candidates, findings_to_settings
from aivh_ens.auto.plan import (
    AutoPlan,
    AutoRun,
    choose_runs,
    extension,
    last_only,
    read_plan,
    train_seconds,
    write_plan,
)
from aivh_ens.auto.table import final_table, run_rows
from aivh_ens.errors import UserError
from aivh_ens.io import sha256_file, write_json, write_text
from aivh_ens.layout import auto_dir, blend_path, oof_path

Log = Callable[[str], None]
BLEND_TRIALS = 100
PROCESS_START_S = 8.0
"""A sweep device's process start (spawned, torch and timm imported) before its first job."""
REPORT_S = 2.0
SUBMIT_EXTRA_PASSES = 1
"""Test-set passes per fold model that submit's estimate counts beyond one per TTA view, at the probe's
evaluation speed (one thread, in the run's precision, which submit scores in too): the time beyond the views
(reading the test images, the shift diagnosis and its re-scoring) less what submit's threads (all the jobs'
cores) save. Measured on 4,000 cifake-dev test images, one run of 4 ``aivh_res_s`` folds in bf16 on 2 threads,
hflip (2 views): 26 s (this estimate: 42 s); in fp32 it had taken 48-61 s, when 6 passes were counted."""
TOP_UP_SHARE = 0.85
"""The share of the time left that a top-up plans for: its runs are timed by the speeds other runs measured
(a top-up of ``aivh_cnn_s`` after ``aivh_res_s`` ran at 0.69x its estimate took 1.2x its own)."""
TOP_UPS = 2
"""Rounds of runs a call may add when its plan ends early (each costs a sweep's start-up)."""
@dataclass(frozen=True)
class Clock:
    """The call's time limit: seconds since it started and seconds left."""

    start: float
    limit_s: float

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.limit_s - self.elapsed()


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


def finish_seconds(
    n_train: int, n_test: int, runs: Sequence[AutoRun], folds: int, speeds: dict[str, Speed]
) -> float:
    """Estimated seconds of blend (Optuna, nested CV), submit (every fold model, :data:`SUBMIT_PASSES` passes over
    the test set) and report."""
    m = len(runs)  # one run blends as itself; two or more: the Optuna search and nested CV (measured here)
    blend = 1.0 + (10.0 + 2.0 * (m - 2) if m > 1 else 0.0) + 2e-4 * n_train * m
    # every fold model scores the test set in each of its run's TTA views, and more (SUBMIT_EXTRA_PASSES)
    submit = 3.0 + sum(
        folds * (0.3 + (sp.views + SUBMIT_EXTRA_PASSES) * n_test / sp.eval_img_s)
        for sp in (_speed_of(r.name, speeds) for r in runs)
    )
    return blend + submit + REPORT_S + 0.5 * len(runs)


def _speed_of(name: str, speeds: dict[str, Speed]) -> Speed:
    """The probe that applies to a run: its candidate's (a longer run ``<candidate>-e<N>`` is timed as its
    candidate), else the slowest one measured."""
    while name not in speeds and "-e" in name:
        name = name.rsplit("-e", 1)[0]
    return speeds.get(name) or min(speeds.values(), key=lambda s: s.eval_img_s)


def step_inspect(data: Path, log: Log) -> tuple[Any, Any]:
    """The audit (nothing written yet) and the plan settings its findings recommend."""
    from aivh_ens.inspect.stage import audit_dataset

    audit = audit_dataset(data, progress=False, log=lambda _m: None)
    short = int(audit.train[["width", "height"]].min(axis=1).median())
    facts = findings_to_settings(audit.findings, short)
    log(f"inspect: {len(audit.train_table)} train images, median shorter side {short} px; "
        + ("; ".join(facts.used) if facts.used else "no finding changes the plan"))  # fmt: skip
    return audit, facts


def _speeds(timings: dict[str, Any], candidates: Sequence[Candidate], data: str) -> dict[str, Speed]:
    """Each timed candidate's speed, with the TTA views its run will score with."""
    views = {c.name: tta_views(c, data) for c in candidates}
    # a cached timing of a candidate not offered now plans nothing; its views count as the recipes' hflip
    return {k: Speed(v["train_img_s"], v["eval_img_s"], views.get(k, 2)) for k, v in timings.items()}


def tta_views(c: Candidate, data: str) -> int:
    """The TTA views a candidate's run scores each OOF row and test image with (its ``tta``, else its
    recipe's)."""
    from aivh_ens.config import resolve_config
    from aivh_ens.infer.tta import own_spec

    values = {k: v for k, v in c.settings.items() if k != "recipe"}
    return own_spec(
        resolve_config(c.settings.get("recipe", "none"), name=c.name, data=data, **values)
    ).n_views


def _first_plan(
    clock: Clock, base: AutoPlan, candidates: Sequence[Candidate], speeds: dict[str, Speed]
) -> AutoPlan:
    """The runs that fit the time left, with blend, submit and report reserved.

    Raises:
        UserError: not even one run fits; the message gives the smallest --time-limit that would.
    """
    sp = [speeds[c.name] for c in candidates]
    devices = len(base.devices)
    finish = finish_seconds(base.n_train, base.n_test, [_as_run(candidates[0])], 2, speeds)
    images_s = prepare_s(base.n_train + base.n_test)
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
    return dataclasses.replace(base, folds=folds, runs=tuple(runs), finish_s=finish,
                               train_s=train_seconds(runs, folds, devices))  # fmt: skip


def _as_run(c: Candidate) -> AutoRun:
    return AutoRun(c.name, c.kind, dict(c.settings), c.epochs[0])


def _extended(
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
        owed_s += prepare_s(prev.n_train + prev.n_test)
    extra, sp = extension(candidates, [speeds[c.name] for c in candidates], prev.runs)
    everything = [*prev.runs, *(_as_run(c) for c in extra)]  # the reserve as if every extra run were added
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


def measured_ratio(workdir: Path, plan: AutoPlan) -> float:
    """Actual over estimated seconds of the plan's finished fold jobs, within [0.3, 3]; 1 before any."""
    from aivh_ens.auto.budget import JOB_OVERHEAD_S
    from aivh_ens.layout import fold_dir
    from aivh_ens.scale.jobs import read_json

    actual = estimated = 0.0
    for r in plan.runs:
        for k in range(plan.folds):
            done = read_json(fold_dir(workdir, r.name, k) / "done.json")
            if done and "wall_minutes_this_process" in done:
                actual += 60 * done["wall_minutes_this_process"] + JOB_OVERHEAD_S
                estimated += r.job_s
    return min(3.0, max(0.3, actual / estimated)) if estimated else 1.0


def top_up(
    call: Any, plan: AutoPlan, sweep: Any, weights_dir: Path | None, models: Sequence[str]
) -> AutoPlan | None:
    """When the plan is done with time to spare (its estimates were cautious), the plan extended with the runs
    the time left buys, timed by the speeds this call measured; None when nothing more fits."""
    from aivh_ens.auto.candidates import DataFacts

    from aivh_ens.auto.timing import timed_settings

    timings = _old_timings(call.workdir)
    if sweep.unfinished or not timings:
        return None  # the clock stopped jobs already, or nothing was timed (a resumed plan)
    ratio = measured_ratio(call.workdir, plan)
    facts = DataFacts(plan.short_side, plan.shared, plan.used)
    candidates = timed_settings(choose_candidates(facts, call.slots[0], weights_dir, models), timings)
    speeds = {
        k: dataclasses.replace(v, train_img_s=v.train_img_s / ratio, eval_img_s=v.eval_img_s / ratio)
        for k, v in _speeds(timings, candidates, plan.data).items()
    }
    candidates = [c for c in candidates if c.name in speeds]
    if not candidates:
        return None
    more = _extended(call.clock, plan, candidates, speeds, lambda _m: None, owed_s=0.0, share=TOP_UP_SHARE)
    if len(more.runs) == len(plan.runs):
        return None
    added = ", ".join(r.name for r in more.runs[len(plan.runs) :])
    call.log(f"plan: done with {format_duration(call.clock.left())} left (the runs took {ratio:.2f}x their "
             f"estimate); adding {added}")  # fmt: skip
    return more


@dataclass
class Gate:
    """The sweep's ``admit``: start a job only when its estimate (corrected by how long this call's finished
    jobs took against theirs) fits the time left before blend, submit and report; the first job of a run only
    when the run's unfinished folds fit (on ``devices`` at once). Until one run of the plan is complete, the
    jobs of the first run started are always admitted: the plan was made to fit, and a call that trains
    nothing has nothing to submit."""

    plan: AutoPlan
    clock: Clock
    devices: int = 1
    started: list[Any] = dataclasses.field(default_factory=list)

    def __call__(self, job_file: Path) -> bool:
        from aivh_ens.scale.jobs import read_spec

        spec = read_spec(job_file)
        if self._needed_first(spec) or self.clock.left() - self.plan.finish_s >= self.need(spec):
            self.started.append(spec)
            return True
        return False

    def need(self, spec: Any) -> float:
        """Seconds the job needs (its whole run's unfinished folds when the run has not started yet)."""
        need = self.plan.estimate(spec.run) * self.correction()
        if not any(s.run == spec.run for s in self.started):  # a run half done is worth nothing to the blend
            folds = [spec.fold_dir.parent / f"fold{k}" / "done.json" for k in range(self.plan.folds)]
            need *= math.ceil(sum(not f.is_file() for f in folds) / self.devices)
        if (
            len(self.started) < self.devices
        ):  # the device's process starts with its first job (torch's import)
            need += PROCESS_START_S
        return need

    def _needed_first(self, spec: Any) -> bool:
        from aivh_ens.layout import oof_path

        if any(oof_path(spec.workdir, r.name).is_file() for r in self.plan.runs):
            return False
        return not self.started or spec.run == self.started[0].run

    def correction(self) -> float:
        """Actual over estimated seconds of this call's finished jobs, within [0.5, 3]; 1 before any."""
        from aivh_ens.auto.budget import JOB_OVERHEAD_S
        from aivh_ens.scale.jobs import read_json

        actual = estimated = 0.0
        for spec in list(self.started):
            done = read_json(spec.fold_dir / "done.json")
            if done and "wall_minutes_this_process" in done:
                actual += 60 * done["wall_minutes_this_process"] + JOB_OVERHEAD_S
                estimated += self.plan.estimate(spec.run)
        return min(3.0, max(0.5, actual / estimated)) if estimated else 1.0


def step_sweep(
    plan: AutoPlan, workdir: Path, devices: Sequence[str], threads: int | None, clock: Clock, log: Log
) -> Any:
    """The plan file through the sweep engine (local backend), gated by the clock."""
    from aivh_ens.scale.plan import load_plan
    from aivh_ens.scale.sweep import run_sweep

    sweep_plan = load_plan(auto_dir(workdir) / "plan.toml")
    return run_sweep(
        sweep_plan,
        workdir,
        devices=",".join(devices),
        threads=threads,
        admit=Gate(plan, clock, len(devices)),
        log=log,
    )


def _blend_current(workdir: Path, runs: Sequence[str]) -> dict[str, Any] | None:
    """blend.json when it blends exactly ``runs`` with their current OOF files (a resumed call keeps it)."""
    path = blend_path(workdir)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    same = [(r["name"], r["oof_sha256"]) for r in doc.get("runs", [])] == [
        (r, sha256_file(oof_path(workdir, r))) for r in runs
    ]
    return doc if same else None


def step_blend(workdir: Path, complete: Sequence[str], log: Log) -> dict[str, Any] | None:
    """The blend of the finished runs (reused when it already blends exactly them)."""
    from aivh_ens.blend.stage import run_blend

    if not complete:
        return None
    doc = _blend_current(workdir, complete)
    if doc is not None:
        log(f"blend: reusing {blend_path(workdir)} ({doc['method']}, same runs and OOF files)")
        return doc
    result = run_blend(workdir, runs=list(complete), trials=BLEND_TRIALS, seed=42)
    log(f"blend: {result.reason}")
    return result.blend


def step_submit(workdir: Path, data: Path, out: Path | None, device: str, log: Log) -> Any:
    """``submit`` with its defaults (shift-aware threshold), or None without a test.csv."""
    from aivh_ens.infer.submission import submit

    if not (data / "test.csv").is_file():
        log(f"submit: no {data / 'test.csv'}, so no submission")
        return None
    r = submit(workdir, data=data, out=out, device=device, progress=False, log=lambda _m: None)
    log(f"submit: {r.out} ({r.n} rows, predicted AI rate {r.ai_rate:.1%}, threshold {r.threshold:.4f} "
        f"by --threshold {r.choice.mode if r.choice else 'oof'})")  # fmt: skip
    if r.warning:
        log(f"warning: {r.warning}")
    return r


def step_plan(
    clock: Clock,
    data: Path,
    workdir: Path,
    devices: Sequence[str],
    weights_dir: Path | None,
    threads: int | None,
    log: Log,
    models: Sequence[str] = (),
) -> tuple[AutoPlan, dict[str, Any], Any]:
    """The plan of this call: an earlier call's (resumed as it is, or extended for a larger limit), else a new
    one from the audit and the timed candidates. Returns the plan, the timings and the audit (None if reused).

    Raises:
        UserError: the budget is too small for one run (nothing is written).
    """
    from aivh_ens.auto.candidates import DataFacts

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
    from aivh_ens.auto.timing import step_time, timed_settings

    timings = step_time(candidates, devices[0], threads, workdir, str(data.resolve()), log)
    candidates = timed_settings(candidates, timings)
    speeds = _speeds(timings, candidates, str(data.resolve()))
    if prev is not None:
        return _extended(clock, prev, candidates, speeds, log), timings, None
    base = AutoPlan(str(data.resolve()), clock.limit_s, tuple(devices), 2, dict(facts.shared),
                    short_side=facts.short_side, used=facts.used, n_train=n_train, n_test=n_test)  # fmt: skip
    return _first_plan(clock, base, candidates, speeds), timings, audit


@dataclass(frozen=True)
class _Call:
    """What every step of one ``auto`` call shares."""

    clock: Clock
    data: Path
    workdir: Path
    slots: tuple[str, ...]
    threads: int | None
    log: Log


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

    Raises:
        UserError: a bad time limit or input, or a limit too small for one run; nothing is written then.
    """
    clock = Clock(time.monotonic(), parse_time_limit(time_limit))
    slots = _devices(devices)
    call = _Call(clock, Path(data), Path(workdir), tuple(slots), _job_threads(slots, threads), log)
    wdir = Path(weights_dir) if weights_dir else None
    plan, timings, audit = step_plan(clock, call.data, call.workdir, slots, wdir, call.threads, log, models)
    steps = {"inspect + plan": clock.elapsed()}
    written = write_plan(call.workdir, plan, timings or _old_timings(call.workdir))
    from aivh_ens.auto.timing import write_candidates

    written += write_candidates(call.workdir, timings)
    if audit is not None:
        from aivh_ens.inspect.stage import write_audit

        written += write_audit(audit, call.data, call.workdir).written
    log(
        f"plan: {auto_dir(call.workdir) / 'plan.toml'}: {len(plan.runs)} runs x {plan.folds} folds, training "
        f"about {format_duration(plan.train_s)}, then about {format_duration(plan.finish_s)} for blend, submit, "
        "report"
    )
    sweep = step_sweep(plan, call.workdir, slots, call.threads, clock, log)
    for _ in range(TOP_UPS):
        more = top_up(call, plan, sweep, wdir, models)
        if more is None:
            break
        plan = more
        written += write_plan(call.workdir, plan, _old_timings(call.workdir))
        sweep = step_sweep(plan, call.workdir, slots, call.threads, clock, log)
    steps["training"] = clock.elapsed() - sum(steps.values())
    return _finish(call, plan, sweep, Path(out) if out else None, steps, written)


def _finish(
    call: _Call,
    plan: AutoPlan,
    sweep: Any,
    out: Path | None,
    steps: dict[str, float],
    written: tuple[Path, ...],
) -> AutoResult:
    """Blend, submit and report what the sweep finished; the final table."""
    from aivh_ens.report.page import build_report

    clock, workdir = call.clock, call.workdir
    complete = [r.name for r in plan.runs if sweep.oof.get(r.name)]
    if not complete:
        raise UserError(
            f"no run finished within --time-limit {format_duration(clock.limit_s)}; run the same command with a "
            "larger --time-limit to resume"
        )
    blend = step_blend(workdir, complete, call.log)
    steps["blend"] = clock.elapsed() - sum(steps.values())
    with _torch_threads(submit_threads(call.slots, call.threads)):
        sub = step_submit(workdir, call.data, out, call.slots[0], call.log)
    steps["submit"] = clock.elapsed() - sum(steps.values())
    build_report(workdir, runs=complete, submission=sub.record if sub else None)
    steps["report"] = clock.elapsed() - sum(steps.values())
    rows = run_rows(workdir, plan, blend)
    used = clock.elapsed()
    table = final_table(plan, rows, blend, sub, used, clock.limit_s, steps)
    doc = {"rows": rows, "steps": steps, "used_s": used, "limit_s": clock.limit_s}
    written += (write_text(auto_dir(workdir) / "table.txt", table + "\n"),
                write_json(auto_dir(workdir) / "table.json", doc))  # fmt: skip
    return AutoResult(
        plan, tuple(rows), blend, sub.out if sub else None, table, used, steps, sweep.failed, written
    )


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """This process's torch threads set to ``n`` for a step, then restored (a notebook keeps its setting)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _old_timings(workdir: Path) -> dict[str, Any]:
    path = auto_dir(workdir) / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


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
