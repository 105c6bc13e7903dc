"""The budget maths of ``auto`` (no torch, no training): time limits, the cost model, plans that fit."""

from __future__ import annotations

import dataclasses

import pytest

from aivh_ens.auto.budget import (
    JOB_OVERHEAD_S,
    PlannedRun,
    Speed,
    epochs_s,
    fit_plan,
    job_s,
    minimum_s,
    parse_time_limit,
    plan_seconds,
    schedule_s,
    validated_epochs,
)
from aivh_ens.auto.candidates import Candidate
from aivh_ens.auto.plan import AutoRun, choose_runs, extension, train_seconds, validates_last
from aivh_ens.auto.planning import finish_seconds
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


def test_schedule_is_the_plans_order_on_free_devices():
    base = schedule_s([], 2)
    assert base == 0
    one = schedule_s([10.0], 2)
    assert schedule_s([10.0, 10.0], 2) == one  # side by side
    assert schedule_s([10.0, 10.0, 10.0], 2) == pytest.approx(one + 10)
    assert schedule_s([6.0, 5.0, 4.0, 3.0], 2) == pytest.approx(one - 10 + 9)  # 6+3 | 5+4
    assert schedule_s([3.0, 3.0, 6.0], 2) == pytest.approx(
        one - 10 + 9
    )  # 3+6 | 3: in order, not longest first


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


@pytest.mark.parametrize(("epochs", "checked"), [(1, 1), (2, 2), (3, 2), (8, 2), (9, 3), (14, 4), (24, 6)])
def test_runs_that_validate_last_validate_their_last_quarter(epochs, checked):
    assert validated_epochs(epochs) == checked
    speed, n, k = SPEEDS[0], 20000, 4
    val_pass = 1.3 * (n / k) / speed.eval_img_s  # one validation pass, at the loader factor
    saved = job_s(speed, n, k, epochs) - job_s(speed, n, k, epochs, last_only=True)
    assert saved == pytest.approx((epochs - checked) * val_pass)


def test_the_oof_pass_and_submit_cost_one_pass_per_tta_view():
    one, ten = SPEEDS[0], dataclasses.replace(SPEEDS[0], views=10)
    n, k = 20000, 4
    assert job_s(ten, n, k, 12) - job_s(one, n, k, 12) == pytest.approx(9 * 1.3 * (n / k) / one.eval_img_s)
    run = AutoRun("auto-m-32px", "scratch", {"model": "m"}, 12, 60.0)
    submit = finish_seconds(n, 4000, [run], k, {"auto-m-32px": ten}) - finish_seconds(
        n, 4000, [run], k, {"auto-m-32px": one}
    )
    assert submit == pytest.approx(k * 9 * 4000 / one.eval_img_s)  # each fold model, 9 more test passes


def test_skipped_validation_buys_epochs_and_the_plan_table_says_so():
    budget = _first_alone(4, 2, 14) - 1  # one second short of 14 epochs validated every epoch
    every = fit_plan(SPEEDS[:1], RANGES[:1], 20000, 2, budget)
    last = fit_plan(SPEEDS[:1], RANGES[:1], 20000, 2, budget, last_only=[True])
    assert last.folds == every.folds and last.runs[0].epochs > every.runs[0].epochs
    assert last.seconds <= budget
    assert validates_last("scratch") and not validates_last("finetune") and not validates_last("probe")
    run = AutoRun("auto-m-32px", "scratch", {"model": "m"}, 14, 60.0)
    assert run.table()["validate_last"] == 4
    assert "validate_last" not in AutoRun("auto-m-ft", "finetune", {"model": "m"}, 6, 60.0).table()


