"""Options and decorators shared by the commands: --workdir, --threads, the data and training flags,
one-line errors for bad input."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before anything imports huggingface_hub or albumentations: no network calls unless the user opted in
# (HF_HUB_OFFLINE=0); the machines this runs on are often offline, where each hub look-up waits ~47 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import click

from aivh_ens import system
from aivh_ens.config import (
    AMP_MODES,
    CACHE,
    HEADS,
    MODES,
    ON_BAD_IMAGE,
    OPTIMIZERS,
    PROBE_VIEWS,
    SCHEDULERS,
    SELECT,
    RunConfig,
)
from aivh_ens.errors import UserError

WORKDIR = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Project folder holding folds/, oof/, runs/.",
)


def cpu_threads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A ``--threads N`` option (or ``AIVH_ENS_THREADS``): torch's CPU threads for this process."""

    @functools.wraps(fn)
    def wrapper(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        click.get_current_context().meta["threads"] = threads  # a sweep hands it on to its jobs
        system.set_torch_threads(threads)
        return fn(*args, **kwargs)

    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        envvar="AIVH_ENS_THREADS",
        show_envvar=True,
        help="torch CPU threads in this process; 1 when several processes share the cores.  "
        "[default: one per core]",
    )(wrapper)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--data",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Dataset folder with train.csv/test.csv and the images (paths in the CSVs are "
            "relative to it).  [default: .]",
        ),
        click.option("--train-csv", default=None, help="Train table inside --data.  [default: train.csv]"),
        click.option("--file-col", default=None, help="Column of image paths.  [default: file_name]"),
        click.option("--label-col", default=None, help="Column of 0/1 labels (1 = AI).  [default: label]"),
        click.option("--folds", "n_folds", type=int, default=None, help="Number of folds.  [default: 5]"),
        click.option("--seed", type=int, default=None, help="Fold and training seed.  [default: 42]"),
        click.option(
            "--group",
            default=None,
            help="Keep groups in one fold: 'pairs' (row // 2, the Kaggle pairs) or a column name.  "
            "[default: none, plain stratified folds]",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def parse_floats(spec: str | None, n: int, what: str) -> tuple[float, ...] | None:
    if spec is None:
        return None
    try:
        vals = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise UserError(f"{what} expects {n} comma-separated numbers (got {spec!r})") from None
    if len(vals) != n:
        raise UserError(f"{what} expects {n} comma-separated numbers (got {spec!r})")
    return vals


def parse_ints(spec: str | None, what: str) -> tuple[int, ...] | None:
    """``512,128`` -> ``(512, 128)``: positive integers, comma-separated."""
    if spec is None:
        return None
    try:
        vals = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expects comma-separated whole numbers, e.g. 512,128 (got {spec!r})"
        ) from None
    if any(v < 1 for v in vals):
        raise click.BadParameter(f"expects sizes of at least 1 (got {spec!r})")
    return vals


