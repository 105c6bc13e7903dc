"""Commands that explain the tool and the machine: ``recipes`` (the named presets) and ``checks`` (what this
machine offers a run: torch, devices and their precision, pretrained weights, disk, shared memory, extras)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import click

from aivh_ens.cli.options import WORKDIR, user_errors

# The settings `aivh-ens recipes` shows per recipe, in this order (the rest: `aivh-ens recipes NAME`).
RECIPE_COLUMNS = ("model", "img_size", "epochs", "batch_size", "optimizer", "lr", "scheduler", "head", "tta")

# Each extra, the module it brings and what it is for (pyproject's optional-dependencies).
EXTRAS = (
    ("serve", "fastapi", "aivh-ens serve"),
    ("ray", "ray", "sweep --backend ray"),
    ("slurm", "submitit", "sweep --backend slurm"),
    ("dev", "pytest", "the tests"),
    ("dev", "mkdocs", "the docs site"),
)


@click.command("recipes")
@click.argument("name", required=False)
@user_errors
def recipes_cmd(name: str | None) -> None:
    """List the named presets of cv (--recipe), or every resolved setting of one.

    Settings resolve as defaults, then the recipe, then cv's flags; `cv --print-config` shows the result for a
    given command line.

    \b
    aivh-ens recipes
    aivh-ens recipes effnet-b4-adam
    aivh-ens cv --recipe effnet-b4-adam --data data/ --lr 1e-4 --print-config
    """
    from aivh_ens.config import resolve_config, to_dict
    from aivh_ens.recipes import RECIPES, get_recipe

    if name is not None:
        overrides = get_recipe(name)  # a one-line error naming the close matches
        click.echo(f"recipe {name}: {len(overrides)} settings differ from the defaults (marked *)")
        for key, value in to_dict(resolve_config(name)).items():
            click.echo(f"{'*' if key in overrides else ' '} {key} = {value!r}")
        return
    rows = [("recipe", *RECIPE_COLUMNS)]
    for recipe in RECIPES:
        cfg = to_dict(resolve_config(recipe))
        rows.append((recipe, *(_show(cfg[c]) for c in RECIPE_COLUMNS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    click.echo("img_size None: the model's own. Any cv flag overrides its recipe's value.")


def _show(value: Any) -> str:
    return "-" if value is None else str(value)


@click.command("checks")
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A folder of timm weights to check, as auto --weights-dir reads it.  [default: none]",
)
@WORKDIR
@user_errors
def checks_cmd(weights_dir: Path | None, workdir: Path) -> None:
    """Print what this machine offers a run: torch, CUDA, the devices and the precision each would train in,
    the pretrained weights found, free disk, /dev/shm and the extras installed. Changes nothing.

    \b
    aivh-ens checks
    aivh-ens checks --workdir /kaggle/working --weights-dir /kaggle/input/aivh-weights
    HF_HOME=/kaggle/input/hf-cache aivh-ens checks      # a copied Hugging Face cache
    """
    for line in (*_versions(), *_devices(), *_hub(), *_weights_dir(weights_dir), *_disk(workdir), *_extras()):
        click.echo(line)


def _versions() -> list[str]:
    import platform

    import timm
    import torch

    from aivh_ens import __version__

    cuda = torch.version.cuda or "none (a CPU build)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [
        f"aivh-ens {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"timm {timm.__version__}",
        f"CUDA: {cuda}" + (f", cuDNN {cudnn}" if cudnn else ""),
    ]


def _devices() -> list[str]:
    """One line per device with the precision ``--amp auto`` picks there (the line a run prints)."""
    import torch

    from aivh_ens import system
    from aivh_ens.train.precision import cpu_has_bf16, resolve_precision

    bf16 = "native bf16: yes (auto may train bf16 + channels_last)" if cpu_has_bf16() else "native bf16: no"
    lines = [
        f"device cpu: {system.cores()} cores; {resolve_precision('auto', torch.device('cpu')).line()}; {bf16}"
    ]
    if not torch.cuda.is_available():
        return [
            *lines,
            "device cuda: none visible (CUDA_VISIBLE_DEVICES="
            + os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            + ")",
        ]
    for i in range(torch.cuda.device_count()):
        dev = torch.device("cuda", i)
        props = torch.cuda.get_device_properties(dev)
        lines.append(
            f"device cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB; "
            f"{resolve_precision('auto', dev).line()}"
        )
    return lines


def _hub() -> list[str]:
    """HF_HUB_OFFLINE and who set it; the Hugging Face cache and the timm models with weights in it."""
    from aivh_ens.cli import offline
    from aivh_ens.train.weights import hf_cache_dir, hf_cache_weights

    who = (
        "set by aivh-ens; HF_HUB_OFFLINE=0 to download" if offline.HUB_OFFLINE_FROM_USER is None else "yours"
    )
    lines = [f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')} ({who})"]
    cache = hf_cache_dir()
    lines.append(
        f"Hugging Face cache: {cache} ({'present' if cache.is_dir() else 'missing'}; HF_HOME moves it)"
    )
    held = hf_cache_weights(cache)
    return [*lines, "pretrained timm weights in it: " + (", ".join(held) if held else "none")]


def _weights_dir(weights_dir: Path | None) -> list[str]:
    """The timm models whose weights ``--weights-dir`` holds (auto's naming rule), or why it holds none."""
    from aivh_ens.errors import UserError
    from aivh_ens.train.weights import weights_dir_weights

    if weights_dir is None:
        return ["--weights-dir: not given"]
    try:
        held = weights_dir_weights(weights_dir)
    except UserError as e:
        return [str(e)]
    from aivh_ens.train.weights import WEIGHT_SUFFIXES

    named = [f"{p.name} -> {name}" for name, p in held.items()]
    used = {p.resolve() for p in held.values()}
    named += [f"{p.name} -> no timm model (skipped)" for p in sorted(weights_dir.iterdir())
              if p.suffix in WEIGHT_SUFFIXES and p.resolve() not in used]  # fmt: skip
    return [f"--weights-dir {weights_dir}: {len(held)} models: " + "; ".join(named)]


def _disk(workdir: Path) -> list[str]:
    from aivh_ens import system

    total, free = system.shm_total(), system.shm_free()
    shm = "none" if total is None else f"{total / 2**30:.2f} GiB, {(free or 0) / 2**30:.2f} GiB free"
    return [
        f"disk: {system.free_bytes(workdir) / 1e9:.1f} GB free under {workdir.resolve()} (--workdir)",
        f"{system.SHM_DIR}: {shm} (loader workers' batches; docker run --shm-size=8g gives a container more)",
    ]


def _extras() -> list[str]:
    have = []
    for extra, module, use in EXTRAS:
        ok = importlib.util.find_spec(module) is not None
        have.append(
            f"{extra} ({use}): " + ("installed" if ok else f'missing, pip install "aivh-ens[{extra}]"')
        )
    return ["extras: " + "; ".join(have)]
