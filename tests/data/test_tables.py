"""Tests for aivh_ens.data.tables: CSV tables and path safety; every fixture is made in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_checks import assert_one_line, write_file

from aivh_ens.data.tables import read_test_table, read_train_table, resolve_image_path
from aivh_ens.errors import UserError

TRAIN_FILES = [f"train_data/{c}.jpg" for c in "abcde"]  # all exist in the data fixture
TEST_FILES = [f"test_data_v2/{c}.jpg" for c in "xyz"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A Kaggle-layout folder: data/train_data/{a..e}.jpg and data/test_data_v2/{x,y,z}.jpg (empty files)."""
    root = tmp_path / "data"
    for rel in TRAIN_FILES + TEST_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return root


A, B, C = TRAIN_FILES[:3]
GOOD_TRAIN = [
    pytest.param(f"file_name,label\n{A},1\n{B},0\n", {}, [A, B], [1, 0], None, id="plain"),
    pytest.param(
        f"Unnamed: 0,file_name,label\n0,{A},1\n1,{B},0\n", {}, [A, B], [1, 0], None, id="unnamed-index"
    ),
    pytest.param(f",file_name,label\n0,{A},1\n1,{B},0\n", {}, [A, B], [1, 0], None, id="empty-index-header"),
    pytest.param(f"file_name,label\n0,{A},1\n1,{B},0\n", {}, [A, B], [1, 0], None, id="index-without-header"),
    pytest.param(
        f"\ufefffile_name,label\r\n{A},1\r\n{B},0\r\n", {}, [A, B], [1, 0], None, id="utf8-bom-and-crlf"
    ),
    pytest.param(f"file_name,label\n{A},1.0\n{B}, 0.00\n", {}, [A, B], [1, 0], None, id="integral-floats"),
    pytest.param(
        f"\nfile_name,label\n\n{A},1\n\n{B},0\n,\n,\n", {}, [A, B], [1, 0], None, id="blank-and-empty-rows"
    ),
    pytest.param(f"file_name,label,\n{A},1,\n{B},0,\n", {}, [A, B], [1, 0], None, id="trailing-commas"),
    pytest.param(f"file_name,label\n{A},1,\n{B},0,\n", {}, [A, B], [1, 0], None, id="trailing-commas-rows"),
    pytest.param(f'"file_name","label"\n"{A}","1"\n', {}, [A], [1], None, id="quoted"),
    pytest.param(f"label,extra,file_name\n0,x,{B}\n1,y,{A}\n", {}, [B, A], [0, 1], None, id="column-order"),
    pytest.param(
        f"image,target\n{A},1\n{B},0\n",
        {"file_col": "image", "label_col": "target"},
        [A, B],
        [1, 0],
        None,
        id="renamed-columns",
    ),
    pytest.param(
        f"file_name,label,src\n{A},1,07\n{B},0,07\n{C},1,x\n",
        {"group_col": "src"},
        [A, B, C],
        [1, 0, 1],
        ["07", "07", "x"],
        id="group-column",
    ),
    pytest.param(f"file_name,label\n./{A},1\n", {}, [f"./{A}"], [1], None, id="dot-slash-kept-as-written"),
]


@pytest.mark.parametrize(("text", "kwargs", "files", "labels", "groups"), GOOD_TRAIN)
def test_read_train_table_good(
    data: Path, text: str, kwargs: dict, files: list, labels: list, groups
) -> None:
    write_file(data / "train.csv", text)
    df = read_train_table(data, **kwargs)
    assert list(df.columns) == ["file_name", "label"] + (["group"] if groups else [])
    assert df["file_name"].tolist() == files
    assert df["label"].dtype == np.int64
    assert df["label"].tolist() == labels
    assert isinstance(df.index, pd.RangeIndex)
    if groups:
        assert df["group"].tolist() == groups


# ---- train table: bad files ---------------------------------------------------------------------------

