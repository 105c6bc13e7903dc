"""One (run, fold) job of a sweep: its frozen ``job.json``, and :func:`run_job`, which any backend calls.

``runs/<run>/fold<k>/job.json`` holds the resolved config and its hash; the fold's ``done.json`` repeats the
hash, so a job whose ``done.json`` matches is skipped and re-running a sweep resumes it. While it runs the job
holds the fold's lock (host, PID, job id, heartbeat); ``started.json`` counts its attempts, ``failed.json``
keeps the one-line error of the last failed one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivh_ens import faults
from aivh_ens.config import RunConfig, from_dict, to_dict, training_identity
from aivh_ens.io import sha256_text, write_json
from aivh_ens.layout import fold_dir, run_dir
from aivh_ens.locks import HEARTBEAT_S, FileLock, LockHeld, LockLost, fenced, read_owner
from aivh_ens.system import interrupt_main

JOB = "job.json"
STARTED = "started.json"
FAILED = "failed.json"
GPU_FALLBACK_ENV = "AIVH_ENS_GPU_FALLBACK"  # "cpu": a task given GPUs it cannot see trains on the CPU


def config_hash(cfg: RunConfig, fold: int) -> str:
    """sha256 of what a job trains: the config's training identity (no device or workers) and the fold."""
    return sha256_text(json.dumps({"config": training_identity(cfg), "fold": fold}, sort_keys=True))


@dataclass(frozen=True)
class JobSpec:
    """A frozen (run, fold) job as ``job.json`` stores it."""

    run: str
    fold: int
    workdir: str  # absolute: the job may run in another process, on another host with the same mount
    config: dict[str, Any]
    config_hash: str
    fold_file: str  # relative to workdir
    exclude: tuple[int, ...] = ()  # rows of unreadable images (on_bad_image = skip)

    @property
    def fold_dir(self) -> Path:
        """``runs/<run>/fold<k>/``."""
        return fold_dir(self.workdir, self.run, self.fold)

    @property
    def path(self) -> Path:
        """The job's ``job.json``."""
        return self.fold_dir / JOB

    @property
    def cost(self) -> float:
        """A rough relative duration (epochs x pixels x backbones), to start the longest jobs first."""
        c = self.config
        return c["epochs"] * (c["img_size"] or 224) ** 2 * len(c["model"].split("+"))


def make_spec(cfg: RunConfig, fold: int, workdir: Path, fold_file: str, exclude: tuple[int, ...]) -> JobSpec:
    """The job of fold ``fold`` of a resolved run config (hashed, not yet written)."""
    return JobSpec(
        cfg.name, fold, str(workdir.resolve()), to_dict(cfg), config_hash(cfg, fold), fold_file, exclude
    )


def write_spec(spec: JobSpec) -> Path:
    """Write (atomically) the job's ``job.json``."""
    return write_json(spec.path, dataclasses.asdict(spec) | {"exclude": list(spec.exclude)})


