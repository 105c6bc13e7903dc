"""Model creation: any timm name, local or cached pretrained weights, custom heads, fused backbones.

Every model maps a (B, 3, H, W) float batch to (B, 2) logits; P(AI) = softmax(logits)[:, 1].
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from aivh_ens.config import RunConfig
from aivh_ens.errors import UserError
from aivh_ens.train import smallnets  # noqa: F401 - registers the aivh_cnn_* models with timm

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
            raise UserError(
                f"--weights file {f} does not exist; give the path of a .safetensors or .pth file"
            )
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
        # absolute, not resolved: a Hugging Face snapshot file links to an extension-less blob, and timm reads a
        # file as safetensors by its name
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(weights).absolute()))
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


def local_pretrained(name: str) -> bool:
    """Whether timm's default pretrained weights for ``name`` are on this machine already (the Hugging Face
    cache, or torch hub's cache for URL weights): a look-up in the caches, never a download."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    from timm.models._hub import check_cached_file

    pcfg = get_pretrained_cfg(name)
    if pcfg is None:
        return False
    if pcfg.hf_hub_id:
        repo, _, revision = pcfg.hf_hub_id.partition("@")
        names = [n for n in (pcfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if n]
        for filename in names:
            if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return True
    return bool(pcfg.url) and bool(check_cached_file(pcfg.url))


@dataclass(frozen=True)
class PretrainedInput:
    """What a pretrained model's weights were trained on (timm's ``pretrained_cfg``): input size and
    normalisation; and its family, which sets its fine-tuning recipe."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    family: str  # "vit" (attention over patch tokens) | "convnet"


VIT_MODULES = (
    "vision_transformer",
    "eva",
    "deit",
    "beit",
    "cait",
    "xcit",
    "volo",
    "swin",
    "hiera",
    "twins",
    "pvt",
    "tnt",
    "crossvit",
    "mvitv2",
)
"""Module names (timm.models.<module>) of transformer families: they fine-tune at a ViT's rate with layer-wise
decay (:data:`aivh_ens.recipes.FINETUNE`)."""


def model_family(name: str) -> str:
    """``vit`` for a model of a transformer family (by the timm module that defines it), else ``convnet``."""
    from timm.models import model_entrypoint

    module = model_entrypoint(name.split(".")[0]).__module__.rsplit(".", 1)[-1]
    return "vit" if module.startswith(VIT_MODULES) else "convnet"


def pretrained_input(name: str) -> PretrainedInput:
    """The input size and normalisation of ``name``'s pretrained weights (its tag's ``pretrained_cfg``, else
    the architecture's default tag's, else 224 px and ImageNet's statistics)."""
    from timm.models import get_pretrained_cfg

    from aivh_ens.recipes import IMAGENET_MEAN, IMAGENET_STD

    check_model_name(name)
    pcfg = get_pretrained_cfg(name) or get_pretrained_cfg(name.split(".")[0])
    if pcfg is None:
        return PretrainedInput(224, IMAGENET_MEAN, IMAGENET_STD, model_family(name))
    mean, std = (tuple(float(v) for v in t) for t in (pcfg.mean, pcfg.std))
    return PretrainedInput(int(pcfg.input_size[-1]), mean, std, model_family(name))  # type: ignore[arg-type]


def use_pretrained(cfg: RunConfig, name: str, weights: str | None) -> bool:
    """Whether backbone ``name`` starts from pretrained weights: ``--weights``, ``--pretrained`` (the HF cache,
    an error when absent), ``--no-pretrained``, or by default (``auto``) the weights this machine holds."""
    if weights is not None or cfg.pretrained is True:
        return True
    return cfg.pretrained == "auto" and local_pretrained(name)


def random_init_note(cfg: RunConfig) -> str | None:
    """The one line a run prints when ``--pretrained auto`` finds no local weights and trains from scratch."""
    if cfg.pretrained != "auto":
        return None
    files = weights_files(cfg)
    missing = [n for n, f in zip(cfg.backbones, files, strict=True) if not use_pretrained(cfg, n, f)]
    if not missing:
        return None
    return (
        f"note: no local pretrained weights for {', '.join(missing)} (Hugging Face cache, --weights): training "
        "from random initialisation, which needs many more epochs; pass --weights PATH, or fill the cache once "
        "online (HF_HUB_OFFLINE=0), or --no-pretrained to choose random initialisation"
    )


def _backbone_params(name: str, **kwargs: object) -> tuple[dict[str, tuple[int, ...]], nn.Module]:
    """Parameter names and shapes of a randomly initialised backbone (no classifier)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError:
        kwargs.pop("img_size", None)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}, model


def _read_weights(weights: str) -> dict[str, torch.Tensor]:
    """A weights file's state dict, as timm reads it (``module.`` prefixes dropped, EMA or ``state_dict``
    entries unwrapped); a pickle that needs code to run is refused."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(weights, use_ema=False, weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "pickle" in text.lower():
            raise UserError(
                f"refusing to load {weights}: it is a pickle that needs code to run (only tensors are "
                "accepted); convert it to .safetensors"
            ) from None
        raise UserError(f"cannot read weights {weights}: {(text.splitlines() or [''])[0][:160]}") from None


def _safetensors_shapes(weights: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a .safetensors header, without reading a tensor ({} for other files)."""
    if not weights.endswith(".safetensors"):
        return {}
    from safetensors import safe_open
    from timm.models import clean_state_dict

    try:
        with safe_open(weights, "pt") as f:
            return clean_state_dict({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    except Exception:
        return {}  # the full read below names the problem


def check_weights_match(name: str, weights: str, img_size: int | None = None) -> None:
    """UserError unless the file at ``weights`` covers every backbone parameter of ``name`` by name and shape
    (the classifier aside; timm's own key filter for the model applied first). Read only: nothing is written.

    timm loads a file with a classifier of another size non-strictly, so a file of another model would
    otherwise load nothing, with a warning, and the run would train from random initialisation.
    """
    want, model = _backbone_params(name, img_size=img_size)
    shapes = _safetensors_shapes(weights)  # the common case: a timm file, checked from its header alone
    if shapes and all(shapes.get(k) == shape for k, shape in want.items()):
        return
    sd = _read_weights(weights)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        with contextlib.suppress(Exception):  # a filter for another layout: compare the keys as stored
            sd = filter_fn(dict(sd), model)
    matched = sum(1 for k, shape in want.items() if k in sd and tuple(sd[k].shape) == shape)
    if matched < len(want):
        raise UserError(
            f"--weights {weights} does not fit {name}: {matched} of {len(want)} backbone tensors match by name "
            f"and shape (classifier aside); pass weights saved from {name}, or --model the model they belong to"
        )


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
            n,
            pretrained=use_pretrained(cfg, n, f),
            weights=f,
            num_classes=0 if fused else NUM_CLASSES,
            **extra,
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


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # BatchNorm*, InstanceNorm*, ...


def frozen_eval_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that stay in eval mode while the model trains: fully frozen backbones, and every norm layer
    whose parameters are all frozen (``--train-last``), so BatchNorm statistics stay as loaded.

    ``model`` may be a compile wrapper: the walk goes through its original module (``_orig_mod``), whose
    type a wrapper hides.
    """
    model = getattr(model, "_orig_mod", model)
    mods = fully_frozen_backbones(model)
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, NORM_LAYERS) and own and not any(p.requires_grad for p in own):
            mods.append(m)
    return mods


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
