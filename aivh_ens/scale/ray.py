"""The Ray backend (``aivh-ens[ray]``; the only module that imports ray): one Ray task per (run, fold) job.

Each task asks for ``--gpus-per-task`` GPUs (Ray sets its ``CUDA_VISIBLE_DEVICES``) and its loader workers'
CPUs, a request checked against the alive nodes before anything is submitted. A crashed worker or
a lost node is retried by Ray (``max_retries``); a Python exception is not (``retry_exceptions=False``): a
bug or an out-of-memory error would fail again and burn GPU hours. Before the first job, one task per node
checks that it sees the work dir.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aivh_ens.errors import UserError
from aivh_ens.locks import HEARTBEAT_S
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
    record_failure,
    result_row,
    retry_attempt,
    row_line,
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


def run_ray(
    job_files: list[Path],
    workdir: Path,
    address: str | None,
    log: Callable[[str], None],
    threads: int | None = None,
    gpus_per_task: float | None = None,
    cpus_per_task: int | None = None,
    job_timeout: float = JOB_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Run the jobs as Ray tasks on the cluster at ``address`` (None: a private local Ray); their rows.

    ``gpus_per_task`` (``--gpus-per-task``) is what each task asks for; default 1, or 0 for a private Ray on a
    machine without CUDA. ``cpus_per_task`` defaults to each job's loader workers (at least 1). A task whose
    progress stands still for ``job_timeout`` seconds (``--job-timeout``) is cancelled as hung
    (:class:`aivh_ens.scale.jobs.HangWatch`), its row failed.

    Raises:
        UserError: no alive node can ever hold one task (checked before the first is submitted).
    """
    started_here = not ray.is_initialized()
    if started_here:
        t0 = time.perf_counter()
        ray.init(address=address, log_to_driver=True)
        log(f"ray: connected in {time.perf_counter() - t0:.1f}s ({ray.cluster_resources()})")
    try:
        gpus = gpus_per_task if gpus_per_task is not None else _default_gpus(started_here and address is None)
        cpus = {
            f: cpus_per_task or max(1, read_spec(f).config.get("workers") or threads or 1) for f in job_files
        }
        check_nodes(gpus, max(cpus.values(), default=1))
        check_shared_workdir(workdir)
        task = ray.remote(_task)
        beat_s = beat_for(job_timeout)
        opts = {"num_gpus": gpus, "max_retries": MAX_RETRIES, "retry_exceptions": False}
        opts["runtime_env"] = {"env_vars": _env()}
        refs = {}
        for f in job_files:
            refs[
                task.options(**opts, num_cpus=cpus[f]).remote(
                    str(f), time.time(), threads or cpus[f], gpus, beat_s
                )
            ] = f
        return _collect(refs, log, job_timeout)
    finally:
        if started_here:
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


def _collect(
    refs: dict[Any, Path], log: Callable[[str], None], job_timeout: float = JOB_TIMEOUT_S
) -> list[dict[str, Any]]:
    rows = []
    pending = list(refs)
    watch, hung = HangWatch({ref: (f, ref.task_id().hex()) for ref, f in refs.items()}, job_timeout), set()
    step = poll_step(job_timeout)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=step)
        for ref in watch.hung(pending):
            ray.cancel(ref, force=True)  # kills its worker process: the device and the lock are freed
            hung.add(ref)
        for ref in ready:
            try:
                row = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                row = result_row(read_spec(refs[ref]), "failed", error=error_line(e.cause or e))
            except ray.exceptions.RayError as e:  # crashed worker or lost node, after MAX_RETRIES retries
                error = (
                    HANG_ERROR.format(job_timeout)
                    if ref in hung
                    else f"{type(e).__name__}: {str(e).splitlines()[0]}"
                )
                row = result_row(read_spec(refs[ref]), "failed", error=error)
                record_failure(refs[ref], row["error"])
            log(row_line(row))
            rows.append(row)
    return rows
