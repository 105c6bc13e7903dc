"""A synthetic "AI-generated or human-made?" data set in the Kaggle layout, for demos and tests.

Every image starts as a procedural scene with natural-image statistics (1/f^beta power spectrum textures,
soft-edged shapes, smooth lighting). A "human" image is that scene through a camera model: full-resolution
detail plus signal-dependent sensor noise. An "AI" image is the same scene through a generator model: the
scene is rendered at half resolution with smoothed texture and upsampled by a stride-2 transposed
convolution whose kernel phases do not sum to the same value, which leaves the periodic (checkerboard)
spectral peaks reported for GAN and diffusion decoders; the lost fine detail is filled with invented
texture, and the sensor noise is mostly missing. ``difficulty`` moves the generator from crude (0) to one
that leaves no trace (1); a share of AI images comes from a much better generator, so that no detector is
perfect. Both classes are saved as JPEG with the quality drawn from one range, at the same
size per pair, so that dimensions, format and file size reveal nothing about the label.

The test split is shifted the way Kaggle's is: larger images, other cameras, no pairs, and half of its AI
images from a second generator the training set never shows (rendered 3-5x smaller, bilinear upsampling and
sharpening instead of a transposed convolution); the other half come from the training generator.

Layout written under ``out_dir``::

    train.csv          file_name,label      rows 2k (AI, 1) and 2k+1 (human, 0) show the same scene
    train_data/*.jpg
    test.csv           id                   shuffled, not in pairs
    test_data_v2/*.jpg
    solution.csv       id,label             the truth for test.csv, for scoring
    demo.json          the parameters the data set was made with (marks the folder as a demo data set)

Every image comes from its own random stream keyed by (seed, split, index), so a data set is byte-identical
for a seed (given the same NumPy and OpenCV builds), and a larger ``n`` only adds train rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from aivh_ens.errors import UserError
from aivh_ens.io import write_csv, write_text

TRAIN_DIR = "train_data"
TEST_DIR = "test_data_v2"
MARKER = "demo.json"
DEFAULT_DIFFICULTY = 0.2
_STAGING_PREFIX = ".demo-data-staging-"
# What a demo data set consists of: the only entries replaced when a previous one is overwritten.
_OWNED = ("train.csv", "test.csv", "solution.csv", MARKER, TRAIN_DIR, TEST_DIR)
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Split:
    """How one split's images are drawn: sizes, generator variant, camera and JPEG ranges."""

    name: str
    key: int  # mixed into every random stream, so the splits never share scenes
    size_range: tuple[int, int]  # inclusive, per side
    generator: str  # "tconv" (train) or "bilinear" (test)
    render_factor: tuple[float, float]  # the generator renders at size / factor (tconv: always 2)
    noise_range: tuple[float, float]  # human sensor noise std, in [0, 1] intensity units
    quality_range: tuple[int, int]  # inclusive JPEG quality, the same for both classes


_TRAIN = _Split("train", 1, (48, 128), "tconv", (2.0, 2.0), (0.008, 0.03), (70, 95))
_TEST = _Split("test", 2, (96, 160), "bilinear", (3.0, 5.0), (0.005, 0.04), (65, 95))
_TEST_KNOWN = dataclasses.replace(_TEST, generator="tconv", render_factor=(2.0, 2.0))
_TEST_NEW_SHARE = 0.5  # share of test AI images from the generator that training never sees


def _file_stem(seed: int, split: str, index: int) -> str:
    # A hash of (seed, split, index) only: the name says nothing about the label or the pair.
    return hashlib.sha256(f"aivh-ens-demo:{seed}:{split}:{index}".encode()).hexdigest()[:20]


# ---- scenes --------------------------------------------------------------------------------------------


