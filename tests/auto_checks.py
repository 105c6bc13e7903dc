"""``aivh-ens auto`` as the auto tests call it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from aivh_ens.cli import main


def run_auto(data: Path, work: Path, limit: str, *extra: str):
    """``aivh-ens auto`` in this process on the CPU with one torch thread: the click result."""
    return CliRunner().invoke(
        main,
        [
            "auto",
            "--data",
            str(data),
            "--time-limit",
            limit,
            "--devices",
            "cpu",
            "--threads",
            "1",
            "--workdir",
            str(work),
            *extra,
        ],
    )
