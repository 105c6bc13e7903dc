"""The budget maths of ``auto`` (no torch, no training): time limits, the cost model, plans that fit."""

from __future__ import annotations

import pytest

from aivh_ens.auto.budget import (
    PlannedRun,
    Speed,
    fit_plan,
    job_s,
    minimum_s,
    parse_time_limit,
    plan_seconds,
    schedule_s,
)
from aivh_ens.auto.candidates import Candidate
from aivh_ens.auto.plan import AutoRun, choose_runs, extension, train_seconds
from aivh_ens.errors import UserError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20m", 1200), ("8h", 28800), ("1h30m", 5400), ("90", 90), ("90s", 90), ("1.5h", 5400), (" 2M ", 120)],
)
def test_time_limit_parses(text, seconds):
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["abc", "0", "0m", "", "-5", "5x", "m", "20 m", "1e3"])
def test_bad_time_limit_is_one_line_naming_the_flag(text):
    with pytest.raises(UserError) as err:
        parse_time_limit(text)
    assert "--time-limit" in str(err.value) and "\n" not in str(err.value)


def test_schedule_is_longest_first_on_free_devices():
    base = schedule_s([], 2)
    assert base == 0
    one = schedule_s([10.0], 2)
    assert schedule_s([10.0, 10.0], 2) == one  # side by side
    assert schedule_s([10.0, 10.0, 10.0], 2) == pytest.approx(one + 10)
    assert schedule_s([6.0, 5.0, 4.0, 3.0], 2) == pytest.approx(one - 10 + 9)  # 6+3 | 5+4


SPEEDS = [Speed(600.0, 2000.0), Speed(900.0, 3000.0), Speed(300.0, 1000.0)]
RANGES = [(4, 16), (4, 16), (4, 16)]


@pytest.mark.parametrize("budget", [60, 120, 300, 1200, 3600, 8 * 3600])
@pytest.mark.parametrize("devices", [1, 2, 4])
@pytest.mark.parametrize("n_train", [200, 20000])
def test_plan_fits_the_budget(budget, devices, n_train):
    fit = fit_plan(SPEEDS, RANGES, n_train, devices, budget)
    if fit is None:
        assert minimum_s(SPEEDS, RANGES, n_train, devices) > budget
        return
    assert fit.seconds == pytest.approx(plan_seconds(fit.runs, fit.folds, devices))
    assert fit.seconds <= budget
    assert all(RANGES[r.candidate][0] <= r.epochs <= RANGES[r.candidate][1] for r in fit.runs)
    more = fit_plan(SPEEDS, RANGES, n_train, devices, budget * 2)
    assert (more.folds, len(more.runs)) >= (fit.folds, len(fit.runs))  # more time never buys less


def test_folds_for_the_best_candidate_come_before_more_candidates():
    fit = fit_plan(SPEEDS, RANGES, 20000, 2, 900)
    assert fit.folds == 5 and fit.runs[0].candidate == 0  # the first candidate on 5 folds, not more on fewer
    five = plan_seconds([PlannedRun(0, RANGES[0][0], job_s(SPEEDS[0], 20000, 5, RANGES[0][0]))], 5, 2)
    small = fit_plan(SPEEDS, RANGES, 20000, 2, five - 1)  # the first candidate no longer fits on 5 folds
    assert small.folds == 3 and small.runs[0].candidate == 0
    assert fit_plan(SPEEDS, RANGES, 20000, 2, 10) is None


def _cands():
    return [Candidate(f"auto-m{i}-32px", "scratch", {"model": f"m{i}"}, r) for i, r in enumerate(RANGES)]


def test_a_larger_limit_adds_runs_and_keeps_the_planned_ones():
    cands = _cands()
    folds, runs = choose_runs(cands[:2], SPEEDS[:2], 20000, 2, 900)
    extra, speeds = extension(cands, SPEEDS, runs)
    names = [c.name for c in extra]
    assert names[0] == "auto-m2-32px"  # the candidate not yet planned comes first
    for r in runs:  # each planned candidate comes back only as a new, longer run
        assert r.name not in names and f"{r.name}-e{2 * r.epochs}" in names
    added = choose_runs(extra, speeds, 20000, 2, 1800, folds=folds)
    assert added is not None and added[0] == folds
    assert not {r.name for r in added[1]} & {r.name for r in runs}
    assert train_seconds([*runs, *added[1]], folds, 2) <= 900 + 1800
    again, _ = extension(
        cands, SPEEDS, [*runs, AutoRun(f"{runs[0].name}-e{2 * runs[0].epochs}", "scratch", {}, 1)]
    )
    assert f"{runs[0].name}-e{4 * runs[0].epochs}" in [c.name for c in again]


def _job(work, run: str, fold: int):
    from aivh_ens.scale.jobs import JobSpec, write_spec

    return write_spec(JobSpec(run, fold, str(work), {}, f"{run}{fold}", "folds/f.csv"))


def test_the_clock_starts_a_job_only_when_it_fits(tmp_path):
    import time

    from aivh_ens.auto.plan import AutoPlan
    from aivh_ens.auto.stage import PROCESS_START_S, Clock, Gate

    runs = (AutoRun("a", "scratch", {}, 4, 10.0), AutoRun("b", "scratch", {}, 4, 10.0))
    plan = AutoPlan("d", 100.0, ("cpu",), 2, {}, runs, finish_s=10.0)

    def gate(left: float) -> Gate:
        return Gate(plan, Clock(time.monotonic() - (100 - left), 100.0), devices=1)

    g = gate(left=5)
    assert g(_job(tmp_path, "a", 0)) and g(
        _job(tmp_path, "a", 1)
    )  # nothing done yet: the first run always starts
    assert not g(_job(tmp_path, "b", 0))
    (tmp_path / "oof").mkdir()
    (tmp_path / "oof/a.csv").write_text("file_name,label,fold,prob\n")  # run a is complete
    both = 2 * 10.0 + PROCESS_START_S  # run b's two folds, one device, its process to start
    assert gate(left=10 + both + 1)(_job(tmp_path, "b", 0))
    assert not gate(left=10 + both - 1)(_job(tmp_path, "b", 0))
    g = gate(left=10 + both + 1)
    assert g(_job(tmp_path, "b", 0)) and g(_job(tmp_path, "b", 1))  # a started run needs one fold more


def test_only_fine_tuning_stops_early():
    scratch = AutoRun("auto-aivh_cnn_s-32px", "scratch", {"model": "aivh_cnn_s"}, 11).table()
    tune = AutoRun("auto-convnext_tiny-ft", "finetune", {"model": "convnext_tiny"}, 6).table()
    short = AutoRun("auto-convnext_tiny-ft", "finetune", {"model": "convnext_tiny"}, 4).table()
    assert "early_stop" not in scratch and scratch["epochs"] == 11  # the epochs are the budget
    assert tune["early_stop"] == 3 and "early_stop" not in short
