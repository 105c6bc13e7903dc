"""One training loop for every backbone: ``fit_fold`` -> ``train_one_epoch`` / ``evaluate``.

A fold's folder holds everything needed to resume it:
``state.pt`` (after each epoch: model, optimizer, EMA, scaler, epoch, history; loaded with weights_only),
``best.safetensors`` (weights of the best epoch), ``metrics.csv`` (one row per epoch), and when the fold is
finished ``oof.csv`` (validation rows scored by the best weights) and ``done.json``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from aivh_ens import faults, metrics
from aivh_ens.config import RunConfig
from aivh_ens.errors import TrainingDiverged, UserError
from aivh_ens.io import atomic_path, write_csv, write_json
from aivh_ens.loader import ImageDataset, ImageSource, Normalizer, default_workers, derive_seed, make_loader
from aivh_ens.models import build_model, fully_frozen_backbones
from aivh_ens.transforms import eval_transform, train_transform

STATE = "state.pt"
BEST = "best.safetensors"
METRICS = "metrics.csv"
FOLD_OOF = "oof.csv"
DONE = "done.json"


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
    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (CPU trains in fp32)."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class FoldContext:
    """What train_one_epoch/evaluate need besides the model and data."""

    cfg: RunConfig
    device: torch.device
    normalize: Normalizer
    describe: Callable[[int], str]  # row -> file name, for error messages
    skipped: set[int]  # rows skipped as bad images (with --on-bad-image skip)


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


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, ctx: FoldContext, *,
                    epoch: int, step: int, total_steps: int, scaler: torch.amp.GradScaler | None,
                    ema: Any | None, progress: bool = True) -> tuple[dict[str, float], int]:
    """One pass over the training rows. Returns (train metrics, optimizer steps taken so far).

    The loss is summed on the device and read by the host every batch on the CPU but only every
    ``SYNC_EVERY`` batches (and at the end) on CUDA: each read waits for the GPU to finish, and the CPU could
    not queue the next batch meanwhile. A non-finite loss therefore stops the epoch within that many batches.
    """
    cfg, device = ctx.cfg, ctx.device
    model.train()
    for m in fully_frozen_backbones(model):
        m.eval()
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.accum_steps))
    sync_every = _sync_every(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum over samples, on the device
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last read
    n_seen, first_unread, t0 = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} train", leave=False, disable=not progress,
               unit="batch", dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y, rows, ok) in enumerate(bar):
        keep = _check_batch(ctx, rows, ok)
        if not bool(keep.any()):
            continue
        x, y = _good(x, y, keep)
        x = ctx.normalize(x)
        y = y.to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        bad |= ~torch.isfinite(loss.detach())
        scaled = loss / cfg.accum_steps
        (scaler.scale(scaled) if scaler else scaled).backward()
        last = i + 1 == len(loader)
        if (i + 1) % cfg.accum_steps == 0 or last:
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
        faults.point("batch")
        n = len(y)
        loss_sum += loss.detach().double() * n
        n_seen += n
        if (i + 1) % sync_every == 0 or last:
            if bool(bad):  # the host waits for the GPU here, once per sync_every batches
                where = f"batch {i}" if i == first_unread else f"batches {first_unread}-{i}"
                raise TrainingDiverged(f"training diverged: the loss became non-finite at epoch {epoch + 1}, "
                                       f"{where}; {_DIVERGED_FIX}")
            first_unread = i + 1
            if progress:
                bar.set_postfix(loss=f"{float(loss_sum) / max(1, n_seen):.4f}",
                                img_s=f"{n_seen / (time.perf_counter() - t0):.0f}")
    if bool(bad):  # the last batches, when the loop ended on a skipped one
        raise TrainingDiverged(f"training diverged: the loss became non-finite at epoch {epoch + 1}, batch "
                               f"{first_unread} or later; {_DIVERGED_FIX}")
    bar.close()
    train_loss = float(loss_sum) / max(1, n_seen)
    seconds = time.perf_counter() - t0  # after the read above: the GPU's work is done
    lr = optimizer.param_groups[0]["lr"]
    return {"train_loss": train_loss, "lr": lr, "img_s": n_seen / max(seconds, 1e-9),
            "train_seconds": seconds}, step


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: FoldContext, progress: bool = False,
             desc: str = "valid") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score every row of ``loader``. Returns (rows (N,), labels (N,), P(label 1) (N,)) for good images.

    Probabilities stay on the device until the pass ends (one copy to the host, no wait per batch).
    """
    model.eval()
    out_rows, out_y, out_p = [], [], []
    for x, y, rows, ok in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        keep = _check_batch(ctx, rows, ok)
        if not bool(keep.any()):
            continue
        x, y = _good(x, y, keep)
        with autocast(ctx.device, ctx.cfg.amp):
            logits = model(ctx.normalize(x))
        out_p.append(torch.softmax(logits.float(), dim=1)[:, 1])  # (B,) on the device
        out_y.append(y.numpy())
        out_rows.append(rows[keep].numpy())
    cat = (lambda a, dt: np.concatenate(a).astype(dt) if a else np.zeros(0, dt))  # noqa: E731
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

    def __init__(self, model: nn.Module, log: Callable[[str], None] = print,
                 compile_fn: Callable[[nn.Module], Any] = torch.compile):
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


