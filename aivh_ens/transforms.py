"""Augmentation pipelines (albumentations, on uint8 HWC arrays) for the two preprocessing modes.

``resize``: the whole image is resized to the model's input (the reference systems' way).
``crop``: training takes random crops of the input size at native resolution and evaluation a centre crop,
because resizing low-pass-filters away the high-frequency traces that generators leave.

Pipelines output uint8 (img_size, img_size, 3); normalisation happens on the batch tensor (on the GPU when
there is one), so workers move 4x fewer bytes.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2

from aivh_ens.config import RunConfig

INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def _interp(cfg: RunConfig) -> int:
    return INTERPOLATION.get(cfg.interpolation, cv2.INTER_AREA)


def _pad(size: int) -> A.BasicTransform:
    # Images smaller than a crop are padded (reflection keeps the image statistics; no black bars).
    return A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_REFLECT_101)


def train_transform(cfg: RunConfig, img_size: int) -> A.Compose:
    """Training pipeline: geometry by mode and recipe, then flips, rotation, colour, blur, JPEG."""
    s, interp = img_size, _interp(cfg)
    ops: list[A.BasicTransform] = []
    if cfg.mode == "crop":
        ops += [_pad(s), A.RandomCrop(height=s, width=s)]
    else:
        if cfg.train_resize:
            ops.append(A.SmallestMaxSize(max_size=cfg.train_resize, interpolation=interp))
        if cfg.rrc_scale is not None:
            ops.append(A.RandomResizedCrop(size=(s, s), scale=cfg.rrc_scale, interpolation=interp))
        elif cfg.train_resize:
            ops += [_pad(s), A.RandomCrop(height=s, width=s)]
        else:
            ops.append(A.Resize(height=s, width=s, interpolation=interp))
    if cfg.hflip > 0:
        ops.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.rotate > 0:
        ops.append(A.Rotate(limit=cfg.rotate, interpolation=interp, border_mode=cv2.BORDER_REFLECT_101, p=1.0))
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
        ops = [A.SmallestMaxSize(max_size=cfg.eval_resize, interpolation=interp), _pad(s),
               A.CenterCrop(height=s, width=s)]
    else:
        ops = [A.Resize(height=s, width=s, interpolation=interp)]
    return A.Compose(ops, seed=cfg.seed)
