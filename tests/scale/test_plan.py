"""Sweep plans: expansion, hashing, --dry-run, and every kind of bad plan (one line, exit 2, nothing written)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from cli_checks import assert_user_error
from click.testing import CliRunner
from sweep_plans import write_plan

from aivh_ens.cli import main
from aivh_ens.config import resolve_config
from aivh_ens.scale.jobs import config_hash
from aivh_ens.scale.plan import load_plan

RUNS = [{"name": "e", "model": "test_efficientnet"}, {"name": "c", "model": "test_convnext", "lr": 0.002}]


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=40, n_test=10, seed=5)


def sweep(workdir: Path, plan: Path, *extra: str):
    return CliRunner().invoke(main, ["sweep", str(plan), "--workdir", str(workdir), *extra])


def test_a_plan_expands_into_runs_with_shared_settings(tmp_path, data):
    plan = load_plan(write_plan(tmp_path / "plan.toml", data, RUNS, seed=7))
    assert [c.name for c in plan.runs] == ["e", "c"]
    e, c = plan.runs
    assert (e.model, c.model, e.recipe, e.folds, e.seed, e.group) == (
        "test_efficientnet",
        "test_convnext",
        "tiny",
        3,
        7,
        "pairs",
    )
    assert c.lr == 0.002 and e.lr == resolve_config("tiny").lr  # per-run keys override shared and recipe
    assert e.data == str(data)


def test_relative_data_paths_are_relative_to_the_plan_file(tmp_path, data):
    shutil.copytree(data, tmp_path / "d")
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    (plan_dir / "p.toml").write_text('[shared]\ndata = "../d"\nrecipe = "tiny"\n\n[[runs]]\nname = "x"\n')
    assert Path(load_plan(plan_dir / "p.toml").runs[0].data).resolve() == (tmp_path / "d").resolve()


def test_the_job_hash_follows_what_is_trained_not_where():
    cfg = resolve_config("tiny", name="r")
    h = config_hash(cfg, 0)
    assert h == config_hash(resolve_config("tiny", name="r"), 0) and len(h) == 64
    assert config_hash(dataclasses.replace(cfg, device="cuda:1", workers=4), 0) == h
    assert config_hash(cfg, 1) != h
    assert config_hash(dataclasses.replace(cfg, lr=cfg.lr * 2), 0) != h


def test_dry_run_prints_every_job_and_writes_nothing(tmp_path, data):
    plan = write_plan(tmp_path / "plan.toml", data, RUNS)
    work = tmp_path / "w"
    res = sweep(work, plan, "--dry-run")
    assert res.exit_code == 0, res.output
    lines = [ln.split() for ln in res.output.splitlines() if ln.startswith(("e ", "c "))]
    assert sorted((r[0], r[1], r[2]) for r in lines) == sorted(
        (run, str(k), "pending") for run in "ec" for k in range(3)
    )
    assert "dry run: 6 jobs, nothing written" in res.output
    assert not work.exists()


BAD = [
    (
        "unknown-run-key",
        {"runs": [{"name": "a", "model": "test_efficientnet", "lrr": 0.1}]},
        ["run a", "'lrr'"],
    ),
    ("unknown-shared-key", {"shared": "foldz = 3", "runs": [{"name": "a"}]}, ["[shared]", "'foldz'"]),
    ("unknown-top-key", {"top": "[extra]\nx = 1", "runs": [{"name": "a"}]}, ["'extra'", "top level"]),
    ("unknown-recipe", {"runs": [{"name": "a", "recipe": "effnet-b9"}]}, ["run a", "'recipe'", "effnet-b9"]),
    (
        "unknown-model",
        {"runs": [{"name": "a", "model": "test_efficientnett"}]},
        ["run a", "'model'", "test_efficientnet"],
    ),
    (
        "name-twice",
        {"runs": [{"name": "a"}, {"name": "a", "model": "test_convnext"}]},
        ["run a", "'name'", "twice"],
    ),
    ("wrong-type", {"runs": [{"name": "a", "epochs": "3"}]}, ["run a", "'epochs'", "int"]),
    ("wrong-tuple", {"runs": [{"name": "a", "rrc_scale": [0.5]}]}, ["run a", "'rrc_scale'"]),
    ("out-of-range", {"runs": [{"name": "a", "lr": -1.0}]}, ["run a", "'lr'", "(--lr) must be > 0"]),
    ("no-runs", {"runs": []}, ["'runs'", "no runs"]),
]


@pytest.mark.parametrize("case,spec,needles", BAD, ids=[b[0] for b in BAD])
def test_a_bad_plan_is_one_line_naming_file_run_and_key(tmp_path, data, case, spec, needles):
    plan = write_plan(tmp_path / "plan.toml", data, spec["runs"], model="test_efficientnet")
    text = plan.read_text()
    if "shared" in spec:
        text = text.replace("[shared]\n", "[shared]\n" + spec["shared"] + "\n")
    if "top" in spec:
        text += spec["top"] + "\n"
    plan.write_text(text)
    work = tmp_path / "w"
    res = sweep(work, plan)
    assert_user_error(res, str(plan), *needles)
    assert not work.exists()


def test_unreadable_plans_and_images_stop_before_anything_is_written(tmp_path, data):
    work = tmp_path / "w"
    assert_user_error(sweep(work, tmp_path / "missing.toml"), "missing.toml", "does not exist")
    (tmp_path / "broken.toml").write_text("[shared\n")
    assert_user_error(sweep(work, tmp_path / "broken.toml"), "broken.toml", "not valid TOML")
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    victim = sorted((bad / "train_data").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # header fine, pixels cut
    plan = write_plan(tmp_path / "plan.toml", bad, RUNS)
    assert_user_error(sweep(work, plan), "plan.toml", "run e", victim.name, "--on-bad-image skip")
    assert not work.exists()  # no fold file, no config, no cache


def test_cv_with_several_models_is_a_plan_of_one_run_each(tmp_path, data):
    res = CliRunner().invoke(
        main,
        ["cv", "--recipe", "tiny", "--model", "test_efficientnet,test_convnext", "--data", str(data)]
        + ["--name", "x", "--workdir", str(tmp_path / "w")],
    )
    assert_user_error(res, "--name names one run", "2 --model names")
    res = CliRunner().invoke(
        main, ["cv", "--model", "test_efficientnet", "--devices", "cpu", "--fold", "0", "--data", str(data)]
    )
    assert_user_error(res, "--fold", "sweep")
    res = CliRunner().invoke(
        main, ["cv", "--model", "test_efficientnet", "--devices", "tpu:0", "--data", str(data)]
    )
    assert_user_error(res, "--devices", "cuda:0,cuda:1")
