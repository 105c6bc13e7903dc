"""The TTA spec grammar (no torch here: a RunConfig checks its ``tta`` field with it).

A spec joins at most one flip term, one crop term and one shift term with ``+``:

- ``none``: the run's own evaluation preprocessing, one view.
- ``hflip``: that view and its mirror image (2 views).
- ``d4``: the 8 symmetries of the square: rotations by 0/90/180/270 degrees, each with and without a mirror.
- ``crops:N``: N crops of the model's input size instead of the single centre crop, spread over the image
  at native resolution (``crop`` mode) or over the resized image (``eval_resize``); see :func:`aivh_ens.score.tta.crop_offsets`.
  A run that resizes the whole image to its input size has nothing to crop and keeps one view.
- ``shift:P``: each view also moved by P pixels up, down, left and right (5 positions; the border the move
  uncovers is mirrored in). For CNNs that keep small images at full resolution this averages over the phase of
  their pooling grid: on 20,000 cifake-dev train rows (4 ``aivh_res_t`` fold models, OOF) ``hflip+shift:1``
  lifted the AUC from 0.9894 to 0.9901 and the best F1 from 0.9508 to 0.9528 over ``hflip`` (README, "auto").

:mod:`aivh_ens.score.tta` makes the views and scores them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aivh_ens.errors import UserError

FLIPS: dict[str, tuple[str, ...]] = {
    "none": ("id",),
    "hflip": ("id", "hflip"),
    "d4": ("id", "rot90", "rot180", "rot270", "hflip", "hflip_rot90", "hflip_rot180", "hflip_rot270"),
}
"""The views of each flip term, by name. ``hflip_rotK``: mirror left-right, then rotate K degrees."""
MAX_CROPS = 64
MAX_SHIFT = 8
VALID_FORMS = (
    "none, hflip, d4, crops:N (1 <= N <= 64), shift:P (1 <= P <= 8 pixels), or a flip term with crops:N and/or "
    "shift:P joined by '+' (e.g. hflip+crops:5, hflip+shift:1)"
)
_CROPS = re.compile(r"crops:(\d+)")
_SHIFT = re.compile(r"shift:(\d+)")


@dataclass(frozen=True)
class TTASpec:
    """A parsed TTA spec: the flip term, the crop count (0 = the run's own single evaluation crop) and the
    shift in pixels (0 = none)."""

    flips: str = "none"
    crops: int = 0
    shift: int = 0

    @property
    def name(self) -> str:
        """The canonical spec string, e.g. ``hflip+crops:5`` (``none`` for no augmentation)."""
        parts = [self.flips] if self.flips != "none" else []
        parts += [f"crops:{self.crops}"] if self.crops else []
        parts += [f"shift:{self.shift}"] if self.shift else []
        return "+".join(parts) or "none"

    @property
    def file_stem(self) -> str:
        """A file-name-safe form of :attr:`name` (``hflip+crops-5``)."""
        return self.name.replace(":", "-")

    @property
    def flip_views(self) -> tuple[str, ...]:
        """The views made on the device from each crop (:func:`apply_view` names), flip-major: each flip or
        rotation, then (with ``shift``) the same moved by ``shift`` pixels, ``<flip>@<dx>,<dy>``."""
        return tuple(f"{f}@{dx},{dy}" if dx or dy else f for f in FLIPS[self.flips] for dx, dy in self.shifts)

    @property
    def shifts(self) -> tuple[tuple[int, int], ...]:
        """(dx, dy) of each position: the unmoved image, then right, left, down and up by ``shift`` pixels."""
        p = self.shift
        return ((0, 0), (p, 0), (-p, 0), (0, p), (0, -p)) if p else ((0, 0),)

    @property
    def n_views(self) -> int:
        return len(self.flip_views) * max(1, self.crops)


def parse_tta(spec: str | TTASpec) -> TTASpec:
    """Parse ``none`` / ``hflip`` / ``d4`` / ``crops:N`` / ``FLIP+crops:N``; UserError listing the forms."""
    if isinstance(spec, TTASpec):
        return spec
    terms = [t.strip().lower() for t in str(spec).split("+")]
    flips, crops, shift = None, None, None
    for t in terms:
        m, sh = _CROPS.fullmatch(t), _SHIFT.fullmatch(t)
        if t in FLIPS and flips is None and (t != "none" or len(terms) == 1):
            flips = t
        elif m and crops is None and 1 <= int(m.group(1)) <= MAX_CROPS:
            crops = int(m.group(1))
        elif sh and shift is None and 1 <= int(sh.group(1)) <= MAX_SHIFT:
            shift = int(sh.group(1))
        else:
            raise UserError(f"invalid --tta {spec!r}; valid forms: {VALID_FORMS}")
    return TTASpec(flips or "none", crops or 0, shift or 0)
