"""The hard limit of ``auto``: folds end their epochs by a deadline, the sweep runs jobs in the planner's order,
one progress line per finished job, and the first complete run is submitted while the others train."""

from __future__ import annotations

import math
import re
import time

import pytest

from aivh_ens.auto.gate import Clock, Gate
from aivh_ens.auto.plan import AutoPlan, AutoRun
from aivh_ens.auto.steps import Progress
from aivh_ens.config import resolve_config
from aivh_ens.train.fold import planned_epochs


def _epochs(n: int, train_s: float, val_s: float | None = None) -> list[dict[str, float]]:
    return [
        {
            "train_seconds": train_s,
            "seconds": train_s + (val_s or 0.0),
            "val_f1": math.nan if val_s is None else 0.9,
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("time_left", "want"), [(None, 20), (1000.0, 20), (52.0, 6), (45.0, 5), (12.0, 3), (0.0, 3), (-5.0, 3)]
)
def test_a_fold_ends_its_epochs_before_the_deadline(time_left, want):
    """2 epochs of 10 s done, a validation pass timed at 1 s (0.1 x 10 s); the OOF pass keeps 2 passes (2 s)."""
    cfg = resolve_config("tiny", epochs=20)
    # k more epochs take 10k s + 1 s per validated one (all of them): k=4 takes 44 s, +2 s OOF = 46 s
    assert planned_epochs(cfg, _epochs(2, 10.0), 0.1, time_left) == want
    assert planned_epochs(cfg, [], 0.1, 0.0) == 20  # before the first epoch nothing is measured


def test_the_deadline_caps_fold_time_and_never_lengthens_it():
    cfg = resolve_config("tiny", epochs=20, fold_time=60.0, validate_last=2)
    assert planned_epochs(cfg, _epochs(2, 10.0), 0.1) == 6
    assert planned_epochs(cfg, _epochs(2, 10.0), 0.1, 1000.0) == 6  # a far deadline changes nothing
    assert planned_epochs(cfg, _epochs(2, 10.0), 0.1, 25.0) == 4  # 2 more (20 s + 2 validated) + OOF 2 s


def test_the_sweep_runs_jobs_in_the_plans_order(tmp_path):
    from aivh_ens.scale.sweep import _Checked, expand

    small = resolve_config("tiny", name="first", epochs=2, folds=2)
    large = resolve_config("tiny", name="second", epochs=50, folds=2)
    checked = [_Checked(small, None, {}), _Checked(large, None, {})]
    assert [(s.run, s.fold) for s, _ in expand(checked, tmp_path, "plan")] == [
        ("first", 0), ("first", 1), ("second", 0), ("second", 1)
    ]  # fmt: skip
    assert [s.run for s, _ in expand(checked, tmp_path)][0] == "second"  # the sweep command: longest first


def _progress(tmp_path, lines, submitted):
    runs = (AutoRun("a", "scratch", {}, 4, 10.0, 8.0), AutoRun("b", "scratch", {}, 4, 10.0, 8.0))
    plan = AutoPlan("d", 600.0, ("cpu", "cpu"), 2, {}, runs, finish_s=30.0)
    clock = Clock(time.monotonic() - 60, 600.0)
    return Progress(plan, clock, Gate(plan, clock, tmp_path, 2), lines.append, submitted.append)


def _finish_job(tmp_path, run: str, fold: int, complete: bool = False) -> dict:
    d = tmp_path / "runs" / run / f"fold{fold}"
    d.mkdir(parents=True)
    (d / "done.json").write_text("{}")
    if complete:
        (tmp_path / "oof").mkdir(exist_ok=True)
        (tmp_path / "oof" / f"{run}.csv").write_text("file_name,label,fold,prob\n")
    return {"run": run, "fold": fold, "state": "done", "f1": 0.9, "error": ""}


def test_one_line_per_finished_job_and_the_first_run_is_submitted_at_once(tmp_path):
    lines, submitted = [], []
    progress = _progress(tmp_path, lines, submitted)
    progress(_finish_job(tmp_path, "a", 0))
    assert re.fullmatch(
        r"\[1/4\] a fold 0 done, val F1 0\.9000; \d+s of 10\.0m used, expected end \d+s", lines[-1]
    )
    assert not submitted
    progress(_finish_job(tmp_path, "a", 1, complete=True))
    assert lines[-1].startswith("[2/4] a fold 1 done") and submitted == ["a"]  # while run b trains
    progress({"run": "b", "fold": 0, "state": "failed", "error": "CUDA out of memory"})
    assert "[2/4] b fold 0 FAILED: CUDA out of memory" in lines[-1]  # a failure named as one
    progress(_finish_job(tmp_path, "b", 1, complete=True))
    assert submitted == ["a"]  # once per call


def test_a_single_run_plan_is_not_submitted_twice(tmp_path):
    lines, submitted = [], []
    progress = _progress(tmp_path, lines, submitted)
    progress.plan = AutoPlan("d", 600.0, ("cpu",), 2, {}, progress.plan.runs[:1], finish_s=30.0)
    progress(_finish_job(tmp_path, "a", 0))
    progress(_finish_job(tmp_path, "a", 1, complete=True))
    assert not submitted  # the final blend and submit come next anyway


@pytest.mark.parametrize("limit", [180.0, 360.0, 720.0, 8 * 3600.0])
def test_a_scout_run_goes_first_when_the_first_submission_would_come_late(limit):
    from aivh_ens.auto.budget import Speed
    from aivh_ens.auto.candidates import Candidate
    from aivh_ens.auto.planning import SUBMIT_BY, first_plan, first_submission_s

    candidates = [
        Candidate("c", "scratch", {"model": "m"}, (6, 40)),
        Candidate("d", "scratch", {"model": "n"}, (6, 16)),
    ]
    speeds = {"c": Speed(1000.0, 4000.0, 2), "d": Speed(2000.0, 8000.0, 2)}
    base = AutoPlan("data", limit, ("cpu", "cpu"), 2, {}, n_train=4000, n_test=1000)
    clock = Clock(time.monotonic(), limit)
    plan = first_plan(clock, base, candidates, speeds)
    first = plan.runs[0]
    assert (
        first_submission_s(clock, plan, first, plan.folds, speeds) <= SUBMIT_BY * limit + 1
    )  # by half the limit
    assert plan.train_s + plan.finish_s <= limit  # the scout's time came out of the other runs'
    if first.name != "c":  # a scout: the first candidate at a few epochs, then the plan as before
        assert re.fullmatch(r"c-e\d", first.name) and first.epochs <= 6
        assert plan.runs[1].name == "c"
