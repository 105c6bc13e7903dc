"""The decode-once image cache: exact pixels, incremental rebuilds, atomic builds, disk checks, same OOF."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from cli_checks import tiny_cv
from click.testing import CliRunner

from aivh_ens.cli import main
from aivh_ens.config import resolve_config
from aivh_ens.data import cache as C
from aivh_ens.data import cache_format as CF
from aivh_ens.data.images import image_size
from aivh_ens.data.loader import FileSource, ImageDataset, close_loaders, make_loader
from aivh_ens.data.ring import RingLoader
from aivh_ens.data.transforms import (
    RandomAffineCrop,
    StorageStep,
    affine_crop,
    eval_transform,
    storage_step,
    train_transform,
)
from aivh_ens.errors import UserError

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def demo(demo_data) -> Path:
    return demo_data(n=120, n_test=20, seed=3)


@pytest.fixture
def data(tmp_path, demo) -> tuple[Path, list[str]]:
    """A private copy of 24 demo images plus a large JPEG, a PNG and an EXIF-rotated JPEG."""
    d = tmp_path / "data"
    names = pd.read_csv(demo / "train.csv")["file_name"].tolist()[:24]
    for n in names:
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(demo / n, d / n)
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.integers(0, 256, (300, 460, 3), dtype=np.uint8), (5, 5), 0)
    cv2.imwrite(str(d / "big.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(str(d / "small.png"), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    from PIL import Image

    im = Image.fromarray(big[:200, :120])
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(d / "rotated.jpg", exif=exif, quality=90)
    return d, [*names, "big.jpg", "small.png", "rotated.jpg"]


@pytest.fixture
def one_thread():
    # CPU training on 2 busy cores: OpenMP threads waiting at barriers make 2 threads slower than 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STORAGES = [
    StorageStep("square", 32),
    StorageStep("short", 40),
    StorageStep("short", 64, upscale=False),
    StorageStep("short", 100, upscale=False, interpolation="linear"),
]


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: s.tag)
def test_cache_returns_the_storage_step_pixels(tmp_path, data, storage):
    root, names = data
    src = C.ensure_cache(root, names, storage, tmp_path / "cache", **QUIET)
    assert src is not None and len(src) == len(names)
    for i, n in enumerate(names):
        direct = storage.load(root / n)  # decode + storage step, no cache
        got = src.get(i)
        assert got.dtype == np.uint8 and got.flags.writeable and got.flags.c_contiguous
        np.testing.assert_array_equal(got, direct, err_msg=n)
        view = src.view(i)  # the same pixels, read-only, no copy
        assert not view.flags.writeable
        np.testing.assert_array_equal(view, direct, err_msg=n)
        w, h = image_size(root / n)
        # The size estimate from the header; a reduced JPEG decode may round the long side one pixel apart.
        assert np.abs(np.subtract(got.shape[:2], storage.shape(h, w))).max() <= 1, n
        assert src.describe(i) == n
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize(
    ("recipe", "kind"),
    [("tiny", "sq32"), ("effnet-b4-adam", "ss40"), ("convitx", "ss40"), ("crop-robust", "sc512")],
)
def test_storage_step_by_recipe(recipe, kind):
    cfg = resolve_config(recipe, img_size=32)
    cfg = dataclasses.replace(
        cfg, train_resize=40 if cfg.train_resize else None, eval_resize=36 if cfg.eval_resize else None
    )
    assert storage_step(cfg, 32).tag == kind


def test_plain_resize_pipeline_is_the_identity_on_stored_images():
    """resize mode without crops: the stored image is already S x S, so training only flips it."""
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tf = train_transform(resolve_config("tiny", img_size=32, hflip=1.0), 32)
    np.testing.assert_array_equal(tf(image=img)["image"], img[:, ::-1])
    op = RandomAffineCrop(32, "whole")
    np.testing.assert_array_equal(op(image=img)["image"], img)


def test_fused_warp_geometry():
    img = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    # A whole-pixel window at scale 1 warps to exactly the crop (and its mirror image).
    np.testing.assert_array_equal(affine_crop(img, (5.0, 3.0, 48.0, 48.0), 48, False, 1e-9), img[3:51, 5:53])
    np.testing.assert_array_equal(
        affine_crop(img, (5.0, 3.0, 48.0, 48.0), 48, True, 1e-9), img[3:51, 5:53][:, ::-1]
    )
    sq = img[:48, :48]
    np.testing.assert_array_equal(affine_crop(sq, (0, 0, 48, 48), 48, False, 90.0), np.rot90(sq, 1))
    big = np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    ref = cv2.resize(big, (48, 48), interpolation=cv2.INTER_LINEAR)
    assert np.abs(affine_crop(big, (0, 0, 96, 96), 48, False, 1e-9).astype(int) - ref).max() <= 1


def test_changed_image_is_decoded_again_alone(tmp_path, data, monkeypatch):
    root, names = data
    storage = StorageStep("short", 40)
    calls: list[str] = []
    real = C._decode
    monkeypatch.setattr(C, "_decode", lambda p, s: (calls.append(Path(p).name), real(p, s))[1])
    first = C.ensure_cache(root, names, storage, tmp_path / "c", **QUIET)
    assert len(calls) == len(names)
    before = [first.get(i) for i in range(len(names))]

    calls.clear()
    assert C.ensure_cache(root, names, storage, tmp_path / "c", **QUIET) is not None
    assert calls == []  # nothing changed: nothing decoded

    victim = names[3]
    new = np.full((50, 70, 3), 200, np.uint8)
    cv2.imwrite(str(root / victim), new)
    st = os.stat(root / victim)
    os.utime(root / victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    src = C.ensure_cache(root, names, storage, tmp_path / "c", **QUIET)
    assert calls == [Path(victim).name]  # only the changed image
    for i, n in enumerate(names):
        expect = storage.load(root / n) if n == victim else before[i]
        np.testing.assert_array_equal(src.get(i), expect, err_msg=n)

    # A subset is served from the same file; a new image is decoded alone, the others are kept.
    calls.clear()
    sub = C.ensure_cache(root, names[:5], storage, tmp_path / "c", **QUIET)
    assert calls == [] and sub.path == src.path and len(sub) == 5
    cv2.imwrite(str(root / "extra.png"), new)
    C.ensure_cache(root, ["extra.png"], storage, tmp_path / "c", **QUIET)
    assert calls == ["extra.png"]
    calls.clear()
    again = C.ensure_cache(root, [*names, "extra.png"], storage, tmp_path / "c", **QUIET)
    assert calls == [] and len(again) == len(names) + 1


def no_tmp(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_build_is_never_used(tmp_path, data, monkeypatch):
    root, names = data
    storage = StorageStep("square", 32)
    cdir = tmp_path / "c"
    real_add = CF.CacheWriter.add
    count = {"n": 0}

    def add_then_die(self, *a, **k):
        count["n"] += 1
        if count["n"] == 6:
            raise KeyboardInterrupt  # as a kill mid-build would
        return real_add(self, *a, **k)

    monkeypatch.setattr(CF.CacheWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        C.ensure_cache(root, names, storage, cdir, **QUIET)
    stem = CF.cache_stem(cdir, root, storage)
    assert CF.versions(stem) == [] and no_tmp(cdir)  # nothing half-written is left under any name
    monkeypatch.setattr(CF.CacheWriter, "add", real_add)
    good = C.ensure_cache(root, names, storage, cdir, **QUIET)
    path = good.path
    good.close()
    old_bytes = path.read_bytes()

    # A rebuild that dies leaves the previous complete version, and only it, in place.
    cv2.imwrite(str(root / names[0]), np.zeros((40, 40, 3), np.uint8))
    st = os.stat(root / names[0])
    os.utime(root / names[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    count["n"] = 0
    monkeypatch.setattr(CF.CacheWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        C.ensure_cache(root, names, storage, cdir, **QUIET)
    assert CF.versions(stem) == [path] and path.read_bytes() == old_bytes and no_tmp(cdir)
    monkeypatch.setattr(CF.CacheWriter, "add", real_add)

    # What a killed build leaves (a temp file, a staged file) is ignored and removed; a truncated version
    # is no version: a new one is built and the truncated file removed.
    stale = cdir / f".{stem.name}.building.abc123.tmp"
    stale.write_bytes(b"garbage" * 100)
    staged = cdir / f"{stem.name}.building"
    staged.write_bytes(old_bytes)
    path.write_bytes(old_bytes[: len(old_bytes) // 2])
    assert CF.read_index(path, CF.cache_key(root, storage)) is None
    src = C.ensure_cache(root, names, storage, cdir, **QUIET)
    assert not stale.exists() and not staged.exists() and no_tmp(cdir)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(src.get(i), storage.load(root / n))
    assert CF.versions(stem) == [src.path] and src.path != path  # names[0] changed: another version


def test_bad_images_are_recorded_not_fatal(tmp_path, data):
    root, names = data
    (root / "broken.jpg").write_bytes((root / names[0]).read_bytes()[:200])
    src = C.ensure_cache(
        root, [*names, "broken.jpg", "missing.jpg"], StorageStep("square", 32), tmp_path / "c", **QUIET
    )
    from aivh_ens.data.images import BadImageError

    for i in (len(names), len(names) + 1):
        with pytest.raises(BadImageError):
            src.get(i)
    assert src.get(0).shape == (32, 32, 3)


def test_disk_space_check(tmp_path, data, monkeypatch):
    root, names = data
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**6, 10**6))
    storage = StorageStep("short", 40)
    with pytest.raises(UserError, match=r"needs .* GB .* free.*--cache-dir.*--img-size.*--cache off"):
        C.ensure_cache(root, names, storage, tmp_path / "c", **QUIET)
    assert C.ensure_cache(root, names, storage, tmp_path / "c", required=False, **QUIET) is None
    assert CF.versions(CF.cache_stem(tmp_path / "c", root, storage)) == []
    # cv's auto mode decodes on the fly instead, through the same storage step.
    cfg = resolve_config("tiny", img_size=32, cache="auto")
    src = C.open_source(cfg, root, names, tmp_path, **QUIET)
    assert isinstance(src, FileSource) and src.storage == storage_step(cfg, 32)
    with pytest.raises(UserError):
        C.open_source(resolve_config("tiny", img_size=32, cache="on"), root, names, tmp_path, **QUIET)


def test_cache_command_without_room_is_one_line_exit_2(tmp_path, demo, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**6, 10**6))
    res = CliRunner().invoke(
        main, ["cache", "--data", str(demo), "--recipe", "tiny", "--workdir", str(tmp_path), "--quiet"]
    )
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "GB" in errors[0] and "Traceback" not in res.output


def test_cache_command(tmp_path, demo):
    args = [
        "cache",
        "--data",
        str(demo),
        "--recipe",
        "tiny",
        "--img-size",
        "32",
        "--workdir",
        str(tmp_path),
        "--quiet",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "GB for 140 images (140 to decode, 0 reused)" in res.output and "cache ready" in res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "to decode" not in res.output  # reused as is
    assert len(list((tmp_path / "runs" / "cache").glob("*.imgcache"))) == 1


def test_workers_see_each_epoch_and_match_in_process(tmp_path, data):
    root, names = data
    cfg = resolve_config("tiny", img_size=32, rotate=10.0)
    src = C.ensure_cache(root, names, storage_step(cfg, 32), tmp_path / "c", **QUIET)
    state = pickle.dumps(src)
    assert len(state) < 20_000 and pickle.loads(state)._arr is None  # the mapping never travels

    def passes(workers: int) -> list[list[torch.Tensor]]:
        ds = ImageDataset(
            src, np.arange(len(names)), np.arange(len(names)) % 2, train_transform(cfg, 32), 32, seed=5
        )
        out, loaders = [], set()
        for epoch in range(2):
            ds.set_epoch(epoch)
            loader = make_loader(ds, 8, train=True, device=torch.device("cpu"), workers=workers, seed=epoch)
            loaders.add(id(loader))
            batches = list(loader)
            out.append([torch.cat([b[i] for b in batches]) for i in range(4)])
        if workers:
            assert len(loaders) == 1 and isinstance(loader, RingLoader)  # the same workers every epoch
        close_loaders(ds)
        return out

    a, b = passes(0), passes(2)
    for ea, eb in zip(a, b, strict=True):
        for x, y in zip(ea, eb, strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(a[0][0], a[1][0])  # a new epoch draws new augmentations


def test_model_img_size_matches_the_built_model():
    from aivh_ens.train.models import build_model

    for model in ("test_efficientnet", "test_vit"):
        cfg = resolve_config("none", model=model)
        assert C.model_img_size(cfg) == build_model(cfg)[1].img_size


def test_cv_gives_the_same_oof_with_and_without_the_cache(tmp_path, demo, one_thread):
    common = ["cv", *tiny_cv(), "--data", str(demo), "--workdir", str(tmp_path)]
    for mode in ("on", "off"):
        res = CliRunner().invoke(main, [*common, "--cache", mode, "--name", f"r-{mode}"])
        assert res.exit_code == 0, res.output
        assert ("image cache" in res.output) == (mode == "on")
    a = pd.read_csv(tmp_path / "oof" / "r-on.csv")
    b = pd.read_csv(tmp_path / "oof" / "r-off.csv")
    assert a["file_name"].tolist() == b["file_name"].tolist()
    np.testing.assert_array_equal(a["prob"].to_numpy(), b["prob"].to_numpy())
    assert len(list((tmp_path / "runs" / "cache").glob("*.imgcache"))) == 1


def test_loader_workers_stop_when_the_loader_is_dropped(tmp_path, data):
    import gc

    root, names = data
    cfg = resolve_config("tiny", img_size=32)
    src = C.ensure_cache(root, names, storage_step(cfg, 32), tmp_path / "c", **QUIET)
    ds = ImageDataset(src, np.arange(len(names)), None, train_transform(cfg, 32), 32)
    loader = make_loader(ds, 8, train=False, device=torch.device("cpu"), workers=1)
    list(loader)
    worker = loader._iterator._workers[0]
    assert worker.is_alive()
    gc.disable()  # freed by reference counting alone: no cycle keeps the workers up
    try:
        del loader
        worker.join(timeout=10)
        assert not worker.is_alive()
    finally:
        gc.enable()


def test_a_reader_keeps_the_version_it_opened(tmp_path, data):
    """A rebuild while a run reads the cache writes a new version: the run (its forked workers, and copies
    sent to spawned workers before or after the rebuild) keep reading the version its index describes; a
    copy that finds another file under that version's name refuses it."""
    root, names = data
    storage = StorageStep("square", 32)
    src = C.ensure_cache(root, names[:10], storage, tmp_path / "c", **QUIET)
    expect = [src.get(i) for i in range(10)]
    fresh = pickle.loads(pickle.dumps(src))  # as a spawned worker gets it, before the rebuild
    more = C.ensure_cache(root, names, storage, tmp_path / "c", **QUIET)  # more images: a new version
    assert more.path != src.path
    later = pickle.loads(pickle.dumps(src))
    reader = ImageDataset(
        src, np.arange(10), None, eval_transform(resolve_config("tiny", img_size=32), 32), 32
    )
    loader = make_loader(reader, 5, train=False, device=torch.device("cpu"), workers=1)
    got = torch.cat([x for x, *_ in loader])  # forked workers map the inherited descriptor: the old version
    assert torch.equal(
        got, torch.from_numpy(np.stack(expect)).permute(0, 3, 1, 2)
    )  # eval is the identity here
    for i in range(10):
        np.testing.assert_array_equal(src.get(i), expect[i])
        np.testing.assert_array_equal(fresh.get(i), expect[i])
        np.testing.assert_array_equal(later.get(i), expect[i])
    close_loaders(reader)
    stranger = pickle.loads(pickle.dumps(src))
    copy = src.path.with_name("copy")
    shutil.copy2(src.path, copy)
    os.replace(copy, src.path)  # the same bytes in another file: not the file the index was read from
    with pytest.raises(UserError, match="removed or replaced while this run was reading it"):
        stranger.get(0)
    np.testing.assert_array_equal(src.get(0), expect[0])
