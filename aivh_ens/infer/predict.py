"""``aivh-ens predict``: P(AI) and the label for single image files, with the same models and TTA as submit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aivh_ens.blend.artifact import apply_blend, load_blend, rank_reference
from aivh_ens.data.loader import FileSource
from aivh_ens.data.transforms import storage_step
from aivh_ens.errors import UserError
from aivh_ens.infer.submission import default_blend_path
from aivh_ens.score import resolve_device
from aivh_ens.score.runs import (
    RunInfo,
    check_run,
    fold_average,
    load_models,
    predict_folds,
    run_spec,
    view_average,
)
from aivh_ens.score.tta import parse_tta


@dataclass(frozen=True)
class ImagePrediction:
    """P(AI) and the label of one image, or why it could not be scored."""

    image: str
    prob: float | None = None  # P(AI); for a rank-space blend the blended rank score in [0, 1]
    label: int | None = None
    error: str | None = None


def scorer(
    workdir: Path, blend_path: str | Path | None, run: str | None
) -> tuple[dict[str, Any] | None, list[RunInfo], dict[str, Any]]:
    """``(blend document or None, the runs to score with, source description)`` for ``--blend``/``--run``."""
    if blend_path is not None and run is not None:
        raise UserError("give either --blend or --run, not both (blend_path or run in Python)")
    if run is not None:
        return None, [check_run(workdir, run)], {"run": run, "space": "prob", "threshold": 0.5}
    bpath = Path(blend_path) if blend_path is not None else default_blend_path(workdir)
    doc = load_blend(bpath, workdir)
    infos = [check_run(workdir, n) for n, v in doc["weights"].items() if v > 0]
    return doc, infos, {"blend": str(bpath), "space": doc["space"], "threshold": float(doc["threshold"])}


def blend_scores(
    workdir: Path,
    doc: dict[str, Any] | None,
    scores: dict[str, np.ndarray],
    reference: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The (N,) scores to threshold: one run's as they are, else the blend's (:func:`apply_blend`). A rank-space
    blend places each image among that run's OOF scores (``reference``, read from the OOF files if not
    given), as ``submit`` does; a blend written before ``rank_reference: oof`` is read the same way here,
    since a handful of images cannot be ranked among themselves."""
    if doc is None:
        return next(iter(scores.values()))
    if doc["space"] != "rank" or "stack" in doc:
        return apply_blend(doc, scores)[0]
    ref = reference if reference is not None else rank_reference(workdir, doc)
    return apply_blend({**doc, "rank_reference": "oof"}, scores, ref)[0]


def predict_images(
    images: Sequence[str | Path],
    workdir: str | Path = ".",
    *,
    blend_path: str | Path | None = None,
    run: str | None = None,
    tta: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
) -> tuple[list[ImagePrediction], dict[str, Any]]:
    """P(AI) and the label of single images, from a fitted blend or from one run (threshold 0.5).

    Each run's fold models are loaded once and score all images in batches. A rank-space blend places each
    image's score among that run's OOF scores (the rows the blend was fitted on), exactly as ``submit`` does. Unreadable images get an ``error`` and do not stop the others.

    Returns:
        ``(predictions in input order, source)``: source describes what scored them (blend or run, space,
        threshold).
    """
    workdir = Path(workdir)
    forced = parse_tta(tta) if tta is not None else None
    doc, infos, source_info = scorer(workdir, blend_path, run)
    space, threshold = source_info["space"], source_info["threshold"]
    paths = [str(p) for p in images]
    dev = resolve_device(device or "auto")
    errors: dict[int, str] = {}
    scores: dict[str, np.ndarray] = {}
    good = np.arange(len(paths))
    for info in infos:
        spec = run_spec(info, forced)
        models, dc = load_models(info, dev)
        source = FileSource(Path("."), paths, storage_step(info.cfg, dc.img_size))
        P, bad = predict_folds(
            models, dc, info.cfg, source, good, spec, dev, batch_size=batch_size, workers=workers,
            average=view_average(space),
        )  # fmt: skip
        del models
        errors.update({int(good[i]): r for i, r in bad.items()})
        keep = np.array([i not in bad for i in range(len(good))], dtype=bool)
        good = good[keep]
        scores = {n: s[keep] for n, s in scores.items()}
        scores[info.name] = fold_average(P[:, keep], space)  # (N_good,)
    probs = blend_scores(workdir, doc, scores) if len(good) else np.zeros(0)
    by_pos = dict(zip(good.tolist(), probs.tolist(), strict=True))
    out = []
    for i, p in enumerate(paths):
        if i in by_pos:
            out.append(ImagePrediction(p, by_pos[i], int(by_pos[i] >= threshold)))
        else:
            out.append(ImagePrediction(p, error=f"bad image {p}: {errors.get(i, 'not scored')}"))
    return out, source_info


def format_predictions(preds: Sequence[ImagePrediction], space: str = "prob") -> str:
    """A table: P(AI) (the blended rank score for rank blends), label, image; one line per scored image."""
    lines = [f"{'rank' if space == 'rank' else 'p_ai':>7}  {'label':<8}  image"]
    for p in preds:
        if p.error is None:
            lines.append(f"{p.prob:>7.4f}  {p.label} {'(AI)' if p.label else '(human)':<6}  {p.image}")
    return "\n".join(lines)
