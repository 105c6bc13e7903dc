"""A blend that barely beats guessing says so: the all-AI baseline row and blend's two warnings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from oof_project import write_run

from aivh_ens.blend import methods as bmethods
from aivh_ens.blend import stage as bstage
from aivh_ens.blend.methods import Fit
from aivh_ens.cli import main


@pytest.mark.parametrize(
    ("metric", "p", "expected"),
    [("f1", 0.5, 2 / 3), ("f1", 0.25, 0.4), ("accuracy", 0.25, 0.25), ("macro_f1", 0.5, 1 / 3)],
)
def test_all_ai_scores_predicting_every_row_ai(metric: str, p: float, expected: float) -> None:
    y = np.r_[np.ones(int(400 * p)), np.zeros(400 - int(400 * p))].astype(int)
    folds = np.arange(400) % 4
    score, per_fold = bmethods.all_ai(y, folds, metric)
    assert score == pytest.approx(expected) and per_fold == pytest.approx([expected] * 4)


def _result(nested: float, threshold: float = 0.5) -> bstage.MethodResult:
    return bstage.MethodResult(
        "optuna", 4, Fit("optuna", "rank", np.ones(2) / 2, threshold, nested), (nested,)
    )


@pytest.mark.parametrize(
    ("nested", "ai_share", "expected"),
    [
        (0.80, 0.50, []),  # clearly better than guessing, a sane threshold
        (0.68, 0.50, ["within 0.02 of predicting every row AI (0.6667)"]),
        (0.80, 0.95, ["labels 95% of OOF rows AI"]),
        (0.67, 0.99, ["within 0.02", "labels 99% of OOF rows AI"]),
    ],
)
def test_blend_warnings(nested: float, ai_share: float, expected: list[str]) -> None:
    floor = bstage.MethodResult("all_ai", -1, Fit("all_ai", "prob", np.zeros(2), 0.0, 2 / 3), (2 / 3,))
    warnings = bstage.blend_warnings(_result(nested, 0.015), floor, ai_share, "f1")
    assert len(warnings) == len(expected)
    for w, needle in zip(warnings, expected, strict=True):
        assert needle in w


def test_a_blend_of_noise_warns_and_shows_the_baseline_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    for name in ("a", "b"):  # runs that know nothing: the F1-optimal threshold drifts to "all AI"
        write_run(tmp_path, name, np.round(rng.random(n), 6), folds=(np.arange(n) // 2) % 4)
    res = CliRunner().invoke(
        main, ["blend", "--workdir", str(tmp_path), "--trials", "5", "--nested-trials", "3", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    row = next(ln for ln in out if ln.startswith("all_ai "))
    assert "0.6667" in row and "(baseline: every row AI)" in row
    warnings = [ln for ln in out if ln.startswith("warning: ")]
    assert warnings and any("barely beat guessing" in w for w in warnings)
    assert out[-1].startswith("report: ") and "report.html" in out[-1]
    doc = json.loads((tmp_path / "runs" / "blend" / "blend.json").read_text())
    assert doc["all_ai"]["oof_score"] == pytest.approx(2 / 3) and doc["all_ai"]["threshold"] == 0.0
    assert doc["warnings"] == [w.removeprefix("warning: ") for w in warnings]
