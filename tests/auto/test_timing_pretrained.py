"""The pretrained path end to end on the CPU: a Hugging Face cache and a --weights-dir of timm's ``test_*``
models (weights written here); ``auto`` discovers them, times them (one probe runs out of memory, by fault
injection, and is skipped with a line), plans them at their pretrained sizes and learning rates, trains and
submits.

No budget here is a constant: the full call's limit is a multiple of the least limit the planner asks for on
this machine, now (as in ``test_auto.py``)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from pretrained_weights import fake_hf_cache, save_weights

from aivh_ens.auto.budget import parse_time_limit
from aivh_ens.auto.plan import read_plan
from aivh_ens.auto.stage import Clock, step_plan
from aivh_ens.cli import main

OOM = "auto-test_efficientnet-ft"
"""The candidate whose timing runs out of memory at every batch size."""
MODELS = "test_vit,test_efficientnet"
HEADROOM = 1.5


@pytest.fixture
def held(tmp_path: Path, monkeypatch) -> Path:
    """test_vit.r160_in1k in the Hugging Face cache, test_efficientnet in a weights folder (no tag: its default
    one's, r160_in1k, 160 px), and the out-of-memory fault armed; returns the weights folder."""
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hf_cache(tmp_path / "hub", ["test_vit.r160_in1k"])))
    wdir = tmp_path / "weights"
    save_weights(wdir / "test_efficientnet.safetensors", "test_efficientnet")
    monkeypatch.setenv("AIVH_ENS_KILL_AT", f"timing:{OOM}")
    monkeypatch.setenv("AIVH_ENS_FAULT", "oom")
    return wdir


def test_pretrained_models_are_found_timed_and_planned_at_their_sizes_and_rates(demo_data, tmp_path, held):
    data = demo_data(n=64, n_test=16, seed=5)
    lines: list[str] = []
    clock = Clock(time.monotonic(), 3600.0)  # room for every candidate
    plan, timings, _ = step_plan(
        clock, data, tmp_path / "w", ["cpu"], held, 1, lines.append, MODELS.split(",")
    )
    assert f"timing: {OOM}: skipped, out of memory: CUDA out of memory (injected at timing:{OOM})" in lines
    names = {"auto-test_vit-probe", "auto-test_vit-ft", "auto-test_efficientnet-probe"}
    assert set(timings) == names  # the skipped candidate has no timing, and is not planned
    runs = {r.name: r.table() for r in plan.runs}
    assert set(runs) <= names and "auto-test_vit-ft" in runs
    vit = runs["auto-test_vit-ft"]
    assert (vit["img_size"], vit["mean"], vit["lr"], vit["layer_decay"]) == (160, [0.5] * 3, 2e-5, 0.75)
    assert (
        vit["weights"].endswith("model.safetensors") and "models--timm--test_vit.r160_in1k" in vit["weights"]
    )
    listed = {c["name"]: c for c in timings.listed}
    assert listed[OOM]["skipped"].startswith("out of memory") and listed[OOM]["settings"]["lr"] == 1e-4
    assert {c["settings"]["img_size"] for c in listed.values()} == {160}  # timm's pretrained_cfg, not 224
    assert listed["auto-test_efficientnet-probe"]["settings"]["weights"] == str(
        held / "test_efficientnet.safetensors"
    )


def _auto(data: Path, work: Path, limit: str, wdir: Path):
    args = ["auto", "--data", str(data), "--time-limit", limit, "--devices", "cpu", "--threads", "1",
            "--workdir", str(work), "--weights-dir", str(wdir), "--models", MODELS]  # fmt: skip
    return CliRunner().invoke(main, args)


@pytest.mark.slow
def test_auto_trains_and_submits_the_pretrained_candidates_after_one_is_skipped(demo_data, tmp_path, held):
    data = demo_data(n=64, n_test=16, seed=5)
    asked = _auto(data, tmp_path / "q", "1s", held)
    least = re.search(r"give --time-limit (\S+) or more", asked.output)
    assert asked.exit_code == 2 and least, asked.output
    limit = math.ceil(HEADROOM * parse_time_limit(least.group(1)))
    work = tmp_path / "w"
    res = _auto(data, work, f"{limit}s", held)
    assert res.exit_code == 0, res.output
    assert f"timing: {OOM}: skipped, out of memory" in res.output  # one line, and the call went on
    assert (work / "submission.csv").is_file()
    plan = read_plan(work, data)
    assert plan.runs and OOM not in {r.name for r in plan.runs}
    for r in plan.runs:  # every run trained at its model's pretrained size and normalisation
        cfg = json.loads((work / "runs" / r.name / "config.json").read_text())["config"]
        assert cfg["img_size"] == 160 and cfg["weights"] and cfg["model"].startswith(("test_vit", "test_eff"))
    listed = json.loads((work / "runs/auto/candidates.json").read_text())["candidates"]
    assert [c["name"] for c in listed if "skipped" in c] == [OOM]
