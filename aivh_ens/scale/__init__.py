"""Sweeps: plans of several runs x folds, expanded into idempotent (run, fold) jobs that a backend runs.

Backends, each a :class:`~aivh_ens.scale.backend.Backend` (run the jobs, cancel them): ``local`` (one process
per device, pinned to it and its cores, replaced when a job kills it), ``ray`` (Ray tasks, the only module that
imports ray) and ``slurm`` (submitit job arrays, the only module that imports submitit).
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "Plan": ".plan",
        "load_plan": ".plan",
        "plan_from_configs": ".plan",
        "JobSpec": ".jobs",
        "run_job": ".jobs",
        "run_sweep": ".sweep",
        "Backend": ".backend",
        "SweepInterrupted": ".backend",
        "SweepResult": ".sweep",
        "SlurmOptions": ".sweep",
        "RayOptions": ".sweep",
        "status_rows": ".status",
        "format_table": ".status",
    },
)
