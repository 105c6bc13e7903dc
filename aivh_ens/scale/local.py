"""The local backend: one process per device, pinned to it and its share of the cores; a dying job fails alone.

A thread pool with one thread per device is the scheduler: each task takes a free device slot and sends
its job to that slot's process (spawned, pinned to the device and its cores, kept from job to job to save
torch's start-up). A job that dies outright (OOM killer, SIGKILL, a segfault) takes only its own process
down: it is reported ``failed`` with its signal or exit code, the slot starts a fresh process, and every other
job runs on. ``cuda:N`` means the N-th of the caller's visible GPUs (its
``CUDA_VISIBLE_DEVICES``, indices, UUIDs or MIG entries alike); the child sees only that one, as ``cuda:0``.

A job must show progress, not just presence: every batch it loads, trains or scores advances a counter in
shared memory (:func:`aivh_ens.progress.beats`), and a job whose counter stands still for ``job_timeout``
seconds (a stuck CUDA call, a wedged loader, a D-state read) is killed and reported ``failed`` with that
reason. A process whose job failed is replaced by a fresh one before the next job (a sticky CUDA error
would fail every later job on that device), and so is one that ran ``max_jobs_per_worker`` jobs. SIGTERM,
like Ctrl-C, stops every job (each releases its fold's lock), and the sweep still prints its table; a job
process whose parent dies stops its job and exits.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aivh_ens.errors import UserError
from aivh_ens.scale.backend import Backend, Log, interrupted_row, release_lock
from aivh_ens.scale.jobs import JOB_TIMEOUT_S, poll_step
from aivh_ens.system import interrupt_main

INTERRUPTED = 130  # a job process's exit code after Ctrl-C (128 + SIGINT): its job is pending, not failed


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
    at_once: int = 1  # jobs running at once on this machine (they share /dev/shm)


def make_slots(devices: Sequence[str], visible: str | None, cpus: Sequence[int]) -> list[Slot]:
    """One slot per device; the cores are shared out in equal, disjoint blocks (overlapping when scarce)."""
    n, cpus = len(devices), sorted(cpus)
    share = max(1, len(cpus) // n)
    slots = []
    for i, d in enumerate(devices):
        mine = cpus[i * share : (i + 1) * share] if len(cpus) >= n else [cpus[i % len(cpus)]]
        pin = physical_device(int(d[5:]), visible) if d.startswith("cuda:") else None
        slots.append(Slot(d, pin, tuple(mine), n))
    return slots


class LocalBackend(Backend):
    """The jobs (in the given order), one at a time per device, each device's in its own process.

    Each device's process gets that device's share of the cores (its torch threads and loader workers count
    those); ``threads`` overrides its torch threads. A job that raises is a failed row; a job whose process
    dies, or whose progress stands still for ``job_timeout`` seconds, is a failed row naming the cause, and the
    device gets a fresh process for its next job. ``max_jobs_per_worker`` (0: no limit) also gives a device a
    fresh process after that many jobs. ``admit`` (a job file -> start it now?) is asked when a device is free
    for the job; a job it refuses stays ``pending`` (``auto`` uses it to start no job that would end past its
    time limit). ``hooks``: see :class:`JobHooks`.
    """

    def __init__(
        self,
        devices: list[str],
        log: Log,
        threads: int | None = None,
        admit: Callable[[Path], bool] | None = None,
        job_timeout: float = JOB_TIMEOUT_S,
        hooks: JobHooks | None = None,
        max_jobs_per_worker: int = 0,
    ):
        super().__init__(log)
        self.devices, self.threads, self.admit, self.job_timeout = devices, threads, admit, job_timeout
        self.hooks, self.max_jobs = hooks or JobHooks(), max_jobs_per_worker
        self.workers: list[Worker] = []
        self.free: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        self.futures: list[Future] = []
        self.pool: ThreadPoolExecutor | None = None

    def open(self) -> None:
        slots = make_slots(self.devices, os.environ.get("CUDA_VISIBLE_DEVICES"), sorted(_affinity()))
        self.workers = [Worker(s, self.threads, self.job_timeout, self.hooks, self.max_jobs) for s in slots]
        for w in self.workers:
            self.free.put(w)

    def run(self, job_files: list[Path]) -> None:
        self.pool = ThreadPoolExecutor(len(self.workers))
        self.futures = [
            self.pool.submit(_run_on_free_worker, Path(f), self.free, self.admit) for f in job_files
        ]
        for fut in as_completed(self.futures):
            row = self.record(fut.result())
            if self.hooks.on_done is not None:
                self.hooks.on_done(row)
        self.pool.shutdown()

    def cancel(self, signalled: bool) -> None:
        """Stop the running jobs (each releases its lock; see :func:`stop_workers`); unstarted ones stay
        pending. The rows of the stopped jobs, and of those that ended meanwhile, are recorded."""
        for fut in self.futures:
            fut.cancel()
        stop_workers(self.workers, signalled=signalled)  # the jobs resume from their last epoch
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        seen = {id(r) for r in self.rows}
        ended = [f.result() for f in self.futures if f.done() and not f.cancelled() and f.exception() is None]
        for row in ended:
            if id(row) not in seen:
                self.record(row)

    def close(self) -> None:
        for w in self.workers:
            w.close()


@dataclass(frozen=True)
class JobHooks:
    """What a caller of the local backend adds to its jobs (``auto`` uses all three).

    Attributes:
        on_done: called in the caller's thread with each finished job's row, while the other devices train on.
        env: environment variables set in every job process before its first import (e.g. a deadline).
        output: a file that the job processes' stdout and stderr are appended to, instead of the terminal.
    """

    on_done: Callable[[dict[str, Any]], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    output: Path | None = None


def _affinity() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _run_on_free_worker(
    job_file: Path, free: queue.SimpleQueue, admit: Callable[[Path], bool] | None = None
) -> dict[str, Any]:
    worker = free.get()
    try:
        if admit is not None and not admit(job_file):
            from aivh_ens.scale.jobs import read_spec, result_row

            return result_row(
                read_spec(job_file), "pending", error="not started: it would not fit the time left"
            )
        return worker.run(job_file)
    finally:
        free.put(worker)


class Worker:
    """The process of one slot: started on its first job, it runs jobs sent over a pipe, one at a time, and is
    replaced by a fresh one when it dies, hangs or fails a job, or has run ``max_jobs`` jobs (0: no limit)."""

    def __init__(
        self,
        slot: Slot,
        threads: int | None,
        job_timeout: float = JOB_TIMEOUT_S,
        hooks: JobHooks | None = None,
        max_jobs: int = 0,
    ):
        self.slot, self.threads, self.job_timeout = slot, threads, job_timeout
        self.hooks, self.max_jobs = hooks or JobHooks(), max_jobs
        self.jobs_run = 0  # by the current process
        self.proc: Any = None
        self.conn: Any = None
        self.beats: Any = None  # the process's progress counter, in shared memory
        self.job: Path | None = None  # the job file it was last sent
        self.stopped = False

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # no inherited CUDA or thread state
        if self.conn is not None:
            self.conn.close()  # the pipe of a process that died or hung
        self.conn, child = ctx.Pipe()
        self.beats = ctx.RawValue("q", 0)
        self.proc = ctx.Process(
            target=serve_jobs,
            args=(child, self.slot, self.threads, self.beats, os.getpid(), self.hooks.env, self.hooks.output),
            name=self.slot.device,
        )
        self.proc.start()
        child.close()
        self.jobs_run = 0

    def run(self, job_file: Path) -> dict[str, Any]:
        """The job's row; ``failed`` with the cause when the process died or hung running it."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        outcome = "died"
        self.job = job_file
        try:
            self.conn.send((str(job_file), time.time()))
            outcome = self._wait()
            if outcome == "reply":
                row = self.conn.recv()
                self.jobs_run += 1
                if row["state"] == "failed" or self.jobs_run == self.max_jobs:
                    self.close()  # a fresh process for the next job: a sticky CUDA error stays behind
                return row
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass
        if outcome == "hung":
            self.proc.kill()
        self.proc.join()
        if self.stopped or self.proc.exitcode == INTERRUPTED:
            return interrupted_row(job_file)
        if outcome == "hung":
            cause = f"made no progress in {self.job_timeout:g}s (--job-timeout) and was killed"
            return failed_row(job_file, cause, -signal.SIGKILL)
        return died_row(job_file, self.proc.exitcode)

    def _wait(self) -> str:
        """Wait for the job's reply (``reply``), its process's death (``died``), or ``job_timeout`` seconds
        in which its progress counter did not move (``hung``)."""
        last, since = self.beats.value, time.monotonic()
        step = poll_step(self.job_timeout)
        while True:
            ready = mp_connection.wait([self.conn, self.proc.sentinel], timeout=step)
            if self.conn in ready:
                return "reply"
            if ready:
                return "died"
            if self.beats.value != last:
                last, since = self.beats.value, time.monotonic()
            elif time.monotonic() - since >= self.job_timeout:
                return "hung"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def close(self) -> None:
        """Ask the process to exit after its job and wait for it."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc = self.conn = None


def stop_workers(workers: list[Worker], grace_s: float = 5.0, signalled: bool = False) -> None:
    """Stop the running jobs (their rows say pending, not failed), letting each release its fold's lock.

    A Ctrl-C reached them too; any still running after ``grace_s`` get a SIGINT of their own (at once when
    the sweep was ``signalled`` with SIGTERM, which reached only this process), then SIGKILL.
    """
    for w in workers:
        w.stopped = True
    actions = (signal.SIGINT, signal.SIGKILL) if signalled else (None, signal.SIGINT, signal.SIGKILL)
    for action in actions:
        live = [w for w in workers if w.alive()]
        for w in live:
            if action is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, action)
        deadline = time.monotonic() + grace_s
        for w in live:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.job is not None and w.proc is not None and w.proc.exitcode == -signal.SIGKILL:
            release_lock(w.job, w.proc.pid)  # it could not release its own


def died_row(job_file: Path, exitcode: int | None) -> dict[str, Any]:
    """The row (and ``failed.json``) of a job whose process died: its signal or exit code."""
    rc = -1 if exitcode is None else exitcode
    return failed_row(job_file, exit_cause(rc), rc)


def failed_row(job_file: Path, cause: str, rc: int) -> dict[str, Any]:
    """The row (and ``failed.json``) of a job whose process ``cause`` (died, hung): resumable."""
    error = f"the job's process {cause}; run the sweep again to resume it from its last epoch"
    return Backend.fail(job_file, error, host=socket.gethostname(), exit_code=rc)


def exit_cause(rc: int) -> str:
    """``was killed by SIGKILL (...)`` or ``exited with code 3``, from a process's exit code."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (out of memory? the OOM killer sends it)" if -rc == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {rc}"


