"""The served ensemble: every fold model of every run of a blend, loaded once, scoring images held in memory.

Scores go through the code ``predict`` uses (:func:`aivh_ens.infer.predict_folds` with the run's TTA,
:func:`aivh_ens.infer.fold_average` in the blend's space, :func:`aivh_ens.infer.blend_scores` and the
blend's threshold), so a served score equals ``predict``'s for the same file. Uploads are decoded with the
decoder and storage step that reading the file would use, from bytes that never touch the disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aivh_ens.data.images import BadImageError, decode_image
from aivh_ens.data.transforms import StorageStep, storage_step
from aivh_ens.infer.predict import blend_scores, rank_reference, scorer
from aivh_ens.score import DataConfig, resolve_device
from aivh_ens.score.runs import RunInfo, fold_average, load_models, predict_folds, run_spec, view_average
from aivh_ens.score.tta import TTASpec, parse_tta

SERVE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""The image formats ``serve`` accepts: no other Pillow plugin (EPS, which runs Ghostscript, among them)
ever parses an upload."""
SERVE_MAX_PIXELS = 16_000_000
"""The default pixel cap of an upload (``--max-pixels``): a 16 MP photo decodes in well under a second and
~50 MB; training's 50 MP cap would let one small request cost seconds of CPU and gigabytes of memory."""


class UnsupportedFormat(BadImageError):
    """An upload in a format ``serve`` does not accept (a 415)."""


def check_upload(data: bytes, name: str, max_pixels: int = SERVE_MAX_PIXELS) -> None:
    """Refuse an upload that is not one of :data:`SERVE_FORMATS` or has more than ``max_pixels`` pixels,
    from its header alone (only the allowed plugins parse it; no pixel is decoded).

    Raises:
        UnsupportedFormat: another format (or none).
        BadImageError: over the pixel cap.
    """
    import io

    from PIL import Image

    if not data:
        raise BadImageError(name, "the file is empty (0 bytes)")
    allowed = ", ".join(SERVE_FORMATS)
    try:
        with Image.open(io.BytesIO(data), formats=SERVE_FORMATS) as im:
            w, h = im.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(name, f"over this server's limit of {max_pixels:,} pixels ({e})") from None
    except Exception:  # no allowed plugin accepts it (Pillow raises many types for a bad header)
        reason = f"not an image in a served format ({allowed}): it starts with {data[:16]!r}"
        raise UnsupportedFormat(name, reason, f"send one of {allowed}") from None
    if w * h > max_pixels:
        raise BadImageError(
            name, f"{w}x{h} = {w * h:,} pixels is over this server's limit of {max_pixels:,} (--max-pixels)"
        )


Decoded = dict[StorageStep, np.ndarray]
"""One image as each distinct storage step of the ensemble stores it: (h, w, 3) uint8 per step."""


class ArraySource:
    """An :class:`aivh_ens.data.loader.ImageSource` over images already decoded and stored (no file access)."""

    def __init__(self, images: Sequence[np.ndarray], names: Sequence[str]):
        self.images, self.names = list(images), list(names)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> np.ndarray:
        return self.images[i]

    def describe(self, i: int) -> str:
        return self.names[i]


@dataclass(frozen=True)
class LoadedRun:
    """One run's fold models on the device, its data config, TTA spec and storage step."""

    info: RunInfo
    models: list[nn.Module]
    dc: DataConfig
    spec: TTASpec
    storage: StorageStep


@dataclass(frozen=True)
class Scored:
    """One image's P(AI) (the blended rank score for rank blends), label and fold-averaged P(AI) per run."""

    prob: float
    label: int
    runs: dict[str, float] = field(default_factory=dict)


