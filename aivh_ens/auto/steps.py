"""The steps of an ``auto`` call after its plan: the sweep under the clock (one progress line per finished job,
the anytime submission), blend and submit.

The first run to complete is blended alone and submitted at once, so a call stopped or killed later still
leaves a valid ``submission.csv`` (written atomically, so a kill mid-write keeps the previous one); the final
blend refreshes it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aivh_ens.auto.budget import format_duration
from aivh_ens.auto.gate import Clock, Gate
from aivh_ens.auto.plan import AutoPlan
from aivh_ens.auto.planning import BLEND_TRIALS
from aivh_ens.io import sha256_file
from aivh_ens.layout import auto_dir, blend_path, oof_path

Log = Callable[[str], None]
JOBS_LOG = "jobs.log"
"""The sweep jobs' own output (epoch lines) under ``runs/auto/``: the terminal gets one line per job."""


@dataclass
class Progress:
    """The sweep's ``on_done``: one line per finished job (done/total, time used of the limit, expected end),
    and the anytime submission when the first run completes while others still train."""

    plan: AutoPlan
    clock: Clock
    gate: Gate
    log: Log
    submit_first: Callable[[str], None] | None = None
    finished: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, row: dict[str, Any]) -> None:
        total = len(self.plan.runs) * self.plan.folds
        if row["state"] in ("done", "skipped (done)"):
            self.finished.append((row["run"], row["fold"]))
            what = "done" + (f", val F1 {row['f1']:.4f}" if row.get("f1") is not None else "")
        elif row["state"] == "failed":
            what = f"FAILED: {row.get('error') or 'see its failed.json'}"
        else:
            what = f"{row['state']}" + (f": {row['error']}" if row.get("error") else "")
        done = self._done_count()
        self.log(f"[{done}/{total}] {row['run']} fold {row['fold']} {what}; {format_duration(self.clock.elapsed())}"
                 f" of {format_duration(self.clock.limit_s)} used, expected end "
                 f"{format_duration(self.expected_end())}")  # fmt: skip
        if row["state"] == "done" and self.submit_first is not None and self._run_complete(row["run"]):
            first, self.submit_first = self.submit_first, None
            if not all(oof_path(self.gate.workdir, r.name).is_file() for r in self.plan.runs):
                first(row["run"])  # other runs still train: the last one's submission is the final one

    def _done_count(self) -> int:
        from aivh_ens.layout import fold_dir

        wd = self.gate.workdir
        return sum(
            (fold_dir(wd, r.name, k) / "done.json").is_file()
            for r in self.plan.runs
            for k in range(self.plan.folds)
        )

    def _run_complete(self, run: str) -> bool:
        return oof_path(self.gate.workdir, run).is_file()

    def expected_end(self) -> float:
        """Seconds from the start at which the call is expected to end: the admitted jobs still to finish
        (their estimates, on the devices), then blend, submit and report; never past the limit, since the gate
        starts nothing that would end past it."""
        from aivh_ens.layout import fold_dir

        wd, left = self.gate.workdir, 0.0
        for r in self.plan.runs:
            for k in range(self.plan.folds):
                if not (fold_dir(wd, r.name, k) / "done.json").is_file():
                    left += r.job_s
        end = self.clock.elapsed() + left / max(1, self.gate.devices) + self.plan.finish_s
        return min(end, self.clock.limit_s)


def step_sweep(
    plan: AutoPlan,
    workdir: Path,
    devices: Sequence[str],
    threads: int | None,
    clock: Clock,
    log: Log,
    submit_first: Callable[[str], None] | None = None,
) -> Any:
    """The plan file through the sweep engine (local backend, the plan's order), gated by the clock: jobs
    start only when they fit, and end their epochs by the deadline that keeps blend, submit and report."""
    from aivh_ens.scale.local import JobHooks
    from aivh_ens.scale.plan import load_plan
    from aivh_ens.scale.sweep import run_sweep
    from aivh_ens.system import DEADLINE_ENV

    gate = Gate(plan, clock, workdir, len(devices))
    progress = Progress(plan, clock, gate, log, submit_first)
    output = auto_dir(workdir) / JOBS_LOG
    output.parent.mkdir(parents=True, exist_ok=True)
    hooks = JobHooks(progress, {DEADLINE_ENV: repr(clock.wall_deadline(plan.finish_s))}, output)
    log(f"sweep: {len(plan.runs) * plan.folds} jobs on {','.join(devices)}; their epoch lines go to {output}")
    return run_sweep(load_plan(auto_dir(workdir) / "plan.toml"), workdir, devices=",".join(devices),
                     threads=threads, admit=gate, hooks=hooks, order="plan", log=log)  # fmt: skip


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


@dataclass
class FirstSubmission:
    """The sweep's anytime submission: the first complete run blended alone and submitted while the other runs
    train (on the threads of one job, beside them), with ``submit``'s default threshold; or, before a top-up,
    the runs complete by then. ``runs`` and ``sub`` say what it wrote, so the final step does not redo it."""

    workdir: Path
    data: Path
    out: Path | None
    device: str
    threads: int | None
    clock: Clock
    log: Log
    runs: tuple[str, ...] = ()
    sub: Any = None

    def __call__(self, run: str) -> None:
        self.submit([run])

    def submit(self, runs: Sequence[str], threads: int | None = None) -> None:
        """Blend ``runs`` and submit (on ``threads``, default one job's); a failure is one line (the training
        goes on, the final step retries)."""
        t0, named = time.monotonic(), ", ".join(runs)
        try:
            step_blend(self.workdir, runs, lambda _m: None)
            with torch_threads(threads or self.threads):
                sub = step_submit(self.workdir, self.data, self.out, self.device, lambda _m: None)
        except Exception as e:
            self.log(f"submit: FAILED to write the first submission from {named}: {str(e).splitlines()[0]}")
            return
        if sub is not None:
            self.runs, self.sub = tuple(runs), sub
            self.log(f"submit: {sub.out} written from {named} at {format_duration(self.clock.elapsed())} "
                     f"({format_duration(time.monotonic() - t0)}); a later blend refreshes it")  # fmt: skip


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """This process's torch threads set to ``n`` for a step, then restored (a notebook keeps its setting)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
