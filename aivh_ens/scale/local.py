"""The local backend: one child process per job, pinned to its device and its share of the cores.

A thread pool with one thread per device is the scheduler: each thread takes a device slot, starts
``python -m aivh_ens.scale.local JOB`` for the next job and waits for it. A job that dies outright (OOM
killer, SIGKILL, a segfault) takes only its own process down: it is reported ``failed`` with its signal or
exit code, and every other job runs on. ``cuda:N`` means the N-th of the caller's visible GPUs (its
``CUDA_VISIBLE_DEVICES``, indices, UUIDs or MIG entries alike); the child sees only that one, as ``cuda:0``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivh_ens.errors import UserError

Log = Callable[[str], None]


def physical_device(index: int, visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry (physical index, ``GPU-<uuid>`` or ``MIG-...``) of ``cuda:index`` in
    a process whose own ``CUDA_VISIBLE_DEVICES`` is ``visible``.

    Raises:
        UserError: ``index`` is past the visible list.
    """
    from aivh_ens.system import physical_gpu, visible_gpus

    entry = physical_gpu(index, visible)
    if entry is None:
        n = len(visible_gpus(visible) or [])
        valid = f"cuda:0..cuda:{n - 1}" if n else "cpu only"
        raise UserError(
            f"--devices cuda:{index}: CUDA_VISIBLE_DEVICES={visible!r} shows {n} GPU(s) here, so --devices "
            f"takes {valid}"
        )
    return entry


def parse_devices(devices: str | None, gpus: int | None, visible: str | None = None) -> list[str]:
    """``--devices cuda:0,cuda:1`` / ``--gpus N`` -> device names; default: every visible GPU, else the CPU.

    ``cuda:N`` counts the caller's visible GPUs (``visible``: its ``CUDA_VISIBLE_DEVICES``, default this
    process's), as torch does.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if devices:
        out = [d.strip() for d in devices.split(",") if d.strip()]
        bad = [d for d in out if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit())]
        if bad or not out:
            raise UserError(
                f"--devices takes cpu or cuda:N, comma-separated, e.g. cuda:0,cuda:1 (got {devices!r})"
            )
        for d in out:
            if d != "cpu":
                physical_device(int(d[5:]), visible)  # checks the index
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


@dataclass(frozen=True)
class Slot:
    """One device of the local backend: the child's device name, its CUDA_VISIBLE_DEVICES and its cores."""

    device: str  # as given: cpu or cuda:N (N counts the caller's visible GPUs)
    visible: str | None  # the child's CUDA_VISIBLE_DEVICES (one physical entry), None for the CPU
    cpus: tuple[int, ...]  # the cores the child may run on


def make_slots(devices: Sequence[str], visible: str | None, cpus: Sequence[int]) -> list[Slot]:
    """One slot per device; the cores are shared out in equal, disjoint blocks (overlapping when scarce)."""
    n, cpus = len(devices), sorted(cpus)
    share = max(1, len(cpus) // n)
    slots = []
    for i, d in enumerate(devices):
        mine = cpus[i * share : (i + 1) * share] if len(cpus) >= n else [cpus[i % len(cpus)]]
        pin = physical_device(int(d[5:]), visible) if d.startswith("cuda:") else None
        slots.append(Slot(d, pin, tuple(mine)))
    return slots


def run_local(
    job_files: list[Path], devices: list[str], log: Log, threads: int | None = None
) -> list[dict[str, Any]]:
    """Run the jobs (in the given order), one at a time per device, each in its own process; their rows.

    Each job gets its device's share of the cores (its torch threads and loader workers count those);
    ``threads`` overrides its torch threads. A job that raises or dies is a failed row; the others go on.
    """
    slots = make_slots(devices, os.environ.get("CUDA_VISIBLE_DEVICES"), sorted(_affinity()))
    free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
    for s in slots:
        free.put(s)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aivh-sweep-") as tmp, ThreadPoolExecutor(len(slots)) as pool:
        futures = [pool.submit(_run_in_slot, Path(f), free, threads, Path(tmp)) for f in job_files]
        try:
            for fut in as_completed(futures):
                row = fut.result()
                log(
                    f"{row['run']} fold {row['fold']}: {row['state']}{' - ' + row['error'] if row['error'] else ''}"
                )
                rows.append(row)
        except BaseException:
            for fut in futures:
                fut.cancel()
            _stop_children()
            raise
    return rows


def _affinity() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()


def _stop_children() -> None:
    """On Ctrl-C or an error here: stop the running jobs (they resume from their last epoch next time)."""
    with _children_lock:
        for p in _children:
            p.terminate()


def _run_in_slot(job_file: Path, free: queue.SimpleQueue, threads: int | None, tmp: Path) -> dict[str, Any]:
    slot = free.get()
    try:
        return run_child(job_file, slot, threads, tmp)
    finally:
        free.put(slot)


def run_child(job_file: Path, slot: Slot, threads: int | None, tmp: Path) -> dict[str, Any]:
    """Run one job in a child process on ``slot``; its row (``failed`` with the cause if the child died)."""
    from aivh_ens.io import write_json
    from aivh_ens.scale.jobs import FAILED, read_spec, result_row

    out = tmp / f"{job_file.parent.parent.name}-{job_file.parent.name}.json"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if slot.visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.visible
    cmd = [sys.executable, "-m", "aivh_ens.scale.local", str(job_file), "--device", slot.device]
    cmd += ["--cpus", ",".join(map(str, slot.cpus)), "--result", str(out), "--submitted", str(time.time())]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, env=env)
    with _children_lock:
        _children.add(proc)
    try:
        rc = proc.wait()
    finally:
        with _children_lock:
            _children.discard(proc)
    try:
        return json.loads(out.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    error = f"the job's process {exit_cause(rc)}; run the sweep again to resume it from its last epoch"
    spec = read_spec(job_file)
    write_json(spec.fold_dir / FAILED, {"error": error, "host": socket.gethostname(), "time": time.time()})
    return result_row(spec, "failed", error=error, exit_code=rc)


def exit_cause(rc: int) -> str:
    """``was killed by SIGKILL (out of memory?)`` or ``exited with code 3``, from a Popen return code."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (out of memory? the OOM killer sends it)" if -rc == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {rc}"


def child_main(argv: Sequence[str] | None = None) -> int:
    """The job process: pin to its cores, run the job, write its row to ``--result``."""
    p = argparse.ArgumentParser(prog="python -m aivh_ens.scale.local")
    p.add_argument("job_file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpus", default="")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--result", required=True)
    p.add_argument("--submitted", type=float, default=None)
    a = p.parse_args(argv)
    cpus = {int(c) for c in a.cpus.split(",") if c}
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # before torch: its thread pool and the loader workers count these
    from aivh_ens.io import write_json
    from aivh_ens.scale.jobs import error_line, read_spec, result_row, run_job

    device = "cuda:0" if a.device.startswith("cuda") else a.device
    job_id = f"local-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    try:
        row = run_job(
            a.job_file, device, threads=a.threads or max(1, len(cpus)), job_id=job_id, submitted=a.submitted
        )
    except Exception as e:
        write_json(Path(a.result), result_row(read_spec(a.job_file), "failed", error=error_line(e)))
        return 1
    write_json(Path(a.result), row)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
