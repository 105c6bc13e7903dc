"""Named presets: one per reference system, plus ``tiny`` for CPU demos and tests.

A recipe is a dict of RunConfig field overrides applied on top of the defaults; CLI flags override the
recipe. Where a published setting cannot be expressed exactly, the comment beside it says what was done.
"""

from __future__ import annotations

import difflib
from typing import Any

from aivh_ens.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RECIPES: dict[str, dict[str, Any]] = {
    # No preset: library defaults, every choice from the CLI.
    "none": {},
    # Seed 000: efficientnet_b4, Adam 5e-5, StepLR(gamma 0.7) per epoch, 10 epochs, batch 32, seed 42.
    # Train: Resize 255, hflip, rotate +-20, RandomResizedCrop 224 scale (0.8, 1.2); eval: Resize 224.
    # albumentations caps the RRC scale at 1.0; torchvision's RRC falls back to the whole image for
    # areas > 1, so (0.8, 1.0) matches it up to how often the full image is taken.
    "effnet-b4-adam": dict(
        model="efficientnet_b4",
        pretrained=True,
        img_size=224,
        train_resize=255,
        rrc_scale=(0.8, 1.0),
        hflip=0.5,
        rotate=20.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        optimizer="adam",
        lr=5e-5,
        weight_decay=0.0,
        scheduler="step",
        step_gamma=0.7,
        step_epochs=1.0,
        epochs=10,
        batch_size=32,
        seed=42,
        tta="hflip",
    ),
    # Seed 001: efficientnet_b3 from scratch at 300 px, AdamW 1e-3, OneCycle stepped per batch,
    # batch 16 with gradient accumulation 4 (effective 64), 12 epochs.
    "effnet-b3-scratch": dict(
        model="efficientnet_b3",
        pretrained=False,
        img_size=300,
        hflip=0.5,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=1e-2,
        scheduler="onecycle",
        onecycle_pct_start=0.3,
        epochs=12,
        batch_size=16,
        accum_steps=4,
        tta="hflip",
    ),
    # Seed 002: resnetv2_50 pretrained, frozen backbone, head GAP -> Dense 32 -> Dropout 0.4 -> out,
    # 512 px, Adam, early stopping with patience 3.
    "resnetv2-50-head": dict(
        model="resnetv2_50",
        pretrained=True,
        img_size=512,
        train_last=0,
        head_hidden=(32,),
        head_dropout=0.4,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        scheduler="constant",
        epochs=20,
        early_stop=3,
        select="loss",
        batch_size=32,
        tta="hflip",
    ),
    # Seed 003: coatnet_2_rw_224 pretrained, LAMB lr 2e-4 wd 5e-5, OneCycle (pct_start 0.25, cosine,
    # final_div 5), label smoothing 0.002, clip 1.0, batch 32, 15 epochs, RRC 224 scale (0.9, 1.0).
    "coatnet-2-lamb": dict(
        model="coatnet_2_rw_224",
        pretrained=True,
        img_size=224,
        rrc_scale=(0.9, 1.0),
        hflip=0.5,
        optimizer="lamb",
        lr=2e-4,
        weight_decay=5e-5,
        scheduler="onecycle",
        onecycle_pct_start=0.25,
        onecycle_final_div=5.0,
        label_smoothing=0.002,
        clip_grad=1.0,
        batch_size=32,
        epochs=15,
        tta="hflip",
    ),
    # Seed 004 ("ConViTX"): convnext_large + swin_base fused; BN -> MLP 1024-512-256 (dropout 0.4) -> 128
    # -> out; each backbone frozen except its last 20 parameter tensors; AdamW 1e-4 wd 1e-2, cosine
    # T_max 10, AMP, batch 8. Train: Resize 232 + RRC 224 + hflip + rotate 10 + ColorJitter;
    # eval: Resize 232 + CenterCrop 224.
    "convitx": dict(
        model="convnext_large+swin_base_patch4_window7_224",
        pretrained=True,
        img_size=224,
        train_resize=232,
        rrc_scale=(0.08, 1.0),
        hflip=0.5,
        rotate=10.0,
        color_jitter=0.2,
        eval_resize=232,
        head_bn=True,
        head_hidden=(1024, 512, 256, 128),
        head_dropout=0.4,
        train_last=20,
        optimizer="adamw",
        lr=1e-4,
        weight_decay=1e-2,
        scheduler="cosine",
        cosine_epochs=10,
        epochs=10,
        batch_size=8,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        tta="hflip",
    ),
    # CPU-sized: timm's test_* models (~0.1M params), small images, a few epochs. For demos and tests.
    "tiny": dict(
        model="test_efficientnet",
        pretrained=False,
        img_size=64,
        hflip=0.5,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.01,
        scheduler="cosine",
        warmup_epochs=0.5,
        epochs=4,
        batch_size=64,
        select="f1",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        tta="hflip",
    ),
    # Native-resolution training for detection: random crops keep generator traces that resizing erases;
    # JPEG and blur augmentation make the model robust to re-encoding on the test side.
    "crop-robust": dict(
        mode="crop",
        img_size=224,
        hflip=0.5,
        jpeg_p=0.5,
        jpeg_quality=(65, 100),
        blur_p=0.1,
        optimizer="adamw",
        lr=3e-4,
        weight_decay=0.05,
        scheduler="cosine",
        warmup_epochs=1.0,
        epochs=10,
        batch_size=32,
        tta="hflip+crops:5",
    ),
    # Frozen-feature probes (UnivFD, Ojha et al. 2023: CLIP ViT-L/14 features + one linear layer). Features
    # come from the backbone's own eval input (size, mean/std from its data config; shorter side to 224 with
    # area resampling, the antialiased cv2 analogue of timm's PIL bicubic, then a centre crop); a logistic regression per
    # fold. The quickgelu variant is the one timm loads OpenAI's weights into faithfully.
    "clip-probe": dict(
        model="vit_large_patch14_clip_quickgelu_224.openai",
        pretrained=True,
        head="linear",
        img_size=224,
        eval_resize=224,
        batch_size=64,
        tta="none",
    ),
    # DINOv2 ViT-B/14 (with registers) at 224 px (16 x 16 patches) instead of its native 518: 5x fewer tokens.
    "dinov2-probe": dict(
        model="vit_base_patch14_reg4_dinov2.lvd142m",
        pretrained=True,
        head="linear",
        img_size=224,
        eval_resize=224,
        batch_size=64,
        tta="none",
    ),
}


