"""The local backend: a process pool with one worker per device, each pinned to its device for life.

Worker processes are started with ``spawn`` (no inherited CUDA or thread state); each takes one device token
from a queue in its initializer, so two workers never share a GPU. ``cuda:N`` is pinned through
``CUDA_VISIBLE_DEVICES`` before torch is imported, and the job sees it as ``cuda:0``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from aivh_ens.scale.jobs import error_line, read_spec, result_row, run_job

_DEVICE = "cpu"  # this worker's device, set once by _pin
_THREADS: int | None = None


def parse_devices(devices: str | None, gpus: int | None) -> list[str]:
    """``--devices cuda:0,cuda:1`` / ``--gpus N`` -> device names; default: every visible GPU, else the CPU."""
    from aivh_ens.errors import UserError

    if devices:
        out = [d.strip() for d in devices.split(",") if d.strip()]
        bad = [d for d in out if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit())]
        if bad or not out:
            raise UserError(
                f"--devices takes cpu or cuda:N, comma-separated, e.g. cuda:0,cuda:1 (got {devices!r})"
            )
        return out
    import torch

    n = torch.cuda.device_count()
    if gpus is not None:
        if gpus < 1 or gpus > n:
            raise UserError(
                f"--gpus {gpus}: {n} CUDA device(s) are visible here; use --gpus 1..{n} or --devices cpu"
            )
        return [f"cuda:{i}" for i in range(gpus)]
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def _pin(tokens: Any, threads: int | None, at_once: int = 1) -> None:
    """Pool initializer: take this worker's device for the rest of its life; say how many jobs run at once
    (they share /dev/shm, see :func:`aivh_ens.data.loader.ring_prefetch`)."""
    global _DEVICE, _THREADS
    from aivh_ens.system import JOBS_AT_ONCE_ENV

    os.environ[JOBS_AT_ONCE_ENV] = str(at_once)
    device = tokens.get(timeout=60)
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        device = "cuda:0"
    _DEVICE, _THREADS = device, threads


def _run(job_file: str, submitted: float) -> dict[str, Any]:
    return run_job(job_file, _DEVICE, threads=_THREADS, job_id=f"local-{os.getpid()}", submitted=submitted)


def run_local(
    job_files: list[Path], devices: list[str], log: Callable[[str], None], threads: int | None = None
) -> list[dict[str, Any]]:
    """Run the jobs (in the given order), one at a time per device; their end-table rows.

    A job that raises is a failed row; the others go on. A worker killed outright (OOM killer, SIGKILL)
    breaks the pool: the jobs it had not started are left pending, and running the sweep again resumes.
    """
    if threads is None and all(d == "cpu" for d in devices):
        from aivh_ens.system import cores

        threads = max(1, cores() // len(devices))
    ctx = mp.get_context("spawn")
    tokens = ctx.Queue()
    for d in devices:
        tokens.put(d)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(
        len(devices), mp_context=ctx, initializer=_pin, initargs=(tokens, threads, len(devices))
    ) as pool:
        futures = {pool.submit(_run, str(f), time.time()): f for f in job_files}
        for fut in as_completed(futures):
            rows.append(_row(fut, futures[fut], log))
    return rows


def _row(fut: Any, job_file: Path, log: Callable[[str], None]) -> dict[str, Any]:
    spec = read_spec(job_file)
    try:
        row = fut.result()
    except BrokenProcessPool:
        row = result_row(
            spec, "pending", error="a worker process died (killed?); run the sweep again to resume"
        )
    except Exception as e:
        row = result_row(spec, "failed", error=error_line(e))
    log(f"{row['run']} fold {row['fold']}: {row['state']}{' - ' + row['error'] if row['error'] else ''}")
    return row
