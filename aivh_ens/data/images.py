"""Image decoding: any format Pillow reads to (H, W, 3) uint8 RGB, EXIF orientation applied, limits checked.

:func:`load_image` decodes JPEG/PNG/WebP/BMP (and the other formats Pillow reads); :func:`image_size` reads
(width, height) from the header alone.

Decoders: a JPEG whose Pillow mode is RGB or L and whose data ends with the EOI marker is decoded by
``cv2.imdecode`` (libjpeg-turbo in both libraries: bit-identical pixels, also at reduced DCT scales, and
10-25% faster on a 768x512 photo). Everything else goes through Pillow: CMYK/YCCK JPEGs (Pillow undoes
Adobe's inverted CMYK), JPEGs without a final EOI marker (Pillow refuses truncated data; OpenCV's handling
of it has changed between versions), and PNG, WebP, BMP and the rest (one reference for their many modes;
only JPEG decoding is hot enough to have been measured). Orientation is read by Pillow in both cases and
applied with numpy, so both paths give what ``PIL.ImageOps.exif_transpose`` gives.

No torch here: the Dataset, augmentation and decode cache call these functions."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from aivh_ens.errors import UserError

MIN_SIDE = 8  # px; smaller images carry no usable signal and break random crops


MAX_PIXELS = 50_000_000  # width * height; larger is refused before any pixel is decoded


_FIX_BAD_IMAGE = "remove or replace the file, or pass --on-bad-image skip"


_JPEG_EOI = b"\xff\xd9"


class BadImageError(UserError):
    """An image file that cannot be used: missing, empty, truncated, not an image, too small or too large.

    Attributes:
        path: the offending file, as passed to the loader.
        reason: what was wrong with it (the message without the path and the fix).
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str = _FIX_BAD_IMAGE):
        self.path = Path(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"bad image {path}: {reason}; {fix}")

    def __reduce__(self) -> tuple[type[BadImageError], tuple[Path, str, str]]:
        # Default pickling would call cls(message); worker processes send exceptions back pickled.
        return type(self), (self.path, self.reason, self.fix)


def load_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Decode an image file to RGB with its EXIF orientation applied.

    Args:
        path: image file: JPEG, PNG, WebP, BMP or another format Pillow reads (animations: the first frame).
        max_side: if given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's reduced DCT) as long
            as both sides stay >= ``max_side``; other formats are always decoded in full. None: full decode.

    Returns:
        (H, W, 3) uint8 RGB, C-contiguous and writable. Alpha is dropped (not composited), CMYK is converted
        with Pillow's (255 - C) * (255 - K) / 255, 16/32-bit grayscale is scaled to 8 bits by its bit depth.

    Raises:
        BadImageError: the file is missing, empty, not an image, truncated/corrupt, smaller than ``MIN_SIDE``
            on a side, or larger than ``MAX_PIXELS`` (checked from the header, before decoding).
    """
    return decode_image(_read_bytes(path), path, max_side)


def decode_image(data: bytes, name: str | Path, max_side: int | None = None) -> np.ndarray:
    """Decode an image held in memory, exactly as :func:`load_image` decodes a file with these bytes.

    Args:
        data: the encoded image.
        name: what error messages call the image (nothing is opened under this name).
        max_side: see :func:`load_image`.

    Raises:
        BadImageError: the bytes are empty or are no usable image (see :func:`load_image`).
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
    if not data:
        raise BadImageError(name, "the file is empty (0 bytes)")
    with _open(name, io.BytesIO(data)) as im:
        scale = _draft_scale(im.size, max_side) if im.format == "JPEG" else 1
        rgb = None
        if im.format == "JPEG" and im.mode in ("RGB", "L") and data.endswith(_JPEG_EOI):
            rgb = _decode_cv2(data, im.size, scale)
        if rgb is None:
            rgb = _decode_pil(name, im, max_side if scale > 1 else None)
        orientation = _orientation(im)
    return _orient(rgb, orientation)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header without decoding pixels.

    Applies the same checks as :func:`load_image` that need no decoding (missing, empty, not an image,
    smaller than ``MIN_SIDE``, larger than ``MAX_PIXELS``). A PNG whose EXIF chunk comes after the pixel
    data (allowed, rare) reports its stored size here, while :func:`load_image` rotates it.

    Raises:
        BadImageError: the file is missing, empty, unreadable or outside the size limits.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - Pillow reads the header lazily from it; closed below
    except OSError as e:
        raise BadImageError(path, _os_reason(e)) from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BadImageError(path, "the file is empty (0 bytes)")
        with _open(path, f) as im:
            w, h = im.size
            # Pillow's PNG getexif() decodes the pixels to reach a late EXIF chunk; only look at what the
            # header already holds.
            header_only = im.format != "PNG" or "exif" in im.info
            orientation = _orientation(im) if header_only else 1
    return (h, w) if orientation >= 5 else (w, h)


def _os_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "the file does not exist"
    if isinstance(e, IsADirectoryError):
        return "it is a directory, not an image file"
    return f"cannot be read ({e.strerror or e})"


