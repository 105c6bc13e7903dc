"""The resolved configuration of one run: frozen, built as defaults -> recipe -> CLI flags, saved as JSON.

A (run, fold) training job is a pure function of a ``RunConfig`` plus the fold index, so it can be sent to
another process, GPU or machine. Nothing mutates a config after it is built: use ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any

from aivh_ens.errors import UserError
from aivh_ens.layout import RESERVED_RUN_NAMES, pseudo_path
from aivh_ens.recipes import get_recipe

CONFIG_VERSION = 1

OPTIMIZERS = ("adam", "adamw", "sgd", "lamb")
SCHEDULERS = ("cosine", "step", "onecycle", "constant")
MODES = ("resize", "crop")
AMP_MODES = ("auto", "bf16", "fp16", "none")
SELECT = ("f1", "auc", "loss", "last")
ON_BAD_IMAGE = ("error", "skip")
CACHE = ("auto", "on", "off")
HEADS = ("finetune", "linear", "mlp")
PROBE_VIEWS = ("none", "hflip")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run's training. Field docs double as the CLI/recipe reference."""

    # -- identity and data
    name: str = ""  # run name: runs/<name>/, oof/<name>.csv (default: derived from model and recipe)
    model: str = "efficientnet_b0"  # any timm name, or "a+b" for a fused two-backbone model
    recipe: str = "none"
    data: str = "."  # dataset folder holding train.csv / test.csv (paths inside are relative to it)
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    file_col: str = "file_name"
    label_col: str = "label"
    id_col: str = "id"
    on_bad_image: str = "error"  # error | skip (skipped rows are recorded in runs/<run>/skipped.csv)

    # -- folds
    folds: int = 5
    seed: int = 42
    group: str | None = None  # None | "pairs" (row // 2) | a column of train.csv

    # -- model
    # auto: timm's pretrained weights when this machine holds them (HF cache), else random init with a note;
    # True: they must be there (--pretrained); False: random initialisation (--no-pretrained)
    pretrained: bool | str = "auto"
    weights: str | None = None  # local weights file (.safetensors/.pth); "a,b" for fused models
    head_hidden: tuple[int, ...] = ()  # () = timm's own classifier; else an MLP on pooled features
    head_dropout: float = 0.0
    head_bn: bool = False  # BatchNorm on the pooled features before the MLP head
    train_last: int | None = None  # None = train everything; 0 = frozen backbone; N = last N param tensors
    drop_rate: float | None = None  # timm drop_rate override
    drop_path_rate: float | None = None
    # finetune: train the model on images; linear | mlp: a frozen-feature probe (features extracted once into
    # runs/features/, then a logistic regression or a small MLP per fold on them)
    head: str = "finetune"
    probe_views: str = "none"  # probe runs: none | hflip (features of the image and its mirror, averaged)

    # -- pseudo-labels (cv --pseudo): confident test rows join every fold's training rows, never its validation
    pseudo: str | None = (
        None  # an id,prob file (`submit --proba` writes one), or "blend": the blend's test scores
    )
    pseudo_min_conf: float = 0.95  # prob >= c becomes AI (1), prob <= 1 - c human (0); the rest is left out
    pseudo_max_share: float = 1.0  # at most this many pseudo rows per labelled row (the most confident first)
    pseudo_weight: float = 1.0  # a pseudo row's loss weight (a labelled row's is 1)
    # keep the pseudo classes at the train set's AI share: the larger class is cut to its most confident rows
    # (under shift the scores of one class drift across the cut, and its confident rows are the wrong ones)
    pseudo_balance: bool = True
    pseudo_sha256: str | None = None  # set by cv: sha256 of the frozen copy runs/<run>/pseudo.csv

    # -- preprocessing and augmentation
    mode: str = "resize"  # resize: whole image to img_size; crop: native-resolution crops of img_size
    img_size: int | None = None  # None = the model's default input size
    train_resize: int | None = None  # resize to this before a random crop (e.g. 255 -> RRC 224)
    eval_resize: int | None = None  # resize to this, then centre crop img_size (e.g. 232 -> 224)
    rrc_scale: tuple[float, float] | None = None  # RandomResizedCrop area range; None = no RRC
    hflip: float = 0.5
    rotate: float = 0.0  # degrees, uniform in [-rotate, rotate]
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (hue at a quarter of it)
    jpeg_p: float = 0.0  # probability of re-compressing as JPEG
    jpeg_quality: tuple[int, int] = (60, 95)
    blur_p: float = 0.0
    mean: tuple[float, float, float] | None = None  # None = the model's data config
    std: tuple[float, float, float] | None = None
    interpolation: str = "area"  # area | linear | cubic (cv2) for resizes
    tta: str = "none"  # the run's test-time augmentation: its OOF rows are scored with it, submit's default

    # -- optimisation
    epochs: int = 10
    batch_size: int = 32
    accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    # layer-wise lr decay (BEiT): each block towards the input trains at this times the next one's lr; None = off
    layer_decay: float | None = None
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    cosine_epochs: float | None = None  # cosine period (T_max) in epochs; None = the whole run
    step_gamma: float = 0.7
    step_epochs: float = 1.0
    onecycle_pct_start: float = 0.3
    onecycle_div: float = 25.0
    onecycle_final_div: float = 1e4
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    ema_decay: float | None = None  # e.g. 0.999; evaluation and best weights then use the EMA model
    early_stop: int | None = None  # patience in epochs on the selection metric
    validate_last: int | None = None  # validate only the last N epochs (None = every epoch)
    # seconds of training and validation passes per fold: the epochs (up to `epochs`) and the schedule follow the
    # measured epoch times (train.fold.planned_epochs); None = train `epochs`
    fold_time: float | None = None
    select: str = "f1"  # metric picking the best epoch: f1 | auc | loss | last

    # -- hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 on GPUs with compute capability >= 8.0, fp16 + GradScaler below, fp32 on the CPU; an explicit
    # bf16 | fp16 | none is used on any device (inference always chooses by the device it runs on)
    amp: str = "auto"
    channels_last: bool | None = None  # None = on CUDA only; True/False force it on any device
    compile: bool = False  # torch.compile (inductor, also on the CPU), eager when compiling fails
    workers: int | None = None  # DataLoader workers; None = one per core (up to 8) on CUDA, 0 on CPU
    eval_batch_size: int | None = None  # None = 2 x batch_size
    deterministic: bool = False  # cudnn deterministic algorithms (slower on GPU; CPU is deterministic)
    cache: str = "auto"  # decode-once image cache: auto (on when it fits on disk) | on | off
    cache_dir: str | None = None  # None = <workdir>/runs/cache

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into config.json

    def __post_init__(self) -> None:
        validate(self)

    @property
    def backbones(self) -> list[str]:
        """The timm names this run's model is made of (two for a fused model)."""
        return self.model.split("+")