def test_each_fold_trains_for_the_seconds_its_epochs_were_planned_to_take():
    """The plan gives each run's folds the seconds of its planned epochs (``fold_time``) and the candidate's most
    epochs, which a fold reaches only when its epochs run faster than the probe said."""
    cands = _cands()
    folds, runs = choose_runs(cands[:1], SPEEDS[:1], 20000, 2, _first_alone(4, 2, 12))
    run = runs[0]
    assert RANGES[0][0] <= run.epochs < RANGES[0][1] and run.most == RANGES[0][1]
    assert run.fold_s >= epochs_s(SPEEDS[0], 20000, folds, run.epochs, last_only=True)
    oof_pass = 1.3 * 20000 / folds / SPEEDS[0].eval_img_s
    # the job is its epochs, its OOF pass and its set-up
    assert run.job_s == pytest.approx(JOB_OVERHEAD_S + run.fold_s + oof_pass)
    table = run.table()
    assert table["fold_time"] == pytest.approx(run.fold_s, abs=0.051) and table["epochs"] == RANGES[0][1]
    assert table["validate_last"] == validated_epochs(run.epochs)
    # the seconds 12 whole epochs leave over go to the folds: the plan fills its budget
    budget = plan_seconds([PlannedRun(0, 12, job_s(SPEEDS[0], 20000, 4, 12, last_only=True))], 4, 2) + 60
    folds, (run,) = choose_runs(cands[:1], SPEEDS[:1], 20000, 2, budget)
    assert train_seconds([run], folds, 2) == pytest.approx(budget) and run.epochs == 12
    assert run.fold_s == pytest.approx(epochs_s(SPEEDS[0], 20000, folds, 12, last_only=True) + 30)
    # not when a run trains its most epochs (its folds would end at --epochs anyway)
    folds, (run,) = choose_runs(cands[:1], SPEEDS[:1], 20000, 2, _first_alone(5, 2, RANGES[0][1]) + 60)
    assert run.epochs == RANGES[0][1] and run.fold_s == pytest.approx(
        epochs_s(SPEEDS[0], 20000, folds, run.epochs, last_only=True)
    )
    old = AutoRun("auto-m-32px", "scratch", {"model": "m"}, 14, 60.0)  # a plan written before fold_time
    assert "fold_time" not in old.table() and old.table()["epochs"] == 14


def _first_alone(k: int, devices: int, epochs: int) -> float:
    return plan_seconds([PlannedRun(0, epochs, job_s(SPEEDS[0], 20000, k, epochs))], k, devices)


def test_the_first_candidate_trains_its_most_epochs_before_more_candidates():
    budget = _first_alone(5, 2, 8)
    fit = fit_plan(SPEEDS, RANGES, 20000, 2, budget)
    assert [r.candidate for r in fit.runs] == [0]  # short of its 16 epochs: no further candidate
    assert fit.runs[0].epochs < RANGES[0][1]
    assert _first_alone(fit.folds, 2, fit.runs[0].epochs + 1) > budget  # and every epoch that fits
    full = _first_alone(5, 2, RANGES[0][1])  # 16 epochs on 5 folds: the rest goes to more candidates
    fit = fit_plan(SPEEDS, RANGES, 20000, 2, full + 400)
    assert fit.folds == 5 and fit.runs[0].candidate == 0 and fit.runs[0].epochs == RANGES[0][1]
    assert len(fit.runs) > 1 and all(r.epochs >= RANGES[r.candidate][0] for r in fit.runs)


@pytest.mark.parametrize(("devices", "folds"), [(1, 5), (2, 4), (3, 5), (4, 4)])
def test_folds_fill_the_devices_rounds_while_epochs_are_short(devices, folds):
    budget = _first_alone(5, devices, 10)  # enough for 10 of the first candidate's 16 epochs on 5 folds
    fit = fit_plan(SPEEDS, RANGES, 20000, devices, budget)
    assert fit.folds == folds and fit.runs[0].candidate == 0
    if folds == 4:  # 5 folds would leave a device idle in the last round: 4 folds train longer
        assert fit.runs[0].epochs > 10


def test_fewer_folds_when_the_first_candidate_does_not_fit_on_more():
    small = fit_plan(SPEEDS, RANGES, 20000, 2, _first_alone(4, 2, RANGES[0][0]) - 1)
    assert small.folds in (3, 2) and small.runs[0].candidate == 0
    assert fit_plan(SPEEDS, RANGES, 20000, 2, 10) is None


def _cands():
    return [Candidate(f"auto-m{i}-32px", "scratch", {"model": f"m{i}"}, r) for i, r in enumerate(RANGES)]