def options(*opts: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply click options in the order they are listed (the order --help shows)."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


def recipe_default(field: str, none_means: str | None = None) -> str:
    """The help text's default of a training flag: the recipe's value, else RunConfig's (shown so `--help`
    never drifts from the code; `aivh-ens recipes` and `cv --print-config` show a recipe's own values)."""
    value = RunConfig.__dataclass_fields__[field].default
    if value is None or value == ():
        shown = none_means or "off"
    elif isinstance(value, bool):
        shown = "on" if value else "off"
    else:
        shown = str(value)
    return f"  [default: the recipe's, else {shown}]"


_rd = recipe_default

# Every RunConfig field a flag of `cv` can override (the recipe's value otherwise).
training_options = options(
    click.option("--epochs", type=int, default=None, help="Training epochs per fold." + _rd("epochs")),
    click.option(
        "--img-size",
        type=int,
        default=None,
        help="Model input size in pixels." + _rd("img_size", "the model's"),
    ),
    click.option("--batch-size", type=int, default=None, help="Training batch size." + _rd("batch_size")),
    click.option(
        "--accum-steps", type=int, default=None, help="Gradient accumulation steps." + _rd("accum_steps")
    ),
    click.option("--lr", type=float, default=None, help="Peak learning rate." + _rd("lr")),
    click.option("--weight-decay", type=float, default=None, help="Weight decay." + _rd("weight_decay")),
    click.option(
        "--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="Optimizer." + _rd("optimizer")
    ),
    click.option(
        "--scheduler",
        type=click.Choice(SCHEDULERS),
        default=None,
        help="Learning-rate schedule." + _rd("scheduler"),
    ),
    click.option(
        "--warmup-epochs", type=float, default=None, help="Linear warm-up, in epochs." + _rd("warmup_epochs")
    ),
    click.option(
        "--label-smoothing",
        type=float,
        default=None,
        help="Label smoothing of the loss." + _rd("label_smoothing"),
    ),
    click.option(
        "--layer-decay",
        type=float,
        default=None,
        help="Layer-wise lr decay, e.g. 0.75 for ViTs (each block's lr times this per block from the top)."
        + _rd("layer_decay"),
    ),
    click.option("--clip-grad", type=float, default=None, help="Max gradient norm." + _rd("clip_grad")),
    click.option(
        "--ema",
        "ema_decay",
        type=float,
        default=None,
        help="EMA decay of the weights, e.g. 0.999." + _rd("ema_decay"),
    ),
    click.option("--early-stop", type=int, default=None, help="Patience in epochs." + _rd("early_stop")),
    click.option(
        "--validate-last",
        type=int,
        default=None,
        help="Validate only the last N epochs; earlier ones cannot be selected."
        + _rd("validate_last", "every epoch"),
    ),
    click.option(
        "--fold-time",
        type=float,
        default=None,
        help="Seconds each fold trains (training and validation passes): --epochs becomes the most, and the "
        "epochs and learning-rate schedule follow the measured epoch times, so the fold ends at the whole epoch "
        "nearest that time." + _rd("fold_time", "off: train --epochs"),
    ),
    click.option(
        "--select",
        type=click.Choice(SELECT),
        default=None,
        help="Validation metric that picks the saved epoch." + _rd("select"),
    ),
    click.option(
        "--mode",
        type=click.Choice(MODES),
        default=None,
        help="resize: whole image to --img-size; crop: native-resolution crops (keeps generator traces)."
        + _rd("mode"),
    ),
    click.option(
        "--rrc-scale",
        default=None,
        help="RandomResizedCrop area range, e.g. 0.8,1.0." + _rd("rrc_scale", "no RRC"),
    ),
    click.option(
        "--jpeg-p",
        type=float,
        default=None,
        help="Probability of JPEG re-compression augmentation." + _rd("jpeg_p"),
    ),
    click.option(
        "--blur-p",
        type=float,
        default=None,
        help="Probability of Gaussian blur augmentation." + _rd("blur_p"),
    ),
    click.option(
        "--train-resize",
        type=click.IntRange(min=8),
        default=None,
        help="Resize the shorter side to this before the random crop (e.g. 255, then a 224 crop)."
        + _rd("train_resize"),
    ),
    click.option(
        "--eval-resize",
        type=click.IntRange(min=8),
        default=None,
        help="Evaluation: resize the shorter side to this, then centre-crop --img-size (e.g. 232 -> 224)."
        + _rd("eval_resize", "resize to --img-size"),
    ),
    click.option(
        "--tta",
        default=None,
        metavar="SPEC",
        help="The run's test-time augmentation (none, hflip, d4, crops:N, shift:P, joined by '+'): each fold "
        "scores its OOF rows with it, and submit and predict use it by default, so the blend and threshold are "
        "fitted on the scores they cut.  [default: the recipe's]",
    ),
    click.option(
        "--pretrained/--no-pretrained",
        default=None,
        help="Start from timm's pretrained weights, which must be in the Hugging Face cache (--pretrained), "
        "or from random initialisation (--no-pretrained).  [default: auto: the cached weights when there are "
        "any, else random initialisation, with a note]",
    ),
    click.option(
        "--weights",
        default=None,
        help="Local weights (.safetensors/.pth); 'a,b' for a fused model, one file per backbone."
        + _rd("weights", "none: see --pretrained"),
    ),
    click.option(
        "--train-last",
        type=int,
        default=None,
        help="Train only the last N parameter tensors of each backbone (0 = frozen backbone)."
        + _rd("train_last", "train everything"),
    ),
    click.option(
        "--head",
        type=click.Choice(HEADS),
        default=None,
        help="finetune: train the model; linear|mlp: a probe on frozen features (extracted once into "
        "runs/features/), one head per fold.  [default: finetune]",
    ),
    click.option(
        "--head-hidden",
        default=None,
        metavar="N,N,..",
        callback=lambda ctx, param, value: parse_ints(value, "--head-hidden"),
        help="Hidden layer sizes of an MLP head, e.g. 512,128 (--head mlp, or an MLP on a fine-tuned model's "
        "pooled features)." + _rd("head_hidden", "timm's classifier; --head mlp: 256"),
    ),
    click.option(
        "--head-dropout",
        type=click.FloatRange(0, 1, max_open=True),
        default=None,
        help="Dropout in the MLP head (--head mlp, fused models, recipes with an MLP head)."
        + _rd("head_dropout"),
    ),
    click.option(
        "--probe-views",
        type=click.Choice(PROBE_VIEWS),
        default=None,
        help="Probe runs: features of each image (none) or averaged with its mirror (hflip)."
        + _rd("probe_views"),
    ),
    click.option(
        "--pseudo",
        default=None,
        metavar="FILE|blend",
        help="Pseudo-labels: an id,prob file of test scores (`submit --proba` writes one) or 'blend' (the "
        "current blend's test scores). Confident rows join every fold's training rows, never its validation "
        "rows; the file is frozen as runs/<run>/pseudo.csv.  [default: off]",
    ),
    click.option(
        "--pseudo-min-conf",
        type=float,
        default=None,
        help="prob >= C becomes AI, prob <= 1 - C human; the rest is left out.  [default: 0.95]",
    ),
    click.option(
        "--pseudo-max-share",
        type=float,
        default=None,
        help="At most this many pseudo rows per labelled row, the most confident first.  [default: 1.0]",
    ),
    click.option(
        "--pseudo-weight",
        type=float,
        default=None,
        help="A pseudo row's loss weight (labelled: 1).  [default: 1.0]",
    ),
    click.option(
        "--pseudo-balance/--no-pseudo-balance",
        default=None,
        help="Keep the pseudo classes in the train set's AI share, cutting the larger one to its most confident "
        "rows (under shift one class's scores drift across the cut).  [default: on]",
    ),
    click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]"),
    click.option(
        "--eval-batch-size",
        type=click.IntRange(min=1),
        default=None,
        help="Images per evaluation batch." + _rd("eval_batch_size", "twice --batch-size"),
    ),
    click.option(
        "--amp",
        default=None,
        metavar="[" + "|".join(AMP_MODES) + "]",
        help="Mixed precision. auto: bf16 on GPUs of compute capability >= 8.0, fp16 + GradScaler on older "
        "GPUs (T4, P100, V100), fp32 on the CPU; an explicit mode applies on any device.  [default: auto]",
    ),
    click.option(
        "--compile/--no-compile",
        default=None,
        help="torch.compile the model (inductor); falls back to eager, with a message, if compiling fails."
        + _rd("compile"),
    ),
    click.option(
        "--channels-last/--no-channels-last",
        default=None,
        help="channels_last memory format.  [default: on CUDA only]",
    ),
    click.option(
        "--workers", type=int, default=None, help="DataLoader workers.  [default: cores on CUDA, 0 on CPU]"
    ),
    click.option("--deterministic", is_flag=True, default=None, help="Deterministic cuDNN (slower on GPU)."),
    click.option(
        "--on-bad-image",
        type=click.Choice(ON_BAD_IMAGE),
        default=None,
        help="A corrupt image stops the run (error) or is skipped and recorded (skip)." + _rd("on_bad_image"),
    ),
    click.option(
        "--cache",
        type=click.Choice(CACHE),
        default=None,
        help="Decode every image once into a memory-mapped cache (auto: when it fits on disk)."
        + _rd("cache"),
    ),
    click.option(
        "--cache-dir", default=None, help="Where the image cache lives.  [default: WORKDIR/runs/cache]"
    ),
)


def report_line(workdir: Path) -> str:
    """Where the report page of ``workdir`` goes, printed when cv and blend finish."""
    from aivh_ens.layout import report_path

    return f"report: {report_path(workdir)} (write or refresh it with `aivh-ens report --workdir {workdir}`)"


TTA_HELP = (
    "Test-time augmentation: none, hflip, d4 (8 flips/rotations), crops:N (N native-resolution "
    "crops), shift:P (each view also moved P pixels four ways), or combined, e.g. hflip+crops:5, "
    "hflip+shift:1.  [default: each run's own, the one its OOF rows were scored with]"
)
TTA = click.option("--tta", default=None, metavar="SPEC", help=TTA_HELP)
BLEND = click.option(
    "--blend",
    "blend_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Fitted blend.  [default: WORKDIR/runs/blend/blend.json]",
)