def _flag(name: str) -> str:
    """``name=... (--flag)``: how an error names a field, for a Python caller and for the command line."""
    return {"ema_decay": "--ema", "name": "--name"}.get(name, "--" + name.replace("_", "-"))


def _bad(name: str, value: Any, rule: str) -> UserError:
    return UserError(f"{name}={value!r} ({_flag(name)}) {rule}")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise _bad(name, value, f"must be one of {', '.join(options)}")


def validate(cfg: RunConfig) -> None:
    """Check ranges and choices; raise a UserError naming the field, its CLI flag, the value and the rule."""
    for name, options in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("mode", MODES),
                          ("amp", AMP_MODES), ("select", SELECT), ("on_bad_image", ON_BAD_IMAGE),
                          ("cache", CACHE), ("head", HEADS), ("probe_views", PROBE_VIEWS)):  # fmt: skip
        _choice(name, getattr(cfg, name), options)
    if cfg.name in RESERVED_RUN_NAMES:
        raise _bad(
            "name", cfg.name, f"is reserved: runs/{cfg.name}/ holds other files; choose another run name"
        )
    if cfg.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", cfg.name):
        raise _bad("name", cfg.name, "must use letters, digits, '_', '-', '.' (a run name names a folder)")
    if cfg.pretrained not in (True, False, "auto"):
        raise _bad("pretrained", cfg.pretrained, "must be true, false or 'auto'")
    if cfg.folds < 2:
        raise _bad("folds", cfg.folds, "must be at least 2: one fold leaves nothing to train on")
    for name in ("epochs", "batch_size", "accum_steps", "validate_last"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise _bad(name, getattr(cfg, name), "must be at least 1")
    if cfg.fold_time is not None and not cfg.fold_time > 0:
        raise _bad("fold_time", cfg.fold_time, "must be more than 0 seconds")
    _check_tta(cfg)
    _check_ranges(cfg)


def _check_tta(cfg: RunConfig) -> None:
    """The run's TTA (its OOF rows are scored with it) must parse."""
    from aivh_ens.score.tta_spec import VALID_FORMS, parse_tta

    try:
        parse_tta(cfg.tta)
    except UserError:
        raise _bad("tta", cfg.tta, f"must be {VALID_FORMS}") from None


def _check_ranges(cfg: RunConfig) -> None:
    if cfg.img_size is not None and cfg.img_size < 8:
        raise _bad("img_size", cfg.img_size, "must be at least 8 px")
    if not cfg.lr > 0:
        raise _bad("lr", cfg.lr, "must be > 0")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise _bad("layer_decay", cfg.layer_decay, "must be in (0, 1], e.g. 0.75")
    if cfg.rrc_scale is not None and not (0 < cfg.rrc_scale[0] <= cfg.rrc_scale[1] <= 1):
        raise _bad("rrc_scale", cfg.rrc_scale, "must satisfy 0 < lo <= hi <= 1")
    if not 0 <= cfg.label_smoothing < 1:
        raise _bad("label_smoothing", cfg.label_smoothing, "must be in [0, 1)")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise _bad("ema_decay", cfg.ema_decay, "must be in (0, 1), e.g. 0.999")
    if not cfg.model or any(not m for m in cfg.backbones) or len(cfg.backbones) > 2:
        raise _bad("model", cfg.model, "must be a timm name or two joined by '+'")
    if cfg.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", cfg.device):
        raise _bad("device", cfg.device, "must be auto, cpu, cuda or cuda:N")
    if cfg.head != "finetune":
        _check_probe(cfg)
    _check_pseudo(cfg)


def _check_pseudo(cfg: RunConfig) -> None:
    if not 0.5 < cfg.pseudo_min_conf <= 1:
        raise _bad("pseudo_min_conf", cfg.pseudo_min_conf, "must be in (0.5, 1], e.g. 0.95")
    if not cfg.pseudo_max_share > 0:
        raise _bad("pseudo_max_share", cfg.pseudo_max_share, "must be > 0 (pseudo rows per labelled row)")
    if not cfg.pseudo_weight > 0:
        raise _bad("pseudo_weight", cfg.pseudo_weight, "must be > 0 (a labelled row's weight is 1)")


def _check_probe(cfg: RunConfig) -> None:
    """A probe run reads features of one pretrained backbone: no fused model, no random initialisation."""
    if len(cfg.backbones) > 1:
        raise _bad("head", cfg.head, f"takes one backbone, got model={cfg.model!r} (--model); drop the '+'")
    if cfg.pretrained is False and not cfg.weights:
        raise _bad(
            "head",
            cfg.head,
            "probes frozen features, which need trained weights: pass pretrained=True (--pretrained, from "
            "the HF cache) or weights=PATH (--weights PATH)",
        )


def default_run_name(model: str, recipe: str) -> str:
    """A folder-safe run name: the model, plus the recipe when one is used."""
    base = re.sub(r"[^A-Za-z0-9_.\-]+", "-", model)
    return base if recipe in ("", "none") else f"{base}-{recipe}"


_TUPLE_FIELDS = {f.name for f in fields(RunConfig) if str(f.type).startswith("tuple")}
# Fields that may differ between two configs of the same run without changing what it trains.
RUNTIME_FIELDS = (
    "device",
    "workers",
    "eval_batch_size",
    "compile",
    "amp",
    "channels_last",
    "extra",
    "on_bad_image",
    "cache",
    "cache_dir",
    "pseudo",  # where the pseudo-labels were read from; what they are is pseudo_sha256
)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-JSON dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a dict, rejecting unknown keys with the list of valid ones."""
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
    kw = {k: tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v for k, v in d.items()}
    try:
        return RunConfig(**kw)
    except TypeError as e:
        raise UserError(f"invalid config: {e}") from None


def training_identity(cfg: RunConfig) -> dict[str, Any]:
    """The part of a config that defines what a run trains (everything but runtime-only fields)."""
    d = to_dict(cfg)
    for k in RUNTIME_FIELDS:
        d.pop(k, None)
    return d


def config_change(old: RunConfig, new: RunConfig) -> str | None:
    """None when two configs of a run train the same thing; else what differs, for an error that then says
    how to proceed: "run NAME already exists with a different config (field, ...)"."""
    a, b = training_identity(old), training_identity(new)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not diff:
        return None
    why = f"run {new.name} already exists with a different config ({', '.join(diff)})"
    if "pseudo_sha256" in diff:
        why += (
            f" (its pseudo-labels are the frozen copy {pseudo_path('.', new.name)}, sha256 "
            f"{str(old.pseudo_sha256)[:12]}; this call's --pseudo has sha256 {str(new.pseudo_sha256)[:12]})"
        )
    return why


def resolve_config(recipe: str = "none", **overrides: Any) -> RunConfig:
    """Defaults, then the recipe, then ``overrides`` (None values mean "not given").

    Args:
        recipe: a name in :data:`aivh_ens.recipes.RECIPES` (``--recipe``), or ``"none"``.
        **overrides: any :class:`RunConfig` field, as the CLI flag of the same name sets it.

    Raises:
        UserError: an unknown recipe or field, or a value out of range (naming the field and the flag).
    """
    values = {**get_recipe(recipe), "recipe": recipe}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = from_dict({**to_dict(RunConfig()), **values})
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=default_run_name(cfg.model, recipe))
    return cfg
