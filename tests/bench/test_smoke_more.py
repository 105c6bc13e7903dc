"""The other half of the bench scripts in ``--smoke`` mode (see ``test_smoke.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_smoke import SCRIPTS, check_smoke

HALF = SCRIPTS[1::2]


@pytest.mark.parametrize("script", HALF, ids=[p.stem for p in HALF])
def test_bench_runs_in_smoke_mode(script: Path, tmp_path: Path) -> None:
    check_smoke(script, tmp_path)