def serve_jobs(
    conn: Any,
    slot: Slot,
    threads: int | None,
    beats: Any = None,
    parent: int | None = None,
    env: dict[str, str] | None = None,
    output: Path | None = None,
) -> None:
    """The slot's process: pin to its GPU and cores (before torch is imported), then run jobs until told.

    ``beats``: the shared counter this process's progress goes to; ``parent``: the sweep's PID, whose death
    stops the job here (its lock released) and ends this process. ``env`` and ``output``: a caller's
    :class:`JobHooks` (what a spawned process can be sent).
    """
    os.environ.update(env or {})
    if output is not None:  # the descriptors themselves, so native libraries' output goes there too
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if slot.visible is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        device = "cpu"
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.visible
        device = "cuda:0"
    if slot.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, slot.cpus)  # torch's thread pool and the loader workers count these
    from aivh_ens import progress
    from aivh_ens.system import JOBS_AT_ONCE_ENV

    if beats is not None:
        progress.count_into(beats)
    if parent is not None:
        die_with(parent)
    signal.signal(signal.SIGTERM, _interrupt)  # a Slurm or container stop: end the job as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (nohup)
    os.environ[JOBS_AT_ONCE_ENV] = str(slot.at_once)  # the loader sizes its /dev/shm ring to its share
    from aivh_ens.scale.jobs import error_line, read_spec, result_row, run_job

    threads = threads or max(1, len(slot.cpus))
    try:
        while (msg := conn.recv()) is not None:
            job_file, submitted = msg
            progress.beat()
            job_id = f"local-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
            try:
                row = run_job(job_file, device, threads=threads, job_id=job_id, submitted=submitted)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                row = result_row(read_spec(job_file), "failed", error=error_line(e))
            conn.send(row)
    except (KeyboardInterrupt, EOFError):  # Ctrl-C, SIGTERM or the sweep gone: the job is being stopped
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)  # the lock is released; don't wait for the loader's feeding threads


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def die_with(parent: int, grace_s: float = 10.0, poll_s: float = 1.0) -> threading.Thread:
    """Stop this process's work when process ``parent`` dies (it is re-parented): interrupt the main thread
    (a job releases its lock), and exit after ``grace_s`` whatever it is doing. Unlike ``PR_SET_PDEATHSIG``,
    this follows the parent process, not the thread of it that started this one."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        interrupt_main()
        time.sleep(grace_s)
        os._exit(INTERRUPTED)

    t = threading.Thread(target=watch, name="die-with-parent", daemon=True)
    t.start()
    return t
