"""``aivh-ens auto`` end to end on tiny demo data with budgets of seconds: the plan fits, a second call resumes
without retraining, a budget too small for one run stops before training, a bad limit is one line.

No budget here is a constant: machines differ (a CPU without fast bf16 needs half as long again as one with it,
and a busy neighbour slows either), so the budget is a multiple of the least limit the planner itself asks for
on this machine, now."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from auto_checks import run_auto
from cli_checks import assert_user_error

from aivh_ens.auto.budget import format_duration, parse_time_limit
from aivh_ens.auto.plan import read_plan
from aivh_ens.auto.stage import submit_threads
from aivh_ens.layout import oof_path

HEADROOM = 1.5
"""The tests' budget over the planner's least limit: room for one timing to read slower than the other."""


def _done_files(work: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/fold*/done.json")}


def least_limit(res) -> int:
    """The smallest --time-limit the planner asks for on this machine (its "too small" error), in seconds."""
    asked = re.search(r"give --time-limit (\S+) or more", res.output)
    assert res.exit_code == 2 and asked, res.output
    return math.ceil(parse_time_limit(asked.group(1)))


@pytest.fixture(scope="module")
def asked(demo_data, tmp_path_factory):
    """``auto --time-limit 1s``: too small for one run anywhere; the error names the least limit."""
    data = demo_data(n=64, n_test=16, seed=5)
    work = tmp_path_factory.mktemp("auto") / "work"
    res = run_auto(data, work, "1s")
    return data, work, res, work.exists()


@pytest.fixture(scope="module")
def first(asked):
    data, work, too_small, _ = asked
    limit = math.ceil(HEADROOM * least_limit(too_small))
    res = run_auto(data, work, f"{limit}s")
    return data, work, res, limit


def test_plan_fits_the_budget(first):
    data, work, res, limit = first
    assert res.exit_code == 0, res.output
    plan = read_plan(work, data)
    used = json.loads((work / "runs/auto/table.json").read_text())
    assert plan.limit_s == limit and plan.runs
    assert plan.decode_s is not None and plan.decode_s > 0  # the images priced by a sample of the user's own
    assert plan.train_s + plan.finish_s <= limit  # the plan was sized for what was left of the limit
    assert used["limit_s"] == limit and 0 < used["used_s"] < 2 * limit
    toml = (work / "runs/auto/plan.toml").read_text()
    assert 'group = "pairs"' in toml  # inspect's pairs finding became the plan's grouping
    timed = set(json.loads((work / "runs/auto/timings.json").read_text()))
    assert timed >= {re.sub(r"-e\d+$", "", r.name) for r in plan.runs}  # a scout `<candidate>-e<N>` included
    assert (work / "submission.csv").is_file() and (work / "runs/report.html").is_file()
    table = res.output[res.output.index("run ") :]
    assert "shipped blend:" in table and f" of {format_duration(limit)}" in table
    assert re.search(r"budget: used \d+(\.\d)?[sm] of ", table)
    for r in plan.runs:
        assert r.name in table


def test_second_call_resumes_without_retraining_and_quiet_prints_only_the_table(first):
    data, work, _, limit = first
    old = read_plan(work, data)
    before = _done_files(work)
    assert before  # the first call trained something
    res = run_auto(data, work, f"{limit}s", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("run ") and "budget: used" in res.output  # --quiet: the final table only
    assert "plan:" not in res.output and "sweep:" not in res.output
    after = _done_files(work)
    assert {p: after[p] for p in before} == before  # every finished fold kept, none retrained
    assert read_plan(work, data).runs[: len(old.runs)] == old.runs  # the plan resumed (time left adds runs)


def test_a_larger_limit_extends_the_plan_without_retraining(first, asked):
    data, work, _, limit = first
    bigger = limit + least_limit(asked[2])  # room for at least the smallest further run
    old = read_plan(work, data)
    before = _done_files(work)
    res = run_auto(data, work, f"{bigger}s")
    assert res.exit_code == 0, res.output
    assert f"plan: extended for {format_duration(bigger)} with " in res.output
    new = read_plan(work, data)
    assert new.limit_s == bigger and new.folds == old.folds
    assert new.runs[: len(old.runs)] == old.runs  # the old runs as they were
    assert len(new.runs) > len(old.runs)
    after = _done_files(work)
    assert {p: after[p] for p in before} == before  # nothing of the first plan was retrained
    added = {r.name for r in new.runs[len(old.runs) :]}
    assert added and all(oof_path(work, name).is_file() for name in added)  # trained to the end
    table = (work / "runs/auto/table.txt").read_text()
    assert all(name in table for name in added)


def test_jobs_that_all_fail_are_named_as_failures(first, asked, tmp_path, monkeypatch):
    data, work, _, _ = first
    # the first call's probes, as a rerun in place reuses them: the least limit (which prices the probes) then
    # buys the smallest plan with room to spare, so few jobs fail
    (tmp_path / "w/runs/auto").mkdir(parents=True)
    shutil.copy(work / "runs/auto/timings.json", tmp_path / "w/runs/auto/timings.json")
    limit = least_limit(asked[2])
    monkeypatch.setenv("AIVH_ENS_KILL_AT", "epoch-done")  # every fold's job raises after its first epoch
    monkeypatch.setenv("AIVH_ENS_FAULT", "raise")
    res = run_auto(data, tmp_path / "w", f"{limit}s")
    assert res.exit_code == 1, res.output
    assert re.search(r"^\[0/\d+\] \S+ fold \d FAILED: ", res.output, re.M)
    assert re.search(r"^no run finished: \d+ jobs FAILED; the first, \S+ fold \d: ", res.output, re.M)
    assert "--time-limit" not in res.output.splitlines()[-1]  # the limit is not blamed


def test_budget_too_small_for_one_run_stops_before_training(asked):
    _, _, res, wrote = asked  # the module's question, asked before its first real call
    assert_user_error(res, "--time-limit", "too small", "give --time-limit")
    need = re.search(r"needs about (\d+)s", res.output)
    assert need and int(need.group(1)) > 1
    assert not wrote  # nothing written: no inspect files, no plan, no runs


@pytest.mark.parametrize("limit", ["abc", "0", "-5m"])
def test_bad_time_limit_is_one_line_exit_2(demo_data, tmp_path, limit):
    res = run_auto(demo_data(n=64, n_test=16, seed=5), tmp_path / "w", limit)
    assert_user_error(res, "--time-limit")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("slots", "threads", "want"),
    [(("cpu", "cpu"), 1, 2), (("cpu",), 2, 2), (("cpu",) * 4, 2, 8), (("cuda:0", "cuda:1"), None, None),
     (("cuda:0",), 4, 4)],
)  # fmt: skip
def test_submit_scores_on_the_threads_all_the_cpu_jobs_had(slots, threads, want):
    """Submit runs after the sweep, alone: on the CPU it takes the cores every job had."""
    assert submit_threads(slots, threads) == want