BAD_TRAIN = [
    pytest.param(
        f"file_name;label\n{A};1\n",
        {},
        ["train.csv looks semicolon-separated; expected comma-separated columns file_name,label"],
        id="semicolon",
    ),
    pytest.param(
        f"file_name\tlabel\n{A}\t1\n", {}, ["train.csv looks tab-separated", "file_name,label"], id="tab"
    ),
    pytest.param(None, {}, ["train.csv not found", "--data"], id="missing-file"),
    pytest.param("", {}, ["train.csv is empty", "file_name,label"], id="empty-file"),
    pytest.param(" \n\n", {}, ["train.csv is empty"], id="blank-file"),
    pytest.param(',,\n""\n', {}, ["train.csv is empty"], id="only-empty-cells"),
    pytest.param("file_name,label\n", {}, ["train.csv has a header", "no rows"], id="header-only"),
    pytest.param(
        f"file_name,target\n{A},1\n",
        {},
        ["no column 'label'", "columns found: file_name, target", "--label-col target"],
        id="no-label-column",
    ),
    pytest.param(
        f"Unnamed: 0,image_path,label\n0,{A},1\n",
        {},
        ["no column 'file_name'", "columns found: image_path, label", "--file-col image_path"],
        id="no-file-column",
    ),
    pytest.param(f"a,b\n{A},1\n", {}, ["columns found: a, b", "--file-col COLUMN"], id="no-guess"),
    pytest.param(f"file_name,label\n{A},1\n{B},ai\n", {}, ["line 3", "'ai'", "must be 0"], id="label-string"),
    pytest.param(f"file_name,label\n{A},2\n", {}, ["line 2", "'2'", "0 (human-made) or 1"], id="label-2"),
    pytest.param(f"file_name,label\n{A},-1\n", {}, ["line 2", "'-1'", "0 or 1"], id="label-minus-1"),
    pytest.param(f"file_name,label\n{A},1\n{B},NaN\n", {}, ["line 3", "'NaN'"], id="label-nan"),
    pytest.param(f"file_name,label\n{A},\n", {}, ["line 2", "''", "0 or 1"], id="label-empty"),
    pytest.param(
        f"file_name,label\n{A},0.5\n{B},7\n", {}, ["line 2", "'0.5'", "2 bad rows"], id="label-float"
    ),
    pytest.param(f"file_name,label\n\n\n{A},1\n{B},x\n", {}, ["line 5", "'x'"], id="line-counts-blank-lines"),
    pytest.param(
        f'file_name,label,note\n{A},1,"two\nlines"\n{B},3,x\n',
        {},
        ["line 4", "'3'"],
        id="line-counts-multiline",
    ),
    pytest.param(
        f"file_name,label\n{A},1\n{B},0\n{A},0\n{B},1\n",
        {},
        ["2 images more than once", f"{A} on lines 2, 4", f"{B} on lines 3, 5"],
        id="duplicates",
    ),
    pytest.param(
        f"file_name,label\n{A},1\n./{A},0\n",
        {},
        ["1 image more than once", "lines 2, 3"],
        id="duplicate-normalized",
    ),
    pytest.param(f"file_name,label\n{A},1\n,0\n", {}, ["line 3", "file_name is empty"], id="file-empty"),
    pytest.param(
        f"file_name,label\n{A},1\nNaN,0\n", {}, ["line 3", "file_name is missing ('NaN')"], id="file-nan"
    ),
    pytest.param(
        f"file_name,label\n{A},1\n",
        {"group_col": "src"},
        ["no column 'src'", "columns found: file_name, label", "--group"],
        id="group-missing",
    ),
    pytest.param(
        f"file_name,label,src\n{A},1,g\n{B},0,\n",
        {"group_col": "src"},
        ["line 3", "src is empty"],
        id="group-empty",
    ),
    pytest.param(
        f"file_name,label,src\n{A},1,nan\n",
        {"group_col": "src"},
        ["line 2", "src is missing"],
        id="group-nan",
    ),
    pytest.param(
        f"file_name,label\n{A},1\n/etc/passwd,0\n", {}, ["line 3", "'/etc/passwd' is absolute"], id="abs"
    ),
    pytest.param(
        "file_name,label\n../secret.jpg,0\n", {}, ["line 2", "escapes the data folder"], id="dotdot"
    ),
    pytest.param(
        "file_name,label\ntrain_data/../../x.jpg,0\n",
        {},
        ["line 2", "escapes the data folder"],
        id="dotdot-inner",
    ),
    pytest.param(
        f"file_name,label\n{A},1\ntrain_data/x.jpg,0\n{B},1\ntrain_data/y.jpg,1\n",
        {},
        [
            "2 of 4 images listed in train.csv are missing under",
            "train_data/x.jpg line 3, train_data/y.jpg line 5",
        ],
        id="missing-images",
    ),
    pytest.param(
        "file_name,label\n" + "".join(f"nope/{i}.jpg,1\n" for i in range(7)),
        {},
        ["7 of 7 images", "nope/0.jpg line 2", "nope/4.jpg line 6, ...", "the folder that holds nope"],
        id="all-missing",
    ),
    pytest.param(
        f"file_name,label\n{A},1\ntrain_data/x,y.jpg,0\n",
        {},
        ["line 3 has 3 cells", "header (line 1) has 2"],
        id="cells",
    ),
    pytest.param(
        f"file_name,label,label\n{A},1,0\n", {}, ["two columns named 'label'"], id="duplicate-column"
    ),
    pytest.param("file_name,label\n".encode("utf-16"), {}, ["UTF-16", "UTF-8"], id="utf16"),
    pytest.param(
        b"file_name,label\ntrain_data/\xe9.jpg,1\n", {}, ["line 2 is not UTF-8", "0xe9"], id="latin1"
    ),
]


