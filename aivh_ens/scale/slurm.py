"""The Slurm backend (``aivh-ens[slurm]``; the only module that imports submitit): one job array.

Each array task runs one (run, fold) job through :class:`FoldTask`, a ``submitit.helpers.Checkpointable``:
on preemption or at its time limit submitit requeues it, and the job resumes from its last finished epoch
(the fold's ``state.pt``); the lock of the first attempt carries the same job id, so the requeue takes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from aivh_ens.locks import HEARTBEAT_S, current_attempt
from aivh_ens.scale.jobs import (
    HANG_ERROR,
    JOB_TIMEOUT_S,
    HangWatch,
    beat_for,
    error_line,
    poll_step,
    preload_training,
    read_spec,
    record_failure,
    result_row,
    row_line,
    run_job,
    task_device,
)


class FoldTask(submitit.helpers.Checkpointable):
    """The array task's callable: run one job file; requeued as is (resuming) when time runs out."""

    def __init__(self, threads: int = 1, gpus: int = 0, beat_s: float = HEARTBEAT_S):
        self.threads, self.gpus, self.beat_s = threads, gpus, beat_s

    def __call__(self, job_file: str) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        device = task_device(getattr(self, "gpus", 0))  # given a GPU it cannot see: refuse, never the CPU
        attempt = current_attempt()  # Slurm's restart count: a requeue takes over its first attempt's lock
        beat_s = getattr(self, "beat_s", HEARTBEAT_S)
        preload_training()
        return run_job(
            job_file,
            device,
            threads=self.threads,
            job_id=str(env.job_id),
            attempt=attempt,
            heartbeat_s=beat_s,
        )


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


def submit(job_files: list[Path], workdir: Path, opts: Any, job_timeout: float = JOB_TIMEOUT_S) -> list[Any]:
    """Submit the jobs as one array; the submitit jobs, in the same order."""
    ex = make_executor(workdir.resolve() / "runs" / "slurm", opts)
    threads = max(1, opts.cpus_per_task if opts.cluster == "slurm" else 1)
    gpus = opts.gpus_per_task if opts.cluster == "slurm" else 0  # submitit's local executor gives none
    task = FoldTask(threads, gpus, beat_for(job_timeout))
    return ex.map_array(task, [str(f) for f in job_files])


def run_slurm(
    job_files: list[Path],
    workdir: Path,
    opts: Any,
    log: Callable[[str], None],
    job_timeout: float = JOB_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Submit the jobs and wait for every one; their rows (a failed task is a failed row). A task whose
    progress stands still for ``job_timeout`` seconds (``--job-timeout``) is cancelled as hung."""
    jobs = submit(job_files, workdir, opts, job_timeout)
    log(f"slurm: submitted {len(jobs)} task(s) as job {jobs[0].job_id.split('_')[0] if jobs else '-'}")
    return wait(jobs, job_files, log, job_timeout)


def wait(
    jobs: list[Any], job_files: list[Path], log: Callable[[str], None], job_timeout: float = JOB_TIMEOUT_S
) -> list[dict[str, Any]]:
    """Each submitit job's row, in order (a failed, uncompleted or hung task is a failed row); logged as each
    finishes."""
    watch = HangWatch({i: (f, str(j.job_id)) for i, (j, f) in enumerate(zip(jobs, job_files, strict=True))},
                      job_timeout)  # fmt: skip
    rows: dict[int, dict[str, Any]] = {}
    hung: set[int] = set()
    while len(rows) < len(jobs):
        pending = [i for i in range(len(jobs)) if i not in rows]
        for i in watch.hung(pending):
            jobs[i].cancel(check=False)
            hung.add(i)
        for i in pending:
            if jobs[i].done():
                rows[i] = _row(jobs[i], job_files[i], HANG_ERROR.format(job_timeout) if i in hung else None)
                log(row_line(rows[i]))
        if len(rows) < len(jobs):
            time.sleep(poll_step(job_timeout))
    return [rows[i] for i in range(len(jobs))]


def _row(job: Any, job_file: Path, hang: str | None) -> dict[str, Any]:
    """A finished submitit job's row: its own, or failed with the task's error (``hang``: it was cancelled)."""
    try:
        return job.result()
    except Exception as e:  # submitit's FailedJobError carries the task's traceback
        if hang:
            record_failure(job_file, hang)
            return result_row(read_spec(job_file), "failed", error=hang)
        text = [ln for ln in str(e).splitlines() if ln.strip()]
        err = next((ln.strip() for ln in reversed(text) if "Error" in ln or "Exception" in ln), error_line(e))
        return result_row(read_spec(job_file), "failed", error=err[:300])
