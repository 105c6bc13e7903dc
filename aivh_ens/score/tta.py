"""Test-time augmentation: parse a spec, make the views of each image, and score them in one batch.

A spec (:mod:`aivh_ens.score.tta_spec`) joins a flip term (none, hflip, d4), a crop term (crops:N) and a
shift term (shift:P) with ``+``.

Crops are cut per image in the dataset (image sizes differ); flips, rotations and shifts are tensor ops
applied to the batch once it is on the device. Every view goes through the model in the same forward pass and the
view probabilities are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from aivh_ens.config import RunConfig
from aivh_ens.data.images import BadImageError
from aivh_ens.data.loader import ImageSource
from aivh_ens.data.transforms import eval_transform
from aivh_ens.score.tta_spec import FLIPS, MAX_CROPS, MAX_SHIFT, VALID_FORMS, TTASpec, parse_tta
from aivh_ens.train.precision import autocast

__all__ = ["FLIPS", "MAX_CROPS", "MAX_SHIFT", "VALID_FORMS", "TTASpec", "parse_tta"]  # re-exported


def effective_spec(spec: TTASpec, cfg: RunConfig) -> TTASpec:
    """The spec as it applies to one run: crops are dropped for runs that resize the whole image."""
    if spec.crops and crop_pretransform(cfg, 8) is None:
        return TTASpec(spec.flips, 0, spec.shift)
    return spec


def own_spec(cfg: RunConfig) -> TTASpec:
    """The run's own TTA (its ``tta``) as it applies to the run: the views its folds score their OOF rows with,
    and submit's default for its test images."""
    return effective_spec(parse_tta(cfg.tta), cfg)


# ---- views -----------------------------------------------------------------------------------------------


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """One flip/rotation view of images ``x`` (B, C, H, W), optionally shifted (``<flip>@<dx>,<dy>``).

    ``hflip`` mirrors W; ``rotK`` turns K degrees counter-clockwise (as ``np.rot90``), swapping H and W. A shift
    moves the content dx pixels right and dy down (negative: left, up); the uncovered border is the mirror
    image of the one beside it (reflect padding), so no blank edge appears that training never showed.
    """
    flip, _, move = view.partition("@")
    if flip not in FLIPS["d4"]:
        raise ValueError(
            f"unknown view {view!r}; expected one of {', '.join(FLIPS['d4'])}, optionally @dx,dy"
        )
    if flip.startswith("hflip"):
        x = torch.flip(x, dims=(-1,))
    k = int(flip.rsplit("rot", 1)[1]) // 90 if "rot" in flip else 0
    x = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return shift_view(x, *map(int, move.split(","))) if move else x


