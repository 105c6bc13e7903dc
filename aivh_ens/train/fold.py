"""One (run, fold) job: set up, resume, train the epochs, write the fold's files (``done.json`` last).

A :class:`FoldJob` is a pure function of its frozen config and fold index; it writes only under
``runs/<run>/fold<k>/``."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from aivh_ens import faults, fence
from aivh_ens.config import RunConfig
from aivh_ens.data.loader import (
    ImageDataset,
    ImageSource,
    Normalizer,
    default_workers,
    derive_seed,
    make_loader,
)
from aivh_ens.data.transforms import eval_transform, train_transform
from aivh_ens.errors import TrainingDiverged, UserError
from aivh_ens.io import write_csv, write_json
from aivh_ens.layout import DONE
from aivh_ens.system import seconds_to_deadline
from aivh_ens.train.loop import (
    BEST,
    METRICS,
    STATE,
    CompileFallback,
    FoldContext,
    _check_batch,
    _save_state,
    _score,
    _unwrap,
    _val_metrics,
    commit_best,
    create_optimizer,
    eval_batch_size,
    evaluate,
    load_state,
    load_weights,
    resolve_device,
    settle_best,
    stage_best,
    train_one_epoch,
)
from aivh_ens.train.models import build_model
from aivh_ens.train.precision import resolve_precision, use_channels_last

FOLD_OOF = "oof.csv"


@dataclass(frozen=True)
class FoldJob:
    """One unit of work: train fold ``fold`` of a run. A pure function of these fields (plus the files)."""

    cfg: RunConfig
    fold: int
    fold_dir: Path
    data_root: Path
    fold_table: pd.DataFrame  # file_name,label,fold[,weight]; pseudo rows (fold -1) train in every fold
    exclude: frozenset[int] = frozenset()  # rows known to be bad (skipped)
    meta: dict[str, Any] = field(default_factory=dict)  # extra done.json fields (a sweep's job hash, host)


def fit_fold(
    job: FoldJob,
    source: ImageSource,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one fold (resuming from ``state.pt`` when asked), write its OOF rows, return its summary.

    Named steps: set up (model, optimizer, loaders) -> resume -> epochs -> write outputs (``done.json`` last).
    """
    job.fold_dir.mkdir(parents=True, exist_ok=True)
    with cudnn_flags_restored():
        setup = _set_up(job, source)
        state = _resume(job, setup, resume, log)
        t_fold = time.perf_counter()
        _train_epochs(job, setup, state, progress, log)
        return _write_outputs(job, setup, state, progress, time.perf_counter() - t_fold)


@dataclass
class _Setup:
    """Everything a fold trains with; made once per fold."""

    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: Any  # timm ModelEmaV3 or None
    train_ds: ImageDataset
    val_loader: Any
    ctx: FoldContext
    workers: int
    train_rows: np.ndarray  # (N_train,) row indices into the fold table
    epoch_steps: int  # optimizer steps per epoch
    dc: Any  # the model's DataConfig (input size, mean, std)

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


@dataclass
class _State:
    """Where training stands: what ``state.pt`` records after every epoch."""

    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_sha256: str | None = None  # of the best epoch's weights as written (None: not recorded)


UNCHECKED = {"val_loss": math.nan, "val_acc": math.nan, "val_f1": math.nan, "val_auc": math.nan}
"""The validation columns of an epoch that was not validated (``validate_last``)."""