FINETUNE: dict[str, dict[str, Any]] = {
    # Transformers (ViT, CLIP, DINOv2, EVA, Swin): lr 2e-5 (the 1e-5 to 5e-5 used for them; at 2e-4 their
    # features are lost in the first epoch), layer-wise decay 0.75 (BEiT, MAE; 0.85 for deeper, large models),
    # warm-up and gradient clipping, for runs of a few epochs.
    "vit": dict(lr=2e-5, layer_decay=0.75, warmup_epochs=0.5, weight_decay=0.05, clip_grad=1.0),
    # ConvNets (ConvNeXt, EfficientNet, ResNet): lr 1e-4, a short warm-up.
    "convnet": dict(lr=1e-4, warmup_epochs=0.25, weight_decay=0.05),
}
"""Fine-tuning settings of a pretrained model by family (:func:`aivh_ens.train.models.model_family`)."""
DEEP_LAYER_DECAY = 0.85
"""Layer-wise decay of large transformers (24 blocks or more): 0.75 would leave their first blocks ~1e-3 of the
rate."""
DEEP_MARKERS = ("_large", "_huge", "_giant", "_gigantic")


def finetune_recipe(model: str, family: str) -> dict[str, Any]:
    """The fine-tuning settings (RunConfig fields) of pretrained ``model`` of ``family`` (``vit`` | ``convnet``)."""
    out = dict(FINETUNE[family])
    if family == "vit" and any(m in model for m in DEEP_MARKERS):
        out["layer_decay"] = DEEP_LAYER_DECAY
    return out


def get_recipe(name: str) -> dict[str, Any]:
    """The overrides of recipe ``name``; UserError listing the valid names (closest first) if unknown."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown recipe {name!r}{hint}; valid recipes: {', '.join(RECIPES)}")
    return dict(RECIPES[name])
