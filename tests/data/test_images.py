"""Tests for aivh_ens.data.images: decoding, EXIF, bit depth, limits, decoder routing; fixtures in tmp_path."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_one_line, write_file
from PIL import Image, ImageFile, ImageOps

from aivh_ens.data.images import MAX_PIXELS, MIN_SIDE, BadImageError, image_size, load_image
from aivh_ens.errors import UserError

FIX = "remove or replace the file, or pass --on-bad-image skip"


# ---- images: fixtures ---------------------------------------------------------------------------------

H, W = 24, 40  # non-square, so a transposed result cannot pass


def _two_tone(color: tuple, other: tuple, mode: str = "RGB") -> Image.Image:
    """Left half ``color``, right half ``other``; a JPEG keeps block-aligned flat areas almost exact."""
    im = Image.new(mode, (W, H), other)
    im.paste(color, (0, 0, W // 2, H))
    return im


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


def _png_palette(path: Path, transparency: bool) -> Path:
    im = Image.new("P", (W, H), 1)
    im.putpalette([250, 10, 20, 5, 240, 15] + [0] * 762)
    im.paste(0, (0, 0, W // 2, H))
    # Per-entry alpha (a tRNS table): Pillow warns when such an image goes straight to RGB.
    return _save(im, path, "PNG", **({"transparency": bytes([0, 128])} if transparency else {}))


def _png16(path: Path) -> Path:
    a = np.full((H, W), 257 * 100, np.uint16)  # 100 in 8 bits exactly
    a[:, W // 2 :] = 65535
    a[0, 0] = 32768  # 127.5 -> 128: rounded, not truncated
    return _save(Image.fromarray(a), path, "PNG")


def _tiff_i32(path: Path) -> Path:
    a = np.full((H, W), 60000, np.int32)  # mode I: 16-bit data in a 32-bit container
    a[:, W // 2 :] = 0
    return _save(Image.fromarray(a), path, "TIFF")


def _rgba(path: Path) -> Path:
    a = np.zeros((H, W, 4), np.uint8)
    a[..., :3] = (10, 20, 30)
    a[:, W // 2 :, 3] = 255  # left half fully transparent: its colour is kept, not composited
    return _save(Image.fromarray(a), path, "PNG")


def _bilevel(path: Path) -> Path:
    im = Image.new("1", (W, H), 1)
    im.paste(0, (0, 0, W // 2, H))
    return _save(im, path, "PNG")


# (maker, pixel at (1, 1), pixel at (1, W - 2), tolerance): left and right half colours after decoding.
GOOD_IMAGES = [
    pytest.param(
        lambda p: _save(_two_tone((200, 30, 60), (0, 0, 255)), p, "JPEG", quality=95),
        (200, 30, 60),
        (0, 0, 255),
        4,
        id="jpeg-rgb",
    ),
    pytest.param(
        lambda p: _save(_two_tone(90, 200, "L"), p, "JPEG", quality=95),
        (90,) * 3,
        (200,) * 3,
        2,
        id="jpeg-gray",
    ),
    pytest.param(
        lambda p: _save(_two_tone((0, 255, 255, 0), (0, 0, 0, 128), "CMYK"), p, "JPEG", quality=95),
        (255, 0, 0),
        (127, 127, 127),
        3,
        id="jpeg-cmyk",
    ),
    pytest.param(lambda p: _save(_two_tone(90, 200, "L"), p, "PNG"), (90,) * 3, (200,) * 3, 0, id="png-gray"),
    pytest.param(
        lambda p: _save(_two_tone((90, 0), (200, 255), "LA"), p, "PNG"), (90,) * 3, (200,) * 3, 0, id="png-la"
    ),
    pytest.param(_rgba, (10, 20, 30), (10, 20, 30), 0, id="png-rgba-alpha-dropped"),
    pytest.param(
        lambda p: _png_palette(p, True), (250, 10, 20), (5, 240, 15), 0, id="png-palette-transparency"
    ),
    pytest.param(lambda p: _png_palette(p, False), (250, 10, 20), (5, 240, 15), 0, id="png-palette"),
    pytest.param(_png16, (100,) * 3, (255,) * 3, 0, id="png-16bit"),
    pytest.param(_tiff_i32, (233,) * 3, (0,) * 3, 0, id="tiff-mode-I"),
    pytest.param(_bilevel, (0,) * 3, (255,) * 3, 0, id="png-1bit"),
    pytest.param(
        lambda p: _save(_two_tone((1, 2, 3), (250, 251, 252)), p, "WEBP", lossless=True),
        (1, 2, 3),
        (250, 251, 252),
        0,
        id="webp-lossless",
    ),
    pytest.param(
        lambda p: _save(_two_tone((200, 30, 60), (0, 0, 255)), p, "WEBP", quality=90),
        (200, 30, 60),
        (0, 0, 255),
        12,
        id="webp-lossy",
    ),
    pytest.param(
        lambda p: _save(_two_tone((1, 2, 3), (250, 251, 252)), p, "BMP"),
        (1, 2, 3),
        (250, 251, 252),
        0,
        id="bmp",
    ),
    pytest.param(
        lambda p: _save(_two_tone((255, 0, 0), (0, 0, 255)), p, "GIF"), (255, 0, 0), (0, 0, 255), 0, id="gif"
    ),
]


@pytest.mark.parametrize(("make", "left", "right", "tol"), GOOD_IMAGES)
def test_load_image_modes(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, make: Callable, left: tuple, right: tuple, tol: int
) -> None:
    path = make(tmp_path / "img")
    recwarn.clear()
    rgb = load_image(path)
    assert not recwarn.list, [str(w.message) for w in recwarn]  # e.g. Pillow's palette-transparency warning
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert rgb.flags.c_contiguous and rgb.flags.writeable
    np.testing.assert_allclose(rgb[1, 1], left, atol=tol)
    np.testing.assert_allclose(rgb[1, W - 2], right, atol=tol)
    assert image_size(path) == (W, H)


def test_png_mode_i16_stays_16_bit(tmp_path: Path) -> None:
    with Image.open(_png16(tmp_path / "a.png")) as im:
        assert im.mode == "I;16"  # so test_load_image_modes[png-16bit] covers the I;16 branch
    assert load_image(tmp_path / "a.png")[0, 0, 0] == 128


def _exif_jpeg(path: Path, orientation: int, fmt: str = "JPEG") -> Path:
    """A 40x24 (stored) image: blue, with a red 8x8 block at the stored top-left, EXIF orientation set."""
    im = Image.new("RGB", (W, H), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw = {"quality": 95} if fmt == "JPEG" else {}
    return _save(im, path, fmt, exif=exif.tobytes(), **kw)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path: Path) -> None:
    path = _exif_jpeg(tmp_path / "r.jpg", 6)  # 6: display rotated 90 degrees clockwise
    rgb = load_image(path)
    assert rgb.shape == (W, H, 3)
    assert image_size(path) == (H, W)
    np.testing.assert_allclose(rgb[2, H - 3], (255, 0, 0), atol=4)  # stored top-left is now top-right
    np.testing.assert_allclose(rgb[2, 2], (0, 0, 255), atol=4)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_exif_transpose(tmp_path: Path, orientation: int, fmt: str) -> None:
    path = _exif_jpeg(tmp_path / "o", orientation, fmt)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = load_image(path)
    np.testing.assert_array_equal(got, want)
    assert image_size(path) == (want.shape[1], want.shape[0])


def _noisy(w: int = 96, h: int = 64, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 2, yy * 3, xx + yy], -1) + rng.normal(0, 25, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return im.convert(mode)


def _reference(path: Path, max_side: int | None = None) -> np.ndarray:
    """Pillow-only decode: what the OpenCV fast path must reproduce exactly."""
    with Image.open(path) as im:
        if max_side:
            im.draft(None, (max_side, max_side))
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


JPEG_FLAVOURS = [
    pytest.param({"quality": 90}, "RGB", id="420"),
    pytest.param({"quality": 95, "subsampling": 0}, "RGB", id="444"),
    pytest.param({"quality": 80, "subsampling": 1}, "RGB", id="422"),
    pytest.param({"quality": 85, "progressive": True}, "RGB", id="progressive"),
    pytest.param({"quality": 85}, "L", id="gray"),
    pytest.param({"quality": 85}, "CMYK", id="cmyk-pillow-path"),
]


@pytest.mark.parametrize(("kw", "mode"), JPEG_FLAVOURS)
@pytest.mark.parametrize("max_side", [None, 30, 8])
def test_jpeg_decode_matches_pillow(tmp_path: Path, kw: dict, mode: str, max_side: int | None) -> None:
    path = _save(_noisy(mode=mode), tmp_path / "n.jpg", "JPEG", **kw)
    np.testing.assert_array_equal(load_image(path, max_side=max_side), _reference(path, max_side))


def test_jpeg_with_bytes_after_eoi_decodes_like_without(tmp_path: Path) -> None:
    clean = _save(_noisy(), tmp_path / "c.jpg", "JPEG")
    padded = write_file(tmp_path / "p.jpg", clean.read_bytes() + b"\x00" * 64)
    np.testing.assert_array_equal(load_image(padded), load_image(clean))


DRAFT_CASES = [  # 800x600 JPEG: scale = largest of 8/4/2 with both sides // scale >= max_side
    pytest.param(None, (600, 800), id="none-full"),
    pytest.param(1000, (600, 800), id="bigger-than-image"),
    pytest.param(600, (600, 800), id="equal-short-side"),
    pytest.param(300, (300, 400), id="half"),
    pytest.param(128, (150, 200), id="quarter"),
    pytest.param(75, (75, 100), id="eighth"),
    pytest.param(10, (75, 100), id="eighth-is-the-floor"),
]


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])
@pytest.mark.parametrize(("max_side", "shape"), DRAFT_CASES)
def test_draft_keeps_short_side(tmp_path: Path, max_side: int | None, shape: tuple, mode: str) -> None:
    path = _save(Image.new(mode, (800, 600), (40, 80, 120, 0)[: len(mode)]), tmp_path / "d.jpg", "JPEG")
    rgb = load_image(path, max_side=max_side)
    assert rgb.shape == (*shape, 3)
    assert min(rgb.shape[:2]) >= min(max_side or 0, 600)


def test_draft_with_rotation_and_non_jpeg(tmp_path: Path) -> None:
    im = Image.new("RGB", (800, 600), (9, 9, 9))
    exif = Image.Exif()
    exif[0x0112] = 8
    jpg = _save(im, tmp_path / "r.jpg", "JPEG", exif=exif.tobytes())
    assert load_image(jpg, max_side=128).shape == (200, 150, 3)
    png = _save(im, tmp_path / "r.png", "PNG")
    assert load_image(png, max_side=128).shape == (600, 800, 3)  # only JPEG has a reduced decode


def test_max_side_must_be_positive(tmp_path: Path) -> None:
    path = _save(_noisy(), tmp_path / "n.jpg", "JPEG")
    with pytest.raises(ValueError, match="max_side"):
        load_image(path, max_side=0)


# ---- images: bad files --------------------------------------------------------------------------------


def _png_header(w: int, h: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims w x h (CRC fixed): only the header is ever read."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _noisy().save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _noisy().save(buf, "PNG")
    return buf.getvalue()


BOMB = f"over the limit of {MAX_PIXELS:,} pixels"
# (file bytes or None for "no file", name, message fragments, image_size also refuses it)
BAD_IMAGES = [
    pytest.param(b"", "e.jpg", ["empty (0 bytes)"], True, id="zero-bytes"),
    pytest.param(_jpeg_bytes()[:1500], "t.jpg", ["truncated"], False, id="truncated-jpeg"),
    pytest.param(_jpeg_bytes()[:-2], "t.jpg", ["truncated"], False, id="jpeg-without-eoi"),
    pytest.param(_png_bytes()[:-400], "t.png", ["truncated"], False, id="truncated-png"),
    pytest.param(
        b"hello, I am text\n", "x.jpg", ["not an image", "looks like text", "hello"], True, id="text"
    ),
    pytest.param(bytes(range(128, 256)) * 4, "x.png", ["not an image", "no format"], True, id="binary-junk"),
    pytest.param(
        _png_header(1, 1), "s.png", ["1x1 pixels is too small", f"at least {MIN_SIDE} px"], True, id="1x1"
    ),
    pytest.param(_png_header(100, 7), "s.png", ["100x7 pixels is too small"], True, id="7-high"),
    pytest.param(
        _png_header(8000, 7000), "b.png", ["8000x7000 = 56,000,000 pixels", BOMB], True, id="bomb-56M"
    ),
    pytest.param(_png_header(10000, 10000), "b.png", ["100,000,000 pixels", BOMB], True, id="bomb-100M"),
    pytest.param(_png_header(20000, 20000), "b.png", ["400000000 pixels", BOMB], True, id="bomb-400M"),
    pytest.param(None, "missing.jpg", ["does not exist"], True, id="missing"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow prints it for 89M-179M px
@pytest.mark.parametrize(("content", "name", "fragments", "header_level"), BAD_IMAGES)
def test_bad_images(
    tmp_path: Path, content: bytes | None, name: str, fragments: list, header_level: bool
) -> None:
    path = tmp_path / name
    if content is not None:
        write_file(path, content)
    with pytest.raises(BadImageError) as err:
        load_image(path)
    assert_one_line(err, str(path), *fragments, FIX)
    assert err.value.path == path
    if header_level:
        with pytest.raises(BadImageError) as err:
            image_size(path)
        assert_one_line(err, str(path), *fragments, FIX)
    else:
        assert image_size(path) == (96, 64)  # the header alone is fine


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow prints it for 89M-179M px
@pytest.mark.parametrize("side", [8000, 10000, 20000])  # below, between and above Pillow's two limits
@pytest.mark.parametrize("action", ["default", "error", "ignore"])
def test_bomb_is_a_bad_image_under_any_warnings_filter(tmp_path: Path, side: int, action: str) -> None:
    path = write_file(tmp_path / "b.png", _png_header(side, 7000 if side == 8000 else side))
    with warnings.catch_warnings(record=True):  # record: "default" must not print into the test log
        warnings.simplefilter(action)
        for fn in (load_image, image_size):
            with pytest.raises(BadImageError, match=BOMB):
                fn(path)


def test_directory_is_a_bad_image(tmp_path: Path) -> None:
    for fn in (load_image, image_size):
        with pytest.raises(BadImageError, match="directory"):
            fn(tmp_path)


def test_bad_image_error_pickles_and_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(BadImageError) as err:
        load_image(tmp_path / "nope.jpg")
    again = pickle.loads(pickle.dumps(err.value))
    assert isinstance(again, UserError) and again.path == err.value.path and str(again) == str(err.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow prints it for 89M-179M px
def test_no_pil_or_warnings_state_changed(tmp_path: Path) -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    write_file(tmp_path / "b.png", _png_header(10000, 10000))
    write_file(tmp_path / "t.jpg", _jpeg_bytes()[:1500])
    for name in ("b.png", "t.jpg"):
        with pytest.raises(BadImageError):
            load_image(tmp_path / name)
    load_image(_save(_noisy(), tmp_path / "ok.jpg", "JPEG"))
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_module_does_not_import_torch() -> None:
    code = "import sys, aivh_ens.data.images, aivh_ens.data.tables; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


ROUTES = [  # which decoder each kind of file must reach; the other one is made to fail
    pytest.param(lambda p: _save(_noisy(), p, "JPEG"), "_decode_pil", id="rgb-jpeg-opencv"),
    pytest.param(lambda p: _save(_noisy(mode="L"), p, "JPEG"), "_decode_pil", id="gray-jpeg-opencv"),
    pytest.param(lambda p: _save(_noisy(mode="CMYK"), p, "JPEG"), "_decode_cv2", id="cmyk-jpeg-pillow"),
    pytest.param(lambda p: write_file(p, _jpeg_bytes() + b"junk"), "_decode_cv2", id="no-final-eoi-pillow"),
    pytest.param(lambda p: _save(_noisy(), p, "PNG"), "_decode_cv2", id="png-pillow"),
]


@pytest.mark.parametrize(("make", "unused"), ROUTES)
def test_decoder_routing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable, unused: str
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError(f"{unused} must not be called")

    path = make(tmp_path / "r")
    monkeypatch.setattr(f"aivh_ens.data.images.{unused}", fail)
    assert load_image(path).shape == (64, 96, 3)
    assert load_image(path, max_side=16).shape[2] == 3


def test_opencv_failure_falls_back_to_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_noisy(), tmp_path / "f.jpg", "JPEG")
    want = load_image(path)
    monkeypatch.setattr("aivh_ens.data.images.cv2.imdecode", lambda *a: None)
    np.testing.assert_array_equal(load_image(path), want)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_threads_get_the_same_results_as_a_loop(tmp_path: Path) -> None:
    # images.scan_files (cv's decode check, submit's test scan) and decode caches call these from thread pools.
    paths = []
    for i in range(24):
        kind = i % 4
        p = tmp_path / f"{i}.img"
        if kind == 0:
            _save(_noisy(mode="RGB" if i % 8 else "CMYK"), p, "JPEG")
        elif kind == 1:
            _exif_jpeg(p, 1 + i % 8)
        elif kind == 2:
            write_file(p, _jpeg_bytes()[: 400 + i])
        else:
            write_file(p, _png_header(10000, 10000))
        paths.append(p)

    def run(fn: Callable, p: Path) -> object:
        try:
            out = fn(p)
            return out.tobytes() if isinstance(out, np.ndarray) else out
        except BadImageError as e:
            return str(e)

    filters = list(warnings.filters)
    for fn in (load_image, image_size):
        serial = [run(fn, p) for p in paths]
        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(lambda p, fn=fn: run(fn, p), paths * 3)) == serial * 3
    assert list(warnings.filters) == filters
