"""`aivh-ens report` on a real (tiny) project: its images decode and its tables hold the runs' numbers."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_checks import assert_user_error, tiny_cv
from click.testing import CliRunner
from PIL import Image

from aivh_ens import layout
from aivh_ens.cli import main
from aivh_ens.inspect import audit_dataset
from aivh_ens.io import write_json
from aivh_ens.metrics import roc_auc, summary_at
from aivh_ens.progress import Progress
from aivh_ens.report.page import all_ai_f1

RUN = "tiny"
COPY = "tiny-noisy"


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.output


def _no_bar(self: Progress, iterable: object) -> None:
    raise AssertionError(f"a progress bar ({self.desc}) was drawn on output that is not a terminal")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, demo_data) -> Path:
    """One real 2-fold, 2-epoch run, a second run made from it with noisier OOF scores, a blend, inspect."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    data, w = demo_data(), root / "w"
    # inspect.json as `inspect` writes it (its own page is tested in tests/inspect and costs seconds here).
    audit = audit_dataset(data, progress=False, log=lambda s: None)
    write_json(layout.inspect_dir(w) / "inspect.json", audit.doc)
    cv = [a for a in tiny_cv(folds=2, epochs=2) if a != "--quiet"]  # progress on, output not a terminal
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Progress, "_open", _no_bar)
        cv_log = _ok(["cv", *cv, "--name", RUN, "--data", str(data), "--workdir", str(w)])
    (root / "cv.log").write_text(cv_log)
    shutil.copytree(w / "runs" / RUN, w / "runs" / COPY)
    oof = pd.read_csv(w / "oof" / f"{RUN}.csv")
    rng = np.random.default_rng(0)
    oof["prob"] = np.clip(oof["prob"] + rng.normal(0, 0.2, len(oof)), 0, 1).round(6)
    oof.to_csv(w / "oof" / f"{COPY}.csv", index=False)
    _ok(["blend", "--workdir", str(w), "--trials", "10", "--nested-trials", "5", "--quiet"])
    return w


def _page(path: Path) -> tuple[str, list[Image.Image]]:
    text = path.read_text()
    images = []
    for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', text):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()  # raises if the PNG is broken
        images.append(im)
    return html.unescape(text), images


def test_report_shows_every_part_with_the_runs_numbers(project: Path) -> None:
    out = _ok(["report", "--workdir", str(project)])
    assert out.strip().splitlines()[-1] == f"wrote {project / 'runs' / 'report.html'}"
    text, images = _page(project / "runs" / "report.html")
    assert "http://" not in text and "https://" not in text
    # 2 runs x (curves, confusion + threshold), correlation, weights, blend confusion + threshold.
    assert len(images) == 7 and all(im.width >= 300 for im in images)
    for run in (RUN, COPY):
        oof = pd.read_csv(project / "oof" / f"{run}.csv")
        s = summary_at(oof["label"], oof["prob"], 0.5)
        assert f"{s['f1']:.4f}" in text and f"{roc_auc(oof['label'], oof['prob']):.4f}" in text
        for k in (0, 1):
            done = json.loads((project / "runs" / run / f"fold{k}" / "done.json").read_text())
            assert f"{done['val_f1']:.4f}" in text and f"{done['val_auc']:.4f}" in text
    blend = json.loads((project / "runs" / "blend" / "blend.json").read_text())
    assert f"{blend['threshold']:.4f}" in text and f"{blend['nested_score']['mean']:.4f}" in text
    for b in blend["baselines"]:
        assert b["method"] in text
    assert f"{all_ai_f1(oof['label']):.4f}" in text and "(predict all AI)" in text
    findings = json.loads((project / "runs" / "inspect" / "inspect.json").read_text())["findings"]
    assert findings and all(f["message"] in text for f in findings)
    assert 'href="inspect/report.html"' in text


def test_cv_off_a_terminal_logs_a_line_per_epoch_and_no_bars(project: Path) -> None:
    log = (project.parent / "cv.log").read_text()
    lines = log.splitlines()
    epochs = [ln for ln in lines if re.match(r"  fold \d epoch \d/2: train_loss", ln)]
    assert len(epochs) == 4 and "\r" not in log
    assert len(lines) <= 4 * 6, (
        log
    )  # 2 folds x 2 epochs: at most 6 lines per epoch, start and summary included
    assert lines[-1].startswith("report: ") and str(project / "runs" / "report.html") in lines[-1]


def test_report_of_chosen_runs_without_the_blend(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.html"
    _ok(["report", RUN, "--no-blend", "--out", str(out), "--workdir", str(project)])
    text, images = _page(out)
    assert f"Run {RUN}" in text and f"Run {COPY}" not in text and "Blend" not in text
    assert len(images) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["report", "nope"], "no run 'nope'"), (["report", "--blend"], "run `aivh-ens blend` first")],
)
def test_report_bad_input_is_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    res = CliRunner().invoke(main, [*args, "--workdir", str(tmp_path)])
    assert_user_error(res, needle)
    assert not (tmp_path / "runs" / "report.html").exists()


def test_report_of_a_rank_blend_over_oof_ranks(tmp_path: Path) -> None:
    """A rank-space blend places scores among the OOF scores; the report's blended OOF needs them too."""
    from oof_project import write_run

    from aivh_ens.blend.stage import run_blend
    from aivh_ens.report.page import build_report

    rng = np.random.default_rng(0)
    y = (np.arange(200) % 2 == 0).astype(int)
    for name in ("a", "b"):
        write_run(tmp_path, name, np.clip(y * 0.3 + rng.uniform(0, 0.7, 200), 0, 1))
    run_blend(tmp_path, trials=5)
    path = layout.blend_path(tmp_path)
    doc = json.loads(path.read_text())
    doc.update(space="rank", method="mean_rank", rank_reference="oof")
    doc.pop("stack", None)
    write_json(path, doc)
    result = build_report(tmp_path)
    assert "blend mean_rank" in result.summary
    assert "rank space" in result.path.read_text()