def read_spec(path: str | Path) -> JobSpec:
    """The job a ``job.json`` describes."""
    d = json.loads(Path(path).read_text())
    return JobSpec(**{**d, "exclude": tuple(d.get("exclude", ()))})


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or unreadable."""
    try:
        d = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def done_matches(spec: JobSpec) -> dict[str, Any] | None:
    """The fold's done.json when it was written by this very job (same hash) and its OOF exists.

    A fold finished by a plain ``cv`` carries no hash; it counts as done, because the sweep has checked that
    the run's config.json describes the same training (or ``--force`` removed the fold).
    """
    done = read_json(spec.fold_dir / "done.json")
    if (
        done
        and done.get("job_hash", spec.config_hash) == spec.config_hash
        and (spec.fold_dir / "oof.csv").exists()
    ):
        return done
    return None


def result_row(spec: JobSpec, state: str, **extra: Any) -> dict[str, Any]:
    """A row of the end table: run, fold, state, host, minutes, best F1, error (and timings)."""
    row = {"run": spec.run, "fold": spec.fold, "state": state, "host": "", "minutes": None, "f1": None}
    return row | {"error": ""} | extra


def _done_row(spec: JobSpec, done: dict[str, Any], state: str = "done") -> dict[str, Any]:
    host = done.get("host", "")
    return result_row(spec, state, host=host, minutes=done.get("minutes"), f1=done.get("val_f1"))


def task_device(gpus: float) -> str:
    """The device of a Ray or Slurm task that asked for ``gpus`` GPUs: ``cuda``, or ``cpu`` when it asked for
    none. ``AIVH_ENS_GPU_FALLBACK=cpu`` lets a task train on the CPU all the same (a cluster's wiring tried
    out with logical GPUs, without the hardware).

    Raises:
        RuntimeError: it asked for GPUs and sees none (a driver or container problem): training on the CPU
            instead would take days and hold the GPU it was given.
    """
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if gpus > 0 and os.environ.get(GPU_FALLBACK_ENV) != "cpu":
        raise RuntimeError(
            f"this task was given {gpus:g} GPU(s) but sees none (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r} on {socket.gethostname()}); it refuses to train on the "
            "CPU: check the node's driver, or pass --gpus-per-task 0 to train on CPUs"
        )
    return "cpu"


def physical_device(device: str) -> str:
    """The device as the machine knows it: ``cuda:0`` in a process pinned to ``CUDA_VISIBLE_DEVICES=GPU-ab``
    is ``cuda:GPU-ab``; ``cpu`` stays ``cpu``."""
    from aivh_ens.system import physical_gpu

    if not device.startswith("cuda"):
        return device
    index = int(device.partition(":")[2] or 0)
    return f"cuda:{physical_gpu(index, os.environ.get('CUDA_VISIBLE_DEVICES'))}"


def _mark_started(spec: JobSpec, job_id: str | None, device: str) -> dict[str, Any]:
    prev = read_json(spec.fold_dir / STARTED) or {}
    rec = {
        "attempt": int(prev.get("attempt", 0)) + 1,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": job_id,
        "device": device,
        "physical_device": physical_device(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "time": time.time(),
    }
    write_json(spec.fold_dir / STARTED, rec)
    (spec.fold_dir / FAILED).unlink(missing_ok=True)
    return rec


JOB_TIMEOUT_S = 3600.0
"""Seconds without a single batch (loaded, trained or scored) before a job counts as hung, on any backend.
Progress is counted per batch, so a slow epoch never trips it; only a phase without batches (a model's first
download, ``torch.compile``) must fit in it."""


def lock_path(spec: JobSpec) -> Path:
    """The fold's lock file."""
    return run_dir(spec.workdir, spec.run) / f"fold{spec.fold}.lock"


def retry_attempt(lock: Path, job_id: str) -> int:
    """The attempt number of a job whose backend keeps its id across retries and never runs one id twice at
    once (a Ray task): one more than the attempt recorded in the fold lock ``lock`` (:func:`lock_path`) when
    this id holds it, else 0. The lock of an attempt whose worker died is then taken over at once, not after
    its heartbeat's grace period."""
    owner = read_owner(lock) or {}
    theirs = owner.get("attempt")
    return theirs + 1 if owner.get("job_id") == job_id and isinstance(theirs, int) else 0


def row_line(row: dict[str, Any]) -> str:
    """A finished job's log line: run, fold, state and its error if any."""
    return f"{row['run']} fold {row['fold']}: {row['state']}" + (f" - {row['error']}" if row["error"] else "")


def record_failure(job_file: Path, error: str, host: str = "") -> None:
    """``failed.json`` beside a job file, for a failure the job could not record itself (a killed worker, a
    cancelled task); ``host``: where it ran, when known."""
    write_json(Path(job_file).parent / FAILED, {"error": error, "host": host, "time": time.time()})


