"""What ``auto`` may train: candidates from local pretrained weights, else from-scratch models sized for the
device and the images, and what the inspect findings change in all of them.

No torch here (timm's model registry and the Hugging Face cache look-up are imported lazily).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aivh_ens.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

SCRATCH_CPU = ("test_resnet", "test_byobnet", "test_efficientnet")
"""From-scratch models on the CPU for images resized to 64 px, best first (timm's ``test_*`` models: 0.1-0.4M
parameters). Measured on CIFAKE at 32 px with one thread each (see the README's "auto" section)."""
SCRATCH_CPU_NATIVE = ("aivh_res_t", "aivh_res_s", "test_resnet", "test_efficientnet")
"""From-scratch models on the CPU for images trained at their native size (at most :data:`NATIVE_MAX`): the
full-resolution CNNs of :mod:`aivh_ens.train.smallnets` first. On 16,000 CIFAKE train rows, one thread each, two
processes at once, bf16 and channels_last, scored on 4,000 other train rows / the 4,000 test rows (hflip TTA):
``aivh_res_s`` 0.951 / 0.951 after 270 s (8 epochs) and 0.960 / 0.958 after 540 s (20 epochs); ``aivh_cnn_s``
0.948 / 0.951 (11 epochs) and 0.955 / 0.957 (26 epochs). ``aivh_cnn_m`` trailed ``aivh_cnn_s`` (0.945 against
0.954 after 4 minutes). ``aivh_res_t`` (half ``aivh_res_s``'s widths) trains 2.1x faster (1,216 against 571
img/s, one thread, batch 64); in the same time, on 15,000 rows scored on 5,000 others (two seeds each):
``aivh_res_t`` x 20 epochs F1 0.955 and 0.951 (AUC 0.9906, 0.9895), ``aivh_res_s`` x 10 0.952 and 0.951 (AUC
0.9898 both), and two models averaged 0.956 (AUC 0.9913) against 0.954 (0.9904), as fold models are. The
other variants timed alike scored within the seeds' spread of ``aivh_res_s``: translations of up to 4 px,
label smoothing 0.1, EMA 0.998, learning rate 6e-3, four stages 16-128 (0.950-0.954)."""
FULL_RES = ("aivh_cnn_", "aivh_res_")
"""Name prefixes of the full-resolution CNNs (:data:`FULL_RES_EPOCHS`)."""
SCRATCH_GPU = ("resnet18", "efficientnet_b0", "test_efficientnet")
"""From-scratch models on a GPU (more capacity per second of training there)."""
CACHED_BACKBONES = (
    ("vit_large_patch14_clip_quickgelu_224.openai", "clip-probe"),
    ("vit_base_patch14_reg4_dinov2.lvd142m", "dinov2-probe"),
    ("convnext_tiny.fb_in22k_ft_in1k", None),
    ("efficientnet_b0.ra_in1k", None),
)
"""Pretrained backbones used when their weights are in the Hugging Face cache: (timm name, probe recipe)."""

SCRATCH_EPOCHS = (6, 16)
FULL_RES_EPOCHS = (6, 40)
"""Epochs of the full-resolution CNNs: on 20,000 CIFAKE images ``aivh_cnn_s`` reached OOF F1 0.943 after 6
epochs and 0.949 after 10 (5 folds each), and on 16,000 rows it scored 0.955-0.957 after 16-17 epochs and 0.958
after 26 (the most was 24 until ``aivh_res_t``, which trains twice as fast, led: in a 20-minute plan in a fast
spell of this machine its 4 folds trained 24-28 epochs). The least is what the first candidate's folds are
chosen by (:func:`aivh_ens.auto.budget.choose_folds`): at 10 a slow probe (285-350 img/s for ``aivh_res_s``)
sent 20-minute plans to 2 folds, and every 2-fold plan scored 0.952-0.954 on the test images (21-24 epochs on
10,000 rows) against 0.958-0.963 for every 4-fold one; and each fold's ``fold_time`` then trains the epochs the
real speed gives (the jobs of the last 2-fold plan ran 1.5x faster than its probe and its cost model said)."""
FULL_RES_TTA = "hflip+shift:1"
"""The TTA of the full-resolution CNNs' runs (their OOF rows and the test images): each hflip view also moved one
pixel four ways, which averages over the phase of their 2x2 pooling grid. On the 20,000 OOF rows of a 20-minute
plan's 4 ``aivh_res_t`` folds (cifake-dev) it scored AUC 0.9901 and best F1 0.9528, against 0.9894 and 0.9508
for ``hflip`` and 0.9877 and 0.9467 for one view; moves along one axis gained less (0.9505-0.9528), and the
diagonal ones nothing (0.9507). On the 4,000 test images the averaged fold models' AUC rose from 0.9925 to
0.9930. It costs 5x hflip's scoring: about 30 s of the OOF passes and 40 s of submit in that plan."""
FINETUNE_EPOCHS = (2, 6)
PROBE_EPOCHS = (1, 1)
NATIVE_MAX = 64
"""Images whose median shorter side is at most this train at their native size (no resizing)."""


@dataclass(frozen=True)
class Candidate:
    """A run ``auto`` may plan: its name, kind (``scratch``, ``finetune``, ``probe``), the plan-table
    settings (RunConfig fields, epochs aside) and the (least, most) epochs worth training."""

    name: str
    kind: str
    settings: dict[str, Any] = field(hash=False)
    epochs: tuple[int, int] = SCRATCH_EPOCHS


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
        )
        for m in models
    ]


