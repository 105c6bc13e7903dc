"""The image pipeline, from file to model input, for the two preprocessing modes.

Pipeline semantics (one definition, used by training, evaluation and the decode-once cache):

1. **Decode** (:func:`aivh_ens.data.load_image`): (H, W, 3) uint8 RGB, EXIF orientation applied. A JPEG the
   storage step shrinks anyway is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps both sides
   at least the storage size: a fraction of a full decode's cost.
2. **Storage step** (:class:`StorageStep`, built by :func:`storage_step`): what every image is kept as.

   - ``resize`` mode, plain (no ``train_resize``, ``eval_resize`` or ``rrc_scale``): S x S with
     S = ``img_size``; the model pipeline's own resize is then the identity.
   - ``resize`` mode with any of them: the shorter side resized (up or down) to
     S = max(img_size, train_resize, eval_resize), aspect ratio kept, because those pipelines crop from an
     aspect-preserving resize (their own shorter-side resize is then the identity or a small step down).
   - ``crop`` mode: native pixels up to a cap: an image whose shorter side exceeds S (default
     max(2 * img_size, 512)) is downscaled to shorter side S; smaller images are kept pixel for pixel.

   In the shorter-side kinds the long side is also capped at ``MAX_ASPECT`` * S by a centre crop (only
   panoramas are affected). The image cache (:mod:`aivh_ens.data.cache`) stores exactly this step's output;
   without the cache the step runs on the fly, so a run gives the same results with the cache or without.
3. **Augmentation** (:func:`train_transform`, :func:`eval_transform`) of the stored uint8 image to
   (img_size, img_size, 3) uint8. ``resize`` mode trains with :class:`RandomAffineCrop`: the crop window
   (RandomResizedCrop, a crop after ``train_resize``, or the whole image), the horizontal flip and the
   rotation are composed into one affine warp: one resampling instead of up to three, several times faster
   than the separate operations. Rotation fills the corners from the image around the window (reflected
   only at the image border) instead of reflecting the already-cropped window. ``crop`` mode takes random
   crops of native pixels (centre crop for evaluation): resizing low-pass-filters away the high-frequency
   traces that generators leave. Colour jitter, blur and JPEG re-compression follow the geometry. A
   pipeline that is the warp alone runs through :class:`FastGeometry`: the same draws and pixels, straight
   to (3, S, S) planes, without albumentations' per-call machinery.
4. **Normalisation** on the uint8 batch tensor (:class:`aivh_ens.data.loader.Normalizer`, on the GPU when there
   is one), so workers move 4x fewer bytes than float tensors.

Interpolation (``RunConfig.interpolation``): resizes use it as given; warps use linear for ``area`` (area
averaging is not defined for a warp; the storage step keeps warp scale factors near 1, where the two agree)
and cubic for ``cubic``.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np

from aivh_ens.config import RunConfig
from aivh_ens.data.images import load_image

INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
WARP_INTERPOLATION = {"area": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
STORAGE_KINDS = ("square", "short")
MAX_ASPECT = 4  # long side <= MAX_ASPECT * short side in stored images (centre crop beyond)
CROP_MIN_STORAGE = 512  # crop mode keeps native pixels up to a shorter side of at least this


def _interp(cfg: RunConfig) -> int:
    return INTERPOLATION.get(cfg.interpolation, cv2.INTER_AREA)


def _pad(size: int) -> A.BasicTransform:
    # Images smaller than a crop are padded (reflection keeps the image statistics; no black bars).
    return A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_REFLECT_101)


# ---- storage step --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageStep:
    """What every image is stored as before augmentation (see the module docstring, step 2).

    Attributes:
        kind: ``square`` (resized to size x size) or ``short`` (shorter side to ``size``).
        size: S in pixels.
        upscale: ``short`` only: also enlarge images whose shorter side is below S (resize mode) or keep
            them as they are (crop mode).
        interpolation: ``area``, ``linear`` or ``cubic`` (cv2), for the resize.
    """

    kind: str
    size: int
    upscale: bool = True
    interpolation: str = "area"

    def __post_init__(self) -> None:
        if self.kind not in STORAGE_KINDS:
            raise ValueError(f"storage kind must be one of {', '.join(STORAGE_KINDS)}; got {self.kind!r}")
        if self.size < 8:
            raise ValueError(f"storage size must be >= 8 px; got {self.size}")
        if self.interpolation not in INTERPOLATION:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATION)}; got {self.interpolation!r}"
            )

    @property
    def tag(self) -> str:
        """Short name for file names: ``sq224``, ``ss255`` (shorter side, up and down), ``sc512`` (capped)."""
        return f"sq{self.size}" if self.kind == "square" else f"{'ss' if self.upscale else 'sc'}{self.size}"

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description (part of the image cache key)."""
        return {
            "kind": self.kind,
            "size": self.size,
            "upscale": self.upscale,
            "interpolation": self.interpolation,
            "max_aspect": MAX_ASPECT,
        }

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) an (h, w) image is stored at (what :meth:`prepare` returns)."""
        if self.kind == "square":
            return self.size, self.size
        short = min(h, w)
        if short != self.size and (self.upscale or short > self.size):
            # The shorter side becomes exactly S; the longer one is rounded to the nearest pixel.
            h, w = (
                (self.size, max(1, round(w * self.size / h)))
                if h == short
                else (max(1, round(h * self.size / w)), self.size)
            )
        cap = MAX_ASPECT * min(h, w)
        return min(h, cap), min(w, cap)

    def decode_side(self) -> int:
        """``max_side`` for :func:`load_image`: a reduced JPEG decode never goes below the stored size."""
        return self.size

    def prepare(self, img: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> the stored (h, w, 3) uint8 image (C-contiguous, writable)."""
        h, w = img.shape[:2]
        interp = INTERPOLATION[self.interpolation]
        if self.kind == "square":
            if (h, w) != (self.size, self.size):
                img = cv2.resize(img, (self.size, self.size), interpolation=interp)
            return np.require(img, requirements=["C", "W"])
        sh, sw = self.shape(h, w)
        short = min(h, w)
        if short != self.size and (self.upscale or short > self.size):
            nh, nw = (
                (self.size, round(w * self.size / h)) if h == short else (round(h * self.size / w), self.size)
            )
            img = cv2.resize(img, (max(1, nw), max(1, nh)), interpolation=interp)
        h, w = img.shape[:2]
        if (h, w) != (sh, sw):  # panorama: keep the centre
            top, left = (h - sh) // 2, (w - sw) // 2
            img = img[top : top + sh, left : left + sw]
        return np.require(img, requirements=["C", "W"])

    def load(self, path: str | Path) -> np.ndarray:
        """Decode ``path`` (reduced where it can) and apply the storage step.

        Raises:
            BadImageError: the file cannot be decoded (see :func:`load_image`).
        """
        return self.prepare(load_image(path, max_side=self.decode_side()))


