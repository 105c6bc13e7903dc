"""What ``auto`` may train: candidates from local pretrained weights, else from-scratch models sized for the
device and the images, and what the inspect findings change in all of them.

No torch here (timm's model registry and the weights look-up, :mod:`aivh_ens.train.weights`, are imported lazily).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRATCH_CPU = ("test_resnet", "test_byobnet", "test_efficientnet")
"""From-scratch models on the CPU for images resized to 64 px, best first (timm's ``test_*`` models: 0.1-0.4M
parameters), ordered by CIFAKE at 32 px, one thread each (docs/benchmarks-history.md)."""
SCRATCH_CPU_NATIVE = ("aivh_res_t", "aivh_res_s", "test_resnet", "test_efficientnet")
"""From-scratch CPU models for images trained at their native size (at most :data:`NATIVE_MAX`), best first:
``aivh_res_t`` led in the time a 20-minute plan gives on 2 cores (history: docs/benchmarks-history.md)."""
FULL_RES = ("aivh_cnn_", "aivh_res_")
"""Name prefixes of the full-resolution CNNs (:data:`FULL_RES_EPOCHS`)."""
SCRATCH_GPU = ("resnet18", "efficientnet_b0", "test_efficientnet")
"""From-scratch models on a GPU (more capacity per second of training there)."""
SCRATCH_EPOCHS = (6, 16)
FULL_RES_EPOCHS = (6, 40)
"""Epochs of the full-resolution CNNs: at least 6 (a least of 10 sent slow-probe plans to 2 folds, which scored
below 4-fold ones), at most 40 (room for ``aivh_res_t``, 24-28 in 20-minute plans); docs/benchmarks-history.md."""
FULL_RES_TTA = "hflip+shift:1"
"""The full-resolution CNNs' TTA: 1-pixel moves average over their 2x2 pooling grid's phase (OOF AUC 0.9901
against 0.9894 for ``hflip``; history: docs/benchmarks-history.md)."""
FINETUNE_EPOCHS = (2, 6)
PROBE_EPOCHS = (1, 1)
NATIVE_MAX = 64
"""Images whose median shorter side is at most this train at their native size (no resizing)."""


@dataclass(frozen=True)
class Candidate:
    """A run ``auto`` may plan: its name, kind (``scratch``, ``finetune``, ``probe``), the plan-table
    settings (RunConfig fields, epochs aside), the (least, most) epochs worth training, and why it is one."""

    name: str
    kind: str
    settings: dict[str, Any] = field(hash=False)
    epochs: tuple[int, int] = SCRATCH_EPOCHS
    why: str = field(default="", compare=False)  # why it is a candidate (printed, runs/auto/candidates.json)


@dataclass(frozen=True)
class DataFacts:
    """What the candidates depend on: the median shorter side of the train images and the inspect flags."""

    short_side: int
    shared: dict[str, Any] = field(hash=False)  # plan [shared] values from the findings (group, mode, jpeg_p)
    used: tuple[str, ...] = ()  # one line per finding used


def img_size_for(short_side: int, device: str) -> int:
    """A from-scratch model's input: native resolution for small images (rounded down to 8 px, at least 16),
    else what the device affords (64 px on the CPU, 128 on a GPU)."""
    if short_side <= NATIVE_MAX:
        return max(16, short_side // 8 * 8)
    return 128 if device.startswith("cuda") else NATIVE_MAX


def _name(model: str, kind: str, size: int | None) -> str:
    base = f"auto-{model.split('.')[0]}" + (f"-{size}px" if size else "")
    return base + {"probe": "-probe", "finetune": "-ft"}.get(kind, "")


def scratch_candidates(facts: DataFacts, device: str, models: Sequence[str] | None = None) -> list[Candidate]:
    """From-scratch models for the device, at native resolution for small images (the ``tiny`` recipe's
    optimiser: AdamW 3e-3, cosine, half an epoch of warm-up, hflip, the epoch of best F1)."""
    size = img_size_for(facts.short_side, device)
    how = "native size" if facts.short_side <= NATIVE_MAX else f"images resized from {facts.short_side} px"
    chosen = models is not None
    if models is None:
        native = facts.short_side <= NATIVE_MAX
        models = SCRATCH_GPU if device.startswith("cuda") else SCRATCH_CPU_NATIVE if native else SCRATCH_CPU
    batch = 128 if device.startswith("cuda") else 64
    return [
        Candidate(
            _name(m, "scratch", size),
            "scratch",
            {
                "recipe": "tiny",
                "model": m,
                "img_size": size,
                "batch_size": batch,
                "pretrained": False,
                **({"tta": FULL_RES_TTA} if m.startswith(FULL_RES) else {}),
            },
            FULL_RES_EPOCHS if m.startswith(FULL_RES) else SCRATCH_EPOCHS,
            f"from scratch at {size} px ({how}){' (--models)' if chosen else ''}",
        )
        for m in models
    ]


VIT_MAX_SIZE = 224
"""A transformer's input at most: its attention costs the square of its tokens. timm's ``pretrained_cfg`` gives
DINOv2 518 px (its last, short training phase), where 224 (most of its training) costs about 25x less in
attention and its image cache 5x less disk; EVA-02's 448 px variants likewise. ConvNets keep their pretrained
size (their cost grows only with the pixels)."""
FINETUNE_BATCH = 32
"""A fine-tune's batch at 224 px; larger inputs and large models take less (the timed probe halves it again on
an out-of-memory error, :func:`aivh_ens.auto.timing.step_time`)."""
PROBE_BATCH = 64


def pretrained_size(size: int, family: str) -> int:
    """A pretrained model's input: its pretrained size, capped at :data:`VIT_MAX_SIZE` for a transformer."""
    return min(size, VIT_MAX_SIZE) if family == "vit" else size


