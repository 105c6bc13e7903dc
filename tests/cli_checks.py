"""Assertions and subprocess helpers shared by the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXE = str(Path(sys.executable).with_name("aivh-ens"))


def spawn(args: list[str], kill_at: str | None = None, fault: str | None = None) -> subprocess.Popen:
    """``aivh-ens ARGS`` in a child process, offline and quiet; ``kill_at`` sets ``AIVH_ENS_KILL_AT`` and
    ``fault`` ``AIVH_ENS_FAULT`` (what happens there)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "TQDM_DISABLE": "1"}
    env.pop("AIVH_ENS_KILL_AT", None)
    if kill_at:
        env["AIVH_ENS_KILL_AT"] = kill_at
    if fault:
        env["AIVH_ENS_FAULT"] = fault
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


def tiny_cv(folds: int = 3, epochs: int | None = 1, pairs: bool = True) -> list[str]:
    """``cv`` options for a CPU-sized run: the tiny recipe at 32 px, batch 16, quiet."""
    args = ["--recipe", "tiny", "--img-size", "32", "--batch-size", "16", "--folds", str(folds)]
    args += ["--group", "pairs"] if pairs else []
    args += ["--epochs", str(epochs)] if epochs is not None else []
    return [*args, "--quiet"]


def write_file(path: Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path``."""
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def assert_one_line(err, *fragments: str) -> None:
    """A raised error's message is one line holding every fragment (``err``: a pytest ExceptionInfo)."""
    msg = str(err.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
