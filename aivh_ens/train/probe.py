"""Probe runs (``cv --head linear|mlp``): a head per fold on frozen-backbone features.

The features of every train image are extracted once into the feature store (:mod:`aivh_ens.train.features`);
each fold then fits its head on the other folds' rows only and scores its own rows:

- ``linear``: L2 logistic regression (scikit-learn) on standardised features, C picked from
  :data:`C_GRID` by log loss in an inner cross-validation over the training folds only (grouped by the run's
  ``--group`` when it has one). The standardisation is fitted on the training folds too.
- ``mlp``: ``--head-hidden`` layers (default :data:`MLP_HIDDEN`) with ReLU and ``--head-dropout``, trained for
  :data:`MLP_EPOCHS` epochs of AdamW (``--lr``, ``--weight-decay``) on the standardised features.

A fold writes the files a fine-tuned fold writes (``best.safetensors`` holding the head, ``metrics.csv``,
``oof.csv``, ``done.json`` last), under the same lock, so blend, submit, predict and status treat the run
like any other. At inference the heads are scored by
:mod:`aivh_ens.score.probe`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from aivh_ens import fence
from aivh_ens.config import RunConfig
from aivh_ens.data.loader import derive_seed
from aivh_ens.errors import UserError
from aivh_ens.io import write_csv, write_json
from aivh_ens.layout import features_dir
from aivh_ens.score.probe import ProbeHead, head_hidden, probe_probs
from aivh_ens.train.features import FeatureStore, ensure_features
from aivh_ens.train.fold import DONE, FOLD_OOF, FoldJob, _split_rows
from aivh_ens.train.loop import BEST, METRICS, _val_metrics, resolve_device, save_weights

Log = Callable[[str], None]

C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse L2 strengths the linear head's inner CV chooses from."""
INNER_FOLDS = 3  # 3 x 5 fits + 1 refit per fold: the C choice is stable, the fits are the cost
MLP_EPOCHS = 50
MLP_BATCH = 256


def is_probe(cfg: RunConfig) -> bool:
    """True for a frozen-feature probe run (``--head linear|mlp``)."""
    return cfg.head != "finetune"


# ---- fitting the heads ----------------------------------------------------------------------------------


def _standardised(X: np.ndarray, head: ProbeHead) -> np.ndarray:
    """Set ``head``'s standardisation from ``X`` (N, D) and return the standardised float64 features."""
    X = np.asarray(X, dtype=np.float64)
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)  # constant features: leave them at 0
    head.mean.copy_(torch.from_numpy(mean))
    head.scale.copy_(torch.from_numpy(scale))
    return (X - mean) / scale