def _read_bytes(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(path, _os_reason(e)) from None
    if not data:
        raise BadImageError(path, "the file is empty (0 bytes)")
    return data


def _open(path: str | Path, fp: BinaryIO) -> Image.Image:
    """Parse the header with Pillow and enforce the size limits before any pixel is decoded."""
    try:
        im = Image.open(fp)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        # Pillow raises above twice its own limit. Between once and twice it warns: that arrives here only
        # under a warnings-as-errors filter; otherwise Pillow prints it and the size check below refuses the
        # image. No warnings.catch_warnings() around open(): it swaps the process-wide filter list, which is
        # not thread-safe, and images are scanned from thread pools.
        raise BadImageError(path, f"over the limit of {MAX_PIXELS:,} pixels ({e})") from None
    except UnidentifiedImageError:
        fp.seek(0)
        head = fp.read(16)
        kind = "looks like text" if _looks_like_text(head) else "is in no format Pillow reads"
        raise BadImageError(path, f"not an image: the content {kind} (starts with {head!r})") from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's plugins raise many types for a corrupt header
        raise BadImageError(path, f"unreadable image header ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise BadImageError(
            path,
            f"{w}x{h} = {w * h:,} pixels is over the limit of {MAX_PIXELS:,} pixels (a decompression bomb?)",
        )
    if min(w, h) < MIN_SIDE:
        im.close()
        raise BadImageError(
            path, f"{w}x{h} pixels is too small; images need at least {MIN_SIDE} px on each side"
        )
    return im


def _looks_like_text(head: bytes) -> bool:
    try:
        s = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in s)


def _draft_scale(size: tuple[int, int], max_side: int | None) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) Pillow's draft() picks to keep both sides >= max_side."""
    if not max_side:
        return 1
    fit = min(size[0] // max_side, size[1] // max_side)
    return next((s for s in (8, 4, 2) if fit >= s), 1)


_CV2_REDUCED = {1: 0, 2: 16, 4: 32, 8: 64}  # the reduced-size bits of cv2.IMREAD_REDUCED_COLOR_{2,4,8}


_CV2_RGB: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10


def _decode_cv2(data: bytes, size: tuple[int, int], scale: int) -> np.ndarray | None:
    """(H, W, 3) RGB from OpenCV, or None to fall back to Pillow (which then names the problem)."""
    flags = cv2.IMREAD_IGNORE_ORIENTATION | _CV2_REDUCED[scale] | (_CV2_RGB or cv2.IMREAD_COLOR)
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    w, h = (size[0] + scale - 1) // scale, (size[1] + scale - 1) // scale
    if arr is None or arr.shape != (h, w, 3):
        return None
    return arr if _CV2_RGB is not None else np.ascontiguousarray(arr[..., ::-1])


def _decode_pil(path: str | Path, im: Image.Image, draft_side: int | None) -> np.ndarray:
    """(H, W, 3) RGB from Pillow. ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False: truncation is an error."""
    try:
        if draft_side:
            im.draft(None, (draft_side, draft_side))  # the same scale _draft_scale gave the OpenCV path
        im.load()
        return _to_rgb(im)
    except MemoryError:
        raise
    except Exception as e:  # OSError for truncation, SyntaxError/ValueError/struct.error for corrupt data
        detail = str(e) or type(e).__name__
        what = "the file is truncated" if "truncated" in detail else "the pixel data is corrupt"
        raise BadImageError(path, f"{what} ({type(e).__name__}: {detail})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from a loaded image of any Pillow mode."""
    mode = im.mode
    if mode.startswith("I"):
        gray = _to_uint8(np.asarray(im), _bit_depth(im))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # P -> RGB with transparency would warn; the alpha is dropped just below
    if im.mode != "RGB":
        im = im.convert("RGB")  # drops alpha, converts CMYK/YCbCr/1/L/LA
    return np.asarray(im)


def _bit_depth(im: Image.Image) -> int:
    """Bits per sample of a single-channel integer image, from its container where it says."""
    if im.mode.startswith("I;16"):
        return 16
    tags = getattr(im, "tag_v2", None)  # TIFF: BitsPerSample
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    if isinstance(bits, int) and 1 <= bits <= 16:
        return bits
    # Mode I is a 32-bit signed container; real files put 16-bit data in it far more often than 31-bit.
    return 16 if np.asarray(im).max(initial=0) <= 65535 else 31


def _to_uint8(a: np.ndarray, bits: int) -> np.ndarray:
    """Scale [0, 2**bits - 1] to [0, 255], rounding; negatives become 0 (clipping would keep only 0..255)."""
    top = float(2**bits - 1)
    scaled = np.clip(a.astype(np.float64), 0.0, top) * (255.0 / top)
    return np.rint(scaled).astype(np.uint8)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8 (XMP's as fallback, as Pillow's exif_transpose reads it); 1 if absent."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except MemoryError:
        raise
    except Exception:  # a corrupt EXIF block does not make the pixels unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# numpy versions of exif_transpose's Image.Transpose per orientation (tested equal to it).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    if orientation in _ORIENT:
        a = _ORIENT[orientation](a)
    # Writable too: np.asarray of a Pillow image is read-only, and augmentations may work in place.
    return np.require(a, requirements=["C", "W"])


def scan_files(
    root: Path, files: list[str], check: Callable[[Path], object], workers: int = 8
) -> dict[int, BadImageError]:
    """Run ``check`` (a header read, or a full decode) on every file under ``root``, in threads (PIL releases
    the GIL while decoding); {position in ``files``: its error} for the files it refused."""

    def one(i: int) -> tuple[int, BadImageError | None]:
        try:
            check(root / files[i])
            return i, None
        except BadImageError as e:
            return i, e

    with ThreadPoolExecutor(max_workers=workers) as ex:
        return {i: e for i, e in ex.map(one, range(len(files)), chunksize=256) if e is not None}
