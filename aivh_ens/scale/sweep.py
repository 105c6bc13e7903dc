"""``run_sweep``: check every input, expand the plan into frozen jobs, hand the pending ones to a backend.

Named steps: :func:`check_plan` (every input, the full decode of every image included; nothing written) ->
:func:`expand` (jobs and their state, in memory; ``--dry-run`` stops here) -> :func:`prepare` (fold files,
``config.json``, ``job.json``, image caches) -> the backend -> :func:`finish` (OOF files, the end table).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from aivh_ens.config import RunConfig, config_change
from aivh_ens.errors import UserError
from aivh_ens.layout import config_path, fold_dir, read_run_config
from aivh_ens.scale.jobs import JobSpec, done_matches, make_spec, result_row, write_spec
from aivh_ens.scale.plan import Plan

Log = Callable[[str], None]
BACKENDS = ("local", "ray", "slurm")
DECODE_S_PER_IMAGE = 0.001
"""Seconds to decode one image when none was measured (32 px JPEGs; a 1024 px JPEG takes 10-40 ms)."""
DONE_STATES = ("done", "skipped (done)")


@dataclass(frozen=True)
class SlurmOptions:
    """What ``--backend slurm`` asks submitit for (per array task)."""

    partition: str | None = None
    timeout_min: float = 24 * 60
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem_gb: int | None = None
    parallelism: int = 64
    cluster: str = "slurm"  # submitit's "local"/"debug" executors run the same jobs without Slurm (tests)


@dataclass(frozen=True)
class RayOptions:
    """What ``--backend ray`` asks for per task (None: see :class:`aivh_ens.scale.ray.RayBackend`)."""

    gpus_per_task: float | None = None
    cpus_per_task: int | None = None


EXTRAS = {"ray": ("ray", "ray"), "slurm": ("submitit", "slurm")}  # backend -> (module, extra)


def check_extra(backend: str) -> None:
    """UserError naming the pip command when the backend's optional dependency is missing."""
    import importlib.util

    if backend in EXTRAS:
        module, extra = EXTRAS[backend]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"--backend {backend} needs {module}, which is not installed: pip install 'aivh-ens[{extra}]'"
            )


@dataclass(frozen=True)
class SweepResult:
    """One row per job (run, fold, state, host, minutes, f1, error); ``failed`` counts the failed jobs."""

    rows: tuple[dict[str, Any], ...]
    oof: dict[str, Path | None] = field(default_factory=dict)
    interrupted: bool = False  # SIGINT or SIGTERM stopped the jobs (they resume on the next run)

    @property
    def failed(self) -> int:
        """How many jobs failed."""
        return sum(r["state"] == "failed" for r in self.rows)

    @property
    def unfinished(self) -> int:
        """How many jobs are not done: failed, pending, or running elsewhere (the sweep then exits 1)."""
        return sum(r["state"] not in DONE_STATES for r in self.rows)


@dataclass(frozen=True)
class _Checked:
    cfg: RunConfig
    table: pd.DataFrame
    bad: dict[int, str]
    pseudo: Any = None  # the run's checked pseudo-label source (train.pseudo.PseudoSource), if any


def expected_prepare_seconds(n_images: int, decode_s: float | None = None, sizes: int = 1) -> float:
    """Seconds a sweep spends on its images before the first job: the full decode check, then each image
    cache (``sizes`` of them) decoding every image again; an upper bound, since later sweeps reuse both.
    ``decode_s``: seconds to decode one image on this machine (default :data:`DECODE_S_PER_IMAGE`)."""
    return (1 + sizes) * (DECODE_S_PER_IMAGE if decode_s is None else decode_s) * n_images


def check_plan(plan: Plan, workdir: Path, force: bool, check_device: str) -> list[_Checked]:
    """Every input of every run, before anything is written: models, weights, shared memory, tables, a full
    decode of every image (once per dataset), and no existing run whose config the plan changes."""
    from aivh_ens.train.cv import check_run_inputs, load_checked_table
    from aivh_ens.train.pseudo import resolve_pseudo

    tables: dict[tuple, tuple[pd.DataFrame, dict[int, str]]] = {}
    out = []
    for cfg in plan.runs:
        where = f"{plan.source}: run {cfg.name}"
        try:
            cfg, pseudo = resolve_pseudo(cfg, workdir)  # its sha256 joins the run's identity and job hashes
            check_run_inputs(dataclasses.replace(cfg, device=check_device))
            key = (cfg.data, cfg.train_csv, cfg.file_col, cfg.label_col, cfg.group, cfg.on_bad_image)
            if key not in tables:
                tables[key] = load_checked_table(cfg, workdir)  # reuses earlier decode verdicts
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not force:
            _check_unchanged(cfg, workdir, where)
        out.append(_Checked(cfg, *tables[key], pseudo))
    return out


def _check_unchanged(cfg: RunConfig, workdir: Path, where: str) -> None:
    if not config_path(workdir, cfg.name).exists():
        return
    old, _ = read_run_config(workdir, cfg.name)
    change = config_change(old, cfg)
    if change:
        raise UserError(f"{where}: {change}; give the run a new name, or pass --force to retrain it")


