"""The demo data set: Kaggle layout, determinism, no metadata shortcut, a learnable signal, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from aivh_ens import synth
from aivh_ens.cli import main
from aivh_ens.errors import UserError
from aivh_ens.synth import DEFAULT_DIFFICULTY, MARKER, is_demo_dataset, make_demo_dataset


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "d"
    return root, make_demo_dataset(root, n=40, n_test=21, seed=3)


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 train images (200 pairs) at the default difficulty, for the statistical tests."""
    root = tmp_path_factory.mktemp("demo") / "m"
    make_demo_dataset(root, n=400, n_test=2, seed=11)
    return root


def _sizes(root: Path, files: pd.Series) -> np.ndarray:
    return np.array([Image.open(root / f).size for f in files])  # (N, 2) width, height


def test_layout(small: tuple[Path, dict]) -> None:
    root, info = small
    train = pd.read_csv(root / "train.csv")
    test = pd.read_csv(root / "test.csv")
    solution = pd.read_csv(root / "solution.csv")
    assert list(train.columns) == ["file_name", "label"]
    assert list(test.columns) == ["id"]
    assert list(solution.columns) == ["id", "label"]
    assert len(train) == info["n_train"] == 40 and len(test) == info["n_test"] == 21
    assert train["label"].tolist() == [1, 0] * 20  # row 2k AI, row 2k+1 human
    assert train["file_name"].str.match(r"^train_data/[0-9a-f]+\.jpg$").all()
    assert test["id"].str.match(r"^test_data_v2/[0-9a-f]+\.jpg$").all()
    assert train["file_name"].is_unique and test["id"].is_unique
    assert all((root / f).is_file() for f in train["file_name"]) and all(
        (root / f).is_file() for f in test["id"]
    )
    # Only the listed images are on disk, and no staging folder is left behind.
    assert (
        len(list((root / "train_data").iterdir())) == 40
        and len(list((root / "test_data_v2").iterdir())) == 21
    )
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["train.csv", "test.csv", "solution.csv", MARKER, "train_data", "test_data_v2"]
    )

    sizes = _sizes(root, train["file_name"])
    assert (sizes[0::2] == sizes[1::2]).all()  # pair members share the size
    assert sizes.min() >= 48 and sizes.max() <= 128 and len({tuple(s) for s in sizes}) > 5
    test_sizes = _sizes(root, test["id"])
    assert test_sizes.min() >= 96 and test_sizes.max() <= 160
    with Image.open(root / train["file_name"][0]) as im:
        assert im.format == "JPEG" and im.mode == "RGB"

    assert solution["id"].tolist() == test["id"].tolist()
    assert set(solution["label"]) == {0, 1}
    assert (
        info["n_test_ai"] + info["n_test_human"] == 21 and abs(info["n_test_ai"] - info["n_test_human"]) <= 1
    )
    assert info["n_test_ai"] == int(solution["label"].sum())
    assert is_demo_dataset(root) and json.loads((root / MARKER).read_text())["seed"] == 3


