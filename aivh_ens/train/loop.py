"""The training loop's parts: device, optimizer, learning-rate schedule, autocast, one epoch, evaluation.

``train_one_epoch`` and ``evaluate`` are what a fold job calls each epoch; ``lr_factor`` is a pure function
of the step (tested against torch's OneCycleLR); weights are saved and read as safetensors."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from aivh_ens import faults, metrics
from aivh_ens.config import RunConfig
from aivh_ens.data.loader import Normalizer
from aivh_ens.errors import TrainingDiverged, UserError
from aivh_ens.io import atomic_path, promote
from aivh_ens.progress import Progress
from aivh_ens.train.models import frozen_eval_modules
from aivh_ens.train.precision import autocast

BEST = "best.safetensors"


METRICS = "metrics.csv"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; a CUDA device that is absent is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def lr_factor(cfg: RunConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based). A pure function, so resume is exact.

    cosine: linear warmup, then half-cosine to ``min_lr_ratio`` over ``cosine_epochs`` (default: the run).
    step: warmup, then ``step_gamma`` every ``step_epochs`` epochs (StepLR per epoch).
    onecycle: torch's OneCycleLR with cosine annealing: lr/div -> lr at pct_start -> lr/div/final_div.
    constant: warmup, then 1.
    """
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.scheduler == "onecycle":
        up = max(1, int(cfg.onecycle_pct_start * total_steps) - 1)
        lo, final = 1.0 / cfg.onecycle_div, 1.0 / cfg.onecycle_div / cfg.onecycle_final_div
        if step <= up:
            return lo + (1.0 - lo) * 0.5 * (1 - math.cos(math.pi * step / up))
        down = max(1, total_steps - 1 - up)
        t = min(1.0, (step - up) / down)
        return final + (1.0 - final) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warm:
        return (step + 1) / warm
    if cfg.scheduler == "cosine":
        period = (cfg.cosine_epochs * steps_per_epoch) if cfg.cosine_epochs else total_steps
        t = min(1.0, (step - warm) / max(1, period - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.scheduler == "step":
        return cfg.step_gamma ** int(step // max(1, round(cfg.step_epochs * steps_per_epoch)))
    return 1.0


FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")  # torch's own, with a fused CUDA kernel (timm's LAMB has none)


def create_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory (no weight decay on norms and biases), over trainable parameters only;
    fused kernels for the models on CUDA (the model must be on its device already)."""
    from timm.optim import create_optimizer_v2

    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"model {cfg.model} has no trainable parameters (check --train-last)")
    kwargs: dict[str, Any] = {}
    if cfg.optimizer == "sgd":
        kwargs["momentum"] = cfg.momentum
    on_cuda = next(model.parameters()).device.type == "cuda"
    if on_cuda and cfg.optimizer in FUSED_OPTIMIZERS:
        kwargs["fused"] = True  # one kernel for all parameters instead of a few per tensor
    if cfg.layer_decay is not None:  # per-group lr_scale, which _optimizer_step applies
        kwargs["layer_decay"] = cfg.layer_decay
    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


@dataclass
class FoldContext:
    """What train_one_epoch/evaluate need besides the model and data."""

    cfg: RunConfig
    device: torch.device
    normalize: Normalizer
    describe: Callable[[int], str]  # row -> file name, for error messages
    skipped: set[int]  # rows skipped as bad images (with --on-bad-image skip)
    amp: str = "none"  # the resolved autocast mode (bf16 | fp16 | none), see train.precision
    row_weights: torch.Tensor | None = None  # (N_rows,) loss weight per source row (pseudo-labels), else None


def _check_batch(ctx: FoldContext, rows: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Mask of good samples; a bad one stops the run unless --on-bad-image skip."""
    if bool(ok.all()):
        return ok
    bad = [int(r) for r in rows[~ok]]
    if ctx.cfg.on_bad_image == "error":
        raise UserError(
            f"cannot decode image {ctx.describe(bad[0])}: remove or replace it, or pass --on-bad-image skip"
        )
    ctx.skipped.update(bad)
    return ok


SYNC_EVERY = 50  # batches between the host's reads of the loss on CUDA (each read waits for the GPU)


_DIVERGED_FIX = "run the fold again with a lower --lr (or a --clip-grad) and --force"


def eval_batch_size(cfg: RunConfig) -> int:
    """Images per evaluation batch: ``--eval-batch-size``, else twice the training batch (no gradients)."""
    return cfg.eval_batch_size or cfg.batch_size * 2


def _sync_every(device: torch.device) -> int:
    return SYNC_EVERY if device.type == "cuda" else 1  # on the CPU a read costs nothing


def _good(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch without its bad samples. A batch that is all good is handed on as it is: a masked copy
    would cost a pass over the batch and, on CUDA, lose the pinned memory its copy to the GPU overlaps from."""
    return (x, y) if bool(keep.all()) else (x[keep], y[keep])


def progress_bar(batches: Iterable[Any], desc: str, progress: bool) -> Progress:
    """Progress over ``batches`` (nothing unless ``progress``), iterated like the batches: a bar on a
    terminal; in a log, one line per minute of the pass (fit_fold adds one line per epoch)."""
    return Progress(batches, desc, unit="batch", enabled=progress)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    ctx: FoldContext,
    *,
    epoch: int,
    step: int,
    total_steps: int,
    scaler: torch.amp.GradScaler | None,
    ema: Any | None,
    progress: bool = True,
) -> tuple[dict[str, float], int]:
    """One pass over the training rows. Returns (train metrics, optimizer steps taken so far).

    The loss is summed on the device and read by the host every batch on the CPU but only every ``SYNC_EVERY``
    batches (and at the end) on CUDA: each read waits for the GPU, and the CPU could not queue the next batch
    meanwhile. A non-finite loss therefore stops the epoch within that many batches.
    """
    cfg, device = ctx.cfg, ctx.device
    model.train()
    for m in frozen_eval_modules(model):  # frozen backbones and norms keep their BatchNorm statistics
        m.eval()
    steps_per_epoch, sync_every = max(1, math.ceil(len(loader) / cfg.accum_steps)), _sync_every(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum over samples, on the device
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last read
    n_seen, first_unread, t0 = 0, 0, time.perf_counter()
    bar = progress_bar(loader, f"epoch {epoch + 1}/{cfg.epochs} train", progress)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y, rows, ok) in enumerate(bar):
        keep = _check_batch(ctx, rows, ok)
        if not bool(keep.any()):
            continue
        x, y = _good(x, y, keep)
        w = None if ctx.row_weights is None else ctx.row_weights[rows[keep]]  # (B,)
        loss = _forward_backward(model, x, y, ctx, scaler, w)
        bad |= ~torch.isfinite(loss.detach())
        last = i + 1 == len(loader)
        if (i + 1) % cfg.accum_steps == 0 or last:
            step = _optimizer_step(model, optimizer, cfg, step, total_steps, steps_per_epoch, scaler, ema)
        faults.point("batch")
        loss_sum, n_seen = loss_sum + loss.detach().double() * len(y), n_seen + len(y)
        if (i + 1) % sync_every == 0 or last:
            if bool(bad):  # the host waits for the GPU here, once per sync_every batches
                raise _diverged(epoch, f"batch {i}" if i == first_unread else f"batches {first_unread}-{i}")
            first_unread = i + 1
            if progress:
                bar.set_postfix(
                    loss=f"{float(loss_sum) / n_seen:.4f}", img_s=f"{n_seen / (time.perf_counter() - t0):.0f}"
                )
    if bool(bad):  # the last batches, when the loop ended on a skipped one
        raise _diverged(epoch, f"batch {first_unread} or later")
    bar.close()
    seconds = time.perf_counter() - t0  # after the read above: the GPU's work is done
    return {
        "train_loss": float(loss_sum) / max(1, n_seen),
        "lr": optimizer.param_groups[0]["lr"],
        "img_s": n_seen / max(seconds, 1e-9),
        "train_seconds": seconds,
    }, step


def _forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: FoldContext,
    scaler: torch.amp.GradScaler | None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise on the device, forward under autocast, cross-entropy in fp32, backward (divided by the
    accumulation steps, scaled for fp16); the batch's mean loss, weighted by ``weights`` (B,) when given."""
    cfg, device = ctx.cfg, ctx.device
    x = ctx.normalize(x)
    y = y.to(device, non_blocking=True)
    with autocast(device, ctx.amp):
        logits = model(x)
        if weights is None:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        else:  # a weighted mean, as CrossEntropyLoss(weight=...) normalises class weights
            w = weights.to(device, non_blocking=True)
            per = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="none")
            loss = (per * w).sum() / w.sum()
    scaled = loss / cfg.accum_steps
    (scaler.scale(scaled) if scaler else scaled).backward()
    return loss


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: RunConfig,
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    scaler: torch.amp.GradScaler | None,
    ema: Any | None,
) -> int:
    """One optimizer step at the schedule's learning rate (clipping, scaler, EMA); the new step count."""
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * lr_factor(cfg, step, total_steps, steps_per_epoch) * g.get("lr_scale", 1.0)
    if scaler:
        scaler.unscale_(optimizer)
    if cfg.clip_grad:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    if ema is not None:
        ema.update(model, step=step)
    return step


def _diverged(epoch: int, where: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: the loss became non-finite at epoch {epoch + 1}, {where}; {_DIVERGED_FIX}"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, ctx: FoldContext, progress: bool = False, desc: str = "valid"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score every row of ``loader``. Returns (rows (N,), labels (N,), P(label 1) (N,)) for good images.

    Probabilities stay on the device until the pass ends (one copy to the host, no wait per batch).
    """
    model.eval()
    out_rows, out_y, out_p = [], [], []
    for x, y, rows, ok in progress_bar(loader, desc, progress):
        keep = _check_batch(ctx, rows, ok)
        if not bool(keep.any()):
            continue
        x, y = _good(x, y, keep)
        with autocast(ctx.device, ctx.amp):
            logits = model(ctx.normalize(x))
        out_p.append(torch.softmax(logits.float(), dim=1)[:, 1])  # (B,) on the device
        out_y.append(y.numpy())
        out_rows.append(rows[keep].numpy())
    cat = lambda a, dt: np.concatenate(a).astype(dt) if a else np.zeros(0, dt)  # noqa: E731
    probs = torch.cat(out_p).cpu().numpy() if out_p else np.zeros(0)
    return cat(out_rows, np.int64), cat(out_y, np.int64), probs.astype(np.float64)


def _val_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    loss = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))) if len(y) else float("nan")
    s = metrics.summary_at(y, p)
    return {"val_loss": loss, "val_acc": s["acc"], "val_f1": s["f1"], "val_auc": s["auc"]}


def _score(m: dict[str, float], select: str) -> float:
    """Higher is better, for every selection metric."""
    if select == "loss":
        return -m["val_loss"]
    v = m["val_auc"] if select == "auc" else m["val_f1"]
    return -math.inf if math.isnan(v) else v


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _is_compile_error(e: BaseException) -> bool:
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))


class CompileFallback(nn.Module):
    """``torch.compile(model)`` that falls back to the eager model, with one message, when compiling fails.

    Compilation happens lazily, at the first forward pass (and again for a new mode or shape), and fails on
    machines without a C compiler or Triton, which is common on Kaggle images. Any error of the first pass,
    and any torch._dynamo / torch._inductor error later, switches to eager for the rest of the run; a genuine
    error then surfaces again from the eager model.
    """

    def __init__(
        self,
        model: nn.Module,
        log: Callable[[str], None] = print,
        compile_fn: Callable[[nn.Module], Any] = torch.compile,
    ):
        super().__init__()
        self._orig_mod = model  # what _unwrap, save_weights and train()/eval() reach
        object.__setattr__(self, "_compiled", compile_fn(model))  # not a submodule: no duplicate state
        self._log, self.fell_back, self._ran = log, False, False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fell_back:
            try:
                out = self._compiled(*args, **kwargs)
                self._ran = True
                return out
            except Exception as e:
                if self._ran and not _is_compile_error(e):
                    raise
                self.fell_back = True
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self._log(f"  --compile failed ({type(e).__name__}: {first}); continuing without compiling")
        return self._orig_mod(*args, **kwargs)


def save_weights(model: nn.Module, path: Path, digests: dict[str, str] | None = None) -> None:
    """Atomically write a model's weights as safetensors (contiguous CPU copies; shared tensors cloned). One
    metadata key only: safetensors writes several in no fixed order, and a seeded CPU run is reproducible to
    the byte. ``digests``: see :func:`aivh_ens.io.atomic_path`."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in _unwrap(model).state_dict().items()}
    with atomic_path(path, digests) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})


STATE = "state.pt"  # resume state of an unfinished fold


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any]:
    """Resume state, read with ``weights_only=True``: a file carrying code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: one line naming the file
        raise UserError(
            f"refusing to resume from {path}: not a plain tensor checkpoint ({str(e).splitlines()[0][:160]}); "
            "delete it and re-run with --force"
        ) from None


def staged_best(fold_dir: Path, epoch: int) -> Path:
    """Where an epoch's best weights wait until ``state.pt`` records that epoch as the best."""
    return fold_dir / f"{BEST}.{epoch}.next"