def shift_view(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Images ``x`` (B, C, H, W) moved dx pixels right and dy down, the uncovered border mirrored in."""
    p = max(abs(dx), abs(dy))
    if not p:
        return x
    h, w = x.shape[-2:]
    if p >= min(h, w):
        raise ValueError(f"a shift of {p} px needs images larger than {p} px; got {h}x{w}")
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def flip_views(x: torch.Tensor, views: Sequence[str]) -> torch.Tensor:
    """Stack the views of a square batch ``x`` (B, C, S, S) view-major: (V * B, C, S, S)."""
    return torch.cat([apply_view(x, v) for v in views])


def _positions(length: int, size: int, n: int) -> list[int]:
    """n start offsets of a window of ``size`` along ``length``: centred for n == 1, else evenly spread."""
    if n == 1:
        return [(length - size) // 2]  # the same rounding as albumentations' CenterCrop
    return [int(round(i * (length - size) / (n - 1))) for i in range(n)]


def crop_grid(n: int, h: int, w: int) -> tuple[int, int, bool]:
    """Layout of n crops as ``(rows, cols, centre)``: a rows x cols grid, plus the centre crop if ``centre``.

    n = k*k + 1 with k even (5, 17, 37) is a k x k grid plus the centre (5 = four corners + centre, like
    torchvision's FiveCrop); otherwise the factorisation rows * cols = n whose shape is closest to the image's
    aspect ratio (ties: fewer rows), e.g. 9 -> 3 x 3 (centre included), 6 -> 2 x 3 on a landscape image.
    """
    k = math.isqrt(n - 1)
    if n > 1 and k * k == n - 1 and k % 2 == 0:
        return k, k, True
    pairs = [(r, n // r) for r in range(1, n + 1) if n % r == 0]
    aspect = math.log(max(h, 1) / max(w, 1))
    rows, cols = min(pairs, key=lambda rc: (abs(math.log(rc[0] / rc[1]) - aspect), rc[0]))
    return rows, cols, False


def crop_offsets(h: int, w: int, size: int, n: int) -> list[tuple[int, int]]:
    """(top, left) of n ``size`` x ``size`` crops of an (h, w) image (h, w >= size), row-major, centre last.

    The grid's outer crops touch the image borders, so for a grid with ``rows >= ceil(h / size)`` and
    ``cols >= ceil(w / size)`` the crops cover every pixel.
    """
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop size {size}; pad it first")
    rows, cols, centre = crop_grid(n, h, w)
    out = [(t, left) for t in _positions(h, size, rows) for left in _positions(w, size, cols)]
    if centre:
        out.append(((h - size) // 2, (w - size) // 2))
    return out


def crop_views(img: np.ndarray, size: int, n: int) -> np.ndarray:
    """n crops of an (H, W, 3) image -> (n, size, size, 3), in :func:`crop_offsets` order."""
    h, w = img.shape[:2]
    return np.stack([img[t : t + size, left : left + size] for t, left in crop_offsets(h, w, size, n)])


def crop_pretransform(cfg: RunConfig, img_size: int):
    """The run's evaluation pipeline without its final centre crop (None if it has none to replace)."""
    import albumentations as A

    pipe = eval_transform(cfg, img_size)
    ops = list(pipe.transforms)
    if not ops or not isinstance(ops[-1], A.CenterCrop):
        return None
    return A.Compose(ops[:-1], seed=cfg.seed)


# ---- dataset and scoring ---------------------------------------------------------------------------------


class TTADataset(Dataset):
    """Rows of a source as crop views. Items: (uint8 (Vc, 3, S, S), index into ``rows``, ok, reason).

    With ``crops == 0`` the run's evaluation transform gives the single view; with ``crops = N`` the
    evaluation transform minus its centre crop, then N crops. A bad image yields ``ok=False``, a blank view
    and the reason (not an exception: inside a worker it would arrive wrapped in a traceback).
    """

    def __init__(
        self, source: ImageSource, rows: Sequence[int], cfg: RunConfig, img_size: int, crops: int = 0
    ):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)  # (N,) indices into source
        self.img_size = img_size
        self.crops = crops
        self.transform = crop_pretransform(cfg, img_size) if crops else eval_transform(cfg, img_size)
        if self.transform is None:
            raise ValueError(f"run {cfg.name} resizes the whole image: no crops to take (use effective_spec)")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool, str]:
        row = int(self.rows[i])
        try:
            img = self.source.get(row)
        except BadImageError as e:
            blank = torch.zeros(max(1, self.crops), 3, self.img_size, self.img_size, dtype=torch.uint8)
            return blank, i, False, e.reason
        out = self.transform(image=img)["image"]  # (H', W', 3) uint8
        views = crop_views(out, self.img_size, self.crops) if self.crops else out[None]  # (Vc, S, S, 3)
        return torch.from_numpy(np.ascontiguousarray(views)).permute(0, 3, 1, 2), i, True, ""


@torch.inference_mode()
def score_views(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    views: Sequence[str],
    *,
    amp: str = "none",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """P(label 1) of every view under every model.

    Args:
        models: K models mapping (B, 3, S, S) to (B, 2) logits, in eval mode, on ``x``'s device.
        x: normalised crop views (B, Vc, 3, S, S) on the device.
        views: flip/rotation (and shift) views to apply to each crop (:attr:`TTASpec.flip_views`).
        amp: autocast mode (auto | bf16 | fp16 | none; auto chooses by the device of ``x``).
        memory_format: layout of the model input (channels_last on CUDA).

    Returns:
        (K, B, Vf * Vc) float32 probabilities, views ordered flip-major.
    """
    b, vc = x.shape[:2]
    flat = x.reshape(b * vc, *x.shape[2:])  # (B*Vc, 3, S, S)
    inp = flip_views(flat, views).contiguous(memory_format=memory_format)  # (Vf*B*Vc, 3, S, S)
    out = []
    for model in models:
        with autocast(x.device, amp):
            logits = model(inp)
        p = torch.softmax(logits.float(), dim=1)[:, 1].view(len(views), b, vc)  # (Vf, B, Vc)
        out.append(p.permute(1, 0, 2).reshape(b, len(views) * vc))  # (B, Vf*Vc)
    return torch.stack(out)
