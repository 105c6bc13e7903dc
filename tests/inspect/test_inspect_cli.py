"""`aivh-ens inspect` end to end: the summary, inspect.json, a self-contained report.html, bad input."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import assert_user_error
from click.testing import CliRunner
from PIL import Image
from planted import make

from aivh_ens.cli import main


def embedded_images(html: str) -> list[Image.Image]:
    """Every data-URI PNG of a page, decoded (raises if one does not decode)."""
    images = []
    for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        images.append(im)
    return images


def test_inspect_writes_the_summary_json_and_a_self_contained_page(tmp_path: Path) -> None:
    data = make(tmp_path / "data", n=60, n_test=20)
    res = CliRunner().invoke(
        main, ["inspect", "--data", str(data), "--workdir", str(tmp_path / "w"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "w/runs/inspect/inspect.json").read_text())
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("scanned 80 images in ") and "img/s" in lines[0]
    assert len(lines) == 2 + len(doc["findings"])  # scan line, one line per finding, "wrote ..."
    for f, line in zip(doc["findings"], lines[1:-1], strict=True):
        assert line.startswith(f["level"] + ":") and f["message"] in line
    assert doc["n_train"] == 60 and doc["n_test"] == 20 and doc["img_per_s"] > 0
    html = (tmp_path / "w/runs/inspect/report.html").read_text()
    assert "http://" not in html and "https://" not in html  # opens from disk, offline
    images = embedded_images(html)
    assert len(images) >= 2 + 2 * 4  # two histogram grids, the first four pairs' thumbnails
    assert all(im.width > 10 and im.height > 10 for im in images)
    for f in doc["findings"]:
        assert f["message"].split(":")[0] in html


def _truncate(data: Path) -> None:
    path = data / pd.read_csv(data / "train.csv").file_name[5]
    path.write_bytes(path.read_bytes()[:200])


def _bad_label(data: Path) -> None:
    t = pd.read_csv(data / "train.csv").astype({"label": str})
    t.loc[3, "label"] = "ai"
    t.to_csv(data / "train.csv", index=False)


@pytest.mark.parametrize(
    ("spoil", "needles"),
    [
        (lambda d: (d / "train.csv").unlink(), ("train.csv not found", "--data")),
        (_truncate, ("bad image", "0005.jpg", "remove or replace")),
        (_bad_label, ("train.csv line 5", "'ai' is not 0 or 1")),
        (lambda d: (d / "test_data_v2/0002.jpg").unlink(), ("missing", "test.csv", "0002.jpg")),
    ],
    ids=["no-train-csv", "truncated-image", "bad-label", "missing-test-image"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, spoil, needles) -> None:
    data = make(tmp_path / "data", n=20, n_test=6)
    spoil(data)
    res = CliRunner().invoke(
        main, ["inspect", "--data", str(data), "--workdir", str(tmp_path / "w"), "--quiet"]
    )
    assert_user_error(res, *needles)
    assert not (tmp_path / "w").exists()
