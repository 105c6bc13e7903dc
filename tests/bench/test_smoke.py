"""Every script under bench/ runs to the end with ``--smoke`` and prints its ``bench <name>:`` line, so a bench
that no longer fits the package (a renamed function, a new required option, a changed default) fails here
rather than in ``make bench``.

The scripts are found by glob, so a new one is covered without editing this file. Each runs as
``python bench/<script>.py --smoke`` would run it (``__main__``, its own argv, its own process), but forked
from a server that has imported torch, timm and the package once: a fresh interpreter per script would pay
those imports again for each.
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
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_bench_runs_in_smoke_mode(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "output.txt"
    code = run_smoke(script, out)
    text = out.read_text(errors="replace")
    assert code is not None, f"{script.name} --smoke still ran after {HANG_S:.0f} s (killed):\n{text[-4000:]}"
    assert code == 0, f"{script.name} --smoke exited with {code}:\n{text[-4000:]}"
    names = [m["name"] for m in BENCH_LINE.finditer(text)]
    assert names, f"{script.name} --smoke printed no 'bench <name>:' line:\n{text[-4000:]}"
    want = expected_name(script)
    assert want is None or want in names, f"{script.name} --smoke printed bench lines for {names}, not {want}"


def test_a_hung_script_is_killed_with_the_processes_it_started(tmp_path: Path) -> None:
    script = tmp_path / "bench_hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    out = tmp_path / "output.txt"
    assert run_smoke(script, out, hang_s=3.0) is None
    grandchild = int(out.read_text().split()[0])
    deadline = time.monotonic() + 30
    while _alive(grandchild) and time.monotonic() < deadline:  # SIGKILLed; reaped by init once orphaned
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_every_bench_script_is_covered() -> None:
    """The glob finds the scripts ``make bench`` runs and the helpers they call."""
    stems = {p.stem for p in SCRIPTS}
    assert {"bench_blend", "bench_sweep", "plain_torch", "make_jpegs", "gpu_train"} <= stems
    assert all(p.stem in stems for p in (ROOT / "bench").glob("bench_*.py"))
