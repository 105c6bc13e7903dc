"""TTA specs, flip/rotation and crop views against numpy, and view scoring with a real tiny timm model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aivh_ens.config import resolve_config
from aivh_ens.data.images import BadImageError
from aivh_ens.data.transforms import eval_transform
from aivh_ens.errors import UserError
from aivh_ens.recipes import RECIPES
from aivh_ens.score.tta import (
    FLIPS,
    TTADataset,
    TTASpec,
    apply_view,
    crop_grid,
    crop_offsets,
    crop_views,
    effective_spec,
    flip_views,
    parse_tta,
    score_views,
)
from aivh_ens.train.models import build_model

# ---- specs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name", "flips", "crops", "n_views"),
    [
        ("none", "none", "none", 0, 1),
        ("hflip", "hflip", "hflip", 0, 2),
        ("d4", "d4", "d4", 0, 8),
        ("crops:5", "crops:5", "none", 5, 5),
        ("hflip+crops:5", "hflip+crops:5", "hflip", 5, 10),
        ("crops:3+d4", "d4+crops:3", "d4", 3, 24),
        (" HFlip ", "hflip", "hflip", 0, 2),
        ("crops:64", "crops:64", "none", 64, 64),
        ("shift:1", "shift:1", "none", 0, 5),
        ("shift:2+hflip", "hflip+shift:2", "hflip", 0, 10),
        ("crops:5+shift:8+d4", "d4+crops:5+shift:8", "d4", 5, 200),
    ],
)
def test_parse_tta_valid(spec, name, flips, crops, n_views):
    s = parse_tta(spec)
    assert (s.name, s.flips, s.crops, s.n_views) == (name, flips, crops, n_views)
    assert len(s.flip_views) * max(1, s.crops) == s.n_views and len(set(s.flip_views)) == len(s.flip_views)
    assert parse_tta(s.name) == s  # the canonical name parses back to the same spec
    assert ":" not in s.file_stem


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "vflip",
        "hflip+d4",
        "crops",
        "crops:0",
        "crops:65",
        "crops:x",
        "none+crops:5",
        "hflip+hflip",
        "crops:2+crops:3",
        "hflip,crops:5",
        "d4+",
        "shift",
        "shift:0",
        "shift:9",
        "shift:1+shift:2",
        "none+shift:1",
    ],
)
def test_parse_tta_invalid_lists_the_valid_forms(spec):
    with pytest.raises(UserError) as e:
        parse_tta(spec)
    msg = str(e.value)
    assert repr(spec) in msg and "hflip" in msg and "d4" in msg and "crops:N" in msg and "shift:P" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_tta_parses(recipe):
    cfg = resolve_config(recipe)
    spec = effective_spec(parse_tta(cfg.tta), cfg)
    assert spec.n_views >= 1


def test_effective_spec_drops_crops_only_for_whole_image_resize():
    spec = parse_tta("hflip+crops:5")
    assert effective_spec(spec, resolve_config("none", mode="resize")) == TTASpec("hflip", 0)
    assert effective_spec(spec, resolve_config("none", mode="crop")) == spec
    assert effective_spec(spec, resolve_config("none", mode="resize", eval_resize=72, img_size=64)) == spec


# ---- flip / rotation views -------------------------------------------------------------------------------


def _numpy_d4(a: np.ndarray) -> dict[str, np.ndarray]:
    """The 8 D4 views of an (H, W) array by numpy, named like aivh_ens.score.tta.FLIPS."""
    out = {}
    for k in range(4):
        out["id" if k == 0 else f"rot{90 * k}"] = np.rot90(a, k)
        out["hflip" if k == 0 else f"hflip_rot{90 * k}"] = np.rot90(np.fliplr(a), k)
    return out


@pytest.mark.parametrize("shape", [(4, 4), (2, 3)])
def test_each_view_matches_numpy(shape):
    a = np.arange(math.prod(shape)).reshape(shape)  # distinct values: a view is identified by its pixels
    expected = _numpy_d4(a)
    assert len({v.tobytes() + bytes(v.shape) for v in expected.values()}) == 8  # numpy's 8 are distinct
    for name in FLIPS["d4"]:
        got = apply_view(torch.from_numpy(a.copy())[None, None], name)[0, 0].numpy()  # (1, 1, H, W) in
        np.testing.assert_array_equal(got, expected[name], err_msg=name)


@pytest.mark.parametrize("flips", sorted(FLIPS))
def test_flip_views_give_exactly_the_expected_set(flips):
    a = np.arange(16).reshape(4, 4)
    x = torch.from_numpy(np.stack([a, a + 100]))[:, None]  # (B=2, C=1, 4, 4)
    v = flip_views(x, FLIPS[flips])  # (V*B, 1, 4, 4), view-major
    assert v.shape == (len(FLIPS[flips]) * 2, 1, 4, 4)
    got = {v[i, 0].numpy().tobytes() for i in range(0, len(v), 2)}  # image 0 of each view
    ref = _numpy_d4(a)
    expected = {"none": [a], "hflip": [a, np.fliplr(a)], "d4": list(ref.values())}[flips]
    assert got == {np.ascontiguousarray(e).tobytes() for e in expected}
    for i in range(len(FLIPS[flips])):  # view-major: image 1 follows image 0 in every view
        np.testing.assert_array_equal(v[2 * i + 1, 0].numpy(), v[2 * i, 0].numpy() + 100)


def test_apply_view_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(torch.zeros(1, 1, 2, 2), "vflip")
    with pytest.raises(ValueError, match="larger than 2 px"):
        apply_view(torch.zeros(1, 1, 2, 2), "id@2,0")


@pytest.mark.parametrize(("dx", "dy"), [(1, 0), (-1, 0), (0, 1), (0, -1), (2, -1), (0, 0)])
def test_a_shift_moves_the_content_and_mirrors_the_border_in(dx, dy):
    a = np.arange(30.0).reshape(5, 6)
    p = max(abs(dx), abs(dy))
    ref = np.pad(a, p, mode="reflect")[p - dy : p - dy + 5, p - dx : p - dx + 6]  # numpy's reflect padding
    got = apply_view(torch.from_numpy(a)[None, None], f"id@{dx},{dy}")[0, 0].numpy()
    np.testing.assert_array_equal(got, ref)
    inner = got[max(dy, 0) : 5 + min(dy, 0), max(dx, 0) : 6 + min(dx, 0)]  # the part that moved, not mirrored
    np.testing.assert_array_equal(inner, a[max(-dy, 0) : 5 - max(dy, 0), max(-dx, 0) : 6 - max(dx, 0)])


def test_shifted_views_are_each_flip_moved_four_ways():
    a = np.arange(16.0).reshape(4, 4)
    spec = parse_tta("hflip+shift:1")
    v = flip_views(torch.from_numpy(a)[None, None], spec.flip_views)[:, 0].numpy()  # (10, 4, 4)
    for i, (flip, (dx, dy)) in enumerate((f, s) for f in ("id", "hflip") for s in spec.shifts):
        base = a if flip == "id" else np.fliplr(a)
        np.testing.assert_array_equal(v[i], np.pad(base, 1, mode="reflect")[1 - dy : 5 - dy, 1 - dx : 5 - dx])
    assert spec.shifts == ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


# ---- crops -----------------------------------------------------------------------------------------------


def test_five_crops_are_the_corners_and_the_centre():
    img = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    views = crop_views(img, 3, 5)  # (5, 3, 3, 3)
    expected = [img[:3, :3], img[:3, 4:], img[2:, :3], img[2:, 4:], img[1:4, 2:5]]
    assert views.shape == (5, 3, 3, 3)
    for got, exp in zip(views, expected, strict=True):
        np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize(
    ("n", "h", "w", "grid"),
    [
        (1, 10, 10, (1, 1, False)),
        (4, 10, 10, (2, 2, False)),
        (5, 10, 10, (2, 2, True)),
        (9, 10, 10, (3, 3, False)),
        (6, 10, 20, (2, 3, False)),
        (6, 20, 10, (3, 2, False)),
        (3, 10, 30, (1, 3, False)),
        (17, 9, 9, (4, 4, True)),
    ],
)
def test_crop_grid_layouts(n, h, w, grid):
    assert crop_grid(n, h, w) == grid


@settings(max_examples=60, deadline=None)
@given(h=st.integers(4, 40), w=st.integers(4, 40), size=st.integers(1, 4), n=st.integers(1, 20))
def test_crop_offsets_stay_inside_and_spread_to_the_borders(h, w, size, n):
    offs = crop_offsets(h, w, size, n)
    assert len(offs) == n
    assert all(0 <= t <= h - size and 0 <= left <= w - size for t, left in offs)
    rows, cols, _ = crop_grid(n, h, w)
    if rows > 1:  # the grid's outer crops touch the top and bottom borders
        assert min(t for t, _ in offs) == 0 and max(t for t, _ in offs) == h - size
    if cols > 1:
        assert min(left for _, left in offs) == 0 and max(left for _, left in offs) == w - size
    if rows >= math.ceil(h / size) and cols >= math.ceil(w / size):  # then every pixel is covered
        covered = np.zeros((h, w), dtype=bool)
        for t, left in offs:
            covered[t : t + size, left : left + size] = True
        assert covered.all()


class _ArraySource:
    def __init__(self, images: list[np.ndarray | None]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> np.ndarray:
        if self.images[i] is None:
            raise BadImageError(f"img{i}.jpg", "not an image")
        return self.images[i]

    def describe(self, i: int) -> str:
        return f"img{i}.jpg"


@pytest.mark.parametrize("overrides", [dict(mode="crop"), dict(mode="resize", eval_resize=20)])
def test_one_crop_is_the_runs_own_evaluation_view(overrides):
    cfg = resolve_config("none", img_size=16, **overrides)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(30, 41), (12, 50), (16, 16)]]
    plain = TTADataset(_ArraySource(imgs), range(3), cfg, 16, crops=0)
    one = TTADataset(_ArraySource(imgs), range(3), cfg, 16, crops=1)
    five = TTADataset(_ArraySource(imgs), range(3), cfg, 16, crops=5)
    for i in range(3):
        ref = eval_transform(cfg, 16)(image=imgs[i])["image"]  # (16, 16, 3)
        x0, x1, x5 = plain[i][0], one[i][0], five[i][0]
        assert x0.shape == x1.shape == (1, 3, 16, 16) and x5.shape == (5, 3, 16, 16)
        np.testing.assert_array_equal(x0[0].permute(1, 2, 0).numpy(), ref)
        np.testing.assert_array_equal(x1[0].permute(1, 2, 0).numpy(), ref)
        np.testing.assert_array_equal(x5[4].permute(1, 2, 0).numpy(), ref)  # the 5th crop is the centre


def test_crops_of_the_crop_mode_are_native_resolution():
    cfg = resolve_config("none", img_size=8, mode="crop")
    img = np.arange(20 * 24 * 3, dtype=np.int64).reshape(20, 24, 3).astype(np.uint8)
    x = TTADataset(_ArraySource([img]), [0], cfg, 8, crops=9)[0][0]  # (9, 3, 8, 8)
    expected = crop_views(img, 8, 9)  # no resize: the pixels themselves
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), expected)


def test_dataset_reports_bad_images_without_raising():
    cfg = resolve_config("none", img_size=8)
    ds = TTADataset(_ArraySource([np.zeros((9, 9, 3), np.uint8), None]), [0, 1], cfg, 8, crops=0)
    assert ds[0][2] is True and ds[0][3] == ""
    x, i, ok, reason = ds[1]
    assert (i, ok, reason) == (1, False, "not an image") and x.shape == (1, 3, 8, 8)


# ---- scoring ---------------------------------------------------------------------------------------------


def _d4_symmetric(n: int, seed: int) -> np.ndarray:
    """An (n, n) image equal to all 8 of its D4 views: a symmetric quadrant mirrored into the others."""
    q = np.random.default_rng(seed).random((n // 2, n // 2))
    q = q + q.T
    top = np.concatenate([q, np.fliplr(q)], axis=1)
    return np.concatenate([top, np.flipud(top)], axis=0)


@pytest.fixture(scope="module")
def tiny_models():
    cfg = dataclasses.replace(resolve_config("tiny", img_size=32), pretrained=False)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, _ = build_model(cfg)
        with torch.no_grad():  # the fresh head starts near p = 0.5; make the outputs depend on the input
            model.get_classifier().weight.normal_(0, 1.0)
        models.append(model.eval())
    return models


def test_symmetric_images_score_identically_in_every_view(tiny_models):
    imgs = [_d4_symmetric(32, s) for s in (0, 1)]
    for a in imgs:
        assert all(np.array_equal(v, a) for v in _numpy_d4(a).values())
    x = torch.from_numpy(np.stack(imgs)).float()[:, None, None].expand(2, 1, 3, 32, 32)  # (B, Vc, 3, S, S)
    p = score_views(tiny_models, x.contiguous(), FLIPS["d4"])  # (K, B, 8)
    assert p.shape == (2, 2, 8)
    torch.testing.assert_close(p, p[..., :1].expand_as(p), rtol=0, atol=1e-6)  # same in all 8 views
    assert not torch.allclose(p[:, 0, 0], p[:, 1, 0], atol=1e-4)  # different images: different scores


def test_views_match_direct_model_calls(tiny_models):
    x = torch.randn(3, 2, 3, 32, 32)  # (B, Vc=2 crops, 3, S, S)
    p = score_views(tiny_models, x, FLIPS["hflip"])  # (K, B, 4): hflip-major, then crop
    with torch.no_grad():
        for k, model in enumerate(tiny_models):
            for vi, view in enumerate(FLIPS["hflip"]):
                for c in range(2):
                    direct = torch.softmax(model(apply_view(x[:, c], view)), dim=1)[:, 1]  # (B,)
                    torch.testing.assert_close(p[k, :, vi * 2 + c], direct, rtol=1e-4, atol=1e-5)
    flipped = score_views(tiny_models, x, ("hflip",))
    assert not torch.allclose(flipped[..., 0], p[..., 0], atol=1e-4)  # a random image is not mirror-symmetric
