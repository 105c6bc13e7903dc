"""Tests for aivh_ens.data.transforms: every recipe's pipeline, the fast geometry path, crop mode, replayable draws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aivh_ens.config import resolve_config
from aivh_ens.data.loader import ImageDataset, derive_seed
from aivh_ens.data.transforms import (
    FastGeometry,
    affine_crop,
    eval_transform,
    reseed,
    to_chw,
    train_transform,
)
from aivh_ens.recipes import RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("shape", [(40, 56, 3), (300, 200, 3)])
def test_every_recipe_transform_gives_model_sized_uint8(name, shape):
    cfg = resolve_config(name, model=None if RECIPES[name].get("model") else "test_convnext", img_size=32)
    cfg = dataclasses.replace(
        cfg, train_resize=40 if cfg.train_resize else None, eval_resize=36 if cfg.eval_resize else None
    )
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for tf in (train_transform(cfg, 32), eval_transform(cfg, 32)):
        out = tf(image=img)["image"]
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


# Stored images the fast path meets: smaller than the crop, about its size, and over twice it (area shrink).
FAST_SHAPES = [(20, 28, 3), (32, 32, 3), (40, 56, 3), (56, 40, 3), (150, 90, 3)]


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize(
    "extra",
    [{}, {"hflip": 1.0, "rotate": 0.0}, {"rotate": 30.0}, {"hflip": 0.0}],
    ids=["recipe", "flip-only", "rotate", "no-flip"],
)
def test_fast_geometry_gives_the_pipelines_pixels(name, extra):
    """Geometry-only pipelines skip albumentations: the same draws from the same seed, the same pixels."""
    cfg = resolve_config(
        name, model=None if RECIPES[name].get("model") else "test_convnext", img_size=32, **extra
    )
    cfg = dataclasses.replace(
        cfg, train_resize=40 if cfg.train_resize else None, eval_resize=36 if cfg.eval_resize else None
    )
    pipe = train_transform(cfg, 32)
    fast = FastGeometry.of(pipe)
    geometry_only = cfg.mode == "resize" and cfg.color_jitter == 0 and cfg.blur_p == 0 and cfg.jpeg_p == 0
    assert (fast is not None) == geometry_only
    assert FastGeometry.of(eval_transform(cfg, 32)) is None
    if fast is None:
        return
    rng = np.random.default_rng(0)
    for seed in range(40):
        img = rng.integers(0, 256, FAST_SHAPES[seed % len(FAST_SHAPES)], dtype=np.uint8)
        img.flags.writeable = False  # the fast path only reads (it is handed read-only views of the cache)
        reseed(pipe, seed)
        want = to_chw(pipe(image=img.copy())["image"])
        got = fast(img, seed)
        assert got.shape == (3, 32, 32) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, shape {img.shape}")


def test_affine_crop_planes_are_the_pixels_transposed():
    rng = np.random.default_rng(4)
    for img in (
        rng.integers(0, 256, (60, 80, 3), dtype=np.uint8),
        rng.integers(0, 256, (60, 80, 1), dtype=np.uint8),
    ):
        for window, flip, angle in (
            ((5.0, 3.0, 48.0, 48.0), True, 0.0),
            ((2.5, 1.0, 50.0, 40.0), False, 12.0),
            ((0.0, 0.0, 80.0, 60.0), True, -7.0),
        ):
            hwc = affine_crop(img, window, 32, flip, angle)
            chw = affine_crop(img, window, 32, flip, angle, chw=True)
            assert chw.flags.c_contiguous
            np.testing.assert_array_equal(chw, hwc.transpose(2, 0, 1))


def test_crop_mode_keeps_native_pixels():
    cfg = resolve_config("crop-robust", model="test_convnext", img_size=16, jpeg_p=0.0, blur_p=0.0, hflip=0.0)
    img = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = eval_transform(cfg, 16)(image=img)["image"]
    np.testing.assert_array_equal(out, img[12:28, 17:33])  # the exact centre crop, no resampling
    tr = train_transform(cfg, 16)(image=img)["image"]
    found = any((img[y : y + 16, x : x + 16] == tr).all() for y in range(25) for x in range(35))
    assert found  # a random crop of native pixels


def test_augmentation_replays_per_epoch_and_row():
    class Src:
        def __len__(self):
            return 4

        def get(self, i):
            return np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)

        def describe(self, i):
            return str(i)

    cfg = resolve_config("tiny", img_size=32, rotate=15.0, jpeg_p=0.5)
    make = lambda: ImageDataset(Src(), np.arange(4), np.zeros(4), train_transform(cfg, 32), 32, seed=7)  # noqa: E731
    a, b = make(), make()
    b[3]  # consuming other rows first must not change what a row gets
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert torch.equal(a[2][0], b[2][0])
    a.set_epoch(0)
    x0 = a[2][0]
    a.set_epoch(1)
    assert not torch.equal(x0, a[2][0])  # a new epoch draws new augmentations
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