def test_same_seed_same_bytes_other_seed_other_bytes(small: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = small
    make_demo_dataset(tmp_path / "again", n=40, n_test=21, seed=3)
    make_demo_dataset(tmp_path / "other", n=40, n_test=21, seed=4)
    same, other = _tree_digest(tmp_path / "again"), _tree_digest(tmp_path / "other")
    assert same == _tree_digest(root)
    assert set(other.values()).isdisjoint(v for k, v in same.items() if k.endswith(".jpg"))


def test_file_names_do_not_follow_the_label(small: tuple[Path, dict]) -> None:
    root, _ = small
    train = pd.read_csv(root / "train.csv")
    # Sorted by name (what a directory listing does), the labels must be mixed, not in two blocks.
    order = train.sort_values("file_name")["label"].to_numpy()
    assert (np.diff(order) != 0).sum() > len(order) // 4


def test_metadata_is_no_shortcut(medium: Path) -> None:
    train = pd.read_csv(medium / "train.csv")
    wh = _sizes(medium, train["file_name"]).astype(float)
    size = np.array([(medium / f).stat().st_size for f in train["file_name"]], float)
    x = np.column_stack([wh, size, size / wh.prod(1)])  # width, height, bytes, bytes per pixel
    clf = make_pipeline(StandardScaler(), LogisticRegression())
    acc = cross_val_score(clf, x, train["label"], groups=np.arange(len(train)) // 2, cv=GroupKFold(5)).mean()
    assert acc < 0.6


def _nyquist_ratio(path: Path) -> float:
    """Mean luminance power on the Nyquist lines over that of the band just inside them.

    A stride-2 transposed convolution whose kernel phases differ modulates the image with period 2 pixels,
    which puts a peak exactly there; natural images and cameras have a smooth spectrum.
    """
    g = np.asarray(Image.open(path).convert("L"), np.float64)
    g = g[: g.shape[0] // 2 * 2, : g.shape[1] // 2 * 2]  # even sides, so the Nyquist bin exists
    power = np.abs(np.fft.fft2(g - g.mean())) ** 2
    h, w = g.shape
    ky = np.minimum(np.arange(h), h - np.arange(h))[:, None]  # |frequency index|; h // 2 is the Nyquist row
    kx = np.minimum(np.arange(w), w - np.arange(w))[None, :]
    nyquist = (ky == h // 2) | (kx == w // 2)
    near = ((ky > 0.8 * (h // 2)) | (kx > 0.8 * (w // 2))) & ~nyquist
    return float(power[nyquist].mean() / power[near].mean())


def test_a_spectral_feature_separates_the_classes(medium: Path) -> None:
    train = pd.read_csv(medium / "train.csv")
    ratio = np.array([_nyquist_ratio(medium / f) for f in train["file_name"]])
    assert roc_auc_score(train["label"], ratio) > 0.8
    # Within a pair the scene is the same, so the comparison isolates the generator's trace.
    assert (ratio[0::2] > ratio[1::2]).mean() > 0.8


def test_difficulty_weakens_the_trace(tmp_path: Path) -> None:
    aucs = []
    for difficulty in (0.0, 1.0):
        root = tmp_path / str(difficulty)
        make_demo_dataset(root, n=60, n_test=2, seed=5, difficulty=difficulty)
        train = pd.read_csv(root / "train.csv")
        aucs.append(roc_auc_score(train["label"], [_nyquist_ratio(root / f) for f in train["file_name"]]))
    assert aucs[0] > 0.8 and aucs[1] < 0.8  # at difficulty 1 an AI image is drawn like a photo


def test_half_the_test_ai_images_come_from_an_unseen_generator(tmp_path: Path, monkeypatch) -> None:
    """The training generator's trace (above every test photo) marks about half of the test AI images."""

    def traced_share(root: Path) -> float:
        sol = pd.read_csv(root / "solution.csv")
        ratio = np.array([_nyquist_ratio(root / f) for f in sol["id"]])
        return float((ratio[sol["label"] == 1] > ratio[sol["label"] == 0].max()).mean())

    make_demo_dataset(tmp_path / "mixed", n=20, n_test=80, seed=1, difficulty=0.0)
    monkeypatch.setattr(synth, "_TEST_NEW_SHARE", 1.0)  # every test AI image from the unseen generator
    make_demo_dataset(tmp_path / "unseen", n=20, n_test=80, seed=1, difficulty=0.0)
    assert 0.3 < traced_share(tmp_path / "mixed") < 0.7
    assert traced_share(tmp_path / "unseen") < 0.05


def test_previous_demo_data_set_is_replaced(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, n=20, n_test=4, seed=0)
    make_demo_dataset(tmp_path, n=24, n_test=2, seed=1)
    assert len(pd.read_csv(tmp_path / "train.csv")) == 24
    assert len(list((tmp_path / "train_data").iterdir())) == 24  # old images gone


def test_a_failed_run_leaves_the_old_data_set_or_none_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_demo_dataset(tmp_path, n=20, n_test=2, seed=0)
    before = _tree_digest(tmp_path)

    def boom(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("killed")

    # Killed while drawing images: the previous data set is untouched and no staging folder is left.
    with monkeypatch.context() as m:
        m.setattr(synth, "_test_image", boom)
        with pytest.raises(RuntimeError):
            make_demo_dataset(tmp_path, n=30, n_test=2, seed=1)
    assert _tree_digest(tmp_path) == before and len(list(tmp_path.iterdir())) == 6

    # Killed while swapping folders in: no train.csv/test.csv, and a re-run needs no --force.
    with monkeypatch.context() as m:
        m.setattr(synth.os, "replace", boom)
        with pytest.raises(RuntimeError):
            make_demo_dataset(tmp_path, n=30, n_test=2, seed=1)
    assert not (tmp_path / "train.csv").exists() and not (tmp_path / "test.csv").exists()
    make_demo_dataset(tmp_path, n=30, n_test=2, seed=1)
    assert len(pd.read_csv(tmp_path / "train.csv")) == 30


def test_foreign_folder_needs_force_and_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        make_demo_dataset(tmp_path, n=20, n_test=2)
    assert not (tmp_path / "train.csv").exists()
    make_demo_dataset(tmp_path, n=20, n_test=2, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "train.csv").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 21}, "even"),
        ({"n": 18}, ">= 20"),
        ({"n_test": 1}, "n-test"),
        ({"difficulty": 1.5}, r"\[0, 1\]"),
        ({"difficulty": -0.1}, r"\[0, 1\]"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        make_demo_dataset(tmp_path / "x", **{"n": 20, "n_test": 2, **kwargs})
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_data_set(tmp_path: Path) -> None:
    out = tmp_path / "d"
    res = CliRunner().invoke(main, ["demo-data", str(out), "--n", "200", "--n-test", "50"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out / "train.csv")) == 200 and len(pd.read_csv(out / "test.csv")) == 50
    assert "100 AI" in res.output and str(out / "train.csv") in res.output


@pytest.mark.parametrize("args", [["--n", "201"], ["--n", "10"], ["--difficulty", "2"]])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    res = CliRunner().invoke(main, ["demo-data", str(tmp_path / "d"), *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_cli_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.csv").write_text("a\n1\n")
    res = CliRunner().invoke(main, ["demo-data", str(tmp_path), "--n", "20", "--n-test", "2"])
    assert res.exit_code == 2 and "--force" in res.output
    res = CliRunner().invoke(main, ["demo-data", str(tmp_path), "--n", "20", "--n-test", "2", "--force"])
    assert res.exit_code == 0, res.output


def test_cli_help_shows_the_default_difficulty() -> None:
    res = CliRunner().invoke(main, ["demo-data", "--help"])
    assert res.exit_code == 0 and "aivh-ens demo-data data/" in res.output
    assert f"[default: {DEFAULT_DIFFICULTY:g}]" in res.output
