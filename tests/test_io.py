"""Tests for aivh_ens.io: atomic writes (whole file or nothing), permissions, content, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pandas as pd
import pytest

from aivh_ens import io
from aivh_ens.io import NAN_REASON


def test_writes_land_whole_with_the_usual_permissions(tmp_path):
    path = io.write_json(tmp_path / "sub" / "a.json", {"b": 1, "a": [1.5, None]})
    assert json.loads(path.read_text()) == {"a": [1.5, None], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # key-sorted
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    df = pd.DataFrame({"file_name": ["x y.jpg", "ü.png"], "prob": [0.125, 1 / 3]})
    io.write_csv(tmp_path / "o.csv", df, float_format="%.4g")
    back = pd.read_csv(tmp_path / "o.csv")
    assert back["file_name"].tolist() == ["x y.jpg", "ü.png"] and back["prob"].tolist() == [0.125, 0.3333]
    assert list(tmp_path.rglob("*.tmp")) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = io.write_text(tmp_path / "t.txt", "old\n")
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and list(tmp_path.glob(".*.tmp")) == []


def test_nan_and_infinities_are_written_as_null_with_the_reason(tmp_path):
    record = {"val_auc": float("nan"), "val_f1": 0.5, "per": [1.0, float("inf")], "sub": {"x": -float("inf")}}
    path = io.write_json(tmp_path / "done.json", record)
    back = json.loads(path.read_text())  # strict JSON: no NaN token anywhere
    assert back["val_auc"] is None and back["val_f1"] == 0.5 and back["per"] == [1.0, None]
    assert back["sub"] == {"x": None}
    assert set(back["nulls"]) == {"val_auc", "per[1]", "sub.x"}
    assert back["nulls"]["val_auc"].startswith("nan: not a finite number") and "one class" in NAN_REASON
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert "nulls" not in json.loads(io.write_json(tmp_path / "ok.json", {"a": 1.0}).read_text())


def test_hashes_match_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    (tmp_path / "b").write_bytes(data)
    assert io.sha256_file(tmp_path / "b") == hashlib.sha256(data).hexdigest()
    assert io.sha256_file(tmp_path / "b", chunk=7) == hashlib.sha256(data).hexdigest()
    assert io.sha256_text("é") == hashlib.sha256("é".encode()).hexdigest()
