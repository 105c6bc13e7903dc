"""Assertions and subprocess helpers shared by the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXE = str(Path(sys.executable).with_name("aivh-ens"))


def spawn(args: list[str], kill_at: str | None = None) -> subprocess.Popen:
    """``aivh-ens ARGS`` in a child process, offline and quiet; ``kill_at`` sets ``AIVH_ENS_KILL_AT``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "TQDM_DISABLE": "1"}
    env.pop("AIVH_ENS_KILL_AT", None)
    if kill_at:
        env["AIVH_ENS_KILL_AT"] = kill_at
    return subprocess.Popen(
        [EXE, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run(args: list[str], kill_at: str | None = None) -> tuple[int, str]:
    """(exit code, output) of ``aivh-ens ARGS``; -9 when the fault point killed it."""
    p = spawn(args, kill_at)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


def assert_user_error(res, *needles: str) -> None:
    """Exit 2, exactly one line starting with 'error:', no traceback, each needle in it."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
