"""The local backend's ``admit`` gate (what ``auto``'s clock uses): a job it refuses is never started and
stays pending; the jobs it admits run."""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_plans import write_plan

from aivh_ens.scale.plan import load_plan
from aivh_ens.scale.sweep import run_sweep


def test_refused_jobs_stay_pending_and_admitted_ones_run(demo_data, tmp_path: Path):
    plan = load_plan(write_plan(tmp_path / "plan.toml", demo_data(n=40, n_test=10, seed=11), [{"name": "a"}],
                                folds=2))  # fmt: skip
    asked: list[str] = []

    def admit(job_file: Path) -> bool:
        asked.append(job_file.parent.name)
        return job_file.parent.name == "fold1"

    result = run_sweep(plan, tmp_path / "w", devices="cpu", threads=1, admit=admit, log=lambda _m: None)
    states = {r["fold"]: (r["state"], r["error"]) for r in result.rows}
    assert sorted(asked) == ["fold0", "fold1"]
    assert states[1] == ("done", "")
    assert states[0] == ("pending", "not started: it would not fit the time left")
    assert not (tmp_path / "w/runs/a/fold0/done.json").exists()
    assert result.unfinished == 1 and result.oof["a"] is None


def test_admit_is_for_the_local_backend(tmp_path: Path):
    with pytest.raises(ValueError, match="local backend"):
        run_sweep(load_plan(write_plan(tmp_path / "p.toml", tmp_path, [{"name": "a"}])), tmp_path,
                  backend="ray", admit=lambda _f: True)  # fmt: skip
