"""Small from-scratch CNNs that keep small images at full resolution, registered as timm models.

timm's ``test_*`` models downsample 4x in their stem, so a 32 px image becomes an 8x8 grid before the first
stage; the traces that tell a generated image from a photo live at the pixel scale. ``aivh_cnn_s`` and
``aivh_cnn_m`` start at full resolution: stages of (3x3 conv, BatchNorm, ReLU) x ``depth`` with a 2x2 max-pool
between stages, then timm's classifier head. ``aivh_res_s`` has the same widths as ``aivh_cnn_s`` with a
full-resolution stem convolution and one residual block (two 3x3 convolutions and a shortcut) per stage;
``aivh_res_t`` is ``aivh_res_s`` at half the widths (16-32-64), twice as fast to train. They have no pretrained
weights.

Importing this module registers them (``aivh_ens.train.models`` does), so every stage that names a model
(``--model aivh_cnn_s``, a sweep plan, ``auto``) reaches them through ``timm.create_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from aivh_ens.errors import UserError

VARIANTS: dict[str, dict[str, Any]] = {
    "aivh_cnn_s": {"widths": (32, 64, 128)},
    "aivh_cnn_m": {"widths": (48, 96, 192)},
    "aivh_res_s": {"widths": (32, 64, 128), "depth": 1, "residual": True},
    "aivh_res_t": {"widths": (16, 32, 64), "depth": 1, "residual": True},
}
"""Each variant's :class:`SmallCNN` arguments: 0.29M, 0.65M, 0.31M and 0.08M parameters."""


def _conv_bn(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions added to the input (through a 1x1 convolution where the width changes), then ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv_bn(cin, cout), _conv_bn(cout, cout, relu=False))
        self.shortcut = (
            nn.Identity()
            if cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.act(self.convs(x) + self.shortcut(x))


class SmallCNN(nn.Module):
    """A plain full-resolution CNN with timm's model interface (``forward_features``, ``forward_head``,
    ``get_classifier``, ``reset_classifier``, ``num_features``).

    Args:
        widths: channels per stage; every stage after the first starts with a 2x2 max-pool.
        depth: convolutions per stage, or residual blocks per stage with ``residual``.
        residual: a full-resolution stem convolution (``widths[0]`` channels), then residual blocks.
        num_classes: classifier outputs; 0 leaves the pooled features (``num_features`` of them).
        drop_rate: dropout before the classifier.
        drop_path_rate: must be 0 (no stochastic depth, the residual variant included); else a UserError.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128),
        depth: int = 2,
        residual: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if drop_path_rate:
            raise UserError(
                f"drop_path_rate={drop_path_rate} (a recipe or sweep plan value): the aivh_cnn_* and aivh_res_* "
                "models have no stochastic depth; use 0"
            )
        stages: list[nn.Module] = []
        cin = in_chans
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i else []
            if residual and not i:
                layers.append(_conv_bn(cin, width))
                cin = width
            for _ in range(depth):
                layers.append(ResidualBlock(cin, width) if residual else _conv_bn(cin, width))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = cin
        self.head = ClassifierHead(cin, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def forward_features(self, x):  # noqa: ANN001, ANN201 - (B, C, H, W) -> (B, F, H/2^(S-1), W/2^(S-1))
        return self.stages(x)

    def forward_head(self, x, pre_logits: bool = False):  # noqa: ANN001, ANN201
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.0.0",
        "classifier": "head.fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    return build_model_with_cfg(SmallCNN, variant, pretrained, **{**VARIANTS[variant], **kwargs})


if not timm.is_model("aivh_res_t"):  # a reload must not register twice (timm warns and overwrites)

    @register_model
    def aivh_cnn_s(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
        """Full-resolution CNN, widths 32-64-128, 0.29M parameters."""
        return _create("aivh_cnn_s", pretrained, **kwargs)

    @register_model
    def aivh_cnn_m(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
        """Full-resolution CNN, widths 48-96-192, 0.65M parameters."""
        return _create("aivh_cnn_m", pretrained, **kwargs)

    @register_model
    def aivh_res_s(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
        """Full-resolution residual CNN, widths 32-64-128, a stem convolution and one block per stage, 0.31M
        parameters."""
        return _create("aivh_res_s", pretrained, **kwargs)

    @register_model
    def aivh_res_t(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
        """Full-resolution residual CNN, ``aivh_res_s`` at half the widths (16-32-64), 0.08M parameters."""
        return _create("aivh_res_t", pretrained, **kwargs)