def stage_best(model: nn.Module, fold_dir: Path, epoch: int) -> str:
    """Step one of saving a new best epoch: its weights under :func:`staged_best`, ``best.safetensors`` untouched;
    their sha256, as written (what ``state.pt`` and ``done.json`` vouch for).

    Step two, :func:`commit_best`, comes after ``state.pt``; a crash between the steps is settled on resume by
    :func:`settle_best`, so ``best.safetensors`` always holds the epoch that ``state.pt`` calls the best."""
    staged = staged_best(fold_dir, epoch)
    digests: dict[str, str] = {}
    save_weights(model, staged, digests)
    return digests[staged.name]


def commit_best(fold_dir: Path, epoch: int) -> None:
    """Step two: the staged weights of ``epoch`` become ``best.safetensors``."""
    promote(staged_best(fold_dir, epoch), fold_dir / BEST)


def settle_best(fold_dir: Path, best_epoch: int | None) -> None:
    """On resume: finish the commit of the best epoch ``state.pt`` records (None: no state), and drop weights
    staged by an epoch whose state was never saved."""
    for f in fold_dir.glob(f"{BEST}.*.next"):
        if best_epoch is not None and f == staged_best(fold_dir, best_epoch):
            promote(f, fold_dir / BEST)
        else:
            f.unlink(missing_ok=True)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights saved by ``save_weights`` (strict)."""
    _unwrap(model).load_state_dict(load_file(str(path)), strict=True)