def finetune_batch(model: str, size: int) -> int:
    """A fine-tune's batch: :data:`FINETUNE_BATCH` scaled by the pixels against 224 px, a quarter for large
    models, a power of two in [4, 64]."""
    b = (
        FINETUNE_BATCH
        * (224 / size) ** 2
        / (4 if any(m in model for m in ("_large", "_huge", "_giant")) else 1)
    )
    return int(2 ** max(2, min(6, math.floor(math.log2(max(b, 1))))))


def pretrained_candidates(held: dict[str, Path]) -> list[Candidate]:
    """A frozen-feature linear probe (cheap, generalises across generators) and a fine-tuned run per model whose
    weights this machine holds, both at the model's pretrained input size and normalisation, the fine-tune
    with its family's recipe (:data:`aivh_ens.recipes.FINETUNE`)."""
    from aivh_ens.recipes import finetune_recipe
    from aivh_ens.train.models import pretrained_input

    arches = [m.split(".")[0] for m in held]
    out = []
    for model, path in held.items():
        info = pretrained_input(model)
        size = pretrained_size(info.img_size, info.family)
        label = model if arches.count(model.split(".")[0]) > 1 else model.split(".")[0]
        base = {"model": model, "weights": str(path), "img_size": size, "mean": list(info.mean),
                "std": list(info.std)}  # fmt: skip
        capped = f", capped from {info.img_size} px" if size < info.img_size else ""
        why = f"weights {path}; {size} px{capped}, normalisation of its pretrained_cfg"
        tune = {**finetune_recipe(model, info.family), "batch_size": finetune_batch(model, size), "tta": "hflip",
                "select": "f1"}  # fmt: skip
        out += [
            Candidate(
                _name(label, "probe", None),
                "probe",
                {**base, "head": "linear", "tta": "none", "batch_size": PROBE_BATCH},
                PROBE_EPOCHS,
                f"linear probe of {why}",
            ),  # fmt: skip
            Candidate(
                _name(label, "finetune", None),
                "finetune",
                {**base, **tune},
                FINETUNE_EPOCHS,
                f"fine-tune ({info.family} recipe, lr {tune['lr']:g}) of {why}",
            ),  # fmt: skip
        ]
    return out


