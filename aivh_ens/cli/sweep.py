"""Commands of the scale stage: sweep (several runs x folds on local devices, Ray or Slurm) and status."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from aivh_ens.cli.options import WORKDIR, options, user_errors
from aivh_ens.errors import UserError

INTERRUPTED = 130  # the exit code of a sweep stopped by SIGINT or SIGTERM (128 + SIGINT, as a shell reports)

scale_options = options(
    click.option(
        "--backend",
        type=click.Choice(["local", "ray", "slurm"]),
        default=None,
        help="Where jobs run: local processes (one per device), a Ray cluster, or a Slurm job array.  "
        "[default: local]",
    ),
    click.option(
        "--devices",
        default=None,
        help="local: devices, one job each at a time, e.g. cuda:0,cuda:1 or cpu,cpu.  [default: --gpus]",
    ),
    click.option(
        "--gpus",
        type=int,
        default=None,
        help="local: use the first N GPUs.  [default: every GPU, else the CPU]",
    ),
    click.option(
        "--ray-address", default=None, help="ray: an existing cluster.  [default: a private local Ray]"
    ),
    click.option(
        "--job-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Seconds a job may go without finishing a single batch before it is killed (local) or cancelled "
        "(ray, slurm) as hung and marked failed (it resumes on the next run).  [default: 3600]",
    ),
    click.option(
        "--max-jobs-per-worker",
        type=click.IntRange(min=0),
        default=None,
        help="local, ray: start a fresh worker process after N jobs (ray: the task's max_calls), to shed "
        "memory a job leaves behind; a failed job's process is always replaced (local), and each slurm task "
        "is a process of its own.  [default: 0, no limit]",
    ),
    click.option("--slurm-partition", default=None, help="slurm: the partition.  [default: the cluster's]"),
    click.option(
        "--timeout-min",
        type=int,
        default=None,
        help="slurm: time limit per task; a timed-out fold is requeued and resumes.  [default: 1440]",
    ),
    click.option(
        "--gpus-per-task",
        type=click.FloatRange(min=0),
        default=None,
        help="ray, slurm: GPUs per job (ray: checked against the nodes up front).  [default: 1; a private Ray "
        "on a machine without CUDA: 0]",
    ),
    click.option(
        "--cpus-per-task",
        type=click.IntRange(min=1),
        default=None,
        help="ray, slurm: CPUs per job.  [default: slurm 8; ray the job's loader workers]",
    ),
    click.option(
        "--mem-gb",
        type=int,
        default=None,
        help="slurm: memory per array task, in GB.  [default: the partition's]",
    ),
    click.option(
        "--array-parallelism",
        type=int,
        default=None,
        help="slurm: array tasks running at once.  [default: 64]",
    ),
    click.option(
        "--slurm-cluster", default="slurm", hidden=True, help="submitit cluster: slurm, local, debug."
    ),
)


# Which backend each flag belongs to (the click parameter name -> backends that read it).
BACKEND_FLAGS = {
    "devices": ("local",),
    "gpus": ("local",),
    "ray_address": ("ray",),
    "max_jobs_per_worker": ("local", "ray"),
    "slurm_partition": ("slurm",),
    "timeout_min": ("slurm",),
    "gpus_per_task": ("ray", "slurm"),
    "cpus_per_task": ("ray", "slurm"),
    "mem_gb": ("slurm",),
    "array_parallelism": ("slurm",),
}


def check_backend_flags(backend: str, kw: dict[str, Any]) -> None:
    """UserError naming the first flag given for another backend (it would be silently ignored)."""
    for name, backends in BACKEND_FLAGS.items():
        if kw.get(name) is not None and backend not in backends:
            flag = "--" + name.replace("_", "-")
            need = " or ".join(f"--backend {b}" for b in backends)
            raise UserError(f"{flag} is for {need}; this sweep runs on --backend {backend}: drop {flag}")
    if kw.get("slurm_cluster") not in (None, "slurm") and backend != "slurm":
        raise UserError(f"--slurm-cluster is for --backend slurm; this sweep runs on --backend {backend}")


def _whole(value: float | None, flag: str) -> int | None:
    if value is None or value == int(value):
        return None if value is None else int(value)
    raise UserError(f"{flag} for --backend slurm takes a whole number of GPUs (got {value:g})")


def slurm_options(kw: dict[str, Any]) -> Any:
    """SlurmOptions from the --slurm-*/--timeout-min/... flags (None means the default)."""
    from aivh_ens.scale.sweep import SlurmOptions

    given = {
        "partition": kw.pop("slurm_partition"),
        "timeout_min": kw.pop("timeout_min"),
        "gpus_per_task": _whole(kw.get("gpus_per_task"), "--gpus-per-task")
        if kw["backend"] == "slurm"
        else None,
        "cpus_per_task": kw.get("cpus_per_task"),
        "mem_gb": kw.pop("mem_gb"),
        "parallelism": kw.pop("array_parallelism"),
        "cluster": kw.pop("slurm_cluster"),
    }
    return SlurmOptions(**{k: v for k, v in given.items() if v is not None})


def run_plan(
    plan: Any, workdir: Path, dry_run: bool, force: bool, kw: dict[str, Any], echo: Callable[[str], None]
) -> None:
    """Run a sweep from the parsed scale options, print its table; exit 1 unless every job is done."""
    from aivh_ens.scale.status import format_table
    from aivh_ens.scale.sweep import RayOptions, run_sweep

    backend = kw["backend"] or "local"
    check_backend_flags(backend, kw)
    ray = RayOptions(kw.get("gpus_per_task"), kw.get("cpus_per_task"))
    slurm = slurm_options(kw)
    result = run_sweep(
        plan,
        workdir,
        backend=backend,
        devices=kw["devices"],
        gpus=kw["gpus"],
        threads=kw.get("threads"),
        dry_run=dry_run,
        force=force,
        ray_address=kw["ray_address"],
        slurm=slurm,
        ray=ray,
        job_timeout=kw.get("job_timeout"),
        max_jobs_per_worker=kw.get("max_jobs_per_worker") or 0,
        log=echo,
    )
    if dry_run:
        echo(f"dry run: {len(result.rows)} jobs, nothing written")
    echo(format_table(result.rows))
    if dry_run:
        return
    if result.unfinished:
        echo(f"{unfinished_line(result)}; {resume_advice(force)}", err=True)
        sys.exit(INTERRUPTED if getattr(result, "interrupted", False) else 1)


def resume_advice(force: bool) -> str:
    """How to resume: never by repeating ``--force``, which would retrain the folds this sweep finished."""
    if force:
        return "run the same command without --force to resume (--force again would retrain every fold)"
    return "run the same command again to resume"


def unfinished_line(result: Any) -> str:
    """``2 of 6 jobs not done (1 failed, 1 running elsewhere)``."""
    from collections import Counter

    from aivh_ens.scale.sweep import DONE_STATES

    counts = Counter(r["state"] for r in result.rows if r["state"] not in DONE_STATES)
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return f"{result.unfinished} of {len(result.rows)} jobs not done ({parts})"


@click.command("sweep")
@click.argument("plan_file", metavar="PLAN.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the job table; write nothing.")
@click.option(
    "--force", is_flag=True, help="Retrain every fold of the plan's runs, also when their config changed."
)
@scale_options
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar="AIVH_ENS_THREADS",
    show_envvar=True,
    help="torch CPU threads per job.  [default: CPU jobs share the cores; 1 per Ray task]",
)
@WORKDIR
@user_errors
def sweep_cmd(plan_file: Path, dry_run: bool, force: bool, workdir: Path, **kw: Any) -> None:
    """Train every fold of several runs, one job per (run, fold), on local devices, Ray or Slurm.

    Re-running the same command resumes: finished jobs are skipped, interrupted ones continue from their
    last epoch. Exit code 1 unless every job is done (failed, pending or running elsewhere); a failed
    job never stops the others.

    \b
    aivh-ens sweep plan.toml --devices cuda:0,cuda:1          # Kaggle 2xT4
    aivh-ens sweep plan.toml --backend ray --ray-address auto
    aivh-ens sweep plan.toml --backend slurm --slurm-partition gpu --timeout-min 240
    aivh-ens sweep plan.toml --dry-run
    """
    from aivh_ens.scale.plan import load_plan

    run_plan(load_plan(plan_file), workdir, dry_run, force, kw, click.echo)


@click.command("status")
@click.argument("runs", nargs=-1)
@WORKDIR
@user_errors
def status_cmd(runs: tuple[str, ...], workdir: Path) -> None:
    """Show every fold of every run (or of RUNS): pending, running on host:pid with epoch and ETA, done, failed.

    \b
    aivh-ens status
    aivh-ens status tiny-effnet --workdir demo
    """
    from aivh_ens.scale.status import format_table, status_rows

    click.echo(format_table(status_rows(workdir, list(runs) or None)))
