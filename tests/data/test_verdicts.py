"""Full-decode verdicts kept between calls: a second cv decodes nothing it already judged; a changed image
is decoded again; a damaged verdict file costs a decode, never a wrong verdict."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cli_checks import tiny_cv
from click.testing import CliRunner
from sweep_plans import write_plan

from aivh_ens.cli import main
from aivh_ens.data.verdicts import Verdicts, verdicts_path
from aivh_ens.train import cv as cv_mod


def _decoder(calls: list[int], bad: set[int] = frozenset()):
    def decode(rows: list[int]) -> dict[int, str]:
        calls.extend(rows)
        return {i: "broken" for i in rows if i in bad}

    return decode


def test_verdicts_are_reused_until_size_or_mtime_changes(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    files = [f"{i}.jpg" for i in range(4)]
    for f in files:
        (root / f).write_bytes(b"x" * 10)
    store = tmp_path / "v.json"
    calls: list[int] = []
    bad, n = Verdicts.read(store).check(root, files, _decoder(calls, bad={2}))
    assert (bad, n, calls) == ({2: "broken"}, 4, [0, 1, 2, 3])
    v = Verdicts.read(store)
    assert not v.entries  # nothing is kept until save()
    v.check(root, files, _decoder([], bad={2}))
    v.save()
    calls.clear()
    bad, n = Verdicts.read(store).check(root, files, _decoder(calls))
    assert (bad, n, calls) == ({2: "broken"}, 0, [])  # the stored verdict, bad one included
    (root / "1.jpg").write_bytes(b"y" * 11)  # another size
    st = (root / "3.jpg").stat()
    os.utime(root / "3.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, another mtime
    bad, n = Verdicts.read(store).check(root, files, _decoder(calls))
    assert (n, sorted(calls)) == (2, [1, 3])


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "entries": {}}', '{"version": 1}'])
def test_a_damaged_or_foreign_verdict_file_means_a_full_decode(tmp_path, content):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"x")
    store = tmp_path / "v.json"
    store.write_text(content)
    calls: list[int] = []
    Verdicts.read(store).check(root, ["a.jpg"], _decoder(calls))
    assert calls == [0]


def test_second_cv_decodes_no_image_the_verdicts_hold(tmp_path, demo_data, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(demo_data(n=48, n_test=8, seed=5), data)
    decoded: list[Path] = []
    real = cv_mod.load_image

    def counting(path, *a, **k):
        decoded.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(cv_mod, "load_image", counting)
    work = tmp_path / "w"
    args = ["cv", *tiny_cv(folds=2, epochs=1), "--fold", "0", "--data", str(data), "--workdir", str(work)]

    def run() -> int:
        decoded.clear()
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        return len(decoded)

    assert run() == 48
    assert verdicts_path(work / "runs" / "cache", data).is_file()
    assert run() == 0
    first = sorted(data.glob("train_data/*"))[0]
    first.write_bytes(first.read_bytes() + b"\0")  # a changed image (trailing bytes: still decodes)
    assert run() == 1 and decoded == [data / "train_data" / first.name]
    # a sweep's driver (here its --dry-run) reads the same verdicts
    plan = write_plan(tmp_path / "plan.toml", data, [{"name": "a"}, {"name": "b", "model": "test_convnext"}])
    decoded.clear()
    res = CliRunner().invoke(main, ["sweep", str(plan), "--workdir", str(work), "--dry-run"])
    assert res.exit_code == 0 and "nothing written" in res.output, res.output
    assert decoded == []
    verdicts_path(work / "runs" / "cache", data).unlink()  # without them, the dry run decodes every image
    CliRunner().invoke(main, ["sweep", str(plan), "--workdir", str(work), "--dry-run"])
    assert len(decoded) == 48 and not verdicts_path(work / "runs" / "cache", data).exists()  # nor writes
