"""Commands of the data and training stages: folds, cv, cache, demo-data."""

from __future__ import annotations

from pathlib import Path

import click

from aivh_ens.cli.options import (
    WORKDIR,
    cpu_threads,
    data_options,
    parse_floats,
    report_line,
    training_options,
    user_errors,
)
from aivh_ens.cli.sweep import scale_options
from aivh_ens.config import MODES
from aivh_ens.errors import UserError


@click.command("folds")
@data_options
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


@click.command("cv", context_settings={"show_default": False})
@click.option(
    "--model",
    default=None,
    help="Any timm model name, or two joined by '+' for a fused model; several, comma-separated, make a sweep "
    "of one run each.  [default: the recipe's]",
)
@click.option(
    "--recipe",
    default="none",
    show_default=True,
    help="Named preset: none, tiny, effnet-b4-adam, effnet-b3-scratch, resnetv2-50-head, "
    "coatnet-2-lamb, convitx, crop-robust, clip-probe, dinov2-probe. Flags below override it.",
)
@data_options
@click.option("--name", default=None, help="Run name (folder under runs/).  [default: model-recipe]")
@click.option(
    "--fold",
    "fold_spec",
    default=None,
    help="Train only these folds, e.g. 0,2 (others may run in other processes).  [default: every fold]",
)
@click.option("--resume", is_flag=True, help="Continue interrupted folds from their last finished epoch.")
@click.option("--force", is_flag=True, help="Retrain folds that are already done (and replace the config).")
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the resolved settings (defaults -> recipe -> flags) as JSON and exit; nothing is trained or written.",
)
@training_options
@scale_options
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
    print_config,
    rrc_scale,
    quiet,
    workdir,
    **flags,
) -> None:
    """Train one model per fold and write out-of-fold probabilities to oof/<run>.csv.

    \b
    aivh-ens cv --recipe tiny --data demo/data --group pairs
    aivh-ens cv --recipe tiny --data demo/data --lr 1e-3 --print-config   # the resolved settings; trains nothing
    aivh-ens cv --model efficientnet_b4 --folds 5 --data data/ --group pairs --weights b4.safetensors
    aivh-ens cv --recipe effnet-b4-adam --data data/ --fold 0,1 --device cuda:0   # beside --fold 2,3,4 on cuda:1
    aivh-ens cv --recipe effnet-b4-adam --data data/ --resume                      # after an interruption
    aivh-ens cv --model efficientnet_b4,convnext_tiny --data data/ --devices cuda:0,cuda:1   # a sweep
    aivh-ens cv --recipe clip-probe --data data/ --group pairs                      # frozen CLIP + linear head
    aivh-ens cv --model convnext_tiny --pretrained --head mlp --data data/ --group pairs
    """
    from aivh_ens.config import resolve_config
    from aivh_ens.train.cv import format_summary, run_cv

    scale = {k: flags.pop(k) for k in SCALE_KEYS}
    if flags.get("deterministic") is False:
        flags["deterministic"] = None
    values = dict(data=str(data) if data else None, train_csv=train_csv, file_col=file_col, label_col=label_col,
                  folds=n_folds, seed=seed, group=group, rrc_scale=parse_floats(rrc_scale, 2, "--rrc-scale"),
                  **flags)  # fmt: skip
    if model is None and recipe == "none":
        raise UserError("give --model NAME (any timm model) or --recipe NAME")
    if print_config:
        return _print_configs(model, recipe, name, values)
    if _is_sweep(model, scale):
        return _cv_sweep(model, recipe, name, fold_spec, force, workdir, scale, values)
    cfg = resolve_config(recipe, model=model, name=name, **values)
    what = f"{cfg.epochs} epochs" if cfg.head == "finetune" else f"{cfg.head} probe on frozen features"
    click.echo(
        f"run {cfg.name}: {cfg.model} (recipe {cfg.recipe}), {cfg.folds} folds, {what}, device {cfg.device}"
    )
    result = run_cv(
        cfg, workdir, fold_spec=fold_spec, resume=resume, force=force, progress=not quiet, log=click.echo
    )
    click.echo(format_summary(result))
    click.echo(report_line(workdir))


SCALE_KEYS = (
    "backend",
    "devices",
    "gpus",
    "job_timeout",
    "max_jobs_per_worker",
    "ray_address",
    "slurm_partition",
    "timeout_min",
    "gpus_per_task",
    "cpus_per_task",
    "mem_gb",
    "array_parallelism",
    "slurm_cluster",
)


def _print_configs(model: str | None, recipe: str, name: str | None, values: dict) -> None:
    """``cv --print-config``: each run's resolved RunConfig as JSON (one object, or a list for --model a,b)."""
    import json

    from aivh_ens.config import resolve_config, to_dict

    models = [m.strip() for m in model.split(",")] if model else [None]
    docs = [to_dict(resolve_config(recipe, model=m, name=name, **values)) for m in models]
    click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))


def _is_sweep(model: str | None, scale: dict) -> bool:
    """cv becomes a sweep with several --model names or any sweep option (--backend, --devices, --gpus,
    --ray-address, --slurm-*...; one given without its backend is then refused, not ignored)."""
    return bool(model and "," in model) or any(
        scale[k] is not None for k in SCALE_KEYS if k != "slurm_cluster" or scale[k] != "slurm"
    )


def _cv_sweep(model, recipe, name, fold_spec, force, workdir, scale, values) -> None:
    """``cv --model a,b`` or ``cv --devices ...``: a plan of one run per model, run as a sweep."""
    from aivh_ens.cli.sweep import run_plan
    from aivh_ens.scale.plan import plan_from_configs

    models = [m.strip() for m in model.split(",")] if model else [None]
    if fold_spec is not None:
        raise UserError(
            "--fold picks folds of one process; a sweep (--backend/--devices/--gpus) runs them all"
        )
    if name and len(models) > 1:
        raise UserError(
            f"--name names one run; with {len(models)} --model names each run is named after its model"
        )
    tables = [{**values, "recipe": recipe, "model": m, "name": name} for m in models]
    plan = plan_from_configs("cv", tables)
    kw = {**scale, "threads": click.get_current_context().meta.get("threads")}
    run_plan(plan, workdir, False, force, kw, click.echo)


# ---- cache ---------------------------------------------------------------------------------------------
# (the cache command is defined below this line)


@click.command("cache")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Dataset folder with train.csv (and test.csv) and the images.  [default: .]",
)
@click.option("--recipe", default="none", show_default=True, help="Derive the storage size from this recipe.")
@click.option(
    "--model",
    default=None,
    help="Derive the storage size from this timm model's input size.  [default: the recipe's]",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=None,
    help="resize: S x S (or shorter side S when the recipe crops after a resize); crop: native pixels, "
    "shorter side capped at S.  [default: the recipe's, else resize]",
)
@click.option(
    "--img-size", type=int, default=None, help="Model input size.  [default: the recipe's, else the model's]"
)
@click.option(
    "--size",
    type=int,
    default=None,
    help="Storage size S; another size than cv's makes a cache cv does not read.  [default: what cv uses "
    "for the same recipe, model, mode and img-size]",
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

    Each image is stored after the pipeline's storage step (see aivh_ens/data/transforms.py), so training reads
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


# ---- demo-data -----------------------------------------------------------------------------------------
# (the demo-data command is defined below this line)
@click.command("demo-data")
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