NO_WEIGHTS = (
    "candidates: no pretrained weights found (Hugging Face cache {cache}, --weights-dir): training from scratch, "
    "which is much weaker than fine-tuning pretrained weights; to attach weights offline, pass --weights-dir DIR "
    "with files named after their timm models (DIR/convnext_tiny.fb_in22k_ft_in1k.safetensors), or copy a "
    "Hugging Face cache's models--timm--<name> folders to DIR or under $HF_HOME/hub"
)


def matches(model: str, wanted: Sequence[str]) -> bool:
    """Whether ``model`` is one of ``wanted`` (``--models``), with or without its pretrained tag:
    ``convnext_tiny`` matches ``convnext_tiny.fb_in22k_ft_in1k``."""
    return model in wanted or model.split(".")[0] in wanted


def choose_candidates(
    facts: DataFacts, device: str, weights_dir: Path | None, models: Sequence[str] = ()
) -> list[Candidate]:
    """Pretrained candidates first (every timm model in the Hugging Face cache and ``--weights-dir``), then
    from-scratch ones; with ``models`` (``--models``) only the pretrained candidates of those timm names (with
    or without a tag), and a from-scratch one for each name without weights."""
    from aivh_ens.train.weights import local_weights

    pretrained = pretrained_candidates(local_weights(weights_dir))
    probes = [c for c in pretrained if c.kind == "probe"]
    tuned = [c for c in pretrained if c.kind == "finetune"]
    if not models:
        return probes + tuned + scratch_candidates(facts, device)
    kept = [c for c in probes + tuned if matches(c.settings["model"], models)]
    extra = [m for m in models if not any(matches(c.settings["model"], [m]) for c in kept)]
    return kept + scratch_candidates(facts, device, tuple(extra))


def candidate_lines(candidates: Sequence[Candidate]) -> list[str]:
    """What ``auto`` prints of its candidates: one line each with why it is there, and the no-weights line
    when all train from scratch."""
    from aivh_ens.train.weights import hf_cache_dir

    lines = [f"candidates: {len(candidates)}"] + [f"  {c.name}: {c.why}" for c in candidates]
    if all(c.kind == "scratch" for c in candidates):
        lines.append(NO_WEIGHTS.format(cache=hf_cache_dir()))
    return lines


def candidates_doc(candidates: Sequence[Candidate], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """What ``runs/auto/candidates.json`` records of each candidate: name, kind, settings, epochs, why it is in
    the list, and the reason its timing skipped it (when it did)."""
    return [{"name": c.name, "kind": c.kind, "why": c.why, "settings": c.settings, "epochs": list(c.epochs),
             **({"skipped": skipped[c.name]} if c.name in skipped else {})} for c in candidates]  # fmt: skip


def findings_to_settings(findings: Sequence[Any], short_side: int) -> DataFacts:
    """The plan's shared settings from inspect's findings: pairs -> ``group = "pairs"``; a size shortcut or
    shift -> crop mode (not for images already at native size); a compression one -> JPEG augmentation."""
    shared: dict[str, Any] = {}
    used = []
    for f in findings:
        if f.level != "warn" or not f.flag:
            continue
        if f.flag == "--group pairs":
            shared["group"] = "pairs"
            used.append(f"{f.key}: train rows come in pairs -> group = 'pairs' (--group pairs)")
        elif f.flag == "--mode crop" and short_side > NATIVE_MAX and "mode" not in shared:
            shared["mode"] = "crop"
            used.append(f"{f.key}: image sizes differ -> mode = 'crop' (--mode crop)")
        elif f.flag == "--jpeg-p 0.5" and "jpeg_p" not in shared:
            shared["jpeg_p"] = 0.5
            used.append(f"{f.key}: compression differs -> jpeg_p = 0.5 (--jpeg-p 0.5)")
    return DataFacts(short_side, shared, tuple(used))
