"""The CLI explains itself: help and defaults on every option, `recipes`, `cv --print-config`, `checks`, and
offline by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from aivh_ens.cli import main
from aivh_ens.config import resolve_config, to_dict
from aivh_ens.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[2]


def _options(command: click.Command, path: str = "aivh-ens"):
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden and param.name not in ("help", "version"):
            yield path, param
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f"{path} {name}")


def test_every_option_has_help_and_shows_its_default() -> None:
    """A flag that is off unless given needs no default; every other option shows one (or is required)."""
    missing = []
    for path, opt in _options(main):
        on_off = opt.is_flag and not opt.secondary_opts
        shows = bool(opt.show_default) or "[default:" in (opt.help or "") or opt.required or on_off
        if not opt.help or not shows:
            missing.append(f"{path} {opt.opts[0]}")
    assert missing == []


@pytest.mark.parametrize(
    ("flag", "shown"),
    [("--epochs", "10"), ("--lr", "0.001"), ("--optimizer", "adamw"), ("--scheduler", "cosine"),
     ("--batch-size", "32"), ("--weight-decay", "0.05"), ("--warmup-epochs", "0.0"), ("--label-smoothing", "0.0")],
)  # fmt: skip
def test_training_flags_show_the_recipe_then_the_default(flag: str, shown: str) -> None:
    opt = next(o for _, o in _options(main.commands["cv"]) if flag in o.opts)
    assert opt.help.endswith(f"[default: the recipe's, else {shown}]")


def test_recipes_lists_every_recipe() -> None:
    out = CliRunner().invoke(main, ["recipes"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:3] == ["recipe", "model", "img_size"]
    assert [line.split()[0] for line in lines[1 : 1 + len(RECIPES)]] == list(RECIPES)
    tiny = next(line.split() for line in lines if line.startswith("tiny "))
    assert tiny[1:4] == ["test_efficientnet", "64", "4"]  # model, img_size, epochs of the recipe


def test_recipes_name_marks_the_recipes_own_settings() -> None:
    out = CliRunner().invoke(main, ["recipes", "tiny"])
    assert out.exit_code == 0, out.output
    assert "* model = 'test_efficientnet'" in out.output
    assert "  seed = 42" in out.output  # a default, unmarked


def test_recipes_unknown_name_is_one_line() -> None:
    out = CliRunner().invoke(main, ["recipes", "tinny"])
    assert out.exit_code == 2
    assert out.output.count("\n") == 1 and "tiny" in out.output


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path: Path) -> None:
    args = ["cv", "--recipe", "tiny", "--data", "d", "--lr", "0.01", "--train-resize", "72", "--eval-resize",
            "70", "--head-hidden", "16,8", "--head-dropout", "0.2", "--print-config", "--workdir", str(tmp_path)]  # fmt: skip
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    want = resolve_config("tiny", data="d", lr=0.01, train_resize=72, eval_resize=70, head_hidden=(16, 8),
                          head_dropout=0.2)  # fmt: skip
    assert got == json.loads(json.dumps(to_dict(want)))
    assert (got["lr"], got["epochs"], got["head_hidden"]) == (0.01, 4, [16, 8])  # flag, recipe, parsed flag
    assert list(tmp_path.iterdir()) == []


def test_print_config_of_several_models_is_a_list() -> None:
    out = CliRunner().invoke(
        main, ["cv", "--recipe", "tiny", "--model", "test_resnet,test_vit", "--print-config"]
    )
    assert out.exit_code == 0, out.output
    assert [c["model"] for c in json.loads(out.output)] == ["test_resnet", "test_vit"]


def test_print_config_needs_a_model_or_recipe() -> None:
    out = CliRunner().invoke(main, ["cv", "--print-config"])
    assert out.exit_code == 2 and "give --model" in out.output


def test_bad_head_hidden_is_a_usage_error() -> None:
    out = CliRunner().invoke(main, ["cv", "--recipe", "tiny", "--head-hidden", "16,x", "--print-config"])
    assert out.exit_code == 2 and "--head-hidden" in out.output


def test_checks_reports_the_machine(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "weights"
    weights.mkdir()
    save_file({"w": torch.zeros(1)}, weights / "test_resnet.safetensors")
    save_file({"w": torch.zeros(1)}, weights / "not_a_model_at_all.safetensors")
    out = CliRunner().invoke(main, ["checks", "--weights-dir", str(weights), "--workdir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    text = out.output
    assert f"torch {torch.__version__}" in text
    assert "device cpu:" in text and "precision: fp32 on cpu" in text
    assert "HF_HUB_OFFLINE=1" in text and "Hugging Face cache:" in text
    assert "test_resnet.safetensors -> test_resnet" in text
    assert "not_a_model_at_all.safetensors -> no timm model (skipped)" in text
    assert f"GB free under {tmp_path.resolve()}" in text
    assert "/dev/shm" in text and "extras: serve" in text


def test_checks_names_the_precision_of_each_gpu_kind() -> None:
    """The device line is the run's own precision line: fp16 + GradScaler below compute capability 8.0."""
    from aivh_ens.train.precision import choose_amp

    assert choose_amp("auto", "cuda", (7, 5)) == "fp16"
    assert choose_amp("auto", "cuda", (9, 0)) == "bf16"


@pytest.mark.parametrize(("given", "want"), [(None, "1 True"), ("0", "0 False"), ("1", "1 True")])
def test_offline_by_default_unless_the_user_says(given: str | None, want: str) -> None:
    """The CLI sets HF_HUB_OFFLINE=1 before huggingface_hub reads it, and keeps the user's own value."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if given is not None:
        env["HF_HUB_OFFLINE"] = given
    env["PYTHONPATH"] = str(ROOT)
    code = "import os, aivh_ens.cli, huggingface_hub.constants as c; print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def test_help_says_how_to_go_online() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    assert "HF_HUB_OFFLINE=0" in out.output and "recipes" in out.output and "checks" in out.output
