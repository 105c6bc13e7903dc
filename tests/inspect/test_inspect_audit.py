"""The audits on data sets with planted problems: each is found, with its number and flag; clean data is not."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from planted import findings, make, save

from aivh_ens.inspect import audit_dataset
from aivh_ens.inspect.scan import jpeg_quality, scan_images


def _audit(root: Path):
    return audit_dataset(root, progress=False, log=lambda s: None)


def _warned(a) -> set[str]:
    return {f.key for f in a.findings if f.level == "warn"}


@pytest.mark.parametrize("quality", [10, 35, 50, 75, 90, 95, 100])
def test_jpeg_quality_is_read_back_from_the_quantisation_table(tmp_path: Path, quality: int) -> None:
    rgb = np.random.default_rng(quality).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    save(tmp_path / "pil.jpg", rgb, "JPEG", quality)
    cv2.imwrite(str(tmp_path / "cv2.jpg"), rgb, [cv2.IMWRITE_JPEG_QUALITY, quality])
    for name in ("pil.jpg", "cv2.jpg"):
        with Image.open(tmp_path / name) as im:
            assert jpeg_quality(list(im.quantization[0])) == quality


def test_unusual_but_valid_images_are_scanned(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # (H, W): 60 wide, 40 high
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=80)
    Image.fromarray((rng.integers(0, 65536, (40, 60))).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).save(tmp_path / "img.webp", quality=80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 60x40, shown 40x60
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=90)
    Image.fromarray(rgb).save(tmp_path / "bild_ä_猫.jpg", quality=70)
    files = ["cmyk.jpg", "deep.png", "palette.png", "img.webp", "rotated.jpg", "bild_ä_猫.jpg"]
    t, rate = scan_images(tmp_path, files, jobs=2, progress=False)
    t.index = files
    assert rate > 0
    assert t.loc["cmyk.jpg", "mode"] == "CMYK" and t.loc["cmyk.jpg", "jpeg_quality"] == 80
    assert t.loc["deep.png", "mode"].startswith("I") and np.isnan(t.loc["deep.png", "jpeg_quality"])
    assert t.loc["palette.png", "mode"] == "P"
    assert t.loc["img.webp", "format"] == "WEBP"
    assert (t.loc["rotated.jpg", "width"], t.loc["rotated.jpg", "height"]) == (40, 60)
    assert t.loc["rotated.jpg", "exif"] == 1.0 and t.loc["bild_ä_猫.jpg", "exif"] == 0.0
    assert t.loc["bild_ä_猫.jpg", "jpeg_quality"] == 70
    assert t["sha256"].nunique() == len(files)


def test_clean_data_flags_nothing(tmp_path: Path) -> None:
    a = _audit(make(tmp_path / "clean", n=160, n_test=60))
    assert abs(a.doc["shortcut"]["auc"] - 0.5) < 0.15
    assert abs(a.doc["shift"]["auc"] - 0.5) < 0.2
    assert _warned(a) == set(), [f.message for f in a.findings]
    assert not a.doc["pairs"]["detected"]


@pytest.mark.parametrize(
    ("planted", "feature", "flag"),
    [
        ("png", "format", "--jpeg-p 0.5"),  # every AI image a PNG, every human one a JPEG
        ("size", "megapixels", "--mode crop"),  # AI images 96x96, human ones 40-72 px
    ],
)
def test_a_label_shortcut_is_flagged(tmp_path: Path, planted: str, feature: str, flag: str) -> None:
    def spec(i: int, label: int, rng: np.random.Generator):
        size = (int(rng.integers(40, 73)), int(rng.integers(40, 73)))
        if planted == "png":
            return size, "PNG" if label == 1 else "JPEG", 85
        return ((96, 96) if label == 1 else size), "JPEG", 85

    a = _audit(make(tmp_path / planted, n=120, n_test=20, train_spec=spec))
    f = findings(a)["shortcut"]
    assert f.level == "warn" and f.value > 0.9 and f.flag == flag
    top = [r["feature"] for r in a.doc["shortcut"]["features"][:3]]
    assert feature in top and feature in f.message
    assert "a model would learn" in f.message


def test_a_shifted_test_set_is_flagged(tmp_path: Path) -> None:
    def larger(i: int, label: int, rng: np.random.Generator):
        return (int(rng.integers(110, 160)), int(rng.integers(110, 160))), "JPEG", int(rng.integers(40, 60))

    a = _audit(make(tmp_path / "shift", n=120, n_test=60, test_spec=larger))
    f = findings(a)["shift"]
    assert f.level == "warn" and f.value > 0.7 and f.flag in ("--mode crop", "--jpeg-p 0.5")
    assert "test differs from train" in f.message and "median" in f.message
    assert a.doc["shift"]["features"][0]["distance"] > 0.9
    assert findings(a)["shortcut"].level == "ok"  # the shift is in test only


def test_duplicates_within_train_and_across_train_and_test_are_found(tmp_path: Path) -> None:
    root = make(tmp_path / "dups", n=120, n_test=30)
    train = pd.read_csv(root / "train.csv")
    test = pd.read_csv(root / "test.csv")
    # Leaks: two train images copied into test, one re-encoded harder (a near-duplicate).
    shutil.copy(root / train.file_name[0], root / "test_data_v2/copy0.jpg")
    shutil.copy(root / train.file_name[1], root / "test_data_v2/copy1.jpg")
    with Image.open(root / train.file_name[2]) as im:
        im.convert("RGB").save(root / "test_data_v2/near2.jpg", quality=40)
    test = pd.concat(
        [
            test,
            pd.DataFrame(
                {"id": ["test_data_v2/copy0.jpg", "test_data_v2/copy1.jpg", "test_data_v2/near2.jpg"]}
            ),
        ]
    )
    test.to_csv(root / "test.csv", index=False)
    # Within train: row 3 again under another name with the other label; row 4 again with the same label.
    shutil.copy(root / train.file_name[3], root / "train_data/again3.jpg")
    shutil.copy(root / train.file_name[4], root / "train_data/again4.jpg")
    extra = pd.DataFrame(
        {
            "file_name": ["train_data/again3.jpg", "train_data/again4.jpg"],
            "label": [1 - train.label[3], train.label[4]],
        }
    )
    pd.concat([train, extra]).to_csv(root / "train.csv", index=False)

    a = _audit(root)
    d = a.doc["duplicates"]
    assert sorted(map(sorted, d["train_exact"])) == sorted(
        [
            sorted([train.file_name[3], "train_data/again3.jpg"]),
            sorted([train.file_name[4], "train_data/again4.jpg"]),
        ]
    )
    assert d["train_exact_conflicts"] == [[train.file_name[3], "train_data/again3.jpg"]]
    assert {(x["test"], x["train"]) for x in d["test_exact"]} == {
        ("test_data_v2/copy0.jpg", train.file_name[0]),
        ("test_data_v2/copy1.jpg", train.file_name[1]),
    }
    assert [(x["test"], x["train"]) for x in d["test_near"]] == [
        ("test_data_v2/near2.jpg", train.file_name[2])
    ]
    f = findings(a)
    assert f["train_duplicates"].level == "warn" and f["train_duplicates"].value == 2
    assert "1 of them with conflicting labels" in f["train_duplicates"].message
    assert f["train_duplicates"].flag == "remove the conflicting rows from train.csv"
    assert f["test_leaks"].level == "warn" and f["test_leaks"].value == 3


def test_the_demo_data_pairs_are_detected(demo_data) -> None:
    a = _audit(demo_data())
    f = findings(a)["pairs"]
    assert f.level == "warn" and f.flag == "--group pairs"
    p = a.doc["pairs"]
    assert p["detected"] and p["same_size"] == 1.0 and p["opposite_labels"] == 1.0
    assert p["close"] >= 0.9 and p["close_random"] <= 0.2
    assert findings(a)["train_duplicates"].level == "ok"
    assert a.doc["duplicates"]["n_train_near"] == 0  # the pairs themselves are not reported as duplicates


@pytest.mark.parametrize("bits", [0, 4, 7])
def test_near_duplicate_search_equals_brute_force(bits: int) -> None:
    from aivh_ens.inspect.audit import _near, hamming

    rng = np.random.default_rng(bits)
    a = rng.integers(0, 2**63, 3000, dtype=np.uint64)
    flips = rng.integers(0, 64, (300, 3)).astype(np.uint64)  # 300 hashes 0-3 bits from an earlier one
    a[-300:] = a[:300] ^ np.bitwise_or.reduce(np.uint64(1) << flips, axis=1) * (rng.random(300) < 0.9)
    b = a[::7] ^ np.uint64(1 << 5)
    for x, y, upper in ((a, a, True), (b, a, False)):
        d = hamming(x[:, None], y[None, :])
        i, j = np.nonzero(
            (d <= bits) & ((np.arange(len(y))[None, :] > np.arange(len(x))[:, None]) | (not upper))
        )
        assert np.array_equal(_near(x, y, bits, upper), np.column_stack([i, j, d[i, j]]))


def test_without_a_test_table_the_train_checks_still_run(tmp_path: Path) -> None:
    root = make(tmp_path / "train-only", n=40, n_test=2)
    (root / "test.csv").unlink()
    a = _audit(root)
    assert a.test is None and a.doc["n_test"] is None and "shift" not in a.doc
    assert [f.key for f in a.findings] == ["shortcut", "pairs", "train_duplicates"]