def expand(checked: list[_Checked], workdir: Path, order: str = "cost") -> list[tuple[JobSpec, str]]:
    """Every (run, fold) job with its state (``done`` when its done.json matches its hash): longest first
    (``order="cost"``), or run by run in the plan's order (``"plan"``: the caller ranked its runs)."""
    from aivh_ens.data.folds import fold_file_name
    from aivh_ens.layout import FOLDS

    jobs = []
    for c in checked:
        fold_file = str(Path(FOLDS) / fold_file_name(c.cfg.folds, c.cfg.seed, c.cfg.group))
        for k in range(c.cfg.folds):
            spec = make_spec(c.cfg, k, workdir, fold_file, tuple(sorted(c.bad)))
            jobs.append((spec, "done" if done_matches(spec) else "pending"))
    if order == "plan":
        return jobs
    return sorted(jobs, key=lambda j: -j[0].cost)  # stable: plan order among equal costs


def prepare(
    checked: list[_Checked], jobs: list[tuple[JobSpec, str]], workdir: Path, force: bool, log: Log
) -> None:
    """Write fold files, config.json, skipped.csv and every pending job.json; build the image caches."""
    from aivh_ens.data.cache import open_source
    from aivh_ens.train.cv import prepare_run
    from aivh_ens.train.pseudo import training_table

    tables = []
    with contextlib.ExitStack() as held:  # --force: every fold of every run locked before any is deleted
        for c in checked:
            held.enter_context(fold_locks(c.cfg, workdir, force))
        for c in checked:
            folds = list(range(c.cfg.folds))
            tables.append(prepare_run(c.cfg, workdir, c.table, c.bad, folds, force, log, c.pseudo))
    for c, table in zip(checked, tables, strict=True):
        names = training_table(c.cfg, workdir, table)["file_name"].tolist()  # the images the jobs read
        open_source(c.cfg, c.cfg.data, names, workdir, progress=False, log=log)
    for spec, state in jobs:
        if state == "pending":
            write_spec(spec)


@contextlib.contextmanager
def fold_locks(cfg: RunConfig, workdir: Path, take: bool) -> Iterator[None]:
    """Hold every fold lock of a run (``--force`` deletes its folds only under them; no job trains meanwhile).

    Raises:
        UserError: a fold is running (its lock is live), naming the holder; nothing is deleted.
    """
    from aivh_ens.layout import run_dir
    from aivh_ens.locks import FileLock, LockHeld

    with contextlib.ExitStack() as stack:
        if take:
            for k in range(cfg.folds):
                lock = FileLock(run_dir(workdir, cfg.name) / f"fold{k}.lock", f"fold {k} of run {cfg.name}")
                try:
                    stack.enter_context(lock)
                except LockHeld as e:
                    raise UserError(
                        f"--force: {str(e).split(';')[0]}; stop it first, or run without --force"
                    ) from None
        yield


def run_sweep(
    plan: Plan,
    workdir: str | Path = ".",
    *,
    backend: str = "local",
    devices: str | None = None,
    gpus: int | None = None,
    threads: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    ray_address: str | None = None,
    slurm: SlurmOptions | None = None,
    ray: RayOptions | None = None,
    admit: Callable[[Path], bool] | None = None,
    job_timeout: float | None = None,
    hooks: Any = None,
    order: str = "cost",
    max_jobs_per_worker: int = 0,
    log: Log = print,
) -> SweepResult:
    """Train every fold of every run in the plan on the chosen backend; skip jobs already done.

    Args:
        plan: the runs (:func:`aivh_ens.scale.plan.load_plan`).
        workdir: the project folder (``--workdir``); for ray and slurm it must be on shared storage.
        backend: ``local`` | ``ray`` | ``slurm`` (``--backend``).
        devices, gpus: local devices (``--devices cuda:0,cuda:1`` or ``--gpus N``; default every GPU, else CPU).
        threads: torch threads per job (``--threads``; local CPU default: the cores shared out).
        dry_run: return the job table, write nothing (``--dry-run``).
        force: retrain runs whose config changed, and every fold of the plan's runs (``--force``).
        ray_address: an existing Ray cluster (``--ray-address``); None starts a private local one.
        slurm: submitit settings for ``--backend slurm``.
        ray: GPUs and CPUs per task for ``--backend ray``.
        admit: local backend: asked with a job's ``job.json`` when a device is free for it; a job it refuses
            stays pending (``aivh-ens auto``'s clock). Other backends hand every job over at once.
        job_timeout: seconds a job may go without progress (a batch) before it is killed as
            hung (``--job-timeout``; default :data:`aivh_ens.scale.jobs.JOB_TIMEOUT_S`).
        hooks: local backend: :class:`aivh_ens.scale.local.JobHooks` (a finished job's callback, the job
            processes' environment and output file).
        order: ``cost`` (longest jobs first) or ``plan`` (the plan's runs in their order, fold by fold).
        max_jobs_per_worker: local and ray: a worker process is replaced by a fresh one after this many jobs
            (``--max-jobs-per-worker``; 0: never, only after a failed job). Slurm runs each job in its own task.

    Raises:
        UserError: a bad plan or input, or a missing extra, before anything is written or decoded.
    """
    _check_arguments(backend, admit is not None or hooks is not None, order, max_jobs_per_worker)
    workdir = Path(workdir)
    device_list = _local_devices(backend, devices, gpus)
    checked = check_plan(plan, workdir, force, device_list[0] if device_list else "cpu")
    jobs = expand(checked, workdir, order)
    if force:
        jobs = [(spec, "pending") for spec, _ in jobs]
    if dry_run:
        return SweepResult(tuple(result_row(s, st, cost=s.cost) for s, st in jobs))
    prepare(checked, jobs, workdir, force, log)
    pending = [s.path for s, st in jobs if st == "pending"]
    log(f"sweep: {len(jobs)} jobs, {len(pending)} to run, backend {backend}")
    engine = (ray_address, ray or RayOptions()) if backend == "ray" else slurm
    from aivh_ens.scale.backend import SweepInterrupted, run_jobs
    from aivh_ens.scale.jobs import JOB_TIMEOUT_S

    runner = _backend(backend, workdir, device_list, threads, engine, log, admit,
                      job_timeout or JOB_TIMEOUT_S, hooks, max_jobs_per_worker)  # fmt: skip
    try:
        rows = run_jobs(runner, pending) if pending else []
    except SweepInterrupted as stop:  # every job stopped and its lock released: still print the table
        log("sweep: interrupted; the stopped jobs resume on the next run")
        return dataclasses.replace(finish(checked, jobs, stop.rows, workdir, log), interrupted=True)
    return finish(checked, jobs, rows, workdir, log)