class Ensemble:
    """The models of a fitted blend (or of one run), loaded once; :meth:`score` takes one forward pass per fold.

    Args:
        workdir: the project folder the blend was loaded from.
        doc: the blend document (None when one run scores alone).
        runs: the loaded runs, those with a positive blend weight.
        source: what scores the images: blend file or run, space, threshold (:func:`aivh_ens.infer.scorer`).
        device: where the models live.
    """

    def __init__(
        self,
        workdir: Path,
        doc: dict[str, Any] | None,
        runs: Sequence[LoadedRun],
        source: dict[str, Any],
        device: torch.device,
    ):
        self.workdir, self.doc, self.runs, self.source, self.device = workdir, doc, list(runs), source, device
        self.space, self.threshold = str(source["space"]), float(source["threshold"])
        # A rank blend ranks each image among the runs' OOF scores: read them once, not per batch.
        self.reference = rank_reference(workdir, doc) if doc is not None and self.space == "rank" else None
        self.steps = tuple(dict.fromkeys(r.storage for r in self.runs))  # distinct, in run order

    @classmethod
    def load(
        cls,
        workdir: str | Path = ".",
        *,
        blend_path: str | Path | None = None,
        run: str | None = None,
        tta: str | None = None,
        device: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Ensemble:
        """Load every fold model of the blend (default ``runs/blend/blend.json``) or of ``run``.

        Raises:
            UserError: a bad ``tta`` spec, both or a missing blend/run, or fold weights that are missing.
        """
        workdir = Path(workdir)
        forced = parse_tta(tta) if tta is not None else None
        doc, infos, source = scorer(workdir, blend_path, run)
        dev = resolve_device(device or "auto")
        runs = []
        for info in infos:
            spec = run_spec(info, forced, log)
            models, dc = load_models(info, dev)
            runs.append(LoadedRun(info, models, dc, spec, storage_step(info.cfg, dc.img_size)))
        return cls(workdir, doc, runs, source, dev)

    @property
    def model_count(self) -> int:
        return sum(len(r.models) for r in self.runs)

    def decode(self, data: bytes, name: str) -> Decoded:
        """Decode an upload once per distinct storage step, as reading a file with these bytes would.

        Raises:
            BadImageError: not an image, truncated, too small, or over the pixel limit (before decoding).
        """
        return {s: s.prepare(decode_image(data, name, max_side=s.decode_side())) for s in self.steps}

    def blank(self) -> Decoded:
        """A mid-grey image in every storage step (for the warm-up pass)."""
        grey = np.full((64, 64, 3), 128, dtype=np.uint8)
        return {s: s.prepare(grey.copy()) for s in self.steps}

    def score(self, images: Sequence[Decoded]) -> list[Scored]:
        """P(AI), label and per-run scores of decoded images: one forward pass per fold model for all of them."""
        if not images:
            return []
        n = len(images)
        per_run: dict[str, np.ndarray] = {}
        for r in self.runs:
            source = ArraySource([img[r.storage] for img in images], [f"upload {i}" for i in range(n)])
            P, bad = predict_folds(
                r.models,
                r.dc,
                r.info.cfg,
                source,
                np.arange(n),
                r.spec,
                self.device,
                batch_size=n * r.spec.n_views,
                workers=0,
                average=view_average(self.space),
            )  # (K, N)
            if bad:  # decoded already: a failure here is a bug, not bad input
                raise RuntimeError(f"run {r.info.name}: stored images failed the TTA transform: {bad}")
            per_run[r.info.name] = fold_average(P, self.space)  # (N,)
        probs = blend_scores(self.workdir, self.doc, per_run, self.reference)  # (N,)
        return [
            Scored(float(p), int(p >= self.threshold), {k: float(v[i]) for k, v in per_run.items()})
            for i, p in enumerate(probs)
        ]

    def describe(self) -> dict[str, Any]:
        """The runs, device, model count, blend space and threshold (for ``GET /health``)."""
        weights = self.doc["weights"] if self.doc is not None else {}
        runs = [
            {
                "name": r.info.name,
                "model": r.info.cfg.model,
                "folds": len(r.models),
                "tta": r.spec.name,
                "img_size": r.dc.img_size,
                "weight": float(weights.get(r.info.name, 1.0)),
            }
            for r in self.runs
        ]
        return {
            "device": str(self.device),
            "models": self.model_count,
            "runs": runs,
            "space": self.space,
            "threshold": self.threshold,
            "source": self.source,
        }
