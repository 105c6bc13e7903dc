"""``auto``'s plan: the runs chosen for a budget, written as a sweep plan (``runs/auto/plan.toml``) beside
``runs/auto/auto.json`` (the arguments, the data facts, each run's estimate), which a later call reads to
resume the same plan or to extend it without changing a run that is already trained.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aivh_ens.auto.budget import (
    PlannedRun,
    Speed,
    epochs_s,
    fit_plan,
    format_duration,
    plan_seconds,
    stretch,
    validated_epochs,
)
from aivh_ens.auto.candidates import Candidate
from aivh_ens.errors import UserError
from aivh_ens.io import write_json, write_text
from aivh_ens.layout import auto_dir

STATE_VERSION = 1
SEED = 42


@dataclass(frozen=True)
class AutoRun:
    """One run of the plan: its candidate, epochs and the estimate of one fold job.

    Attributes:
        epochs: the epochs planned at the probe's speed.
        job_s: the estimated seconds of one fold job.
        fold_s: the seconds of a job's epochs (its ``fold_time``; 0: none, as in plans written before it).
        most: the most epochs a fold may train when its epochs run faster than planned (0: ``epochs``).
        epoch_s: the seconds of one epoch at the probe's speed, validation averaged in (0: not recorded).
    """

    name: str
    kind: str
    settings: dict[str, Any] = field(hash=False)
    epochs: int = 1
    job_s: float = 0.0
    fold_s: float = 0.0
    most: int = 0
    epoch_s: float = 0.0

    def table(self) -> dict[str, Any]:
        """The run's ``[[runs]]`` table of the sweep plan. Fine-tuning of six epochs or more stops early (patience
        a third of the epochs); from-scratch runs train their epochs (on a cosine schedule their validation F1
        rises to the end, so early stopping only cuts a fold short) and validate only their last quarter
        (``validate_last``, :func:`aivh_ens.auto.budget.validated_epochs`).

        Each fold trains for the seconds its epochs were planned to take (``fold_time``), up to ``most`` epochs:
        its epochs and schedule follow the speed its epochs measure (:func:`aivh_ens.train.fold.planned_epochs`),
        so a plan made in a fast or slow minute of a machine whose speed drifts still ends on time and uses its
        time."""
        early = (
            {"early_stop": max(3, self.epochs // 3)} if self.kind == "finetune" and self.epochs >= 6 else {}
        )
        last = {"validate_last": validated_epochs(self.epochs)} if validates_last(self.kind) else {}
        timed = {"fold_time": round(self.fold_s, 1)} if self.fold_s > 0 else {}
        epochs = max(self.epochs, self.most) if timed else self.epochs
        return {"name": self.name, **self.settings, "epochs": epochs, **early, **last, **timed}


def validates_last(kind: str) -> bool:
    """Whether runs of this kind validate only their last epochs: from-scratch ones (their cosine schedule
    ends at their best epoch); fine-tuning stops early, so it validates every epoch."""
    return kind == "scratch"


def last_only(candidates: Sequence[Candidate]) -> list[bool]:
    """Per candidate, whether its runs validate only their last epochs (:func:`validates_last`)."""
    return [validates_last(c.kind) for c in candidates]


@dataclass(frozen=True)
class AutoPlan:
    """The plan of one work dir: folds, the shared settings from the findings, the runs and estimates.

    Attributes:
        limit_s: the ``--time-limit`` it was made for.
        train_s: estimated wall seconds of every run's jobs on ``devices``.
        finish_s: estimated seconds of blend, submit and report.
    """

    data: str
    limit_s: float
    devices: tuple[str, ...]
    folds: int
    shared: dict[str, Any] = field(hash=False)
    runs: tuple[AutoRun, ...] = ()
    train_s: float = 0.0
    finish_s: float = 0.0
    short_side: int = 0
    used: tuple[str, ...] = ()
    n_train: int = 0
    n_test: int = 0
    decode_s: float | None = None
    """Seconds one of the user's images takes to read and decode here (a sample measured when the plan was
    made); prices the sweep's decode check and image cache. None: the sweep's default per image."""

    def estimate(self, run: str) -> float:
        """Estimated seconds of one fold job of ``run``."""
        return next(r.job_s for r in self.runs if r.name == run)


def state_path(workdir: Path) -> Path:
    return auto_dir(workdir) / "auto.json"


def read_plan(workdir: Path, data: Path) -> AutoPlan | None:
    """The plan an earlier ``auto`` call wrote under ``workdir``, or None.

    Raises:
        UserError: it was made for another data folder (a work dir holds one data set's runs).
    """
    path = state_path(workdir)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        plan = AutoPlan(**{k: v for k, v in doc["plan"].items() if k != "runs"},
                        runs=tuple(AutoRun(**r) for r in doc["plan"]["runs"]))  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is not a plan auto wrote ({e}); delete {path.parent} to plan afresh"
        ) from None
    if plan.data != str(data.resolve()):
        raise UserError(
            f"--workdir {workdir} holds auto's plan for data {plan.data}, not {data.resolve()}; give this data "
            "its own --workdir"
        )
    return AutoPlan(**{**asdict(plan), "devices": tuple(plan.devices), "used": tuple(plan.used),
                       "runs": plan.runs})  # fmt: skip


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def plan_toml(plan: AutoPlan) -> str:
    """The sweep plan file: ``[shared]`` (data, folds, seed, the findings' settings) and one ``[[runs]]`` per run."""
    shared = {"data": plan.data, "folds": plan.folds, "seed": SEED, **plan.shared}
    lines = [
        f"# aivh-ens auto: {len(plan.runs)} runs for --time-limit {format_duration(plan.limit_s)} on "
        f"{','.join(plan.devices)}; training estimated at {format_duration(plan.train_s)}, blend + submit + "
        f"report at {format_duration(plan.finish_s)}.",
        "# Run it alone with: aivh-ens sweep runs/auto/plan.toml --devices " + ",".join(plan.devices),
        *(f"# inspect: {u}" for u in plan.used),
        "",
        "[shared]",
        *(f"{k} = {_toml_value(v)}" for k, v in shared.items()),
    ]
    for r in plan.runs:
        lines += ["", f"[[runs]]  # {r.kind}, about {format_duration(r.job_s)} per fold job"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in r.table().items()]
    return "\n".join(lines) + "\n"


def write_plan(workdir: Path, plan: AutoPlan, timings: dict[str, Any]) -> tuple[Path, ...]:
    """``plan.toml`` (the sweep plan), ``timings.json`` (the candidates' probes) and ``auto.json`` (the state)."""
    out = auto_dir(workdir)
    return (
        write_text(out / "plan.toml", plan_toml(plan)),
        write_json(out / "timings.json", timings),
        write_json(state_path(workdir), {"version": STATE_VERSION, "plan": asdict(plan)}),
    )


def choose_runs(
    candidates: Sequence[Candidate],
    speeds: Sequence[Speed],
    n_train: int,
    devices: int,
    budget_s: float,
    folds: int | None = None,
) -> tuple[int, list[AutoRun]] | None:
    """Folds and the runs that fit ``budget_s`` of training (:func:`aivh_ens.auto.budget.fit_plan`); None when
    not even the cheapest candidate fits. The seconds the whole epochs leave over stretch every fold's
    ``fold_time`` (whole epochs can leave minutes unused), unless a run already trains its most epochs."""
    checks = last_only(candidates)
    fit = fit_plan(speeds, [c.epochs for c in candidates], n_train, devices, budget_s, folds, checks)
    if fit is None:
        return None
    # the time whole epochs leave over goes to every fold's fold_time (not when a run trains its most epochs)
    short = all(p.epochs < candidates[p.candidate].epochs[1] for p in fit.runs)
    more = stretch(fit.runs, fit.folds, devices, budget_s) if short else 1.0
    runs = []
    for p in fit.runs:
        c = candidates[p.candidate]
        epochs = epochs_s(speeds[p.candidate], n_train, fit.folds, p.epochs, checks[p.candidate])
        fold_s = epochs + (more - 1) * p.job_s
        runs.append(AutoRun(c.name, c.kind, dict(c.settings), p.epochs, p.job_s * more, fold_s, c.epochs[1],
                            epochs / p.epochs))  # fmt: skip
    return fit.folds, runs


def extension(
    candidates: Sequence[Candidate], speeds: Sequence[Speed], kept: Sequence[AutoRun]
) -> tuple[list[Candidate], list[Speed]]:
    """What a larger budget may add to ``kept`` runs without changing them: the candidates not yet planned,
    then each planned one again with twice its epochs (a new run, named after its epochs)."""
    names = {r.name: r.epochs for r in kept}
    out = [(c, s) for c, s in zip(candidates, speeds, strict=True) if c.name not in names]
    for c, s in zip(candidates, speeds, strict=True):
        if c.name in names:
            e = 2 * names[c.name]
            while f"{c.name}-e{e}" in names:
                e *= 2
            out.append((dataclasses.replace(c, name=f"{c.name}-e{e}", epochs=(e, e)), s))
    return [c for c, _ in out], [s for _, s in out]


def train_seconds(runs: Sequence[AutoRun], folds: int, devices: int) -> float:
    """Estimated wall seconds of all the runs' jobs in one sweep."""
    return plan_seconds([PlannedRun(0, r.epochs, r.job_s) for r in runs], folds, devices)