def save_weights(model: nn.Module, path: Path) -> None:
    """Atomically write a model's weights as safetensors (contiguous CPU copies; shared tensors cloned)."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in _unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights saved by ``save_weights`` (strict)."""
    _unwrap(model).load_state_dict(load_file(str(path)), strict=True)


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


@dataclass(frozen=True)
class FoldJob:
    """One unit of work: train fold ``fold`` of a run. A pure function of these fields (plus the files)."""

    cfg: RunConfig
    fold: int
    fold_dir: Path
    data_root: Path
    fold_table: pd.DataFrame  # file_name,label,fold
    exclude: frozenset[int] = frozenset()  # rows known to be bad (skipped)


def fit_fold(job: FoldJob, source: ImageSource, *, resume: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one fold (resuming from ``state.pt`` when asked), write its OOF rows, return its summary."""
    cfg, fold, fdir = job.cfg, job.fold, job.fold_dir
    fdir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    labels = job.fold_table["label"].to_numpy()
    fold_col = job.fold_table["fold"].to_numpy()
    keep = np.ones(len(labels), dtype=bool)
    if job.exclude:
        keep[list(job.exclude)] = False
    train_rows = np.flatnonzero((fold_col != fold) & keep)
    val_rows = np.flatnonzero((fold_col == fold) & keep)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise UserError(f"fold {fold} has no training or validation rows; check the fold file")

    torch.manual_seed(derive_seed(cfg.seed, fold, "init"))
    model, dc = build_model(cfg)
    model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, device=device)

    fold_seed = derive_seed(cfg.seed, fold)
    workers = default_workers(device, cfg.workers)
    train_ds = ImageDataset(source, train_rows, labels[train_rows], train_transform(cfg, dc.img_size),
                            dc.img_size, seed=fold_seed)
    val_ds = ImageDataset(source, val_rows, labels[val_rows], eval_transform(cfg, dc.img_size), dc.img_size)
    eval_bs = eval_batch_size(cfg)
    val_loader = make_loader(val_ds, eval_bs, train=False, device=device, workers=workers)
    ctx = FoldContext(cfg, device, Normalizer(dc.mean, dc.std, device, cfg.channels_last and device.type == "cuda"),
                      source.describe, set())

    batches = len(train_rows) // cfg.batch_size if len(train_rows) > cfg.batch_size else 1
    steps_per_epoch = max(1, math.ceil(batches / cfg.accum_steps))
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, step, history = 0, 0, []
    best_score, best_epoch, bad_epochs = -math.inf, -1, 0
    state_path = fdir / STATE
    if state_path.exists():
        if not resume:
            raise UserError(f"{state_path} holds an interrupted fold: re-run with --resume to continue it, "
                            "or --force to start over")
        st = load_state(state_path)
        _unwrap(model).load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        if ema is not None and st.get("ema"):
            ema.module.load_state_dict(st["ema"])
        start_epoch, step, history = int(st["epoch"]) + 1, int(st["step"]), list(st["history"])
        best_score, best_epoch, bad_epochs = float(st["best_score"]), int(st["best_epoch"]), int(st["bad_epochs"])
        log(f"  fold {fold}: resuming after epoch {start_epoch} (best so far: epoch {best_epoch + 1})")

    train_model = CompileFallback(model, log) if cfg.compile and device.type == "cuda" else model
    eval_model = ema.module if ema is not None else train_model
    t_fold = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(derive_seed(cfg.seed, fold, epoch))  # dropout, drop-path: replayable on resume
        train_ds.set_epoch(epoch)
        train_loader = make_loader(train_ds, cfg.batch_size, train=True, device=device, workers=workers,
                                   seed=derive_seed(cfg.seed, fold, epoch, "order"))
        t0 = time.perf_counter()
        try:
            tr, step = train_one_epoch(train_model, train_loader, optimizer, ctx, epoch=epoch, step=step,
                                       total_steps=total_steps, scaler=scaler, ema=ema, progress=progress)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"fold {fold}: {e}") from None
        _, vy, vp = evaluate(eval_model, val_loader, ctx)
        vm = _val_metrics(vy, vp)
        row = {"epoch": epoch + 1, **{k: tr[k] for k in ("train_loss", "lr", "img_s")}, **vm,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        score = _score(vm, cfg.select)
        improved = cfg.select == "last" or score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            save_weights(eval_model, fdir / BEST)
        else:
            bad_epochs += 1
        write_csv(fdir / METRICS, pd.DataFrame(history), float_format="%.6g")
        _save_state(state_path, {
            "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else {}, "ema": ema.module.state_dict() if ema else {},
            "epoch": epoch, "step": step, "history": history, "best_score": best_score,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs,
        })
        mark = " *" if improved else ""
        log(f"  fold {fold} epoch {epoch + 1}/{cfg.epochs}: train_loss {tr['train_loss']:.4f}  "
            f"val_loss {vm['val_loss']:.4f}  acc {vm['val_acc']:.4f}  f1 {vm['val_f1']:.4f}  "
            f"auc {vm['val_auc']:.4f}  {tr['img_s']:.0f} img/s  {row['seconds']:.1f}s{mark}")
        if cfg.early_stop and bad_epochs >= cfg.early_stop:
            log(f"  fold {fold}: early stop after epoch {epoch + 1} ({cfg.early_stop} epochs without improvement)")
            break

    # Out-of-fold rows from the best weights (re-evaluated: exact even after a resume).
    load_weights(eval_model, fdir / BEST)
    rows, vy, vp = evaluate(eval_model, val_loader, ctx, progress=progress, desc="oof")
    names = job.fold_table["file_name"].to_numpy()
    oof = pd.DataFrame({"file_name": names[rows], "label": vy, "fold": fold, "prob": vp})
    write_csv(fdir / FOLD_OOF, oof, float_format="%.8g")
    if ctx.skipped:
        write_csv(fdir / "skipped.csv", pd.DataFrame({"file_name": names[sorted(ctx.skipped)]}))
    best = history[best_epoch] if 0 <= best_epoch < len(history) else history[-1]
    summary = {
        "fold": fold, "best_epoch": best["epoch"], "epochs_run": len(history), "val_f1": best["val_f1"],
        "val_acc": best["val_acc"], "val_loss": best["val_loss"], "val_auc": best["val_auc"],
        "minutes": sum(h["seconds"] for h in history) / 60, "n_train": int(len(train_rows)),
        "n_val": int(len(oof)), "skipped": sorted(names[sorted(ctx.skipped)].tolist()),
        "wall_minutes_this_process": (time.perf_counter() - t_fold) / 60,
    }
    write_json(fdir / DONE, summary)
    state_path.unlink(missing_ok=True)  # the fold is finished: its resume state is no longer needed
    return summary
