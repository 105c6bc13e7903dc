"""Every script under bench/ runs with ``--smoke`` (half of them here, the other half in
``test_smoke_more.py``, so that two test workers share them), and the smoke runner kills a hung script."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bench_smoke import ROOT, SCRIPTS, alive, check_smoke, run_smoke

HALF = SCRIPTS[0::2]


@pytest.mark.parametrize("script", HALF, ids=[p.stem for p in HALF])
def test_bench_runs_in_smoke_mode(script: Path, tmp_path: Path) -> None:
    check_smoke(script, tmp_path)


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
    while alive(grandchild) and time.monotonic() < deadline:  # SIGKILLed; reaped by init once orphaned
        time.sleep(0.1)
    assert not alive(grandchild)


def test_every_bench_script_is_covered() -> None:
    """The glob finds the scripts ``make bench`` runs and the helpers they call."""
    stems = {p.stem for p in SCRIPTS}
    assert {"bench_blend", "bench_sweep", "plain_torch", "make_jpegs", "gpu_train"} <= stems
    assert all(p.stem in stems for p in (ROOT / "bench").glob("bench_*.py"))