def inner_splits(y: np.ndarray, groups: np.ndarray | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner folds over the training rows only (:func:`aivh_ens.data.folds.group_splits`): stratified, or
    whole groups to random folds when ``groups`` is given."""
    from aivh_ens.data.folds import group_splits

    k = int(min(INNER_FOLDS, np.bincount(y, minlength=2).min()))
    if k < 2:
        raise UserError("a probe head needs at least 2 training rows of each class in every fold")
    return group_splits(y, groups, k, seed)


def fit_linear(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int, weights: np.ndarray | None = None
) -> tuple[ProbeHead, dict[str, float]]:
    """Logistic regression on standardised ``X`` (N, D); C by inner CV (log loss), refitted on all N rows;
    ``weights`` (N,): per-row sample weights (pseudo-labelled rows)."""
    from sklearn.linear_model import LogisticRegressionCV

    head = ProbeHead(X.shape[1])
    Z = _standardised(X, head)
    params = inspect.signature(LogisticRegressionCV).parameters
    # scikit-learn >= 1.8 warns unless the plain-L2 choices are spelled out; older versions lack the names.
    extra = {k: v for k, v in (("l1_ratios", (0.0,)), ("use_legacy_attributes", False)) if k in params}
    lr = LogisticRegressionCV(
        Cs=list(C_GRID),
        cv=inner_splits(y, groups, seed),
        scoring="neg_log_loss",
        max_iter=1000,
        random_state=seed,
        **extra,
    )
    lr.fit(Z, y, sample_weight=weights)
    with torch.no_grad():
        head.net[-1].weight.copy_(torch.from_numpy(lr.coef_.astype(np.float32).reshape(1, -1)))  # (1, D)
        head.net[-1].bias.copy_(torch.from_numpy(np.ravel(lr.intercept_).astype(np.float32)))
    return head, {"C": float(np.ravel(lr.C_)[0])}


def fit_mlp(
    X: np.ndarray,
    y: np.ndarray,
    cfg: RunConfig,
    seed: int,
    device: torch.device,
    weights: np.ndarray | None = None,
) -> tuple[ProbeHead, dict[str, float]]:
    """An MLP head on standardised ``X`` (N, D): MLP_EPOCHS of AdamW with BCE (a weighted mean with
    ``weights`` (N,)), seeded."""
    torch.manual_seed(seed)
    head = ProbeHead(X.shape[1], head_hidden(cfg), cfg.head_dropout)
    Z = torch.from_numpy(_standardised(X, head).astype(np.float32)).to(device)
    t = torch.from_numpy(y.astype(np.float32)).to(device)
    wt = torch.from_numpy((np.ones(len(y)) if weights is None else weights).astype(np.float32)).to(device)
    head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(MLP_EPOCHS):
        for idx in torch.randperm(len(Z), generator=gen).split(MLP_BATCH):
            idx = idx.to(device)
            # Standardisation is already applied: bypass it by calling the layers directly.
            per = nn.functional.binary_cross_entropy_with_logits(
                head.net(Z[idx])[:, 0], t[idx], reduction="none"
            )
            loss = (per * wt[idx]).sum() / wt[idx].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.cpu().eval(), {"final_batch_loss": float(loss.detach())}


# ---- one probe fold -------------------------------------------------------------------------------------


def _fit_head(
    job: FoldJob, X: np.ndarray, labels: np.ndarray, rows: np.ndarray, groups: np.ndarray | None
) -> tuple[ProbeHead, dict[str, float], float]:
    """The fold's head fitted on features ``X[rows]`` only, its fit details and the seconds it took."""
    cfg = job.cfg
    seed = derive_seed(cfg.seed, job.fold, "head")
    w = job.fold_table["weight"].to_numpy(np.float64)[rows] if "weight" in job.fold_table.columns else None
    t0 = time.perf_counter()
    if cfg.head == "linear":
        g = None if groups is None else np.asarray(groups)[rows]
        head, info = fit_linear(X[rows], labels[rows], g, seed, w)
    else:
        head, info = fit_mlp(X[rows], labels[rows], cfg, seed, resolve_device(cfg.device), w)
    return head, info, time.perf_counter() - t0


def fit_probe_fold(
    job: FoldJob,
    store: FeatureStore,
    *,
    groups: np.ndarray | None = None,
    resume: bool = False,
    progress: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Fit fold ``job.fold``'s head on the other folds' features; write the fold's files, ``done.json`` last.

    ``resume`` and ``progress`` are accepted for the fold-job signature: a head takes seconds, so an
    interrupted probe fold is simply fitted again.
    """
    cfg, fdir = job.cfg, job.fold_dir
    fdir.mkdir(parents=True, exist_ok=True)
    labels, train_rows, val_rows = _split_rows(job)
    X = store.features  # (N, D) float16
    head, info, seconds = _fit_head(job, X, labels, train_rows, groups)
    p_train, p_val = probe_probs(head, X[train_rows]), probe_probs(head, X[val_rows])  # (N_train,), (N_val,)
    vm = _val_metrics(labels[val_rows], p_val)
    row = {
        "epoch": 1,
        "train_loss": _val_metrics(labels[train_rows], p_train)["val_loss"],
        "lr": cfg.lr if cfg.head == "mlp" else float("nan"),
        "img_s": len(train_rows) / max(seconds, 1e-9),
        **vm,
        "seconds": seconds,
        "head": cfg.head,
        **info,
    }
    digests: dict[str, str] = {}
    save_weights(head, fdir / BEST, digests)
    write_csv(fdir / METRICS, pd.DataFrame([row]), float_format="%.6g")
    names = job.fold_table["file_name"].to_numpy()
    oof = pd.DataFrame(
        {"file_name": names[val_rows], "label": labels[val_rows], "fold": job.fold, "prob": p_val}
    )
    write_csv(fdir / FOLD_OOF, oof, float_format="%.8g", digests=digests)
    c = f" (C={info['C']:g}, chosen by inner CV)" if "C" in info else ""
    log(
        f"  fold {job.fold}: {cfg.head} head{c} fit in {seconds:.2f}s on {len(train_rows)} rows; "
        f"val f1 {vm['val_f1']:.4f}  auc {vm['val_auc']:.4f}  loss {vm['val_loss']:.4f}"
    )
    summary = {
        "fold": job.fold,
        "best_epoch": 1,
        "epochs_run": 1,
        **{k: vm[k] for k in ("val_f1", "val_acc", "val_loss", "val_auc")},
        "minutes": seconds / 60,
        "n_train": int(len(train_rows)),
        "n_val": int(len(val_rows)),
        "skipped": sorted(names[sorted(job.exclude)].tolist()),
        "wall_minutes_this_process": seconds / 60,
        "head": cfg.head,
        "head_seconds": seconds,
        **info,
        **job.meta,
        **fence.vouch(fdir, digests),  # readers refuse a file that a late write replaced
    }
    write_json(fdir / DONE, summary)
    return summary


# ---- the probe run --------------------------------------------------------------------------------------


def _bad_rows(cfg: RunConfig, store: FeatureStore, bad: dict[int, str]) -> frozenset[int]:
    """Rows to leave out: the scan's plus those the extraction could not decode (an error unless skipped)."""
    extra = {i: r for i, r in store.bad.items() if i not in bad}
    if extra and cfg.on_bad_image == "error":
        first = min(extra)
        raise UserError(
            f"{len(extra)} train image(s) could not be decoded for features; first: {extra[first]}; "
            "replace it, or pass --on-bad-image skip"
        )
    return frozenset(bad) | frozenset(extra)


def run_probe_cv(
    cfg: RunConfig,
    workdir: str | Path = ".",
    *,
    fold_spec: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Log = print,
    pseudo: Any = None,
) -> Any:
    """:func:`aivh_ens.train.cv.run_cv` for a probe run: check, prepare the run, extract (or reuse) the
    train features (and the pseudo-labelled test images' with ``pseudo``, a checked
    :class:`~aivh_ens.train.pseudo.PseudoSource`), fit the requested folds' heads, assemble the OOF.
    Returns a ``CVResult``."""
    from aivh_ens.data.cache import open_source
    from aivh_ens.train.cv import check_inputs, finish_run, prepare_run, run_fold
    from aivh_ens.train.pseudo import training_table

    workdir = Path(workdir)
    folds_to_run, table, bad = check_inputs(cfg, fold_spec, workdir)
    fold_table = prepare_run(cfg, workdir, table, bad, folds_to_run, force, log, pseudo)
    train_table = training_table(cfg, workdir, fold_table)  # + pseudo rows (fold -1)
    names = train_table["file_name"].tolist()
    root = Path(cfg.data)

    def images(size: int) -> Any:
        return open_source(cfg, root, names, workdir, img_size=size, progress=progress, log=log)

    device = resolve_device(cfg.device)
    store = ensure_features(
        cfg, root, names, features_dir(workdir), images, device, progress=progress, log=log
    )
    exclude = _bad_rows(cfg, store, bad)
    groups = train_table["group"].to_numpy() if "group" in train_table.columns else None
    fit = functools.partial(fit_probe_fold, groups=groups)
    summaries = [
        run_fold(
            cfg, k, workdir, train_table, exclude, store, resume=resume, progress=progress, log=log, fit=fit
        )
        for k in folds_to_run
    ]
    return finish_run(cfg, workdir, fold_table, set(exclude), summaries, log)


def fit_probe_job(
    job: FoldJob, workdir: str | Path, groups: np.ndarray | None, *, log: Log = print
) -> dict[str, Any]:
    """One probe fold as a standalone job (a sweep backend's): the run's feature store (built by whichever job
    gets its lock first, read by the others), then the fold's head."""
    from aivh_ens.data.cache import open_source

    cfg = job.cfg
    names = job.fold_table["file_name"].tolist()

    def images(size: int) -> Any:
        return open_source(cfg, job.data_root, names, workdir, img_size=size, progress=False, log=log)

    device = resolve_device(cfg.device)
    store = ensure_features(
        cfg, job.data_root, names, features_dir(workdir), images, device, progress=False, log=log
    )
    exclude = _bad_rows(cfg, store, dict.fromkeys(job.exclude, ""))
    return fit_probe_fold(dataclasses.replace(job, exclude=exclude), store, groups=groups, log=log)