def storage_step(cfg: RunConfig, img_size: int, size: int | None = None) -> StorageStep:
    """The storage step of a run's pipeline (``size`` overrides the storage size S)."""
    if cfg.mode == "crop":
        return StorageStep(
            "short",
            size or max(2 * img_size, CROP_MIN_STORAGE),
            upscale=False,
            interpolation=cfg.interpolation,
        )
    if not (cfg.train_resize or cfg.eval_resize or cfg.rrc_scale):
        return StorageStep("square", size or img_size, interpolation=cfg.interpolation)
    s = size or max(img_size, cfg.train_resize or 0, cfg.eval_resize or 0)
    return StorageStep("short", s, upscale=True, interpolation=cfg.interpolation)


# ---- fused random geometry -----------------------------------------------------------------------------


class RandomAffineCrop(A.ImageOnlyTransform):
    """A random window of the image, resized to size x size, flipped and rotated: one affine warp.

    Args:
        size: output side in pixels.
        window: ``whole`` (the whole image, aspect not kept: a plain resize), ``rrc`` (RandomResizedCrop:
            area fraction in ``scale``, aspect ratio log-uniform in ``ratio``, 10 tries, then a centre crop
            with the ratio clamped, as torchvision and albumentations do) or ``crop`` (the window a
            ``size`` crop covers after resizing the shorter side to ``ref_short``, at a uniform position).
        scale, ratio: ``rrc`` parameters.
        ref_short: ``crop`` parameter (``train_resize``).
        hflip: probability of a horizontal flip.
        rotate: rotation angle limit in degrees, uniform in [-rotate, rotate], about the output centre.
        interpolation: cv2 flag for the warp.
    """

    def __init__(
        self,
        size: int,
        window: str = "whole",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        ref_short: int | None = None,
        hflip: float = 0.0,
        rotate: float = 0.0,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        if window not in ("whole", "rrc", "crop"):
            raise ValueError(f"window must be whole, rrc or crop; got {window!r}")
        if window == "crop" and not ref_short:
            raise ValueError("window='crop' needs ref_short (the shorter side the crop is taken after)")
        self.size, self.window, self.scale, self.ratio = size, window, tuple(scale), tuple(ratio)
        self.ref_short, self.hflip, self.rotate, self.interpolation = ref_short, hflip, rotate, interpolation

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "window", "scale", "ratio", "ref_short", "hflip", "rotate", "interpolation")

    def _window(self, rnd: random.Random, h: int, w: int) -> tuple[float, float, float, float]:
        """(x0, y0, width, height) of the source window, in pixels."""
        if self.window == "whole":
            return 0.0, 0.0, float(w), float(h)
        if self.window == "crop":
            side = self.size * min(h, w) / self.ref_short  # type: ignore[operator]
            if abs(side - round(side)) < 1e-6:
                side = float(round(side))
            x0 = (w - side) / 2 if side > w else _start(rnd.random(), w, side)
            y0 = (h - side) / 2 if side > h else _start(rnd.random(), h, side)
            return x0, y0, side, side
        area = h * w
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = rnd.uniform(self.scale[0] * area, self.scale[1] * area)
            aspect = math.exp(rnd.uniform(lo, hi))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return _start(rnd.random(), w, cw), _start(rnd.random(), h, ch), float(cw), float(ch)
        in_ratio = w / h  # fallback: centre crop with the aspect ratio clamped into range
        if in_ratio < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            cw, ch = round(h * self.ratio[1]), h
        else:
            cw, ch = w, h
        return float((w - cw) // 2), float((h - ch) // 2), float(cw), float(ch)

    def draw(self, rnd: random.Random, h: int, w: int) -> dict[str, Any]:
        """The random parameters for an (h, w) image, drawn from ``rnd`` in a fixed order: window, flip,
        angle (what albumentations asks for through :meth:`get_params_dependent_on_data`)."""
        window = self._window(rnd, h, w)
        flip = self.hflip > 0 and rnd.random() < self.hflip
        angle = rnd.uniform(-self.rotate, self.rotate) if self.rotate > 0 else 0.0
        return {"window": window, "flip": flip, "angle": angle}

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        return self.draw(self.py_random, h, w)

    def apply(
        self,
        img: np.ndarray,
        window: tuple[float, float, float, float] = (0, 0, 0, 0),
        flip: bool = False,
        angle: float = 0.0,
        **params: Any,
    ) -> np.ndarray:
        return affine_crop(img, window, self.size, flip, angle, self.interpolation)


def _start(u: float, n: int, length: float) -> float:
    """Window start for a uniform draw ``u`` in [0, 1): integer positions 0..n-length when it fits."""
    if length == int(length):
        return float(int((n - int(length) + 1) * u))
    return u * (n - length)


_TO_CONTINUOUS = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])  # pixel index -> continuous coordinate
_TO_INDEX = np.array([[1.0, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])


def affine_crop(
    img: np.ndarray,
    window: tuple[float, float, float, float],
    size: int,
    flip: bool = False,
    angle: float = 0.0,
    interpolation: int = cv2.INTER_LINEAR,
    chw: bool = False,
) -> np.ndarray:
    """The window (x0, y0, width, height) of ``img`` (H, W, C) resized to (size, size), flipped, rotated.

    One ``cv2.warpAffine``; a window of exactly size x size at integer offsets, unrotated, is copied
    instead (bit-exact). Windows more than twice the output are first shrunk with area averaging, so a
    warp never aliases. ``img`` is only read. Returns (size, size, C), or with ``chw`` the same pixels as
    contiguous planes (C, size, size), split straight from the warp's output.
    """
    x0, y0, ww, wh = window
    h, w = img.shape[:2]
    if (
        angle == 0
        and ww == wh == size
        and x0 == int(x0)
        and y0 == int(y0)
        and 0 <= x0 <= w - size
        and 0 <= y0 <= h - size
    ):
        out = img[int(y0) : int(y0) + size, int(x0) : int(x0) + size]
        out = out[:, ::-1] if flip else out
        return to_chw(out) if chw else np.ascontiguousarray(out)
    k = max(ww, wh) / size
    if k > 2:
        f = 1.0 / k
        small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        fx, fy = small.shape[1] / w, small.shape[0] / h
        img, (x0, y0, ww, wh) = small, (x0 * fx, y0 * fy, ww * fx, wh * fy)
    # Forward map source -> output in continuous coordinates (pixel centres at +0.5): crop and scale, flip,
    # rotate about the output centre; then shift to cv2's pixel-index coordinates.
    crop = np.array([[size / ww, 0, -x0 * size / ww], [0, size / wh, -y0 * size / wh], [0, 0, 1]])
    m = crop
    if flip:
        m = np.array([[-1.0, 0, size], [0, 1, 0], [0, 0, 1]]) @ m
    if angle:
        rot = np.vstack([cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0), [0, 0, 1]])
        m = rot @ m
    m = _TO_INDEX @ m @ _TO_CONTINUOUS
    three = img.ndim == 3 and img.shape[2] == 3
    if three:  # OpenCV's vectorised warp handles 4 channels, not 3: twice as fast, the same pixels
        img = cv2.cvtColor(img, cv2.COLOR_RGB2RGBA)
    out = cv2.warpAffine(img, m[:2], (size, size), flags=interpolation, borderMode=cv2.BORDER_REFLECT_101)
    out = out if out.ndim == 3 else out[..., None]
    if chw:
        return to_chw(out, channels=3 if three else None)
    return cv2.cvtColor(out, cv2.COLOR_RGBA2RGB) if three else out


