"""The tiny served project the serve tests share (built once per session by ``tests/serve/conftest.py``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from cli_checks import tiny_cv
from click.testing import CliRunner

from aivh_ens.cli import main

TINY = [*tiny_cv(folds=2), "--threads", "1"]


@dataclass(frozen=True)
class Project:
    data: Path
    work: Path
    images: list[Path]  # the demo test images

    @property
    def blend_json(self) -> Path:
        return self.work / "runs" / "blend" / "blend.json"


def _invoke(*args: object) -> None:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output


def make_project(data: Path, work: Path) -> Project:
    """Runs ``a`` (test_efficientnet) and ``b`` (test_convnext) on ``data``, 2 folds, 1 epoch, and a blend
    using both, under ``work``."""
    _invoke("cv", *TINY, "--data", data, "--workdir", work, "--name", "a")
    _invoke("cv", *TINY, "--model", "test_convnext", "--data", data, "--workdir", work, "--name", "b")
    _invoke("blend", "--workdir", work, "--trials", "10", "--nested-trials", "5", "--quiet")
    # On data this small the fitted blend may give one run all the weight; give both some, so both are served.
    path = work / "runs" / "blend" / "blend.json"
    doc = json.loads(path.read_text())
    doc["weights"] = {"a": 0.6, "b": 0.4}
    path.write_text(json.dumps(doc))
    ids = pd.read_csv(data / "test.csv")["id"].tolist()
    return Project(data, work, [data / i for i in ids])


def wait_warm(client, timeout: float = 60.0) -> dict:
    """Poll ``GET /health`` until the warm-up pass is done (bounded); returns the health document."""
    deadline = time.monotonic() + timeout
    while True:
        h = client.get("/health").json()
        if h.get("warm") or time.monotonic() > deadline:
            assert h.get("warm"), h
            return h
        time.sleep(0.02)