@pytest.mark.parametrize(("text", "kwargs", "fragments"), BAD_TRAIN)
def test_read_train_table_bad(
    data: Path, text: str | bytes | None, kwargs: dict, fragments: list[str]
) -> None:
    if text is not None:
        write_file(data / "train.csv", text)
    with pytest.raises(UserError) as err:
        read_train_table(data, **kwargs)
    assert_one_line(err, *fragments)


def test_missing_data_dir_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        read_train_table(tmp_path / "nowhere")
    assert_one_line(err, "data folder", "nowhere does not exist", "--data")


def test_missing_csv_lists_csvs_found(data: Path) -> None:
    write_file(data / "labels.csv", "x\n")
    with pytest.raises(UserError) as err:
        read_train_table(data)
    assert_one_line(err, "train.csv not found", "labels.csv", "--data")


def test_missing_images_message_matches_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    (root / "train_data").mkdir(parents=True)
    for i in range(10):
        (root / f"train_data/{i}.jpg").touch()
    rows = [f"train_data/{i}.jpg,{i % 2}" for i in range(13)]
    write_file(root / "train.csv", "file_name,label\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        read_train_table("data")
    assert str(err.value).startswith(
        "3 of 13 images listed in train.csv are missing under data/ "
        "(first: train_data/10.jpg line 12, train_data/11.jpg line 13, train_data/12.jpg line 14)"
    )


def test_check_files_false_skips_existence_not_escapes(data: Path) -> None:
    write_file(data / "train.csv", "file_name,label\nnot/there.jpg,1\n")
    assert read_train_table(data, check_files=False)["file_name"].tolist() == ["not/there.jpg"]
    write_file(data / "train.csv", "file_name,label\n../there.jpg,1\n")
    with pytest.raises(UserError, match="escapes"):
        read_train_table(data, check_files=False)


def test_csv_path_outside_data_dir_is_allowed(data: Path, tmp_path: Path) -> None:
    # A cleaned copy of the CSV may live elsewhere; image paths stay relative to data_dir.
    csv = write_file(tmp_path / "clean.csv", f"file_name,label\n{A},1\n")
    assert read_train_table(data, csv=str(csv))["file_name"].tolist() == [A]


# ---- symlinks and resolve_image_path ------------------------------------------------------------------


def _symlinks(data: Path, outside: Path) -> None:
    outside.mkdir()
    (outside / "o.jpg").touch()
    (data / "train_data" / "in_link.jpg").symlink_to(data / "train_data" / "a.jpg")
    (data / "train_data" / "out_link.jpg").symlink_to(outside / "o.jpg")
    (data / "linked_dir").symlink_to(outside, target_is_directory=True)
    (data / "train_data" / "dangling.jpg").symlink_to(data / "train_data" / "gone.jpg")


SYMLINK_CASES = [
    pytest.param("train_data/in_link.jpg", None, id="symlink-inside-ok"),
    pytest.param("train_data/out_link.jpg", None, id="file-symlink-outside-followed"),
    pytest.param("linked_dir/o.jpg", None, id="dir-symlink-outside-followed"),
    pytest.param("train_data/dangling.jpg", "missing under", id="dangling-symlink"),
]


@pytest.mark.parametrize(("rel", "error"), SYMLINK_CASES)
def test_symlinks_in_table(data: Path, tmp_path: Path, rel: str, error: str | None) -> None:
    _symlinks(data, tmp_path / "outside")
    write_file(data / "train.csv", f"file_name,label\n{A},0\n{rel},1\n")
    if error is None:
        assert read_train_table(data)["file_name"].tolist() == [A, rel]
        return
    with pytest.raises(UserError) as err:
        read_train_table(data)
    assert_one_line(err, error, rel)


RESOLVE_CASES = [
    pytest.param("train_data/a.jpg", None, id="plain"),
    pytest.param("train_data/in_link.jpg", None, id="symlink-inside"),
    pytest.param("train_data/../train_data/a.jpg", None, id="dotdot-staying-inside"),
    pytest.param("", "is empty", id="empty"),
    pytest.param("/etc/passwd", "is absolute", id="absolute"),
    pytest.param("../x.jpg", "escapes", id="dotdot"),
    pytest.param("train_data/out_link.jpg", None, id="symlink-outside-followed"),
    pytest.param("linked_dir/o.jpg", None, id="dir-symlink-outside-followed"),
    pytest.param("linked_dir/../../x.jpg", "escapes", id="dotdot-through-a-link"),
]


@pytest.mark.parametrize(("rel", "error"), RESOLVE_CASES)
def test_resolve_image_path(data: Path, tmp_path: Path, rel: str, error: str | None) -> None:
    _symlinks(data, tmp_path / "outside")
    if error is None:
        got = resolve_image_path(data, rel)
        assert got.is_absolute() and got == Path(os.path.abspath(data / rel))
        return
    with pytest.raises(UserError) as err:
        resolve_image_path(data, rel)
    assert_one_line(err, error, repr(rel))


# ---- test table ---------------------------------------------------------------------------------------

X, Y, Z = TEST_FILES
TEST_TABLE_CASES = [
    pytest.param(f"id\n{X}\n{Y}\n{Z}\n", {}, [X, Y, Z], id="kaggle"),
    pytest.param(f"\ufeffid\r\n{Z}\r\n{X}\r\n", {}, [Z, X], id="bom-crlf-order-kept"),
    pytest.param(f",id\n0,{X}\n", {}, [X], id="unnamed-index"),
    pytest.param(f"image,other\n{X},1\n", {"id_col": "image"}, [X], id="id-col"),
    pytest.param(
        f"file_name\n{X}\n",
        {},
        ["no column 'id'", "columns found: file_name", "--id-col file_name"],
        id="no-id",
    ),
    pytest.param(f"id\n{X}\n{X}\n", {}, ["more than once in id", f"{X} on lines 2, 3"], id="duplicate"),
    pytest.param(
        f"id\n{X}\ntest_data_v2/q.jpg\n", {}, ["1 of 2 images listed in test.csv", "--id-col"], id="missing"
    ),
    pytest.param("id\n", {}, ["no rows"], id="header-only"),
    pytest.param(f"id\n{X}\nnan\n", {}, ["line 3", "id is missing"], id="nan-id"),
]


@pytest.mark.parametrize(("text", "kwargs", "expect"), TEST_TABLE_CASES)
def test_read_test_table(data: Path, text: str, kwargs: dict, expect: list[str]) -> None:
    write_file(data / "test.csv", text)
    if all(e in TEST_FILES for e in expect):
        df = read_test_table(data, **kwargs)
        assert list(df.columns) == ["id"] and df["id"].tolist() == expect
        assert isinstance(df.index, pd.RangeIndex)
        return
    with pytest.raises(UserError) as err:
        read_test_table(data, **kwargs)
    assert_one_line(err, *expect)
