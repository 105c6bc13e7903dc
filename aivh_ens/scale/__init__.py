"""Sweeps: plans of several runs x folds, expanded into idempotent (run, fold) jobs that a backend runs.

Backends: ``local`` (a process pool, one worker pinned per device), ``ray`` (Ray tasks, the only module that
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
        "SweepResult": ".sweep",
        "SlurmOptions": ".sweep",
        "status_rows": ".status",
        "format_table": ".status",
    },
)