def _powerlaw_fields(rng: np.random.Generator, k: int, h: int, w: int, beta: np.ndarray) -> np.ndarray:
    """``k`` zero-mean, unit-std random fields with power spectrum ~ 1/f^beta[i]; shape (k, h, w)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = f[None] ** (-np.asarray(beta, np.float64)[:, None, None] / 2)  # (k, h, w//2+1)
    amp[:, 0, 0] = 0.0
    shape = (k, h, w // 2 + 1)
    spec = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * amp
    field = np.fft.irfft2(spec, s=(h, w))
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
    return field.astype(np.float32)


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random natural-looking RGB scene, float32 (h, w, 3) in [0, 1]."""
    # Background: a luminance texture and two weaker chroma textures, coloured by a random palette.
    beta = rng.uniform(1.6, 2.8, size=4)
    fields = _powerlaw_fields(rng, 4, h, w, beta)  # (4, h, w): lum, chroma a, chroma b, shape texture
    base = rng.uniform(0.2, 0.75, size=3).astype(np.float32)
    lum_dir = np.abs(rng.normal(1.0, 0.25, size=3)).astype(np.float32)
    chroma = rng.normal(0.0, 1.0, size=(2, 3)).astype(np.float32)
    img = base + rng.uniform(0.06, 0.2) * fields[0, ..., None] * lum_dir
    img += rng.uniform(0.01, 0.05) * np.tensordot(np.moveaxis(fields[1:3], 0, -1), chroma, axes=1)

    # Objects: soft-edged filled shapes with their own colour and texture (occlusion gives sharp edges).
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 7))):
        mask = np.zeros((h, w), np.uint8)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.1, 0.45) * min(h, w)
        if rng.random() < 0.5:
            axes = (max(2, int(r)), max(2, int(r * rng.uniform(0.3, 1.0))))
            cv2.ellipse(
                mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA
            )
        else:
            m = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, m))
            rad = r * rng.uniform(0.5, 1.0, m)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
        alpha = mask.astype(np.float32) / 255.0
        if rng.random() < 0.4:  # out of focus
            alpha = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(0.6, 2.0))
        colour = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
        tex = colour + rng.uniform(0.02, 0.15) * fields[3, ..., None] * lum_dir
        img = img * (1 - alpha[..., None]) + tex * alpha[..., None]

    # Lighting: a smooth gradient and vignetting, as a lens and a light source would add.
    gx, gy = rng.normal(0, 0.25, size=2)
    light = 1 + gx * (xx / w - 0.5) + gy * (yy / h - 0.5)
    light -= rng.uniform(0, 0.35) * (((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2)
    img *= light[..., None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ---- camera and generators -----------------------------------------------------------------------------


def _sensor_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Signal-dependent (shot + read) noise, partly shared across channels as after demosaicing."""
    h, w, _ = img.shape
    scale = sigma * np.sqrt(0.25 + 0.75 * img)
    shared = rng.standard_normal((h, w, 1)).astype(np.float32)
    own = rng.standard_normal((h, w, 3)).astype(np.float32)
    return scale * (0.7 * shared + 0.5 * own)


def _camera(rng: np.random.Generator, scene: np.ndarray, sigma: float) -> np.ndarray:
    return scene + _sensor_noise(rng, scene, sigma)


# The train generator's fixed "learned" kernel: a bilinear transposed-conv kernel plus a perturbation whose
# four stride-2 phases sum to different values (the checkerboard of Odena et al. 2016). Fixed for all
# images, as a trained generator's weights are.
_BILINEAR4 = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).astype(np.float32) / 16.0  # each 2x2 phase sums to 1
_PERTURB = np.random.default_rng(20240611).standard_normal((4, 4)).astype(np.float32)
_PERTURB -= _PERTURB.mean()


def _tconv_up2(low: np.ndarray, strength: float) -> np.ndarray:
    """Stride-2 transposed convolution (zero insertion + 4x4 kernel), float32 (2h, 2w, 3)."""
    h, w, c = low.shape
    z = np.zeros((2 * h, 2 * w, c), np.float32)
    z[::2, ::2] = low
    kernel = _BILINEAR4 + strength * _PERTURB
    return cv2.filter2D(z, -1, kernel, anchor=(1, 1), borderType=cv2.BORDER_REFLECT)


# Generator strengths at difficulty 0 (all scale with 1 - difficulty). Tuned so that at DEFAULT_DIFFICULTY
# a tiny CNN on 64 px resizes is clearly better than chance and clearly short of perfect, and so that the
# JPEG sizes of the two classes match (tests/test_synth.py checks both the signal and the sizes).
_CHECKER = 0.04  # transposed-conv kernel perturbation: phase gains differ by a few % of the intensity
_SMOOTH = 0.6  # Gaussian blur of the low-resolution render, in its pixels
_GRAIN = 1.0  # the generator's low-resolution grain, relative to the paired camera's noise
_INVENTED = 0.8  # invented fine texture, relative to the fine detail the low-resolution render lost
_SHARPEN = 0.15  # the test generator's unsharp-mask amount
# A share of AI images comes from a much better generator (traces at this fraction of their strength), so
# that even a detector that finds every trace stays clearly short of perfect, as on real data.
_GOOD_SHARE = 0.15
_GOOD_TRACE = 0.2


def _image_difficulty(rng: np.random.Generator, difficulty: float) -> float:
    good = rng.random() < _GOOD_SHARE
    return 1.0 - (1.0 - difficulty) * _GOOD_TRACE if good else difficulty


def _generator(
    rng: np.random.Generator, scene: np.ndarray, split: _Split, difficulty: float, sigma: float
) -> np.ndarray:
    """The scene as a generator would produce it: low-resolution render, smoothed, upsampled with traces."""
    h, w, _ = scene.shape
    trace = max(0.0, 1.0 - difficulty)  # 1 at difficulty 0, gone at difficulty 1
    if split.generator == "tconv":
        lh, lw = (h + 1) // 2, (w + 1) // 2
    else:
        factor = rng.uniform(*split.render_factor)
        lh, lw = max(8, round(h / factor)), max(8, round(w / factor))
    low_clean = cv2.resize(scene, (lw, lh), interpolation=cv2.INTER_AREA)
    blur = _SMOOTH * trace
    low = cv2.GaussianBlur(low_clean, (0, 0), blur) if blur > 0 else low_clean.copy()
    low += _GRAIN * trace * rng.uniform(0.5, 1.5) * sigma * rng.standard_normal(low.shape).astype(np.float32)
    if split.generator == "tconv":
        # The trace strength varies per image, as it does across a generator's checkpoints and prompts.
        up = _tconv_up2(low, _CHECKER * trace * rng.uniform(0.3, 1.7))[:h, :w]
        plain = _tconv_up2(low_clean, 0.0)[:h, :w]
    else:
        up = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
        plain = cv2.resize(low_clean, (w, h), interpolation=cv2.INTER_LINEAR)
        # Over-sharpening, as some decoders' last layers do.
        up = up + _SHARPEN * (0.5 + trace) * (up - cv2.GaussianBlur(up, (0, 0), 1.0))
    lost = scene - plain  # (h, w, 3) the band a low-resolution render cannot hold
    # Generators fill that band with invented texture that ignores the scene's edges; a better generator
    # (higher difficulty) gets more of the real detail back instead, and more of the camera noise.
    field = _powerlaw_fields(rng, 1, h, w, np.array([2.0]))[0]
    invented = (field - cv2.GaussianBlur(field, (0, 0), 1.0))[..., None]
    invented *= lost.std() / (invented.std() + 1e-6)
    up = up + difficulty * lost + _INVENTED * trace * invented
    return up + _sensor_noise(rng, np.clip(up, 0, 1), difficulty * sigma)


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - cv2 only fails on invalid input
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _rng(seed: int, split: _Split, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split.key, index])


def _pair(seed: int, k: int, difficulty: float) -> tuple[bytes, bytes]:
    """Train pair ``k``: (AI jpeg, human jpeg) of one scene at one size."""
    rng = _rng(seed, _TRAIN, k)
    lo, hi = _TRAIN.size_range
    h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    scene = _scene(rng, h, w)
    sigma = rng.uniform(*_TRAIN.noise_range)
    q_ai, q_human = (int(v) for v in rng.integers(_TRAIN.quality_range[0], _TRAIN.quality_range[1] + 1, 2))
    ai = _generator(rng, scene, _TRAIN, _image_difficulty(rng, difficulty), sigma)
    human = _camera(rng, scene, sigma)
    return _encode_jpeg(ai, q_ai), _encode_jpeg(human, q_human)


def _test_image(seed: int, i: int, label: int, difficulty: float) -> bytes:
    """Test image ``i``: its own scene and size, through a generator (label 1: the test one or the training
    one, half and half) or a camera (0)."""
    rng = _rng(seed, _TEST, i)
    lo, hi = _TEST.size_range
    h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    scene = _scene(rng, h, w)
    sigma = rng.uniform(*_TEST.noise_range)
    quality = int(rng.integers(_TEST.quality_range[0], _TEST.quality_range[1] + 1))
    d = _image_difficulty(rng, difficulty)
    split = _TEST if rng.random() < _TEST_NEW_SHARE else _TEST_KNOWN
    img = _generator(rng, scene, split, d, sigma) if label else _camera(rng, scene, sigma)
    return _encode_jpeg(img, quality)


# ---- the data set --------------------------------------------------------------------------------------


def is_demo_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a data set written by :func:`make_demo_dataset` (it has the marker file)."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text()).get("made_by") == "aivh_ens.synth"
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; pick another path for the demo data set")
    if not out.exists() or force or is_demo_dataset(out):
        return
    other = sorted(p.name for p in out.iterdir() if not p.name.startswith(_STAGING_PREFIX))
    if other:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        raise UserError(
            f"{out} is not empty ({shown}) and is not a previous demo data set; "
            f"pick an empty or new folder, or pass --force to replace its {', '.join(_OWNED)}"
        )


def make_demo_dataset(
    out_dir: str | os.PathLike,
    n: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    difficulty: float = DEFAULT_DIFFICULTY,
    force: bool = False,
) -> dict[str, Any]:
    """Write a synthetic data set in the Kaggle "AI vs. Human-Generated Images" layout.

    Images go to a staging folder first; the CSVs are written last, so an interrupted run never leaves a
    folder that looks complete.

    Args:
        out_dir: Folder to write to; created if missing. A non-empty folder must be a previous demo data set
            (its files are replaced) unless ``force``.
        n: Train images, an even number >= 20 (``n // 2`` AI/human pairs).
        n_test: Test images (>= 2), about half AI, shuffled, not in pairs.
        seed: Seed; the same seed gives byte-identical files.
        difficulty: In [0, 1]; higher means weaker generator traces and more noise in AI images.
        force: Write into a non-empty folder that is not a demo data set, replacing only the entries a demo
            data set consists of.

    Returns:
        Paths (``root``, ``train_csv``, ``test_csv``, ``solution_csv``, ``train_dir``, ``test_dir``) and
        counts (``n_train``, ``n_train_ai``, ``n_train_human``, ``n_test``, ``n_test_ai``, ``n_test_human``),
        plus ``seed``, ``difficulty`` and ``seconds``.

    Raises:
        UserError: On an invalid count or difficulty, or a non-empty folder that is not a demo data set.
    """
    t0 = time.perf_counter()
    n, n_test, seed, difficulty = _check_counts(n, n_test, difficulty, seed)
    out = Path(out_dir)
    _check_target(out, force)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{_STAGING_PREFIX}*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    stage = out / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        train_rows = _write_train_images(stage, n, seed, difficulty)
        test_rows = _write_test_images(stage, n_test, seed, difficulty)
        _swap_in(stage, out, {"n": n, "n_test": n_test, "seed": seed, "difficulty": difficulty})
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    test = pd.DataFrame(test_rows, columns=["id", "label"])
    write_csv(out / "solution.csv", test)
    write_csv(out / "test.csv", test[["id"]])
    write_csv(out / "train.csv", pd.DataFrame(train_rows, columns=["file_name", "label"]))

    n_test_ai = int(test["label"].sum())
    files = {"train_csv": "train.csv", "test_csv": "test.csv", "solution_csv": "solution.csv",
             "train_dir": TRAIN_DIR, "test_dir": TEST_DIR}  # fmt: skip
    counts = {"n_train": n, "n_train_ai": n // 2, "n_train_human": n // 2, "n_test": n_test,
              "n_test_ai": n_test_ai, "n_test_human": n_test - n_test_ai}  # fmt: skip
    return {"root": out, **{k: out / v for k, v in files.items()}, **counts, "seed": seed,
            "difficulty": difficulty, "seconds": time.perf_counter() - t0}  # fmt: skip


def _check_counts(n: int, n_test: int, difficulty: float, seed: int) -> tuple[int, int, int, float]:
    if isinstance(n, bool) or int(n) != n or n < 20 or n % 2:
        raise UserError(f"n={n} (--n) must be an even number >= 20 (pairs of AI and human images)")
    if isinstance(n_test, bool) or int(n_test) != n_test or n_test < 2:
        raise UserError(f"n_test={n_test} (--n-test) must be a whole number >= 2")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise UserError(
            f"difficulty={difficulty} (--difficulty) must be in [0, 1] (0 = strong generator traces)"
        )
    return int(n), int(n_test), int(seed), float(difficulty)


def _write_train_images(stage: Path, n: int, seed: int, difficulty: float) -> list[tuple[str, int]]:
    """``n // 2`` AI/human pairs under ``stage/TRAIN_DIR``; rows ``(file_name, label)``, row 2k AI."""
    (stage / TRAIN_DIR).mkdir(parents=True)
    rows: list[tuple[str, int]] = []
    for k in range(n // 2):
        for j, data in enumerate(_pair(seed, k, difficulty)):
            name = f"{TRAIN_DIR}/{_file_stem(seed, 'train', 2 * k + j)}.jpg"
            (stage / name).write_bytes(data)
            rows.append((name, 1 - j))  # row 2k is AI (1), row 2k+1 human (0)
    return rows


def _write_test_images(stage: Path, n_test: int, seed: int, difficulty: float) -> list[tuple[str, int]]:
    """``n_test`` shuffled test images (half AI) under ``stage/TEST_DIR``; rows ``(id, label)``."""
    (stage / TEST_DIR).mkdir(parents=True)
    order_rng = np.random.default_rng([seed, _TEST.key, 2**31])
    labels = np.zeros(n_test, np.int64)
    labels[: n_test // 2] = 1
    labels = order_rng.permutation(labels)
    rows: list[tuple[str, int]] = []
    for i in range(n_test):
        name = f"{TEST_DIR}/{_file_stem(seed, 'test', i)}.jpg"
        (stage / name).write_bytes(_test_image(seed, i, int(labels[i]), difficulty))
        rows.append((name, int(labels[i])))
    return rows


def _swap_in(stage: Path, out: Path, params: dict[str, Any]) -> None:
    """Move the staged image folders into ``out``, the marker first.

    The CSVs go first and come back last (written by the caller), so a crash in between leaves a folder that
    looks incomplete; the marker is written before the folders move, so a re-run recognises the folder.
    """
    for entry in ("train.csv", "test.csv", "solution.csv"):
        (out / entry).unlink(missing_ok=True)
    marker = {"made_by": "aivh_ens.synth", "format": _FORMAT_VERSION, **params}
    write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")
    for sub in (TRAIN_DIR, TEST_DIR):
        target = out / sub
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(stage / sub, target)