HANG_ERROR = "made no progress in {:g}s (--job-timeout) and was cancelled"
"""The failed row of a task a backend cancelled as hung (:class:`HangWatch`)."""


def poll_step(job_timeout: float) -> float:
    """How often a backend looks for hung jobs: a tenth of the timeout, between 0.05 and 5 s."""
    return max(0.05, min(5.0, job_timeout / 10))


def beat_for(job_timeout: float) -> float:
    """How often a task watched by :class:`HangWatch` beats: its progress is read at each beat, so a quarter of
    the timeout at most (the lock's own 30 s where the timeout is long)."""
    return min(HEARTBEAT_S, job_timeout / 4)


class HangWatch:
    """Which running tasks of a backend made no progress for ``job_timeout`` seconds. ``tasks``: key -> (job
    file, the backend's id of the task, which its fold lock records). The lock's heartbeat carries the job's
    progress counter (batches loaded, trained or scored); a counter that stands still that long (plus one
    heartbeat interval, the lag of what is read) is a hung job: a stuck CUDA call, a wedged loader, a D-state
    read."""

    def __init__(
        self,
        tasks: dict[Any, tuple[Path, str]],
        job_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.tasks = {k: (lock_path(read_spec(f)), task_id) for k, (f, task_id) in tasks.items()}
        self.job_timeout, self.clock = job_timeout, clock
        # key -> ((token, progress) last read, since when; None once named)
        self.seen: dict[Any, tuple[Any, float | None]] = {}

    def hung(self, pending: Iterable[Any]) -> list[Any]:
        """The pending tasks whose progress stood still for ``job_timeout`` (each named once)."""
        now, out = self.clock(), []
        for k in pending:
            lock, task_id = self.tasks[k]
            owner = read_owner(lock) or {}
            if owner.get("job_id") != task_id:
                self.seen.pop(k, None)  # not started yet (queued), or another sweep's job holds the fold
                continue
            key = (owner.get("token"), owner.get("progress"))
            last = self.seen.get(k)
            if last is None or last[0] != key:
                self.seen[k] = (key, now)
                continue
            lag = float(owner.get("heartbeat_s", 0))  # progress is read as of the last beat
            if last[1] is not None and now - last[1] >= self.job_timeout + lag:
                self.seen[k] = (key, None)
                out.append(k)
        return out


def preload_training() -> None:
    """Import the training code (seconds) in a Ray or Slurm task before it takes its fold lock, where
    :class:`HangWatch`'s clock starts: the imports are not a hang."""
    import aivh_ens.train.cv  # noqa: F401  (it imports train.fold and the data code)


def fold_lock(
    spec: JobSpec, job_id: str | None, attempt: int | None, heartbeat_s: float = HEARTBEAT_S
) -> FileLock:
    """The fold's lock; losing it (another process took it over) interrupts this job's training at once. Its
    heartbeats carry the job's progress every ``heartbeat_s`` seconds."""
    return FileLock(
        lock_path(spec),
        f"fold {spec.fold} of run {spec.run}",
        job_id=job_id,
        attempt=attempt,
        heartbeat_s=heartbeat_s,
        on_lost=interrupt_main,  # the new holder writes this fold's checkpoints from now on
    )


def run_job(
    job_file: str | Path,
    device: str = "auto",
    *,
    threads: int | None = None,
    job_id: str | None = None,
    attempt: int | None = None,
    submitted: float | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> dict[str, Any]:
    """Run one job (or skip it when done or running elsewhere); its row of the end table.

    Args:
        job_file: the job's ``job.json``.
        device: the torch device this worker is pinned to.
        threads: torch CPU threads for this process (1 where processes share the cores).
        job_id: the backend's id of this job (Slurm array task, Ray task), recorded in the lock.
        attempt: the backend's attempt number of this job (Slurm's restart count): a lock of an earlier
            attempt of the same job id is taken over.
        submitted: when the backend was handed the job (``time.time()``), to measure its start-up overhead.
        heartbeat_s: how often the fold lock's heartbeat publishes the job's progress (a backend that watches it
            for hung jobs asks for a fraction of its timeout).

    Raises:
        Exception: whatever the training raised, after writing ``failed.json`` (backends catch it).
    """
    t0 = time.time()
    spec = read_spec(job_file)
    done = done_matches(spec)
    if done is not None:
        return _done_row(spec, done, "skipped (done)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    lock = fold_lock(spec, job_id, attempt, heartbeat_s)
    try:
        with fenced(lock, spec.fold_dir):  # no checkpoint is written once the lock is lost
            done = done_matches(spec)  # finished by another sweep between our first look and the lock
            if done is not None:
                return _done_row(spec, done, "skipped (done)")
            started = _mark_started(spec, job_id, device)
            faults.point(f"job:{spec.run}:{spec.fold}")
            summary = _train(spec, device, started)
    except LockHeld as e:
        return result_row(spec, "running elsewhere", host=e.owner.get("host", ""), error=str(e).split(";")[0])
    except LockLost as e:
        owner = read_json(lock.path) or {}
        return result_row(spec, "running elsewhere", host=owner.get("host", ""), error=str(e))
    except BaseException as e:
        if isinstance(e, Exception):
            write_json(
                spec.fold_dir / FAILED,
                {"error": error_line(e), "host": socket.gethostname(), "time": time.time()},
            )
        raise
    row = _done_row(spec, summary)
    return row | {"queued_s": t0 - submitted if submitted else None, "attempt": started["attempt"]}


def error_line(e: BaseException) -> str:
    """The one line that says what went wrong: ``Type: message`` (first line of it)."""
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]


def _train(spec: JobSpec, device: str, started: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) the fold, then assemble the run's OOF if this was its last fold."""
    from aivh_ens.data.cache import open_source
    from aivh_ens.data.folds import read_fold_file
    from aivh_ens.train.cv import assemble_oof, job_table
    from aivh_ens.train.fold import FoldJob, fit_fold
    from aivh_ens.train.pseudo import training_table

    cfg = dataclasses.replace(from_dict(spec.config), device=device)
    workdir = Path(spec.workdir)
    table = read_fold_file(workdir / spec.fold_file)
    rows = training_table(cfg, workdir, table)  # + the run's frozen pseudo rows (fold -1)
    names = rows["file_name"].tolist()
    meta = {
        "job_hash": spec.config_hash,
        "host": started["host"],
        "pid": started["pid"],
        "job_id": started["job_id"],
        "device": device,
        "cuda_visible_devices": started["cuda_visible_devices"],
        "attempt": started["attempt"],
    }
    job = FoldJob(
        cfg, spec.fold, spec.fold_dir, Path(cfg.data), job_table(rows), frozenset(spec.exclude), meta
    )
    if cfg.head != "finetune":  # a probe fold: the run's feature store, then the fold's head
        from aivh_ens.train.probe import fit_probe_job

        groups = rows["group"].to_numpy() if "group" in rows.columns else None
        summary = fit_probe_job(job, workdir, groups, log=_log(spec))
    else:
        # the sweep's driver built the image cache; a job only reads it (or decodes on the fly)
        source = open_source(cfg, cfg.data, names, workdir, build=False, progress=False, log=_log(spec))
        summary = fit_fold(job, source, resume=True, progress=False, log=_log(spec))
    assemble_oof(workdir, cfg, table, set(spec.exclude), _log(spec))
    return summary


def _log(spec: JobSpec) -> Callable[[str], None]:
    def log(msg: str) -> None:
        """One line, prefixed with the job, on this process's stdout (the backend's log)."""
        print(f"[{spec.run} fold {spec.fold}] {msg.strip()}", flush=True)

    return log
