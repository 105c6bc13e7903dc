"""The Ray backend (``aivh-ens[ray]``; the only module that imports ray): one Ray task per (run, fold) job.

Each task asks for ``--gpus-per-task`` GPUs (Ray sets its ``CUDA_VISIBLE_DEVICES``) and its loader workers'
CPUs, a request checked against the alive nodes before anything is submitted. A crashed worker or
a lost node is retried by Ray (``max_retries``); a Python exception is not (``retry_exceptions=False``): a
bug or an out-of-memory error would fail again and burn GPU hours. Before the first job, one task per node
checks that it sees the work dir. An interrupted sweep cancels every unfinished task (a running one's worker
is killed) and releases the fold locks of the killed workers on this host.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aivh_ens.errors import UserError
from aivh_ens.locks import HEARTBEAT_S
from aivh_ens.scale.backend import STOP_GRACE_S, Backend, Log, interrupted_row, lock_owner, release_killed
from aivh_ens.scale.jobs import (
    HANG_ERROR,
    JOB_TIMEOUT_S,
    HangWatch,
    beat_for,
    error_line,
    lock_path,
    poll_step,
    preload_training,
    read_spec,
    result_row,
    retry_attempt,
    run_job,
    task_device,
)

MAX_RETRIES = 3
PROBE_TIMEOUT_S = 300.0
"""Seconds each node has to read the work dir's probe file (a worker's start included) before it is named."""
FORWARDED_ENV = ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME", "NO_ALBUMENTATIONS_UPDATE", "TORCH_HOME")


def _env() -> dict[str, str]:
    """Settings the workers need to behave like this process (``AIVH_ENS_*``, offline flags, paths)."""
    keep = {k: v for k, v in os.environ.items() if k.startswith("AIVH_ENS_") or k in FORWARDED_ENV}
    return keep


def _probe(path: str, token: str) -> tuple[str, bool]:
    try:
        return socket.gethostname(), Path(path).read_text() == token
    except OSError:
        return socket.gethostname(), False


def check_shared_workdir(workdir: Path) -> None:
    """One task per alive node reads a probe file the driver wrote; UserError naming the nodes that can't, or
    that have not answered within :data:`PROBE_TIMEOUT_S` (their tasks are cancelled)."""
    from aivh_ens.io import write_text

    token = uuid.uuid4().hex
    probe = workdir.resolve() / "runs" / f".ray-probe-{token[:8]}"
    write_text(probe, token)
    try:
        task = ray.remote(num_cpus=0)(_probe)
        nodes = {n["NodeID"]: n.get("NodeManagerHostname", "?") for n in ray.nodes() if n.get("Alive")}
        refs = {
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
                str(probe), token
            ): host
            for n, host in nodes.items()
        }
        ready, stuck = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        for ref in stuck:
            ray.cancel(ref, force=True)
        blind = [host for host, ok in ray.get(ready) if not ok]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise UserError(
            f"the work dir {workdir.resolve()} is not visible on Ray node(s) {', '.join(sorted(set(blind)))}: put "
            "it on storage every node mounts at the same path (NFS, Lustre, a cloud file system)"
        )
    if stuck:
        raise UserError(
            f"Ray node(s) {', '.join(sorted({refs[r] for r in stuck}))} did not read a file in the work dir "
            f"{workdir.resolve()} within {PROBE_TIMEOUT_S:.0f} s (a stalled mount, or no worker could start "
            "there): check that node's storage, or remove it from the cluster"
        )


def _task(
    job_file: str, submitted: float, threads: int, gpus: float = 0, beat_s: float = HEARTBEAT_S
) -> dict[str, Any]:
    device = task_device(gpus)  # a task given a GPU it cannot see refuses to train on the CPU
    preload_training()
    job_id = ray.get_runtime_context().get_task_id()  # the same for every retry of this task
    attempt = retry_attempt(lock_path(read_spec(job_file)), job_id)
    return run_job(
        job_file,
        device,
        threads=threads,
        job_id=job_id,
        attempt=attempt,
        submitted=submitted,
        heartbeat_s=beat_s,
    )


class RayBackend(Backend):
    """The jobs as Ray tasks on the cluster at ``address`` (None: a private local Ray, stopped at the end).

    ``gpus_per_task`` (``--gpus-per-task``) is what each task asks for; default 1, or 0 for a private Ray on a
    machine without CUDA. ``cpus_per_task`` defaults to each job's loader workers (at least 1). A task whose
    progress stands still for ``job_timeout`` seconds (``--job-timeout``) is cancelled as hung
    (:class:`aivh_ens.scale.jobs.HangWatch`), its row failed. ``max_jobs_per_worker`` (0: Ray's default, no
    limit) is Ray's ``max_calls``: a worker process exits after that many jobs.
    """

    def __init__(
        self,
        workdir: Path,
        address: str | None,
        log: Log,
        threads: int | None = None,
        gpus_per_task: float | None = None,
        cpus_per_task: int | None = None,
        job_timeout: float = JOB_TIMEOUT_S,
        max_jobs_per_worker: int = 0,
    ):
        super().__init__(log)
        self.workdir, self.address, self.threads = workdir, address, threads
        self.gpus_per_task, self.cpus_per_task, self.job_timeout = gpus_per_task, cpus_per_task, job_timeout
        self.max_calls = max_jobs_per_worker
        self.started_here = False
        self.refs: dict[Any, Path] = {}  # every task -> its job file
        self.pending: list[Any] = []  # the tasks not yet finished

    def open(self) -> None:
        """Connect (a private Ray starts here); Ray's own SIGTERM handler is then replaced by the sweep's."""
        self.started_here = not ray.is_initialized()
        if self.started_here:
            t0 = time.perf_counter()
            ray.init(address=self.address, log_to_driver=True)
            self.log(f"ray: connected in {time.perf_counter() - t0:.1f}s ({ray.cluster_resources()})")

    def run(self, job_files: list[Path]) -> None:
        """Check the request against the nodes and the work dir on each, submit every job, collect the rows.

        Raises:
            UserError: no alive node can ever hold one task (checked before the first is submitted).
        """
        private = self.started_here and self.address is None
        gpus = self.gpus_per_task if self.gpus_per_task is not None else _default_gpus(private)
        cpus = {
            f: self.cpus_per_task or max(1, read_spec(f).config.get("workers") or self.threads or 1)
            for f in job_files
        }
        check_nodes(gpus, max(cpus.values(), default=1))
        check_shared_workdir(self.workdir)
        task = ray.remote(max_calls=self.max_calls)(_task) if self.max_calls else ray.remote(_task)
        beat_s = beat_for(self.job_timeout)
        opts = {"num_gpus": gpus, "max_retries": MAX_RETRIES, "retry_exceptions": False}
        opts["runtime_env"] = {"env_vars": _env()}
        for f in job_files:
            ref = task.options(**opts, num_cpus=cpus[f]).remote(
                str(f), time.time(), self.threads or cpus[f], gpus, beat_s
            )
            self.refs[ref] = f
            self.pending.append(ref)
        self._collect()

    def cancel(self, signalled: bool) -> None:
        """Cancel every unfinished task: a running one's worker is killed, and its fold lock released once the
        worker is gone; their rows are pending."""
        owners = {ref: lock_owner(self.refs[ref]) for ref in self.pending}
        for ref in self.pending:
            ray.cancel(ref, force=True)  # kills its worker process (and any task it started)
        if self.pending:
            ray.wait(self.pending, num_returns=len(self.pending), timeout=STOP_GRACE_S)
        for ref in self.pending:
            if owners[ref].get("job_id") == ref.task_id().hex():
                release_killed(self.refs[ref], owners[ref])
            self.record(interrupted_row(self.refs[ref]))
        self.pending = []

    def _collect(self) -> None:
        """Record each task's row as it finishes; cancel a task whose progress stands still as hung."""
        tasks = {ref: (f, ref.task_id().hex()) for ref, f in self.refs.items()}
        watch, hung = HangWatch(tasks, self.job_timeout), set()
        step = poll_step(self.job_timeout)
        while self.pending:
            ready, running = ray.wait(self.pending, num_returns=1, timeout=step)
            for ref in watch.hung(running):
                ray.cancel(ref, force=True)  # kills its worker process: the device and the lock are freed
                hung.add(ref)
            for ref in ready:
                row = self._row(ref, HANG_ERROR.format(self.job_timeout) if ref in hung else None)
                self.pending.remove(ref)  # not before its row is read: an interrupt leaves it to cancel()
                self.record(row)

    def _row(self, ref: Any, hang: str | None) -> dict[str, Any]:
        """A finished task's row: its own, or failed with the task's error (``hang``: it was cancelled)."""
        f = self.refs[ref]
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            return result_row(read_spec(f), "failed", error=error_line(e.cause or e))
        except ray.exceptions.RayError as e:  # crashed worker or lost node, after MAX_RETRIES retries
            return self.fail(f, hang or f"{type(e).__name__}: {str(e).splitlines()[0]}")

    def close(self) -> None:
        if self.started_here:
            ray.shutdown()


def _default_gpus(private: bool) -> float:
    if not private:
        return 1  # a cluster's nodes are not this machine: GPUs are the point, say --gpus-per-task 0 if not
    import torch

    return 1 if torch.cuda.is_available() else 0


def check_nodes(gpus: float, cpus: float, nodes: list[dict[str, Any]] | None = None) -> None:
    """UserError unless some alive node offers ``gpus`` GPUs and ``cpus`` CPUs (a larger request waits forever)."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    res = [n.get("Resources", {}) for n in nodes]
    if any(r.get("GPU", 0) >= gpus and r.get("CPU", 0) >= cpus for r in res):
        return
    seen = ", ".join(
        f"{n.get('NodeManagerHostname', '?')}: {r.get('GPU', 0):g} GPU {r.get('CPU', 0):g} CPU"
        for n, r in zip(nodes, res, strict=True)
    )
    raise UserError(
        f"no Ray node can run a job that asks for {gpus:g} GPU and {cpus:g} CPU (nodes: {seen or 'none alive'}); "
        "pass --gpus-per-task/--cpus-per-task that fit a node (--gpus-per-task 0 trains on CPU), or add nodes"
    )
