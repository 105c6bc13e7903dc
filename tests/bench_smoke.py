"""Helpers of the bench smoke tests (``tests/bench/test_smoke*.py``): every script under bench/ runs to the end
with ``--smoke`` and prints its ``bench <name>:`` line, so a bench that no longer fits the package (a renamed
function, a new required option, a changed default) fails here rather than in ``make bench``.

The scripts are found by glob, so a new one is covered without editing this file. Each runs as ``python
bench/<script>.py --smoke`` would run it (``__main__``, its own argv, its own process), but forked from a
server that has imported torch, timm and the package once: a fresh interpreter per script would pay those
imports again for each.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import runpy
import shutil
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text())
PRELOAD = ["torch", "timm", "pandas", "sklearn.metrics", "aivh_ens.cli", "aivh_ens.train", "aivh_ens.blend"]
HANG_S = 600.0
"""A smoke run that has not ended after this is hung, not slow: every one takes well under a minute here."""
BENCH_LINE = re.compile(r"^bench (?P<name>[\w-]+)(?: \([^)]*\))?: \S", re.MULTILINE)

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(PRELOAD)


def _run_script(script: str, out: str, tmp: str) -> None:
    """In the forked child: stdout and stderr (and those of the script's own children) to ``out``, temporary
    files under ``tmp``, then the script as ``__main__`` with ``--smoke``."""
    os.setpgid(0, 0)  # a process group of its own: a hung script is killed with everything it started
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the child's stream until it exits
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ["TMPDIR"] = tmp
    tempfile.tempdir = tmp
    os.chdir(ROOT)
    sys.argv = [script, "--smoke"]
    runpy.run_path(script, run_name="__main__")


def expected_name(script: Path) -> str | None:
    """``bench_<name>.py`` prints ``bench <name>:``; another script (a helper, the GPU bench) any bench line."""
    return script.stem.removeprefix("bench_") if script.stem.startswith("bench_") else None


def run_smoke(script: Path, out: Path, hang_s: float = HANG_S) -> int | None:
    """``script --smoke`` in a forked child, its output to ``out``: its exit code, or None when it still ran
    after ``hang_s`` (then it and everything it started are killed)."""
    tmp = tempfile.mkdtemp(prefix="bench-smoke-")  # short: Ray's socket paths under it must fit 107 bytes
    try:
        child = _CTX.Process(target=_run_script, args=(str(script), str(out), tmp))
        child.start()
        child.join(hang_s)
        if child.is_alive():  # the child leads its own process group (see _run_script)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.join()
            return None
        return child.exitcode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_smoke(script: Path, tmp_path: Path) -> None:
    """``script --smoke`` ran to the end, exit 0, and printed its ``bench <name>:`` line."""
    out = tmp_path / "output.txt"
    code = run_smoke(script, out)
    text = out.read_text(errors="replace")
    assert code is not None, f"{script.name} --smoke still ran after {HANG_S:.0f} s (killed):\n{text[-4000:]}"
    assert code == 0, f"{script.name} --smoke exited with {code}:\n{text[-4000:]}"
    names = [m["name"] for m in BENCH_LINE.finditer(text)]
    assert names, f"{script.name} --smoke printed no 'bench <name>:' line:\n{text[-4000:]}"
    want = expected_name(script)
    assert want is None or want in names, f"{script.name} --smoke printed bench lines for {names}, not {want}"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
