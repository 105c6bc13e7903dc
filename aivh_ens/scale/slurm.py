"""The Slurm backend (``aivh-ens[slurm]``; the only module that imports submitit): one job array.

Each array task runs one (run, fold) job through :class:`FoldTask`, a ``submitit.helpers.Checkpointable``:
on preemption or at its time limit submitit requeues it, and the job resumes from its last finished epoch
(the fold's ``state.pt``); the lock of the first attempt carries the same job id, so the requeue takes it.
An interrupted sweep cancels every unfinished task of its array.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import submitit

from aivh_ens.locks import HEARTBEAT_S, current_attempt
from aivh_ens.scale.backend import STOP_GRACE_S, Backend, Log, interrupted_row, lock_owner, release_killed
from aivh_ens.scale.jobs import (
    HANG_ERROR,
    JOB_TIMEOUT_S,
    HangWatch,
    beat_for,
    error_line,
    poll_step,
    preload_training,
    read_spec,
    result_row,
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


class SlurmBackend(Backend):
    """The jobs as one array (:func:`submit`); each task's row as it finishes (a failed task is a failed row).
    A task whose progress stands still for ``job_timeout`` seconds (``--job-timeout``) is cancelled as hung.
    Each task is a process of its own, so no process runs two jobs."""

    def __init__(self, workdir: Path, opts: Any, log: Log, job_timeout: float = JOB_TIMEOUT_S):
        super().__init__(log)
        self.workdir, self.opts, self.job_timeout = workdir, opts, job_timeout
        self.jobs: list[Any] = []
        self.files: list[Path] = []
        self.pending: list[int] = []  # indices of the tasks not yet finished

    def run(self, job_files: list[Path]) -> None:
        self.files = list(job_files)
        self.jobs = submit(self.files, self.workdir, self.opts, self.job_timeout)
        self.pending = list(range(len(self.jobs)))
        self.log(f"slurm: submitted {len(self.jobs)} task(s) as job {_array_id(self.jobs)}")
        tasks = {i: (f, str(j.job_id)) for i, (j, f) in enumerate(zip(self.jobs, self.files, strict=True))}
        watch, hung = HangWatch(tasks, self.job_timeout), set()
        hang = HANG_ERROR.format(self.job_timeout)
        while self.pending:
            for i in watch.hung(self.pending):
                self.jobs[i].cancel(check=False)
                hung.add(i)
            for i in list(self.pending):
                if self.jobs[i].done():
                    row = _row(self.jobs[i], self.files[i], hang if i in hung else None)
                    self.pending.remove(i)  # not before its row is read: an interrupt leaves it to cancel()
                    self.record(row)
            if self.pending:
                time.sleep(poll_step(self.job_timeout))

    def cancel(self, signalled: bool) -> None:
        """Cancel every unfinished task (``scancel``; submitit's local executor sends SIGINT, and the job
        releases its fold lock), wait for them to end, release the locks of killed tasks on this host; their
        rows are pending."""
        owners = {i: lock_owner(self.files[i]) for i in self.pending}
        for i in self.pending:
            self.jobs[i].cancel(check=False)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(not _ended(self.jobs[i]) for i in self.pending) and time.monotonic() < deadline:
            time.sleep(0.2)
        for i in self.pending:
            if owners[i].get("job_id") == str(self.jobs[i].job_id):
                release_killed(self.files[i], owners[i], within_s=max(0.0, deadline - time.monotonic()))
            self.record(interrupted_row(self.files[i]))
        self.pending = []


def _array_id(jobs: list[Any]) -> str:
    return jobs[0].job_id.split("_")[0] if jobs else "-"


def _ended(job: Any) -> bool:
    """Whether a cancelled job has ended (an error asking the scheduler counts as ended: it was cancelled)."""
    try:
        return job.done(force_check=True)
    except Exception:
        return True


def _row(job: Any, job_file: Path, hang: str | None) -> dict[str, Any]:
    """A finished submitit job's row: its own, or failed with the task's error (``hang``: it was cancelled)."""
    try:
        return job.result()
    except Exception as e:  # submitit's FailedJobError carries the task's traceback
        if hang:
            return Backend.fail(job_file, hang)
        text = [ln for ln in str(e).splitlines() if ln.strip()]
        err = next((ln.strip() for ln in reversed(text) if "Error" in ln or "Exception" in ln), error_line(e))
        return result_row(read_spec(job_file), "failed", error=err[:300])