def weights_dir_candidates(weights_dir: Path) -> list[Candidate]:
    """A linear probe and a fine-tuned run per weights file named after its timm model
    (``convnext_tiny.safetensors``, ``convnext_tiny.fb_in22k.safetensors``).

    Raises:
        UserError: the folder is missing, or holds no weights file named after a timm model.
    """
    import timm

    if not weights_dir.is_dir():
        raise UserError(f"weights_dir={str(weights_dir)!r} (--weights-dir) is not a folder")
    files = sorted(p for p in weights_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    found = []
    for p in files:
        stem = p.name[: -len(p.suffix)]
        model = stem if timm.is_model(stem) else stem.split(".")[0]
        if timm.is_model(model):
            found += pretrained_pair(model, weights=str(p.resolve()))
    if not found:
        raise UserError(
            f"--weights-dir {weights_dir}: no weights file named after a timm model (found {len(files)} weight "
            "files); name each file after its model, e.g. convnext_tiny.safetensors"
        )
    return found


def pretrained_pair(model: str, weights: str | None = None, recipe: str | None = None) -> list[Candidate]:
    """A frozen-feature linear probe of a pretrained backbone (cheap, generalises) and its fine-tuning, both
    at the backbone's own input size (what its weights were trained at)."""
    source = {"weights": weights} if weights else {"pretrained": True}
    probe = {"recipe": recipe} if recipe else {"tta": "none", "head": "linear"}
    tune = {"lr": 2e-4, "weight_decay": 0.05, "warmup_epochs": 0.5, "batch_size": 32, "tta": "hflip",
            "select": "f1"}  # fmt: skip
    return [
        Candidate(_name(model, "probe", None), "probe", {"model": model, **source, **probe}, PROBE_EPOCHS),
        Candidate(
            _name(model, "finetune", None), "finetune", {"model": model, **source, **tune}, FINETUNE_EPOCHS
        ),
    ]


def cached_candidates() -> list[Candidate]:
    """Probes (and fine-tuning) of the backbones in :data:`CACHED_BACKBONES` whose weights this machine holds."""
    from aivh_ens.train.models import local_pretrained

    out = []
    for model, recipe in CACHED_BACKBONES:
        try:
            held = local_pretrained(model)
        except Exception:  # an unknown tag in an older timm, an unreadable cache: not a candidate
            held = False
        if held:
            out += pretrained_pair(model, recipe=recipe)
    return out


def choose_candidates(
    facts: DataFacts, device: str, weights_dir: Path | None, models: Sequence[str] = ()
) -> list[Candidate]:
    """Pretrained candidates first (``--weights-dir``, else the Hugging Face cache), then from-scratch ones;
    with ``models`` (``--models``) only the candidates of those timm names, a from-scratch one for each name
    no other candidate uses."""
    pretrained = weights_dir_candidates(weights_dir) if weights_dir else cached_candidates()
    probes = [c for c in pretrained if c.kind == "probe"]
    tuned = [c for c in pretrained if c.kind == "finetune"]
    out = probes + tuned + scratch_candidates(facts, device)
    if not models:
        return out
    kept = [c for c in out if c.settings["model"] in models]
    extra = [m for m in models if m not in {c.settings["model"] for c in kept}]
    return kept + scratch_candidates(facts, device, tuple(extra))


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
