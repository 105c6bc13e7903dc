"""Model creation: any timm name, local or cached pretrained weights, custom heads, fused backbones.

Every model maps a (B, 3, H, W) float batch to (B, 2) logits; P(AI) = softmax(logits)[:, 1].
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from aivh_ens.config import RunConfig
from aivh_ens.errors import UserError

NUM_CLASSES = 2


@functools.lru_cache(maxsize=1)
def _all_model_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def check_model_name(name: str) -> None:
    """UserError with the closest timm names when ``name`` is not a timm model."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, _all_model_names(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*pattern*')"
    raise UserError(f"unknown timm model {name!r}{hint}")


def weights_files(cfg: RunConfig) -> list[str | None]:
    """One local weights file (or None) per backbone; UserError if the count or a file is wrong."""
    names = cfg.backbones
    if cfg.weights is None:
        return [None] * len(names)
    files = [w.strip() or None for w in cfg.weights.split(",")]
    if len(files) != len(names):
        raise UserError(
            f"--weights lists {len(files)} file(s) but --model {cfg.model} has {len(names)} backbone(s); "
            "give one file per backbone, comma-separated"
        )
    for f in files:
        if f is not None and not Path(f).is_file():
            raise UserError(f"--weights file {f} does not exist")
        if f is not None and Path(f).suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise UserError(f"--weights file {f}: expected a .safetensors, .pth, .pt or .bin file")
    return files


def create_backbone(
    name: str, *, pretrained: bool, weights: str | None, num_classes: int, **kwargs: object
) -> nn.Module:
    """``timm.create_model`` with clear errors for unknown names and missing/unsafe weights.

    ``weights`` is a local file loaded through ``pretrained_cfg_overlay=dict(file=...)``: safetensors, or a
    torch pickle read with ``weights_only=True`` (a file that needs arbitrary code to load is refused). A
    classifier of another size in the file is dropped and re-initialised for ``num_classes``.
    """
    check_model_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(weights).resolve()))
        pretrained = True
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except TypeError as e:
            # Only transformer-like models take img_size (to size their position grid); CNNs don't need it.
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
            kwargs.pop("img_size")
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as e:  # timm/hub/torch raise many types; each becomes one actionable line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if weights is not None:
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in str(e).lower():
                raise UserError(
                    f"refusing to load {weights}: it is a pickle that needs code to run (only tensors are "
                    "accepted); convert it to .safetensors"
                ) from None
            raise UserError(f"cannot load weights {weights} into {name}: {msg}") from None
        if pretrained:
            raise UserError(
                f"no pretrained weights for {name} in the local Hugging Face cache and no network ({msg}); "
                f"pass --weights PATH to a .safetensors/.pth file for {name}, or drop --pretrained"
            ) from None
        raise


class MLPHead(nn.Module):
    """[BatchNorm] -> (Linear -> ReLU -> Dropout) x len(hidden) -> Linear(num_classes) on pooled features."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], dropout: float, bn: bool, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_features)] if bn else []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, C)
        return self.net(x)


class PooledClassifier(nn.Module):
    """One or more timm backbones (``num_classes=0``: pooled features), concatenated, into an MLP head."""

    def __init__(self, backbones: list[nn.Module], head: nn.Module):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C)
        feats = [b(x) for b in self.backbones]  # each (B, F_i)
        return self.head(torch.cat(feats, dim=1) if len(feats) > 1 else feats[0])


@dataclass(frozen=True)
class DataConfig:
    """Input geometry and normalisation a model expects."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_model(cfg: RunConfig) -> tuple[nn.Module, DataConfig]:
    """The model a run trains, and its data config (recipe/CLI values win over the model's defaults)."""
    names = cfg.backbones
    files = weights_files(cfg)
    fused = len(names) > 1 or bool(cfg.head_hidden) or cfg.head_bn
    extra = dict(drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, img_size=cfg.img_size)
    parts = [
        create_backbone(
            n, pretrained=cfg.pretrained, weights=f, num_classes=0 if fused else NUM_CLASSES, **extra
        )
        for n, f in zip(names, files, strict=True)
    ]
    for p in parts:
        freeze(p, cfg.train_last)
    if fused:
        in_features = sum(int(p.num_features) for p in parts)
        head = MLPHead(in_features, cfg.head_hidden, cfg.head_dropout, cfg.head_bn, NUM_CLASSES)
        model: nn.Module = PooledClassifier(parts, head)
        out_layer = head.net[-1]
    else:
        model = parts[0]
        out_layer = model.get_classifier()
        if cfg.train_last is not None:
            for p in out_layer.parameters():  # the fresh 2-class head always trains
                p.requires_grad_(True)
    init_output_layer(out_layer)
    dc = timm.data.resolve_model_data_config(parts[0])
    data_cfg = DataConfig(
        img_size=cfg.img_size or int(dc["input_size"][-1]),
        mean=tuple(cfg.mean or dc["mean"]),  # type: ignore[arg-type]
        std=tuple(cfg.std or dc["std"]),  # type: ignore[arg-type]
    )
    return model, data_cfg


def init_output_layer(layer: nn.Module) -> None:
    """Small weights and zero bias for the fresh 2-class layer: start near p = 0.5, not confidently wrong.

    Some timm heads (efficientnet's uniform init) start with logits of std ~4, i.e. a first-epoch loss of
    2-3 nats that the rest of the network then has to unlearn.
    """
    if isinstance(layer, nn.Linear):
        nn.init.trunc_normal_(layer.weight, std=0.01)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def freeze(backbone: nn.Module, train_last: int | None) -> None:
    """Freeze a backbone: None = all trainable, 0 = all frozen, N = only its last N parameter tensors train."""
    if train_last is None:
        return
    params = list(backbone.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(train_last > 0 and i >= len(params) - train_last)


def fully_frozen_backbones(model: nn.Module) -> list[nn.Module]:
    """Backbones with no trainable parameter: kept in eval mode so BatchNorm statistics stay as loaded."""
    mods = list(model.backbones) if isinstance(model, PooledClassifier) else []
    return [m for m in mods if not any(p.requires_grad for p in m.parameters())]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