def validates(cfg: RunConfig, epoch: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` (0-based) of a fold that trains ``epochs`` (:func:`planned_epochs`) is validated:
    every epoch, or with ``validate_last`` N the last N (from scratch on a cosine schedule F1 rises to the end,
    so early passes only cost time). An unvalidated epoch is never selected nor counts towards ``early_stop``."""
    return cfg.validate_last is None or epoch >= epochs - cfg.validate_last


RECENT_EPOCHS = 3  # epochs that time the next ones (recent ones: the machine's speed drifts)
OOF_PASSES = 2  # validation passes' seconds a deadline keeps for the OOF pass (hflip TTA: two views)


def planned_epochs(
    cfg: RunConfig, history: Sequence[dict[str, Any]], val_share: float, time_left: float | None = None
) -> int:
    """The epochs the fold trains, as known before its next epoch: ``cfg.epochs``, fewer under ``fold_time``
    or a deadline (at least one more), at the seconds the last :data:`RECENT_EPOCHS` epochs took.

    ``fold_time`` (seconds of passes) takes the count that ends nearest to it, so a fold ends on its time on
    average as the machine's speed drifts; ``time_left`` (seconds to a deadline) is a wall: the most epochs
    that end, with the OOF pass after them, before it. The schedule and ``validate_last`` follow the count.
    ``val_share``: a validation pass's seconds per training pass's until one was measured.
    """
    done = len(history)
    if (cfg.fold_time is None and time_left is None) or not done:
        return cfg.epochs
    train_s = statistics.mean(h["train_seconds"] for h in history[-RECENT_EPOCHS:])
    checks = [h["seconds"] - h["train_seconds"] for h in history if not math.isnan(h["val_f1"])]
    val_s = statistics.mean(checks[-RECENT_EPOCHS:]) if checks else train_s * val_share

    def seconds(more: int) -> float:  # of ``more`` epochs, their last ``validate_last`` validated
        return more * train_s + min(more, cfg.validate_last or more) * val_s

    epochs = cfg.epochs
    if cfg.fold_time is not None:
        left = cfg.fold_time - sum(h["seconds"] for h in history)
        epochs = done + 1
        for total in range(done + 2, cfg.epochs + 1):  # one more if it ends less past than one fewer is short
            if seconds(total - done) - left >= left - seconds(total - done - 1):
                break
            epochs = total
    if time_left is not None:
        wall = time_left - OOF_PASSES * val_s
        epochs = max([t for t in range(done + 1, epochs + 1) if seconds(t - done) <= wall], default=done + 1)
    return epochs


def _split_rows(job: FoldJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels (N,), train rows, validation rows)`` without the excluded (bad) rows and other folds' pseudo rows."""
    labels = job.fold_table["label"].to_numpy()
    fold_col = job.fold_table["fold"].to_numpy()
    only = job.fold_table.get("only_fold", pd.Series(-1, index=job.fold_table.index)).to_numpy()
    keep = (only == -1) | (only == job.fold)  # fold-consistent pseudo rows train in their own fold only
    if job.exclude:
        keep[list(job.exclude)] = False
    train_rows = np.flatnonzero((fold_col != job.fold) & keep)
    val_rows = np.flatnonzero((fold_col == job.fold) & keep)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise UserError(f"fold {job.fold} has no training or validation rows; check the fold file")
    return labels, train_rows, val_rows


def _set_up(job: FoldJob, source: ImageSource) -> _Setup:
    """The device settings, the model (seeded per fold), optimizer, scaler, EMA, datasets and loaders."""
    cfg = job.cfg
    device = _use_device(cfg)
    labels, train_rows, val_rows = _split_rows(job)
    torch.manual_seed(derive_seed(cfg.seed, job.fold, "init"))
    model, dc = build_model(cfg)
    model.to(device)
    channels_last = use_channels_last(cfg.channels_last, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg, model)
    precision = resolve_precision(cfg.amp, device)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        # warm-up: the decay ramps up over the first steps, so the EMA does not average in the random start
        ema = ModelEmaV3(model, decay=cfg.ema_decay, device=device, use_warmup=True)
    workers = default_workers(device, cfg.workers)
    train_ds = ImageDataset(
        source,
        train_rows,
        labels[train_rows],
        train_transform(cfg, dc.img_size),
        dc.img_size,
        seed=derive_seed(cfg.seed, job.fold),
    )
    val_ds = ImageDataset(source, val_rows, labels[val_rows], eval_transform(cfg, dc.img_size), dc.img_size)
    val_loader = make_loader(val_ds, eval_batch_size(cfg), train=False, device=device, workers=workers)
    ctx = FoldContext(
        cfg, device, Normalizer(dc.mean, dc.std, device, channels_last), source.describe, set(), precision.amp,
        row_weights(job.fold_table),
    )  # fmt: skip
    batches = len(train_rows) // cfg.batch_size if len(train_rows) > cfg.batch_size else 1
    epoch_steps = max(1, math.ceil(batches / cfg.accum_steps))
    return _Setup(
        device,
        model,
        optimizer,
        precision.scaler(),
        ema,
        train_ds,
        val_loader,
        ctx,
        workers,
        train_rows,
        epoch_steps,
        dc,
    )


def row_weights(table: pd.DataFrame) -> torch.Tensor | None:
    """(N,) float32 loss weights of a training table's rows (its ``weight`` column: pseudo-labelled runs), or
    None when every row weighs 1, so a plain run computes exactly the unweighted loss."""
    if "weight" not in table.columns:
        return None
    w = table["weight"].to_numpy(np.float32)
    return None if bool((w == 1).all()) else torch.from_numpy(w)


def _use_device(cfg: RunConfig) -> torch.device:
    """The fold's device, made current (``cuda:N``), with the cuDNN flags the config asks for; a fresh
    compile cache (dynamo's guards and recompile counts would otherwise carry over from the last fold)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels, caches and streams on this GPU, not on cuda:0
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
    if cfg.compile:
        torch._dynamo.reset()
    return device


@contextlib.contextmanager
def cudnn_flags_restored() -> Iterator[None]:
    """cuDNN's global flags as they were before the block (a job must not change the next job's)."""
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def _resume(job: FoldJob, s: _Setup, resume: bool, log: Callable[[str], None]) -> _State:
    """A fresh state, or the one in ``state.pt`` (with the model, optimizer, scaler and EMA restored)."""
    state_path = job.fold_dir / STATE
    if not state_path.exists():
        settle_best(job.fold_dir, None)
        return _State()
    if not resume:
        raise UserError(
            f"{state_path} holds an interrupted fold: re-run with --resume to continue it, "
            "or --force to start over"
        )
    st = load_state(state_path)
    settle_best(job.fold_dir, int(st["best_epoch"]))
    _unwrap(s.model).load_state_dict(st["model"])
    s.optimizer.load_state_dict(st["optimizer"])
    if s.scaler is not None and st.get("scaler"):
        s.scaler.load_state_dict(st["scaler"])
    if s.ema is not None and st.get("ema"):
        s.ema.module.load_state_dict(st["ema"])
    state = _State(
        int(st["epoch"]) + 1,
        int(st["step"]),
        list(st["history"]),
        float(st["best_score"]),
        int(st["best_epoch"]),
        int(st["bad_epochs"]),
        st.get("best_sha256"),
    )
    log(
        f"  fold {job.fold}: resuming after epoch {state.start_epoch} (best so far: epoch {state.best_epoch + 1})"
    )
    return state


def _train_epochs(job: FoldJob, s: _Setup, state: _State, progress: bool, log: Callable[[str], None]) -> None:
    """Epochs from ``state.start_epoch``: train, validate, keep the best weights, save the resume state."""
    cfg, fold = job.cfg, job.fold
    train_model = CompileFallback(s.model, log) if cfg.compile else s.model
    eval_model = s.eval_model  # uncompiled: no recompile for eval mode or the last partial batch
    val_share = len(s.val_loader.dataset) / max(1, len(s.train_rows)) / 3
    for epoch in range(state.start_epoch, cfg.epochs):
        epochs = planned_epochs(cfg, state.history, val_share, seconds_to_deadline())
        torch.manual_seed(derive_seed(cfg.seed, fold, epoch))  # dropout, drop-path: replayable on resume
        s.train_ds.set_epoch(epoch)
        train_loader = make_loader(
            s.train_ds,
            cfg.batch_size,
            train=True,
            device=s.device,
            workers=s.workers,
            seed=derive_seed(cfg.seed, fold, epoch, "order"),
        )
        t0 = time.perf_counter()
        try:
            tr, state.step = train_one_epoch(
                train_model,
                train_loader,
                s.optimizer,
                s.ctx,
                epoch=epoch,
                step=state.step,
                total_steps=s.epoch_steps * epochs,
                scaler=s.scaler,
                ema=s.ema,
                progress=progress,
            )
        except TrainingDiverged as e:
            raise TrainingDiverged(f"fold {fold}: {e}") from None
        checked = validates(cfg, epoch, epochs)
        vm = _val_metrics(*evaluate(eval_model, s.val_loader, s.ctx)[1:]) if checked else dict(UNCHECKED)
        row = {
            "epoch": epoch + 1,
            **{k: tr[k] for k in ("train_loss", "lr", "img_s")},
            **vm,
            "train_seconds": tr["train_seconds"],
            "seconds": time.perf_counter() - t0,
        }
        improved = _record_epoch(job, s, state, epoch, row, eval_model, checked)
        faults.point("epoch-done")
        if _epoch_done(job, state, row, epochs, checked, improved, log):
            break


def _epoch_done(
    job: FoldJob,
    state: _State,
    row: dict[str, Any],
    epochs: int,
    checked: bool,
    improved: bool,
    log: Callable[[str], None],
) -> bool:
    """Log the epoch ``row`` of a fold planned for ``epochs``; True (with the reason logged) when it is the last:
    early stopping, or the end of a plan cut short by ``fold_time``."""
    cfg, fold, epoch = job.cfg, job.fold, row["epoch"]
    val = (
        f"val_loss {row['val_loss']:.4f}  acc {row['val_acc']:.4f}  f1 {row['val_f1']:.4f}  auc {row['val_auc']:.4f}"
        if checked
        else f"(validated in the last {cfg.validate_last} epochs)"
    )
    log(
        f"  fold {fold} epoch {epoch}/{epochs}: train_loss {row['train_loss']:.4f}  {val}  "
        f"{row['img_s']:.0f} img/s  {row['seconds']:.1f}s{' *' if improved else ''}"
    )
    if cfg.early_stop and state.bad_epochs >= cfg.early_stop:
        log(f"  fold {fold}: early stop after epoch {epoch} ({cfg.early_stop} epochs without improvement)")
        return True
    if epoch < epochs:
        return False
    if epochs < cfg.epochs:
        limit = f"--fold-time {cfg.fold_time:g}s" if cfg.fold_time is not None else "the deadline"
        log(f"  fold {fold}: {epochs} epochs fit {limit} (of at most {cfg.epochs})")
    return True


def _record_epoch(
    job: FoldJob,
    s: _Setup,
    state: _State,
    epoch: int,
    row: dict[str, Any],
    eval_model: torch.nn.Module,
    checked: bool,
) -> bool:
    """Book one finished epoch: best weights when it improved, metrics.csv, then state.pt; True if improved."""
    cfg, fdir = job.cfg, job.fold_dir
    state.history.append(row)
    score = _score(row, cfg.select) if checked else -math.inf
    improved = cfg.select == "last" or (checked and score > state.best_score)
    if improved:
        state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
        # best.safetensors itself changes once state.pt says so
        state.best_sha256 = stage_best(eval_model, fdir, epoch)
    elif checked:
        state.bad_epochs += 1
    write_csv(fdir / METRICS, pd.DataFrame(state.history), float_format="%.6g")
    _save_state(
        fdir / STATE,
        {
            "model": _unwrap(s.model).state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler else {},
            "ema": s.ema.module.state_dict() if s.ema else {},
            "epoch": epoch,
            "step": state.step,
            "history": state.history,
            "best_score": state.best_score,
            "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs,
            "best_sha256": state.best_sha256,
            "generation": fence.read_fence(fdir).get("generation"),  # the lock holder that wrote it
        },
    )
    if improved:
        commit_best(fdir, epoch)
    return improved


def oof_scores(
    job: FoldJob, s: _Setup, model: torch.nn.Module, spec: Any, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, labels, P(label 1), P(label 1) with the views averaged as logits)`` of the fold's validation
    rows through the run's own TTA views ``spec``, by submit's code, averaged both ways submit may average them
    (:func:`aivh_ens.blend.core.view_average`): the blend and threshold are fitted on the scores they cut (a
    threshold fitted on single-view scores sat 0.07 above the best one for hflip-averaged ones on cifake-dev)."""
    from aivh_ens.score.runs import predict_fold_averages

    val = s.val_loader.dataset  # the validation rows, their labels and the image source
    model.eval()
    Ps, bad = predict_fold_averages(
        [model], s.dc, job.cfg, val.source, val.rows, spec, s.device,
        batch_size=eval_batch_size(job.cfg), workers=s.workers, progress=progress, desc="oof",
    )  # fmt: skip
    keep = ~np.isnan(Ps["prob"][0])
    if bad:
        _check_batch(s.ctx, torch.from_numpy(val.rows), torch.from_numpy(keep))
    p, p_logit = (Ps[a][0, keep].astype(np.float64) for a in ("prob", "logit"))
    return val.rows[keep], val.labels[keep], p, p_logit


def _write_outputs(job: FoldJob, s: _Setup, state: _State, progress: bool, seconds: float) -> dict[str, Any]:
    """OOF rows from the best weights (re-scored: exact even after a resume), then done.json, last."""
    from aivh_ens.score.tta import own_spec

    fdir, history = job.fold_dir, state.history
    eval_model = s.eval_model
    load_weights(eval_model, fdir / BEST)
    spec = own_spec(job.cfg)
    rows, vy, vp, vp_logit = oof_scores(job, s, eval_model, spec, progress)
    names = job.fold_table["file_name"].to_numpy()
    oof = pd.DataFrame({"file_name": names[rows], "label": vy, "fold": job.fold, "prob": vp,
                        **({"prob_logit": vp_logit} if spec.n_views > 1 else {})})  # fmt: skip
    digests: dict[str, str] = {}
    write_csv(fdir / FOLD_OOF, oof, float_format="%.8g", digests=digests)
    if s.ctx.skipped:
        write_csv(fdir / "skipped.csv", pd.DataFrame({"file_name": names[sorted(s.ctx.skipped)]}))
    best = history[state.best_epoch] if 0 <= state.best_epoch < len(history) else history[-1]
    summary = {
        "fold": job.fold,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "val_f1": best["val_f1"],
        "val_acc": best["val_acc"],
        "val_loss": best["val_loss"],
        "val_auc": best["val_auc"],
        "minutes": sum(h["seconds"] for h in history) / 60,
        "n_train": int(len(s.train_rows)),
        "n_pseudo": int((job.fold_table["fold"].to_numpy()[s.train_rows] < 0).sum()),
        "n_val": int(len(oof)),
        "oof_tta": spec.name,
        "skipped": sorted(names[sorted(s.ctx.skipped)].tolist()),
        "wall_minutes_this_process": seconds / 60,
        **job.meta,
        # what readers check: they refuse a file that a late write replaced
        **fence.vouch(fdir, {BEST: state.best_sha256, **digests}),
    }
    write_json(fdir / DONE, summary)
    (fdir / STATE).unlink(missing_ok=True)  # the fold is finished: its resume state is no longer needed
    return summary
