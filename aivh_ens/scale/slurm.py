"""The Slurm backend (``aivh-ens[slurm]``; the only module that imports submitit): one job array.

Each array task runs one (run, fold) job through :class:`FoldTask`, a ``submitit.helpers.Checkpointable``:
on preemption or at its time limit submitit requeues it, and the job resumes from its last finished epoch
(the fold's ``state.pt``); the lock of the first attempt carries the same job id, so the requeue takes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from aivh_ens.locks import current_attempt
from aivh_ens.scale.jobs import error_line, read_spec, result_row, run_job, task_device


class FoldTask(submitit.helpers.Checkpointable):
    """The array task's callable: run one job file; requeued as is (resuming) when time runs out."""

    def __init__(self, threads: int = 1, gpus: int = 0):
        self.threads, self.gpus = threads, gpus

    def __call__(self, job_file: str) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        device = task_device(getattr(self, "gpus", 0))  # given a GPU it cannot see: refuse, never the CPU
        attempt = current_attempt()  # Slurm's restart count: a requeue takes over its first attempt's lock
        return run_job(job_file, device, threads=self.threads, job_id=str(env.job_id), attempt=attempt)


def make_executor(folder: Path, opts: Any) -> Any:
    """submitit's ``AutoExecutor(cluster="slurm")`` with the sweep's settings (``opts``: a SlurmOptions);
    ``cluster="local"`` gives submitit's LocalExecutor (same jobs, signals and requeues, no Slurm), whose time
    limit may be a fraction of a minute."""
    if opts.cluster == "local":
        ex = submitit.LocalExecutor(folder=folder / "%j")
        delay = min(30, max(1, int(opts.timeout_min * 60) // 4))
        ex.update_parameters(
            timeout_min=opts.timeout_min, signal_delay_s=delay, gpus_per_node=opts.gpus_per_task
        )
        return ex
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=opts.cluster)
    params: dict[str, Any] = {
        "timeout_min": max(1, math.ceil(opts.timeout_min)),
        "tasks_per_node": 1,
        "nodes": 1,
        "cpus_per_task": opts.cpus_per_task,
        "gpus_per_node": opts.gpus_per_task,
        "name": "aivh-ens",
        "slurm_array_parallelism": opts.parallelism,
    }
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    ex.update_parameters(
        **{k: v for k, v in params.items() if opts.cluster == "slurm" or not k.startswith("slurm_")}
    )
    return ex


def submit(job_files: list[Path], workdir: Path, opts: Any) -> list[Any]:
    """Submit the jobs as one array; the submitit jobs, in the same order."""
    ex = make_executor(workdir.resolve() / "runs" / "slurm", opts)
    threads = max(1, opts.cpus_per_task if opts.cluster == "slurm" else 1)
    gpus = opts.gpus_per_task if opts.cluster == "slurm" else 0  # submitit's local executor gives none
    return ex.map_array(FoldTask(threads, gpus), [str(f) for f in job_files])


def run_slurm(
    job_files: list[Path], workdir: Path, opts: Any, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Submit the jobs and wait for every one; their rows (a failed task is a failed row)."""
    jobs = submit(job_files, workdir, opts)
    log(f"slurm: submitted {len(jobs)} task(s) as job {jobs[0].job_id.split('_')[0] if jobs else '-'}")
    return wait(jobs, job_files, log)


def wait(jobs: list[Any], job_files: list[Path], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each submitit job's row, in order, as it finishes (a failed or uncompleted task is a failed row)."""
    rows = []
    for job, f in zip(jobs, job_files, strict=True):
        try:
            row = job.result()
        except Exception as e:  # submitit's FailedJobError carries the task's traceback
            text = [ln for ln in str(e).splitlines() if ln.strip()]
            err = next(
                (ln.strip() for ln in reversed(text) if "Error" in ln or "Exception" in ln), error_line(e)
            )
            row = result_row(read_spec(f), "failed", error=err[:300])
        log(f"{row['run']} fold {row['fold']}: {row['state']}{' - ' + row['error'] if row['error'] else ''}")
        rows.append(row)
    return rows
