"""`sweep` flags and exit codes: another backend's flags and a missing extra are one line (exit 2) before any
image is decoded; a sweep exits 1 unless every job is done; Ray requests are checked against the nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_checks import assert_user_error
from click.testing import CliRunner
from sweep_plans import write_plan

from aivh_ens.cli import main
from aivh_ens.scale import sweep as sweep_module
from aivh_ens.scale.sweep import SweepResult

RUNS = [{"name": "e", "model": "test_efficientnet"}]


@pytest.fixture()
def plan(tmp_path, demo_data) -> Path:
    return write_plan(tmp_path / "plan.toml", demo_data(n=40, n_test=10, seed=5), RUNS)


@pytest.fixture()
def no_decode(monkeypatch):
    """Fail the test if the sweep gets as far as checking (decoding) the plan's inputs."""

    def check_plan(*a, **k):
        raise AssertionError("the plan's images were decoded before the refusal")

    monkeypatch.setattr(sweep_module, "check_plan", check_plan)


def sweep(plan: Path, *extra: str):
    return CliRunner().invoke(main, ["sweep", str(plan), "--workdir", str(plan.parent / "w"), *extra])


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--slurm-partition", "gpu"], ["--slurm-partition is for --backend slurm", "--backend local"]),
        (["--timeout-min", "60", "--backend", "ray"], ["--timeout-min is for --backend slurm", "ray"]),
        (["--ray-address", "auto"], ["--ray-address is for --backend ray"]),
        (["--gpus-per-task", "1"], ["--gpus-per-task is for --backend ray or --backend slurm"]),
        (
            ["--max-jobs-per-worker", "2", "--backend", "slurm"],
            ["--max-jobs-per-worker is for --backend local or --backend ray"],
        ),
        (["--devices", "cpu", "--backend", "slurm"], ["--devices is for --backend local"]),
        (["--gpus", "2", "--backend", "ray"], ["--gpus is for --backend local"]),
        (["--backend", "slurm", "--gpus-per-task", "0.5"], ["--gpus-per-task", "whole number", "0.5"]),
    ],
)
def test_flags_for_another_backend_are_refused_in_one_line(plan, no_decode, flags, needles):
    assert_user_error(sweep(plan, *flags), *needles)
    assert not (plan.parent / "w").exists()


@pytest.mark.parametrize("backend,module,extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_a_missing_extra_is_one_line_with_the_pip_command(
    plan, no_decode, monkeypatch, backend, module, extra
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    assert_user_error(sweep(plan, "--backend", backend), f"pip install 'aivh-ens[{extra}]'", module)
    assert not (plan.parent / "w").exists()


@pytest.mark.parametrize(
    "states,code",
    [
        (["done", "skipped (done)"], 0),
        (["done", "failed"], 1),
        (["done", "pending"], 1),
        (["running elsewhere", "done"], 1),
    ],
)
def test_a_sweep_exits_1_unless_every_job_is_done(plan, monkeypatch, states, code):
    rows = tuple({"run": "e", "fold": k, "state": s, "error": ""} for k, s in enumerate(states))
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *a, **k: SweepResult(rows))
    res = sweep(plan)
    assert res.exit_code == code, res.output
    if code:
        unfinished = [s for s in states if s not in ("done", "skipped (done)")]
        assert f"1 of 2 jobs not done (1 {unfinished[0]})" in res.output


def test_a_ray_request_no_node_can_hold_is_refused_up_front():
    from aivh_ens.errors import UserError
    from aivh_ens.scale.ray import check_nodes

    nodes = [
        {"Alive": True, "NodeManagerHostname": "cpu-box", "Resources": {"CPU": 8.0}},
        {"Alive": True, "NodeManagerHostname": "gpu-box", "Resources": {"CPU": 4.0, "GPU": 2.0}},
        {"Alive": False, "NodeManagerHostname": "gone", "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    check_nodes(1, 4, nodes)
    check_nodes(0, 8, nodes)
    for gpus, cpus in [(1, 8), (4, 1), (0, 16)]:
        with pytest.raises(
            UserError, match="cpu-box: 0 GPU 8 CPU, gpu-box: 2 GPU 4 CPU\\); pass --gpus-per-task"
        ):
            check_nodes(gpus, cpus, nodes)


def test_cv_refuses_a_sweep_flag_of_another_backend_too(tmp_path, demo_data, no_decode):
    data = demo_data(n=40, n_test=10, seed=5)
    args = ["cv", "--model", "test_efficientnet", "--data", str(data), "--workdir", str(tmp_path / "w")]
    res = CliRunner().invoke(main, [*args, "--slurm-partition", "gpu"])
    assert_user_error(res, "--slurm-partition is for --backend slurm")
    assert not (tmp_path / "w").exists()


def test_the_resume_advice_after_force_never_repeats_force(plan, monkeypatch):
    rows = ({"run": "e", "fold": 0, "state": "done", "error": ""}, {"run": "e", "fold": 1, "state": "failed"})
    seen = []
    monkeypatch.setattr(
        sweep_module, "run_sweep", lambda *a, **k: seen.append(k["force"]) or SweepResult(rows)
    )
    res = sweep(plan, "--force")
    assert res.exit_code == 1 and seen == [True], res.output
    assert "run the same command without --force to resume" in res.output
    assert "run the same command again" not in res.output
    res = sweep(plan)
    assert res.exit_code == 1 and "run the same command again to resume" in res.output
