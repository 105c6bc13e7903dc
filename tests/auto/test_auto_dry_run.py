"""``aivh-ens auto --dry-run`` on tiny demo data: candidates, plan and estimates printed, nothing written (a
module of its own: it shares nothing with ``test_auto.py``'s trained project, and a second test worker can take
it)."""

from __future__ import annotations

import re

from auto_checks import run_auto


def test_dry_run_prints_candidates_plan_and_estimates_and_writes_nothing(demo_data, tmp_path):
    data = demo_data(n=64, n_test=16, seed=5)
    res = run_auto(data, tmp_path / "w", "1h", "--dry-run", "--on-bad-image", "skip")
    assert res.exit_code == 0, res.output
    assert "inspect: reading" in res.output and "timing: " in res.output  # the slow steps announce themselves
    assert re.search(r"^candidate +kind +model", res.output, re.M)
    assert re.search(
        r"^plan: \d+ runs x \d folds on cpu; shared settings: .*on_bad_image = skip", res.output, re.M
    )
    assert re.search(r"^estimates: inspect \+ timing .* of 60\.0m \(\d+%\)$", res.output, re.M)
    assert "dry run: nothing was trained or written" in res.output
    assert not (tmp_path / "w").exists()