def to_chw(img: np.ndarray, channels: int | None = None) -> np.ndarray:
    """(H, W, C) -> contiguous (channels, H, W): the first ``channels`` planes (default all C).

    ``cv2.split`` into the planes is 5x faster than a numpy transpose; stacking permuted views in a collate
    instead costs ~2 ms an image, and on the CPU the batch would need another strided copy before the model.
    """
    h, w, c = img.shape
    k = c if channels is None else channels
    out = np.empty((k, h, w), dtype=img.dtype)
    if 1 < c <= 4 and img.dtype == np.uint8:
        planes = list(out) + [np.empty((h, w), np.uint8) for _ in range(c - k)]  # planes past k: scratch
        cv2.split(np.ascontiguousarray(img), planes)
    else:
        out[...] = img[..., :k].transpose(2, 0, 1)
    return out


class FastGeometry:
    """A geometry-only training pipeline (a ``Compose`` of one :class:`RandomAffineCrop`, as
    :func:`train_transform` builds for ``resize`` mode without colour, blur or JPEG) run without
    albumentations' per-call machinery: the same draws from the same seed, the same pixels, returned as
    (3, S, S) planes. An image takes ~300 us this way against ~370 us through ``Compose`` (best of 7 over
    300 stored 255 px images, one core; the rest is the warp); tested equal to the ``Compose`` path.
    """

    def __init__(self, op: RandomAffineCrop):
        self.op = op

    @classmethod
    def of(cls, pipe: Any) -> FastGeometry | None:
        """The fast path for ``pipe``, or None when it does more than one :class:`RandomAffineCrop`."""
        ops = getattr(pipe, "transforms", None)
        if type(pipe) is not A.Compose or pipe.p < 1 or ops is None or len(ops) != 1:
            return None
        op = ops[0]
        return cls(op) if type(op) is RandomAffineCrop and op.p >= 1 else None

    def __call__(self, img: np.ndarray, seed: int) -> np.ndarray:
        """(H, W, 3) uint8 (only read) -> (3, S, S) uint8, augmented as :func:`reseed` with ``seed`` and
        the pipeline would."""
        rnd = random.Random(seed)  # the Python generator reseed() gives the pipeline
        rnd.random()  # Compose's own draw for its p (it draws even at p=1)
        h, w = img.shape[:2]
        op = self.op
        return affine_crop(img, size=op.size, interpolation=op.interpolation, chw=True, **op.draw(rnd, h, w))


