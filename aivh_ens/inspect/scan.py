"""Per-image metadata, content hashes and perceptual hashes, read in parallel.

Everything but the perceptual hash comes from the file's bytes and its header (Pillow parses headers
lazily): size after EXIF orientation, format, mode, bytes, JPEG quality estimated from the luminance
quantisation table, chroma subsampling, EXIF and ICC presence, sha256. The perceptual hash needs pixels:
JPEGs are decoded at 1/2-1/8 scale (libjpeg's reduced DCT, through :func:`aivh_ens.data.load_image`), so it
costs a fraction of a full decode.

The perceptual hash is pHash (the DCT hash of ``imagehash.phash``: 32x32 grayscale, the 8x8 lowest
frequencies, each bit "above the median"), written in a few lines of OpenCV rather than a new dependency:
imagehash would decode each image again through Pillow at full size and return an object per image, where
the audit wants one uint64 per image to XOR in bulk.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import ExifTags, Image, JpegImagePlugin

from aivh_ens.data import BadImageError, load_image
from aivh_ens.progress import Progress

__all__ = ["CATEGORICAL", "FEATURES", "NUMERIC", "hamming", "jpeg_quality", "phash", "scan_images"]

# Features the audits use; the scan also returns sha256 and phash.
NUMERIC = (
    "width",
    "height",
    "aspect",
    "megapixels",
    "kbytes",
    "bytes_per_pixel",
    "jpeg_quality",
    "exif",
    "icc",
)
CATEGORICAL = ("format", "mode", "subsampling")
FEATURES = NUMERIC + CATEGORICAL
UNITS = {
    "width": "px",
    "height": "px",
    "aspect": "width/height",
    "megapixels": "MP",
    "kbytes": "kB",
    "bytes_per_pixel": "B/px",
    "jpeg_quality": "of 100",
    "exif": "share",
    "icc": "share",
}
_SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
_HASH_SIDE = 32  # pHash's input side; JPEGs are decoded at the smallest DCT scale that keeps >= this

# The IJG (libjpeg) luminance table at quality 50, natural order: encoders scale it by quality.
# fmt: off
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float64)
# fmt: on


def _ijg_tables() -> np.ndarray:
    """(100, 64) the luminance table libjpeg writes at each quality 1..100 (baseline, clamped to 1..255)."""
    q = np.arange(1, 101, dtype=np.float64)
    scale = np.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)  # (100,) percent
    return np.clip(np.floor((_IJG_LUMA[None] * scale[:, None] + 50.0) / 100.0), 1, 255)


_TABLES = _ijg_tables()


def jpeg_quality(luma_table: Sequence[int]) -> float:
    """The IJG quality (1-100) whose luminance table is closest to ``luma_table`` (64 values, natural order).

    Exact for libjpeg/OpenCV/Pillow encoders; for custom tables (cameras, Photoshop) the nearest IJG
    quality, which still orders files by how hard they were compressed.
    """
    t = np.asarray(luma_table, dtype=np.float64)
    if t.shape != (64,):
        return float("nan")
    return float(np.argmin(np.abs(_TABLES - t[None]).sum(axis=1)) + 1)


def phash(rgb: np.ndarray) -> np.uint64:
    """64-bit DCT perceptual hash of an (H, W, 3) uint8 image (imagehash.phash's algorithm)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(gray, (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].ravel()  # (64,) lowest frequencies
    ordered = np.sort(low)
    bits = low > 0.5 * (ordered[31] + ordered[32])  # above the median (np.median costs 4x the whole DCT)
    return np.uint64(int(np.packbits(bits).view(">u8")[0]))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between uint64 hashes, broadcast: (..., ) uint8 in 0..64."""
    return np.bitwise_count(np.bitwise_xor(a, b))


def _orientation(im: Image.Image) -> int:
    """EXIF orientation as :func:`aivh_ens.data.image_size` reads it: from the header only (a PNG's late
    EXIF chunk would need the pixels decoded), 1 when absent or unreadable."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a corrupt EXIF block does not make the image unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _header(data: bytes) -> dict[str, Any]:
    """Format, mode and compression facts from the header of already validated image bytes."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if _orientation(im) >= 5:  # rotated by 90 degrees: shown as h x w
            w, h = h, w
        out: dict[str, Any] = {"width": w, "height": h, "format": im.format or "unknown", "mode": im.mode}
        out["icc"] = float(bool(im.info.get("icc_profile")))
        out["exif"] = float(bool(im.info.get("exif")))  # raw EXIF bytes (JPEG APP1, WebP, PNG eXIf)
        quality, sampling = float("nan"), None
        if im.format == "JPEG":
            tables = getattr(im, "quantization", None) or {}
            if 0 in tables:
                quality = jpeg_quality(list(tables[0]))
            sampling = _SUBSAMPLING.get(JpegImagePlugin.get_sampling(im), "other")
        out["jpeg_quality"], out["subsampling"] = quality, sampling or "n/a"
    return out


def _scan_one(path: Path) -> dict[str, Any]:
    """One image's metadata, sha256 and pHash. Raises BadImageError for a file ``cv`` would refuse."""
    rgb = load_image(path, max_side=_HASH_SIDE)  # the same checks as training: missing, truncated, size
    with open(path, "rb") as f:
        data = f.read()
    head = _header(data)
    width, height = head["width"], head["height"]
    meta = {
        "width": width,
        "height": height,
        "aspect": width / height,
        "megapixels": width * height / 1e6,
        "kbytes": len(data) / 1e3,
        "bytes_per_pixel": len(data) / (width * height),
        **head,
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": phash(rgb),
    }
    return meta


def scan_images(
    root: str | os.PathLike,
    files: Sequence[str],
    jobs: int | None = None,
    progress: bool = True,
    desc: str = "scan",
    log: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, float]:
    """Scan ``files`` (relative to ``root``) on ``jobs`` threads.

    Returns:
        ``(table, img_per_s)``: one row per file in order, columns :data:`FEATURES` plus ``sha256`` (str)
        and ``phash`` (uint64).

    Raises:
        BadImageError: the first unusable image in table order, with how many there are in all.
    """
    root = Path(root)
    jobs = jobs or min(32, os.cpu_count() or 1)

    def one(i: int) -> dict[str, Any] | BadImageError:
        """Scan row ``i``, or return its BadImageError (raised in table order after the pool)."""
        try:
            return _scan_one(root / files[i])
        except BadImageError as e:
            return e

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as ex:  # decoding and hashing release the GIL
        it = ex.map(one, range(len(files)), chunksize=64)
        rows = list(Progress(it, desc, total=len(files), unit="img", enabled=progress, log=log))
    rate = len(files) / max(time.perf_counter() - t0, 1e-9)
    bad = [r for r in rows if isinstance(r, BadImageError)]
    if bad:
        more = f" ({len(bad)} unusable images in all)" if len(bad) > 1 else ""
        raise BadImageError(bad[0].path, bad[0].reason + more, "remove or replace the file, or its row")
    table = pd.DataFrame(rows, columns=[*FEATURES, "sha256", "phash"])
    table["phash"] = table["phash"].astype(np.uint64)
    return table, rate
