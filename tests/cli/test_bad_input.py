"""A corpus of bad inputs driven through the CLI: exit 2, one line naming the problem, nothing written."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_checks import assert_user_error, tiny_cv
from click.testing import CliRunner
from PIL import Image

from aivh_ens.cli import main

BASE_ARGS = tiny_cv(folds=2, pairs=False)


@pytest.fixture(scope="module")
def base(demo_data) -> Path:
    return demo_data(n=40, n_test=10, seed=11)


def _csv(d: Path) -> pd.DataFrame:
    return pd.read_csv(d / "train.csv")


def _first_image(d: Path) -> Path:
    return d / _csv(d)["file_name"][0]


def write_csv_text(text: str) -> Callable[[Path], None]:
    return lambda d: (d / "train.csv").write_text(text)


def set_label(value: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        lines = (d / "train.csv").read_text().splitlines()
        name = lines[3].split(",")[0]
        lines[3] = f"{name},{value}"
        (d / "train.csv").write_text("\n".join(lines) + "\n")

    return mutate


def set_file(value: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        df = _csv(d)
        df.loc[2, "file_name"] = value
        df.to_csv(d / "train.csv", index=False)

    return mutate


def image_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda d: _first_image(d).write_bytes(data)


def truncate_first(d: Path) -> None:
    raw = _first_image(d).read_bytes()
    _first_image(d).write_bytes(raw[: len(raw) // 3])


def tiny_png(d: Path) -> None:
    Image.new("RGB", (1, 1)).save(_first_image(d), format="PNG")


def bomb(d: Path) -> None:
    # A PNG whose header claims 20000 x 20000 pixels: refused from the header, before any decoding.
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda t, b: struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b))  # noqa: E731
    _first_image(d).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def duplicate(d: Path) -> None:
    df = _csv(d)
    df.loc[5, "file_name"] = df.loc[4, "file_name"]
    df.to_csv(d / "train.csv", index=False)


def one_class(d: Path) -> None:
    df = _csv(d)
    df["label"] = 1
    df.loc[0, "label"] = 0
    df.to_csv(d / "train.csv", index=False)


NOOP: Callable[[Path], None] = lambda d: None  # noqa: E731

# (id, mutation of a copy of the dataset, extra CLI args, words the error line must contain)
CASES = [
    ("csv-missing", lambda d: (d / "train.csv").unlink(), [], ["train.csv"]),
    ("csv-empty", write_csv_text(""), [], ["train.csv", "empty"]),
    ("csv-header-only", write_csv_text("file_name,label\n"), [], ["train.csv", "no rows"]),
    (
        "csv-missing-label-col",
        lambda d: _csv(d)[["file_name"]].to_csv(d / "train.csv", index=False),
        [],
        ["label", "--label-col"],
    ),
    ("csv-semicolon", lambda d: _csv(d).to_csv(d / "train.csv", index=False, sep=";"), [], ["semicolon"]),
    ("csv-tab", lambda d: _csv(d).to_csv(d / "train.csv", index=False, sep="\t"), [], ["tab"]),
    ("label-string", set_label("ai"), [], ["line 4", "ai", "0 or 1"]),
    ("label-2", set_label("2"), [], ["line 4", "2"]),
    ("label-minus-1", set_label("-1"), [], ["line 4", "-1"]),
    ("label-nan", set_label(""), [], ["line 4"]),
    ("label-float", set_label("0.5"), [], ["line 4", "0.5"]),
    ("duplicate-file", duplicate, [], ["more than once", "lines 6, 7"]),
    ("file-empty-name", set_file(""), [], ["line 4"]),
    ("path-dotdot", set_file("../outside.jpg"), [], ["../outside.jpg"]),
    ("path-absolute", set_file("/etc/hostname"), [], ["/etc/hostname"]),
    ("image-missing", lambda d: _first_image(d).unlink(), [], ["missing", "1 of 40"]),
    ("image-zero-bytes", image_bytes(b""), [], ["empty"]),
    ("image-not-image", image_bytes(bytes(range(256)) * 4), [], ["not"]),
    ("image-text", image_bytes(b"hello, this is not a picture\n" * 20), [], ["text"]),
    ("image-1x1", tiny_png, [], ["1x1"]),
    ("image-bomb", bomb, [], ["pixel"]),
    ("folds-1", NOOP, ["--folds", "1"], ["--folds", "at least 2"]),
    ("folds-too-many", NOOP, ["--folds", "30"], ["smallest class"]),
    ("one-class", one_class, [], ["smallest class"]),
    ("unknown-model", NOOP, ["--model", "convnext_tinyy"], ["unknown timm model", "convnext_tiny"]),
    ("unknown-recipe", NOOP, ["--recipe", "effnet"], ["unknown recipe"]),
    ("group-col-missing", NOOP, ["--group", "source"], ["source"]),
    ("fold-out-of-range", NOOP, ["--fold", "5"], ["--fold"]),
    ("img-size-tiny", NOOP, ["--img-size", "4"], ["--img-size"]),
    ("no-cuda", NOOP, ["--device", "cuda:0"], ["CUDA"]),
    ("weights-missing", NOOP, ["--weights", "nope.safetensors"], ["nope.safetensors", "does not exist"]),
    ("amp-unknown", NOOP, ["--amp", "fp8"], ["--amp", "fp8", "auto, bf16, fp16, none"]),
    ("bad-run-name", NOOP, ["--name", "../x"], ["run name"]),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case_id,mutate,extra,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, base, case_id, mutate, extra, needles):
    _assert_refused(tmp_path, base, case_id, mutate, extra, needles)


def test_too_little_shared_memory_for_the_loader_is_refused_up_front(tmp_path, base, monkeypatch):
    """A container's small /dev/shm would kill the loader's workers with SIGBUS mid-epoch: cv refuses first."""
    from aivh_ens import system

    monkeypatch.setattr(
        system, "shm_free", lambda: 1 << 17
    )  # 128 KiB; 3 batches of 16 x 3 x 32 x 32 need 144 KiB
    _assert_refused(
        tmp_path, base, "small-shm", NOOP, ["--workers", "2"], ["/dev/shm", "--shm-size", "--workers"]
    )


def _assert_refused(tmp_path, base, case_id, mutate, extra, needles):
    data = tmp_path / "data"
    shutil.copytree(base, data, symlinks=True)
    mutate(data)
    work = tmp_path / "work"
    (work / "folds").mkdir(parents=True)
    (work / "folds" / "keep.txt").write_text("untouched")
    before = _snapshot(work)
    res = CliRunner().invoke(main, ["cv", *BASE_ARGS, "--data", str(data), "--workdir", str(work), *extra])
    assert res.exit_code == 2, f"{case_id}: {res.output}"
    lines = res.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n.lower() in errors[0].lower(), f"{case_id}: {n!r} not in {errors[0]!r}"
    assert _snapshot(work) == before, f"{case_id} wrote files"


def test_must_work_variants_together(tmp_path, base):
    """Unnamed index column + BOM + CRLF in train.csv, and a PNG with alpha among the JPEGs, all train."""
    data = tmp_path / "data"
    shutil.copytree(base, data)
    df = _csv(data)
    rgba = np.random.default_rng(0).integers(0, 256, (60, 60, 4), dtype=np.uint8)
    png = "train_data/alpha.png"
    Image.fromarray(rgba, "RGBA").save(data / png)
    (data / df.loc[7, "file_name"]).unlink()
    df.loc[7, "file_name"] = png
    text = df.to_csv(index=True, lineterminator="\r\n")  # a leading unnamed index column
    (data / "train.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    res = CliRunner().invoke(
        main, ["cv", *BASE_ARGS, "--data", str(data), "--workdir", str(tmp_path / "w"), "--name", "ok"]
    )
    assert res.exit_code == 0, res.output
    oof = pd.read_csv(tmp_path / "w" / "oof" / "ok.csv")
    assert len(oof) == 40 and png in set(oof["file_name"])


def test_truncated_jpeg_names_the_file(tmp_path, base):
    data = tmp_path / "data"
    shutil.copytree(base, data)
    truncate_first(data)
    res = CliRunner().invoke(
        main, ["cv", *BASE_ARGS, "--data", str(data), "--workdir", str(tmp_path / "w"), "--cache", "off"]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert _csv(data)["file_name"][0] in res.output and "--on-bad-image skip" in res.output
    assert not (tmp_path / "w" / "oof").exists() or not list((tmp_path / "w" / "oof").glob("*.csv"))


def test_a_diverging_run_stops_with_one_line_naming_fold_and_fix(tmp_path, base, monkeypatch):
    """A non-finite loss is a setting to change, not a bug: exit 2, one line with the fold, the batch and the fix."""

    def nan_loss(logits, y, **kw):
        return (logits * float("nan")).sum()

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_loss)
    res = CliRunner().invoke(main, ["cv", *BASE_ARGS, "--data", str(base), "--workdir", str(tmp_path / "w")])
    assert_user_error(res, "fold 0: training diverged", "epoch 1, batch 0", "--lr", "--force")


def test_weights_of_another_model_are_refused_with_nothing_written(tmp_path, base):
    """timm would load them non-strictly (nothing matches, a warning) and train from random init."""
    from safetensors.torch import save_file

    from aivh_ens.train.models import create_backbone

    def other_weights(d: Path) -> None:
        src = create_backbone("test_convnext", pretrained=False, weights=None, num_classes=0)
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(d / "other.safetensors"))

    weights = tmp_path / "data" / "other.safetensors"  # where _assert_refused's copy of the data puts it
    extra = ["--weights", str(weights)]
    _assert_refused(tmp_path, base, "weights-other-model", other_weights, extra, ["does not fit", "0 of"])


def test_a_symlinked_image_folder_trains(tmp_path, base):
    """An image folder that is a link to another disk (and a linked file) is followed, not refused."""
    data = tmp_path / "data"
    shutil.copytree(base, data)
    folder = _first_image(data).parent
    elsewhere = tmp_path / "other-disk" / folder.name
    shutil.move(str(folder), str(elsewhere))
    os.symlink(elsewhere, folder, target_is_directory=True)
    first = _first_image(data)
    moved = tmp_path / "other-disk" / "moved.jpg"
    shutil.move(str(first), str(moved))
    os.symlink(moved, first)
    work = tmp_path / "w"
    res = CliRunner().invoke(
        main, ["cv", *BASE_ARGS, "--data", str(data), "--workdir", str(work), "--name", "ln"]
    )
    assert res.exit_code == 0, res.output
    oof = pd.read_csv(work / "oof" / "ln.csv")
    assert oof["file_name"].tolist() == _csv(data)["file_name"].tolist()