# ---- pipelines -----------------------------------------------------------------------------------------


def reseed(pipe: A.BaseCompose, seed: int) -> None:
    """Seed a pipeline for one sample: one numpy and one Python generator, shared by all its transforms.

    albumentations' ``set_random_seed`` gives every transform its own generator with the same seed, so
    their first draws coincide (a flip with p=0.5 would only ever come with a colour jitter of p=0.8), and
    it builds two generators per transform per sample; shared generators draw in sequence, at a third of
    the cost.
    """
    pipe.set_random_state(np.random.default_rng(seed), random.Random(seed))


def train_transform(cfg: RunConfig, img_size: int) -> A.Compose:
    """Training pipeline on a stored image: geometry by mode and recipe, then colour, blur, JPEG."""
    s = img_size
    ops: list[A.BasicTransform] = []
    if cfg.mode == "crop":
        ops += [_pad(s), A.RandomCrop(height=s, width=s)]
        if cfg.hflip > 0:
            ops.append(A.HorizontalFlip(p=cfg.hflip))
        if cfg.rotate > 0:
            ops.append(
                A.Rotate(
                    limit=cfg.rotate, interpolation=_interp(cfg), border_mode=cv2.BORDER_REFLECT_101, p=1.0
                )
            )
    else:
        window = "rrc" if cfg.rrc_scale is not None else "crop" if cfg.train_resize else "whole"
        ops.append(
            RandomAffineCrop(
                s,
                window,
                scale=cfg.rrc_scale or (1.0, 1.0),
                ref_short=cfg.train_resize,
                hflip=cfg.hflip,
                rotate=cfg.rotate,
                interpolation=WARP_INTERPOLATION.get(cfg.interpolation, cv2.INTER_LINEAR),
            )
        )
    if cfg.color_jitter > 0:
        c = cfg.color_jitter
        ops.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=c / 4, p=0.8))
    if cfg.blur_p > 0:
        ops.append(A.GaussianBlur(sigma_limit=(0.1, 1.5), p=cfg.blur_p))
    if cfg.jpeg_p > 0:
        ops.append(A.ImageCompression(quality_range=cfg.jpeg_quality, p=cfg.jpeg_p))
    return A.Compose(ops, seed=cfg.seed)


def eval_transform(cfg: RunConfig, img_size: int) -> A.Compose:
    """Deterministic evaluation pipeline: resize (or resize + centre crop), or a native centre crop."""
    s, interp = img_size, _interp(cfg)
    if cfg.mode == "crop":
        ops = [_pad(s), A.CenterCrop(height=s, width=s)]
    elif cfg.eval_resize:
        ops = [
            A.SmallestMaxSize(max_size=cfg.eval_resize, interpolation=interp),
            _pad(s),
            A.CenterCrop(height=s, width=s),
        ]
    else:
        ops = [A.Resize(height=s, width=s, interpolation=interp)]
    return A.Compose(ops, seed=cfg.seed)