def _check_arguments(backend: str, local_only: bool, order: str, max_jobs_per_worker: int = 0) -> None:
    """The backend is known and its extra installed; ``admit``/``hooks`` (``local_only``) only on local;
    ``max_jobs_per_worker`` not on slurm, whose tasks are a process each."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if local_only and backend != "local":
        raise ValueError(f"admit= and hooks= are for the local backend, not {backend}")
    if max_jobs_per_worker < 0 or (max_jobs_per_worker and backend == "slurm"):
        raise ValueError(f"max_jobs_per_worker= is 0 or more, for local or ray (got {max_jobs_per_worker})")
    if order not in ("cost", "plan"):
        raise ValueError(f"order= is 'cost' or 'plan', not {order!r}")
    check_extra(backend)


def _local_devices(backend: str, devices: str | None, gpus: int | None) -> list[str]:
    from aivh_ens.scale.local import parse_devices

    if backend != "local":
        if devices:
            raise UserError(f"--devices is for --backend local; {backend} assigns GPUs itself (use --gpus)")
        return []
    return parse_devices(devices, gpus)


def _backend(
    backend: str,
    workdir: Path,
    devices: list[str],
    threads: int | None,
    engine: Any,
    log: Log,
    admit: Callable[[Path], bool] | None,
    job_timeout: float,
    hooks: Any,
    max_jobs_per_worker: int,
) -> Any:
    """The :class:`aivh_ens.scale.backend.Backend` that runs the sweep's jobs."""
    if backend == "local":
        from aivh_ens.scale.local import LocalBackend

        return LocalBackend(devices, log, threads, admit, job_timeout, hooks, max_jobs_per_worker)
    if backend == "ray":
        from aivh_ens.scale.ray import RayBackend

        address, opts = engine
        return RayBackend(
            workdir, address, log, threads, opts.gpus_per_task, opts.cpus_per_task, job_timeout,
            max_jobs_per_worker,
        )  # fmt: skip
    from aivh_ens.scale.slurm import SlurmBackend

    return SlurmBackend(workdir, engine or SlurmOptions(), log, job_timeout)


def finish(
    checked: list[_Checked],
    jobs: list[tuple[JobSpec, str]],
    rows: list[dict[str, Any]],
    workdir: Path,
    log: Log,
) -> SweepResult:
    """Assemble any OOF file not yet written (a job normally does it); one row per job in plan order."""
    from aivh_ens.scale.jobs import read_json
    from aivh_ens.train.cv import assemble_oof

    by_job = {(r["run"], r["fold"]): r for r in rows}
    order = [c.cfg.name for c in checked]
    out = []
    for spec, state in sorted(jobs, key=lambda j: (order.index(j[0].run), j[0].fold)):
        row = by_job.get((spec.run, spec.fold))
        if row is None:
            done = read_json(fold_dir(workdir, spec.run, spec.fold) / "done.json") or {}
            row = result_row(
                spec, state, host=done.get("host", ""), minutes=done.get("minutes"), f1=done.get("val_f1")
            )
        out.append(row)
    from aivh_ens.data.folds import read_fold_file

    oof = {}
    for c in checked:
        spec = next(s for s, _ in jobs if s.run == c.cfg.name)
        table = read_fold_file(workdir / spec.fold_file)
        oof[c.cfg.name] = assemble_oof(workdir, c.cfg, table, set(c.bad), log)
    return SweepResult(tuple(out), oof)
