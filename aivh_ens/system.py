"""The machine: cores, OpenCV and torch thread settings, free disk and shared memory, library versions.

Kept apart so the image cache, the loaders and the cv stage ask one place (and tests patch one place).
torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SHM_DIR = "/dev/shm"  # the tmpfs that torch's shared memory (the loaders' ring) lives in on Linux


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus(visible: str | None) -> list[str] | None:
    """A ``CUDA_VISIBLE_DEVICES`` value as its list of entries (indices, ``GPU-<uuid>``, ``MIG-...``); None
    when unset (every GPU is visible). CUDA reads the list up to its first empty or negative entry; so does
    this."""
    if visible is None:
        return None
    out = []
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        out.append(entry)
    return out


def physical_gpu(index: int, visible: str | None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` entry that a process whose own value is ``visible`` calls ``cuda:index``:
    ``visible="4,5"``, index 1 -> ``"5"``; unset -> ``str(index)``; None when the index is past the list."""
    entries = visible_gpus(visible)
    if entries is None:
        return str(index)
    return entries[index] if 0 <= index < len(entries) else None


def free_bytes(folder: Path) -> int:
    """Bytes free on the disk that holds ``folder`` (or its nearest existing parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
)
"""Filesystem types whose file locking SQLite cannot rely on (its own FAQ warns against them)."""


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem holding ``path`` (its longest mount point in ``/proc/mounts``), or None."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    target = str(Path(path).resolve())
    best = max(
        (m for m in mounts if len(m) == 2 and (target == m[0] or target.startswith(m[0].rstrip("/") + "/"))),
        key=lambda m: len(m[0]),
        default=None,
    )
    return best[1] if best else None


def shm_free() -> int | None:
    """Bytes free in :data:`SHM_DIR`, or None where there is none (not Linux)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def shm_total() -> int | None:
    """Bytes :data:`SHM_DIR` holds in all (a container's ``--shm-size``), or None where there is none."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return int(st.f_blocks) * int(st.f_frsize)


JOBS_AT_ONCE_ENV = "AIVH_ENS_JOBS_AT_ONCE"  # set by a sweep's local backend in each of its job processes


DEADLINE_ENV = "AIVH_ENS_DEADLINE"
"""Set by ``auto`` in its job processes: the wall time (``time.time()``) by which a fold's training must end."""


def seconds_to_deadline() -> float | None:
    """Seconds left before :data:`DEADLINE_ENV`'s wall time (negative past it); None when none is set."""
    try:
        return float(os.environ[DEADLINE_ENV]) - time.time()
    except (KeyError, ValueError):
        return None


def jobs_at_once() -> int:
    """How many training jobs run at once on this machine (they share its /dev/shm): 1 unless a sweep says."""
    try:
        return max(1, int(os.environ.get(JOBS_AT_ONCE_ENV, "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def cv2_threads(n: int) -> Iterator[None]:
    """OpenCV's own thread pool at ``n`` threads while the block runs (e.g. 1 while many decoding threads
    already use every core), restored afterwards."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def set_cv2_single_threaded() -> None:
    """OpenCV's pool at one thread for good, in a process about to fork loader workers.

    Forked workers inherit OpenCV's thread pool. Resizing it inside a child can deadlock on the parent's
    condition variables, and a pool per worker would oversubscribe the cores (its threads spin while
    waiting). So the pool is made single-threaded in the parent, before the workers fork; a process with
    workers only feeds the model, it does no image work of its own.
    """
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def set_torch_threads(n: int | None) -> None:
    """torch's CPU threads in this process (``--threads``); None leaves torch's default (one per core)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run's results depend on, recorded in its config.json."""
    import albumentations
    import numpy as np
    import pandas as pd
    import sklearn
    import timm
    import torch

    from aivh_ens import __version__

    return {
        "aivh_ens": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "sklearn": sklearn.__version__,
        "albumentations": albumentations.__version__,
    }


def busy_elsewhere(samples: int = 5, interval: float = 0.05) -> int | None:
    """Runnable tasks on this machine besides the caller, the least of a few instant samples of
    /proc/loadavg (not the load average, which still counts a process that finished a minute ago);
    None where that file does not exist."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, min(counts) - 1)  # the reading thread itself is running


def cpu_contention_note(device_name: str) -> str | None:
    """A hint when CPU training would run several torch threads on cores other processes already use.

    OpenMP threads wait for each other at every operator; when another process holds one of their cores,
    each step waits for the slowest. Measured on 2 cores: 2 threads trained at 91-159 img/s beside other
    work, against ~1,000 img/s with 1 thread in each of two processes (README, "CPU threads").
    """
    import torch

    from aivh_ens.train.loop import resolve_device

    if resolve_device(device_name).type != "cpu" or torch.get_num_threads() <= 1:
        return None
    others = busy_elsewhere()
    if not others:
        return None
    return (
        f"note: {others} other process(es) are running on the CPU and torch uses {torch.get_num_threads()} "
        "threads; with shared cores --threads 1 per process is often several times faster"
    )


def interrupt_main() -> None:
    """KeyboardInterrupt in the main thread, from any thread: a real SIGINT to it, which also wakes a blocking
    call there (a sleep, a wait); ``_thread.interrupt_main`` would leave that call to run its course."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
