"""The report's shift section: the picture of the threshold decision (test lumps against the OOF classes)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from oof_project import write_run
from PIL import Image

from aivh_ens.blend.shift import choose_threshold, diagnose
from aivh_ens.io import write_json
from aivh_ens.metrics import best_threshold
from aivh_ens.report.page import build_report
from aivh_ens.report.plots import SHIFT_ALT


def _record(root: Path, histogram: bool) -> dict:
    """A ``submission.json`` as submit writes it, for a 25%-AI test set (label shift: auto moves the cut)."""
    rng = np.random.default_rng(0)
    y = (np.arange(2000) % 2 == 0).astype(int)
    s = 1 / (1 + np.exp(-(np.where(y == 1, 2.0, -2.0) + rng.normal(0, 1.2, 2000))))
    write_run(root, "a", s, y=y)
    yt = rng.random(3000) < 0.25
    t = 1 / (1 + np.exp(-(np.where(yt, 2.0, -2.0) + rng.normal(0, 1.2, 3000))))
    thr = best_threshold(y, s)[0]
    d = diagnose(s, y, t, thr)
    c = choose_threshold("auto", s, y, t, thr, "f1", d)
    diag = d.to_dict() if histogram else {**d.to_dict(), "histogram": None}
    rec = {"threshold_mode": "auto", "resolved_mode": c.resolved, "threshold": c.threshold, "reason": c.reason,
           "oof_threshold": thr, "predicted_ai_share": float(np.mean(t >= c.threshold)), "diagnosis": diag}  # fmt: skip
    write_json(root / "submission.json", rec)
    return rec


@pytest.mark.parametrize("histogram", [True, False])
def test_shift_section_shows_test_scores_over_the_reweighted_oof_classes(
    tmp_path: Path, histogram: bool
) -> None:
    rec = _record(tmp_path, histogram)
    assert rec["resolved_mode"].startswith("prior:") and rec["threshold"] > rec["oof_threshold"]
    page = build_report(tmp_path, blend=False).path.read_text()
    section = page[page.index("Submission: train/test shift") :]
    imgs = re.findall(r'<img alt="([^"]*)"[^>]*src="data:image/png;base64,([^"]+)"', section)
    plots = [b for alt, b in imgs if alt == SHIFT_ALT]
    if not histogram:  # a record written before the histograms existed: the findings alone
        assert not plots and "score shift: KS" in section
        return
    assert len(plots) == 1
    img = Image.open(io.BytesIO(base64.b64decode(plots[0])))
    assert img.size == (800, 380)
    px = np.asarray(img.convert("RGB"))
    # the re-weighted AI class (tab:red) and the two threshold lines (green: OOF, purple: shipped) are drawn
    for colour in ((214, 39, 40), (44, 160, 44), (148, 103, 189)):
        assert np.any(np.all(np.abs(px.astype(int) - colour) < 8, axis=-1)), colour
