"""Thin click commands: each parses options and hands off to one library module.

Exit codes: 0 success, 2 bad input (a one-line ``error: ...`` on stderr, no traceback), 1 a bug.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before anything imports huggingface_hub or albumentations: no network calls at import time unless the
# user opted in (the machines this runs on are often offline, where each attempt costs ~47 s).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import click

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
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aivh-ens")
def main() -> None:
    """aivh-ens: cross-validated timm ensembles for "AI-generated or human-made?" competitions.

    \b
    aivh-ens cv --model efficientnet_b4 --folds 5 --data data/
    aivh-ens cv --model convnext_tiny --folds 5 --data data/
    aivh-ens blend
    aivh-ens submit --data data/
    """


# ---- folds / cv ----------------------------------------------------------------------------------------
def _data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
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
            help="Keep groups in one fold: 'pairs' (row // 2, the Kaggle pairs) or a column name.",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command("folds")
@_data_options
@WORKDIR
@user_errors
def folds_cmd(data, train_csv, file_col, label_col, n_folds, seed, group, workdir) -> None:
    """Write the fold file folds/k{K}_s{seed}[_g{group}].csv (cv does this itself when it is missing).

    \b
    aivh-ens folds --data data/ --folds 5 --group pairs
    """
    from aivh_ens.config import resolve_config
    from aivh_ens.data.folds import ensure_fold_file
    from aivh_ens.train.cv import load_train_table

    cfg = resolve_config(
        "none",
        data=str(data) if data else None,
        train_csv=train_csv,
        file_col=file_col,
        label_col=label_col,
        folds=n_folds,
        seed=seed,
        group=group,
        model="none",
    )
    table = load_train_table(cfg)
    path, sha, folds, created = ensure_fold_file(workdir, table, cfg.folds, cfg.seed, cfg.group)
    counts = folds.groupby("fold")["label"].agg(["size", "mean"])
    click.echo(f"{'wrote' if created else 'reused'} {path} (sha256 {sha[:12]})")
    for k, r in counts.iterrows():
        click.echo(f"  fold {k}: {int(r['size'])} rows, {r['mean']:.1%} label 1")


def _floats(spec: str | None, n: int, what: str) -> tuple[float, ...] | None:
    if spec is None:
        return None
    try:
        vals = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise UserError(f"{what} expects {n} comma-separated numbers (got {spec!r})") from None
    if len(vals) != n:
        raise UserError(f"{what} expects {n} comma-separated numbers (got {spec!r})")
    return vals


def _options(*opts: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply click options in the order they are listed (the order --help shows)."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


# Every RunConfig field a flag of `cv` can override (the recipe's value otherwise).
_training_options = _options(
    click.option("--epochs", type=int, default=None),
    click.option("--img-size", type=int, default=None, help="Input size (default: the model's)."),
    click.option("--batch-size", type=int, default=None),
    click.option("--accum-steps", type=int, default=None, help="Gradient accumulation steps."),
    click.option("--lr", type=float, default=None),
    click.option("--weight-decay", type=float, default=None),
    click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd", "lamb"]), default=None),
    click.option("--scheduler", type=click.Choice(["cosine", "step", "onecycle", "constant"]), default=None),
    click.option("--warmup-epochs", type=float, default=None),
    click.option("--label-smoothing", type=float, default=None),
    click.option("--clip-grad", type=float, default=None, help="Max gradient norm."),
    click.option(
        "--ema", "ema_decay", type=float, default=None, help="EMA decay, e.g. 0.999 (off by default)."
    ),
    click.option("--early-stop", type=int, default=None, help="Patience in epochs."),
    click.option(
        "--select",
        type=click.Choice(["f1", "auc", "loss", "last"]),
        default=None,
        help="Validation metric that picks the saved epoch.",
    ),
    click.option(
        "--mode",
        type=click.Choice(["resize", "crop"]),
        default=None,
        help="resize: whole image to --img-size; crop: native-resolution crops (keeps generator traces).",
    ),
    click.option("--rrc-scale", default=None, help="RandomResizedCrop area range, e.g. 0.8,1.0."),
    click.option(
        "--jpeg-p", type=float, default=None, help="Probability of JPEG re-compression augmentation."
    ),
    click.option("--blur-p", type=float, default=None, help="Probability of Gaussian blur augmentation."),
    click.option("--pretrained/--no-pretrained", default=None, help="timm pretrained weights (HF cache)."),
    click.option(
        "--weights", default=None, help="Local weights (.safetensors/.pth); 'a,b' for a fused model."
    ),
    click.option(
        "--train-last",
        type=int,
        default=None,
        help="Train only the last N parameter tensors of each backbone (0 = frozen backbone).",
    ),
    click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]"),
    click.option(
        "--amp", type=click.Choice(["bf16", "fp16", "none"]), default=None, help="CUDA mixed precision."
    ),
    click.option(
        "--compile/--no-compile",
        default=None,
        help="torch.compile the model (CUDA); falls back to eager, with a message, if compiling fails.",
    ),
    click.option("--channels-last/--no-channels-last", default=None),
    click.option(
        "--workers", type=int, default=None, help="DataLoader workers.  [default: cores on CUDA, 0 on CPU]"
    ),
    click.option("--deterministic", is_flag=True, default=None, help="Deterministic cuDNN (slower on GPU)."),
    click.option(
        "--on-bad-image",
        type=click.Choice(["error", "skip"]),
        default=None,
        help="A corrupt image stops the run (error) or is skipped and recorded (skip).",
    ),
    click.option(
        "--cache",
        type=click.Choice(["auto", "on", "off"]),
        default=None,
        help="Decode every image once into a memory-mapped cache (auto: when it fits on disk).",
    ),
    click.option(
        "--cache-dir", default=None, help="Where the image cache lives.  [default: WORKDIR/runs/cache]"
    ),
)


@main.command("cv", context_settings={"show_default": False})
@click.option("--model", default=None, help="Any timm model name, or two joined by '+' for a fused model.")
@click.option(
    "--recipe",
    default="none",
    show_default=True,
    help="Named preset: none, tiny, effnet-b4-adam, effnet-b3-scratch, resnetv2-50-head, "
    "coatnet-2-lamb, convitx, crop-robust. Flags below override it.",
)
@_data_options
@click.option("--name", default=None, help="Run name (folder under runs/).  [default: model-recipe]")
@click.option(
    "--fold",
    "fold_spec",
    default=None,
    help="Train only these folds, e.g. 0,2 (others may run in other processes).",
)
@click.option("--resume", is_flag=True, help="Continue interrupted folds from their last finished epoch.")
@click.option("--force", is_flag=True, help="Retrain folds that are already done (and replace the config).")
@_training_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
@WORKDIR
@cpu_threads
@user_errors
def cv_cmd(
    model,
    recipe,
    data,
    train_csv,
    file_col,
    label_col,
    n_folds,
    seed,
    group,
    name,
    fold_spec,
    resume,
    force,
    rrc_scale,
    quiet,
    workdir,
    **flags,
) -> None:
    """Train one model per fold and write out-of-fold probabilities to oof/<run>.csv.

    \b
    aivh-ens cv --recipe tiny --data demo/ --group pairs
    aivh-ens cv --model efficientnet_b4 --folds 5 --data data/ --group pairs --weights b4.safetensors
    aivh-ens cv --recipe effnet-b4-adam --data data/ --fold 0,1 --device cuda:0   # beside --fold 2,3,4 on cuda:1
    aivh-ens cv --recipe effnet-b4-adam --data data/ --resume                      # after an interruption
    """
    from aivh_ens.config import resolve_config
    from aivh_ens.train.cv import format_summary, run_cv

    if flags.get("deterministic") is False:
        flags["deterministic"] = None
    cfg = resolve_config(
        recipe,
        model=model,
        data=str(data) if data else None,
        train_csv=train_csv,
        file_col=file_col,
        label_col=label_col,
        folds=n_folds,
        seed=seed,
        group=group,
        name=name,
        rrc_scale=_floats(rrc_scale, 2, "--rrc-scale"),
        **flags,
    )
    if model is None and recipe == "none":
        raise UserError("give --model NAME (any timm model) or --recipe NAME")
    click.echo(
        f"run {cfg.name}: {cfg.model} (recipe {cfg.recipe}), {cfg.folds} folds, {cfg.epochs} epochs, "
        f"device {cfg.device}"
    )
    result = run_cv(
        cfg, workdir, fold_spec=fold_spec, resume=resume, force=force, progress=not quiet, log=click.echo
    )
    click.echo(format_summary(result))


# ---- cache ---------------------------------------------------------------------------------------------
# (the cache command is defined below this line)


@main.command("cache")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Dataset folder with train.csv (and test.csv) and the images.  [default: .]",
)
@click.option("--recipe", default="none", show_default=True, help="Derive the storage size from this recipe.")
@click.option("--model", default=None, help="Derive the storage size from this timm model's input size.")
@click.option(
    "--mode",
    type=click.Choice(["resize", "crop"]),
    default=None,
    help="resize: S x S (or shorter side S when the recipe crops after a resize); crop: native pixels, "
    "shorter side capped at S.",
)
@click.option("--img-size", type=int, default=None, help="Model input size (default: the model's).")
@click.option(
    "--size",
    type=int,
    default=None,
    help="Storage size S (default: what cv uses for the same recipe/model/mode/img-size; another "
    "size makes a cache cv does not read).",
)
@click.option("--train-csv", default=None, help="Train table inside --data.  [default: train.csv]")
@click.option(
    "--test-csv", default=None, help="Test table inside --data (cached when present).  [default: test.csv]"
)
@click.option(
    "--file-col", default=None, help="Column of image paths in the train table.  [default: file_name]"
)
@click.option("--id-col", default=None, help="Column of image paths in the test table.  [default: id]")
@click.option("--cache-dir", default=None, help="Where the image cache lives.  [default: WORKDIR/runs/cache]")
@click.option("--jobs", type=int, default=None, help="Decoding threads.  [default: every core]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@WORKDIR
@user_errors
def cache_cmd(
    data,
    recipe,
    model,
    mode,
    img_size,
    size,
    train_csv,
    test_csv,
    file_col,
    id_col,
    cache_dir,
    jobs,
    quiet,
    workdir,
) -> None:
    """Decode every train and test image once into a memory-mapped cache that cv then reads.

    Each image is stored after the pipeline's storage step (see aivh_ens/transforms.py), so training reads
    the same pixels with or without the cache. Changed images are decoded again on the next run; cv builds
    or updates the cache itself (--cache auto|on), this command does it ahead of time.

    \b
    aivh-ens cache --data data/ --recipe effnet-b4-adam
    aivh-ens cache --data data/ --model convnext_tiny --mode crop
    aivh-ens cache --data data/ --recipe tiny --cache-dir /fast/disk/cache
    """
    from aivh_ens.config import resolve_config
    from aivh_ens.data.cache import cache_dataset

    if size is not None and size < 8:
        raise UserError(f"--size must be >= 8 (got {size})")
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {jobs})")
    cfg = resolve_config(
        recipe,
        model=model,
        mode=mode,
        img_size=img_size,
        data=str(data) if data else None,
        train_csv=train_csv,
        test_csv=test_csv,
        file_col=file_col,
        id_col=id_col,
        cache_dir=cache_dir,
    )
    out = cache_dataset(cfg, workdir, size=size, jobs=jobs, progress=not quiet, log=click.echo)
    bad = f", {out['bad']} unreadable" if out["bad"] else ""
    click.echo(
        f"cache ready: {out['path']} ({out['images']} images, {out['bytes'] / 1e9:.3g} GB, "
        f"storage {out['storage']}{bad})"
    )


# ---- blend ---------------------------------------------------------------------------------------------
# (the blend command is defined below this line)


@main.command("blend")
@click.option(
    "--runs",
    default=None,
    metavar="A,B,..",
    help="Runs to blend (names in oof/).  [default: every oof/*.csv]",
)
@click.option(
    "--metric",
    type=click.Choice(["f1", "macro_f1", "accuracy"]),
    default="f1",
    show_default=True,
    help="Metric the weights and threshold are tuned for (f1: of label 1, the competition's).",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Optuna trials to add; re-running continues the same study.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop the search after this many seconds.",
)
@click.option(
    "--storage",
    default=None,
    metavar="URL",
    help="Optuna storage URL.  [default: sqlite at runs/blend/study.db]",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the TPE samplers.")
@click.option(
    "--nested-trials",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Optuna trials per fold in the nested-CV estimate.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@WORKDIR
@user_errors
def blend_cmd(runs, metric, trials, timeout, storage, seed, nested_trials, quiet, workdir) -> None:
    """Tune blend weights, space and threshold on oof/*.csv; write runs/blend/blend.json.

    Scores every single run, the equal-weight means, Caruana selection, hill climbing and an Optuna search
    in-sample and by nested CV, and ships the method with the best nested score (ties: the simpler one).

    \b
    aivh-ens blend
    aivh-ens blend --runs effnet_b4,convnext_tiny --trials 1000 --metric macro_f1
    aivh-ens blend --storage sqlite:///shared/study.db --timeout 600
    """
    from aivh_ens.blend.stage import format_table, run_blend

    result = run_blend(
        workdir,
        runs=runs.split(",") if runs is not None else None,
        metric=metric,
        trials=trials,
        timeout=timeout,
        storage=storage,
        seed=seed,
        nested_trials=nested_trials,
        progress=not quiet,
    )
    b = result.blend
    click.echo(f"{len(b['runs'])} runs, {b['trials']} trials in the study; in-sample and nested-CV {metric}:")
    click.echo(format_table(result.methods, metric, result.picked.name))
    click.echo(result.reason)
    click.echo(
        f"space {b['space']}, threshold {b['threshold']:.4f}, weights "
        + ", ".join(f"{r} {w:.3f}" for r, w in b["weights"].items())
    )
    click.echo("wrote " + ", ".join(str(p) for p in result.written))


# ---- submit / predict ----------------------------------------------------------------------------------
# (the submit and predict commands are defined below this line)
_TTA_HELP = (
    "Test-time augmentation: none, hflip, d4 (8 flips/rotations), crops:N (N native-resolution "
    "crops), or combined, e.g. hflip+crops:5.  [default: each run's recipe default]"
)


@main.command("submit")
@click.option(
    "--blend",
    "blend_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Fitted blend.  [default: WORKDIR/runs/blend/blend.json]",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Dataset folder with test.csv and the test images.  [default: the runs' training data]",
)
@click.option("--tta", default=None, metavar="SPEC", help=_TTA_HELP)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Submission file (id,label).  [default: WORKDIR/submission.csv]",
)
@click.option("--proba", is_flag=True, help="Also write the blended scores (id,prob) to <out>_proba.csv.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Model inputs (images x TTA views) per forward pass.  [default: the run's eval batch]",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="DataLoader workers.  [default: cores on CUDA, 0 on CPU]",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@WORKDIR
@cpu_threads
@user_errors
def submit_cmd(blend_path, data, tta, out, proba, device, batch_size, workers, quiet, workdir) -> None:
    """Predict test.csv with every run of the blend (folds x TTA, cached per run) and write the submission.

    The blend's weights, space and threshold are applied as fitted on the OOF rows. A second submit with
    another blend or threshold reuses each run's cached test scores (runs/<run>/test/).

    \b
    aivh-ens submit --data data/
    aivh-ens submit --data data/ --tta hflip+crops:5 --out sub_tta.csv --proba
    aivh-ens submit --blend runs/blend/blend.json --device cuda:0 --batch-size 256
    """
    from aivh_ens.infer.submission import submit

    r = submit(
        workdir,
        blend_path=blend_path,
        data=data,
        tta=tta,
        out=out,
        proba=proba,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=not quiet,
        log=click.echo,
    )
    runs = [f"{s.name} ({s.tta}, {'cached' if s.cached else f'{s.seconds:.1f}s'})" for s in r.runs]
    click.echo(f"blend: {r.space} space, threshold {r.threshold:.4f}; runs: {', '.join(runs)}")
    click.echo(f"wrote {r.out} ({r.n} rows)" + (f" and {r.proba}" if r.proba else ""))
    click.echo(f"predicted AI rate {r.ai_rate:.1%} (training rate {r.train_rate:.1%})")
    if r.warning:
        click.echo(f"warning: {r.warning}", err=True)


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--blend",
    "blend_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Fitted blend.  [default: WORKDIR/runs/blend/blend.json]",
)
@click.option("--run", default=None, help="Score with this one run instead of a blend (threshold 0.5).")
@click.option("--tta", default=None, metavar="SPEC", help=_TTA_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Model inputs (images x TTA views) per forward pass.  [default: the run's eval batch]",
)
@WORKDIR
@cpu_threads
@user_errors
def predict_cmd(images, blend_path, run, tta, as_json, device, batch_size, workdir) -> None:
    """P(AI) and the label of single images; unreadable ones are reported and the rest still scored.

    \b
    aivh-ens predict photo.jpg render.png
    aivh-ens predict data/test_data_v2/*.jpg --json > preds.json
    aivh-ens predict photo.jpg --run efficientnet_b4-effnet-b4-adam --tta d4
    """
    import json

    from aivh_ens.infer.predict import format_predictions, predict_images

    preds, source = predict_images(
        list(images), workdir, blend_path=blend_path, run=run, tta=tta, device=device, batch_size=batch_size
    )
    if as_json:
        results = [{"image": p.image, "prob": p.prob, "label": p.label, "error": p.error} for p in preds]
        click.echo(json.dumps({**source, "results": results}, indent=2))
    else:
        click.echo(format_predictions(preds, source["space"]))
    failed = [p for p in preds if p.error is not None]
    for p in failed:
        click.echo(f"error: {p.error}", err=True)
    if failed:
        sys.exit(2)


# ---- demo-data -----------------------------------------------------------------------------------------
# (the demo-data command is defined below this line)
@main.command("demo-data")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--n",
    type=int,
    default=2000,
    show_default=True,
    help="Train images: an even number >= 20, written as AI/human pairs of the same scene.",
)
@click.option(
    "--n-test",
    type=int,
    default=500,
    show_default=True,
    help="Test images (shifted sizes and generator, not in pairs, about half AI).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option(
    "--difficulty",
    type=float,
    default=None,
    help="0..1; higher = weaker generator traces and more noise in AI images.  [default: 0.2]",
)
@click.option(
    "--force",
    is_flag=True,
    help="Write into a non-empty folder that is not a demo data set (replaces only train.csv, "
    "test.csv, solution.csv, demo.json, train_data/, test_data_v2/).",
)
@user_errors
def demo_data_cmd(out_dir, n, n_test, seed, difficulty, force) -> None:
    """Write a synthetic data set in the Kaggle "AI vs. Human-Generated Images" layout to DIR.

    Train rows 2k (AI, label 1) and 2k+1 (human, label 0) show the same scene at the same size; test.csv
    comes from a shifted distribution and solution.csv holds its labels for scoring. A previous demo data
    set in DIR is replaced.

    \b
    aivh-ens demo-data data/
    aivh-ens demo-data data/ --n 400 --n-test 100 --difficulty 0.6
    aivh-ens cv --model test_efficientnet --recipe tiny --folds 5 --data data/ --group pairs
    """
    from aivh_ens.synth import DEFAULT_DIFFICULTY, make_demo_dataset

    r = make_demo_dataset(
        out_dir,
        n=n,
        n_test=n_test,
        seed=seed,
        force=force,
        difficulty=DEFAULT_DIFFICULTY if difficulty is None else difficulty,
    )
    click.echo(
        f"wrote {r['n_train']} train images ({r['n_train_ai']} AI, {r['n_train_human']} human, in "
        f"{r['n_train'] // 2} pairs) to {r['train_dir']} listed in {r['train_csv']}, and {r['n_test']} "
        f"test images ({r['n_test_ai']} AI, {r['n_test_human']} human) to {r['test_dir']} listed in "
        f"{r['test_csv']}, labels in {r['solution_csv']}; seed {r['seed']}, difficulty {r['difficulty']:g}, "
        f"{r['seconds']:.1f}s."
    )


if __name__ == "__main__":
    main()
