"""The auto command: from a data folder to submission.csv within a time limit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from aivh_ens.cli.options import WORKDIR, cpu_threads, user_errors
from aivh_ens.config import ON_BAD_IMAGE


@click.command("auto")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Dataset folder with train.csv, test.csv and the images (Kaggle layout).",
)
@click.option(
    "--time-limit",
    "time_limit",
    required=True,
    metavar="DURATION",
    help="The budget of the whole plan: 20m, 8h, 1h30m or seconds. The same command again resumes; a larger "
    "limit adds runs without retraining the ones done.",
)
@click.option(
    "--devices",
    default=None,
    help="Devices, one job each at a time, e.g. cuda:0,cuda:1 or cpu,cpu.  [default: every GPU, else one CPU "
    "job per core]",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Submission file (id,label).  [default: WORKDIR/submission.csv]",
)
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="timm weights (.safetensors/.pth) named after their models, e.g. convnext_tiny.safetensors: probed and "
    "fine-tuned.  [default: backbones whose weights are in the Hugging Face cache, else from-scratch models]",
)
@click.option(
    "--models",
    default=None,
    metavar="A,B,..",
    help="Only these timm models: their pretrained candidates, else each trained from scratch.  [default: the "
    "candidates auto chooses]",
)
@click.option(
    "--on-bad-image",
    type=click.Choice(ON_BAD_IMAGE),
    default=None,
    help="A corrupt image stops the call (error) or is skipped and recorded (skip).  [default: error]",
)
@click.option(
    "--dry-run", is_flag=True, help="Inspect, time and plan; print the candidates, plan and estimates."
)
@click.option("--quiet", is_flag=True, help="Only the final table.")
@WORKDIR
@cpu_threads
@user_errors
def auto_cmd(
    data, time_limit, devices, out, weights_dir, models, on_bad_image, dry_run, quiet, workdir
) -> None:
    """Inspect, plan, train, blend, submit and report within --time-limit; print one final table.

    The plan (runs/auto/plan.toml, a sweep plan), the candidates' timings and the table are written under
    runs/auto/, so any step can be re-run or edited by hand. The first run to complete is submitted at once;
    the final blend refreshes submission.csv. The jobs' epoch lines go to runs/auto/jobs.log.

    \b
    aivh-ens auto --data data/ --time-limit 20m
    aivh-ens auto --data data/ --time-limit 8h --devices cuda:0,cuda:1 --workdir /kaggle/working
    aivh-ens auto --data data/ --time-limit 40m          # after a 20m call: adds runs, retrains nothing
    aivh-ens auto --data data/ --time-limit 20m --models test_resnet --workdir single   # one model only
    aivh-ens auto --data data/ --time-limit 8h --dry-run     # candidates, plan and estimates; trains nothing
    """
    from aivh_ens.auto.budget import parse_time_limit

    parse_time_limit(time_limit)  # a bad limit fails here, before torch is imported
    from aivh_ens.auto.stage import run_auto

    result = run_auto(
        data,
        workdir,
        time_limit=time_limit,
        devices=devices,
        out=out,
        weights_dir=weights_dir,
        models=tuple(m.strip() for m in models.split(",") if m.strip()) if models else (),
        threads=click.get_current_context().meta.get("threads"),
        on_bad_image=on_bad_image,
        dry_run=dry_run,
        log=(lambda _m: None) if quiet else click.echo,
    )
    click.echo(result.table)
    if result.failed and result.submission is None and not result.rows:
        sys.exit(1)  # every run failed: the table names the failure
    if result.failed:
        click.echo(f"{result.failed} jobs failed (see `aivh-ens status --workdir {workdir}`); the blend and "
                   "submission use the runs that finished", err=True)  # fmt: skip
        sys.exit(1)