def test_a_larger_limit_adds_runs_and_keeps_the_planned_ones():
    cands = _cands()
    folds, runs = choose_runs(cands[:2], SPEEDS[:2], 20000, 2, 900)
    extra, speeds = extension(cands, SPEEDS, runs)
    names = [c.name for c in extra]
    planned = {r.name for r in runs}
    assert names[: 3 - len(runs)] == [c.name for c in cands if c.name not in planned]  # the unplanned first
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

    from aivh_ens.auto.gate import FIRST_RUN_SHARE, PROCESS_START_S, Clock, Gate
    from aivh_ens.auto.plan import AutoPlan

    # each fold job: 2 s of set-up and OOF pass, 8 s of epochs (its fold_time)
    runs = (AutoRun("a", "scratch", {}, 4, 10.0, 8.0), AutoRun("b", "scratch", {}, 4, 10.0, 8.0))
    plan = AutoPlan("d", 100.0, ("cpu",), 2, {}, runs, finish_s=10.0)

    def gate(left: float) -> Gate:
        return Gate(plan, Clock(time.monotonic() - (100 - left), 100.0), tmp_path, devices=1)

    g = gate(left=5)
    assert not g(_job(tmp_path, "a", 0))  # not even the first run starts when the clock cannot finish it
    first = 2 * (2.0 + FIRST_RUN_SHARE * 8.0) + PROCESS_START_S  # its folds may end early, by the deadline
    assert gate(left=10 + first + 1)(_job(tmp_path, "a", 0))
    assert not gate(left=10 + first - 1)(_job(tmp_path, "a", 0))
    (tmp_path / "oof").mkdir()
    (tmp_path / "oof/a.csv").write_text("file_name,label,fold,prob\n")  # run a is complete
    both = 2 * 10.0 + PROCESS_START_S  # run b's two whole folds, one device, its process to start
    assert gate(left=10 + both + 1)(_job(tmp_path, "b", 0))
    assert not gate(left=10 + both - 1)(_job(tmp_path, "b", 0))
    g = gate(left=10 + both + 1)
    assert g(_job(tmp_path, "b", 0)) and g(_job(tmp_path, "b", 1))  # a started run needs one fold more


def _metrics(work, run: str, fold: int, seconds: list[float]) -> None:
    fold_dir = work / "runs" / run / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i + 1},{s}\n" for i, s in enumerate(seconds))
    (fold_dir / "metrics.csv").write_text("epoch,seconds\n" + rows)


def test_speed_corrections_come_from_each_kinds_epochs(tmp_path):
    from aivh_ens.auto.gate import kind_ratios, ratio_for
    from aivh_ens.auto.plan import AutoPlan

    runs = (AutoRun("s", "scratch", {}, 4, 50.0, 40.0, epoch_s=10.0),
            AutoRun("f", "finetune", {}, 4, 50.0, 40.0, epoch_s=10.0))  # fmt: skip
    plan = AutoPlan("d", 100.0, ("cpu",), 2, {}, runs)
    assert kind_ratios(tmp_path, plan) == {}  # nothing measured: no correction
    _metrics(tmp_path, "s", 0, [20.0, 20.0])  # a running fold's epochs already count: twice the plan's
    ratios = kind_ratios(tmp_path, plan)
    assert ratios == {"scratch": pytest.approx(2.0)}
    assert ratio_for(ratios, "scratch") == pytest.approx(2.0)
    assert ratio_for(ratios, "finetune") == pytest.approx(2.0)  # unmeasured: the slowest kind, at least 1
    _metrics(tmp_path, "s", 0, [5.0, 5.0])
    _metrics(tmp_path, "f", 1, [30.0])
    ratios = kind_ratios(tmp_path, plan)
    assert ratios == {
        "scratch": pytest.approx(0.5),
        "finetune": pytest.approx(3.0),
    }  # slower is seen, by kind
    assert ratio_for({"scratch": 0.5}, "probe") == 1.0  # faster elsewhere is not assumed here


def test_only_fine_tuning_stops_early():
    scratch = AutoRun("auto-aivh_cnn_s-32px", "scratch", {"model": "aivh_cnn_s"}, 11).table()
    tune = AutoRun("auto-convnext_tiny-ft", "finetune", {"model": "convnext_tiny"}, 6).table()
    short = AutoRun("auto-convnext_tiny-ft", "finetune", {"model": "convnext_tiny"}, 4).table()
    assert "early_stop" not in scratch and scratch["epochs"] == 11  # the epochs are the budget
    assert tune["early_stop"] == 3 and "early_stop" not in short
