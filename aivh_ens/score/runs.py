"""A trained run's fold models scoring images: check the run, load its fold weights, predict with TTA, average
views and folds in the blend's space. The OOF pass of a fold job and submit, predict and serve all score here."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aivh_ens import faults
from aivh_ens.blend.core import blend
from aivh_ens.blend.core import view_average as core_view_average
from aivh_ens.config import RunConfig
from aivh_ens.data.loader import ImageSource, Normalizer, default_workers, make_loader
from aivh_ens.errors import UserError
from aivh_ens.fence import unvouched
from aivh_ens.io import sha256_file
from aivh_ens.layout import DONE, run_dir
from aivh_ens.layout import read_run_config as load_run
from aivh_ens.score.tta import TTADataset, TTASpec, effective_spec, parse_tta, score_views
from aivh_ens.train.loop import BEST, eval_batch_size, load_weights, progress_bar
from aivh_ens.train.models import DataConfig, build_model
from aivh_ens.train.precision import inference_amp, inference_channels_last

Log = Callable[[str], None]

AVERAGES: tuple[str, ...] = ("prob", "logit")
"""How TTA views (and fold models) can be averaged: mean probability, or sigmoid of the mean logit."""


@dataclass(frozen=True)
class RunInfo:
    """A finished run: its config, config.json document and one weights file per fold (with its sha256)."""

    name: str
    cfg: RunConfig
    doc: dict[str, Any]
    weights: tuple[Path, ...]
    weights_sha256: tuple[str, ...]  # of each fold's weights, checked against its done.json
    oof_tta: str = "none"  # the TTA its OOF rows were scored with (fold 0's done.json; older runs: one view)


def check_run(workdir: str | Path, name: str) -> RunInfo:
    """The run's config and fold weights; UserError naming the run/fold and the fix if any is missing."""
    cfg, doc = load_run(Path(workdir), name)
    rdir = run_dir(Path(workdir), name)
    weights = []
    for k in range(cfg.folds):
        w, done = rdir / f"fold{k}" / BEST, rdir / f"fold{k}" / DONE
        if not (w.is_file() and done.is_file()):
            raise UserError(
                f"run {name}: fold {k} has no finished weights ({w}); finish it with "
                f"`aivh-ens cv --name {name} --resume ...` (the run's own options), or re-fit the blend "
                "without it (`aivh-ens blend --runs ...`)"
            )
        weights.append(w)
    digests = tuple(_vouched_digest(name, k, w) for k, w in enumerate(weights))
    oof_tta = json.loads((rdir / "fold0" / DONE).read_text()).get("oof_tta", "none")
    return RunInfo(name, cfg, doc, tuple(weights), digests, oof_tta)


def _vouched_digest(run: str, k: int, weights: Path) -> str:
    """The sha256 of a fold's weights, which must be the file its done.json vouches for."""
    digest = sha256_file(weights)
    why = unvouched(weights.parent, json.loads((weights.parent / DONE).read_text()), weights.name, digest)
    if why:
        raise UserError(
            f"run {run}: fold {k}: {why}; retrain it: `aivh-ens cv --name {run} --fold {k} --force ...`"
        )
    return digest


def load_models(info: RunInfo, device: torch.device) -> tuple[list[nn.Module], DataConfig]:
    """Build the run's architecture once per fold and load that fold's weights (eval mode, on ``device``)."""
    if info.cfg.head != "finetune":  # a probe run: its frozen backbone, then one head per fold
        from aivh_ens.score.probe import load_probe_models

        return load_probe_models(info.cfg, info.weights, device)
    # The fold weights replace everything: no pretrained download, no --weights file needed here.
    cfg = dataclasses.replace(info.cfg, pretrained=False, weights=None)
    models, dc = [], None
    for path in info.weights:
        model, dc = build_model(cfg)
        try:
            load_weights(model, path)
        except (RuntimeError, OSError) as e:
            raise UserError(
                f"cannot load {path} into {cfg.model} ({str(e).splitlines()[0][:160]}); "
                f"re-train the fold with `aivh-ens cv --name {info.name} --force ...`"
            ) from None
        model.eval().to(device)
        if inference_channels_last(cfg, device):
            model.to(memory_format=torch.channels_last)
        models.append(model)
    assert dc is not None  # a run has at least two folds
    return models, dc


def predict_folds(
    models: Sequence[nn.Module],
    dc: DataConfig,
    cfg: RunConfig,
    source: ImageSource,
    rows: Sequence[int],
    spec: TTASpec,
    device: torch.device,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "test",
    average: str = "prob",
) -> tuple[np.ndarray, dict[int, str]]:
    """P(label 1) of each row under each fold model, averaged over the TTA views (``average``: their mean
    probability, or the sigmoid of their mean logit for logit-space blends, :func:`view_average`).

    :func:`predict_fold_averages` gives both averages of one pass (what a fold's OOF rows need).

    Args:
        models: the K fold models of one run (:func:`load_models`).
        dc, cfg: the run's data config and run config (preprocessing, AMP, channels_last).
        source: the images; ``rows`` index into it.
        spec: the TTA spec (:func:`aivh_ens.score.tta.effective_spec` for this run).
        batch_size: model inputs (images x views) per forward pass; default the run's evaluation batch.
        workers: DataLoader workers; default one per core (up to 8) on CUDA, none on CPU.

    Returns:
        ``(P, bad)``: P (K, N) float32 probabilities (NaN for bad rows) and ``{position: reason}`` for the
        images that could not be decoded.
    """
    Ps, bad = predict_fold_averages(
        models, dc, cfg, source, rows, spec, device, batch_size=batch_size, workers=workers,
        progress=progress, desc=desc, averages=(average,),
    )  # fmt: skip
    return Ps[average], bad


def predict_fold_averages(
    models: Sequence[nn.Module],
    dc: DataConfig,
    cfg: RunConfig,
    source: ImageSource,
    rows: Sequence[int],
    spec: TTASpec,
    device: torch.device,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "test",
    averages: Sequence[str] = AVERAGES,
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """:func:`predict_folds` with the TTA views averaged each way of ``averages`` from one pass:
    ``({average: P (K, N)}, bad)``. A fold's OOF rows keep both, so a blend in either space is fitted on its
    rows' views averaged the way submit averages the test images' views for it."""
    spec = effective_spec(spec, cfg)
    bs = batch_size or eval_batch_size(cfg)
    ds = TTADataset(source, rows, cfg, dc.img_size, spec.crops)
    loader = make_loader(
        ds,
        max(1, bs // spec.n_views),
        train=False,
        device=device,  # type: ignore[arg-type]
        workers=default_workers(device, workers if workers is not None else cfg.workers),
    )
    channels_last = inference_channels_last(cfg, device)
    amp = inference_amp(cfg, device)  # by this device (on the CPU, a forced bf16 run's own precision)
    normalize = Normalizer(dc.mean, dc.std, device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    P = np.full((len(averages), len(models), len(ds)), np.nan, dtype=np.float32)  # (A, K, N)
    done: list[tuple[np.ndarray, torch.Tensor]] = []  # (positions, (A, K, B) probs on the device) per batch
    bad: dict[int, str] = {}
    for x, pos, ok, reasons in progress_bar(loader, desc, progress):
        faults.point("infer-batch")
        bad.update({int(i): r for i, r, good in zip(pos, reasons, ok, strict=True) if not good})
        if not bool(ok.any()):
            continue
        if not bool(ok.all()):  # masking copies the batch out of pinned memory: only when needed
            x, pos = x[ok], pos[ok]
        pos = pos.numpy()  # (B,) positions; x: (B, Vc, 3, S, S) uint8
        b, vc = x.shape[:2]
        xn = normalize(x.reshape(b * vc, *x.shape[2:])).reshape(b, vc, *x.shape[2:])
        p = score_views(models, xn, spec.flip_views, amp=amp, memory_format=fmt)  # (K, B, V)
        means = torch.stack([_mean_views(p, a) for a in averages])  # (A, K, B)
        done.append((pos, means))  # copied to the host once the pass ends: no wait per batch
    if done:
        P[:, :, np.concatenate([pos for pos, _ in done])] = (
            torch.cat([p for _, p in done], dim=2).cpu().numpy()
        )
    return dict(zip(averages, P, strict=True)), bad


def view_average(space: str) -> str:
    """How TTA views and fold models are averaged for a blend in ``space``: ``logit`` for logit-space blends
    (stacks included: they are fitted on logits), else ``prob`` (:func:`aivh_ens.blend.core.view_average`)."""
    return core_view_average(space)


def fold_average(P: np.ndarray, space: str) -> np.ndarray:
    """Average fold probabilities ``P`` (K, N) into (N,) in the blend's averaging space (:func:`view_average`)."""
    return blend(P, np.ones(len(P)), view_average(space))


def _mean_views(p: torch.Tensor, average: str) -> torch.Tensor:
    """(K, B, V) view probabilities -> (K, B): their mean, or the sigmoid of their mean logit."""
    if average == "prob":
        return p.mean(dim=2)
    return torch.sigmoid(torch.logit(p.double(), eps=1e-7).mean(dim=2)).float()


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()  # not inference_mode: the running statistics are updated in place
def adapt_batchnorm(
    models: Sequence[nn.Module],
    dc: DataConfig,
    cfg: RunConfig,
    source: ImageSource,
    rows: Sequence[int],
    device: torch.device,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
) -> int:
    """Test-time BatchNorm adaptation (AdaBN, Li et al. 2016): re-estimate every BatchNorm layer's running
    mean and variance on the images ``rows`` of ``source`` (one pass, the plain view), in place.

    Only the in-memory models change; the saved fold weights do not. Returns the number of models adapted
    (0 when the architecture has no BatchNorm, e.g. ConvNeXt's LayerNorm)."""
    adapted = 0
    bns = [_batchnorms(m) for m in models]
    if not any(bns):
        return 0
    ds = TTADataset(source, rows, cfg, dc.img_size, 0)
    bs = batch_size or eval_batch_size(cfg)
    loader = make_loader(ds, bs, train=False, device=device,  # type: ignore[arg-type]
                         workers=default_workers(device, workers if workers is not None else cfg.workers))  # fmt: skip
    normalize = Normalizer(dc.mean, dc.std, device, False)
    for model, layers in zip(models, bns, strict=True):
        if not layers:
            continue
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over every test batch, not an exponential one
            bn.train()
        for x, _pos, ok, _reasons in loader:
            if bool(ok.any()):
                xs = x[ok][:, 0]  # (B, 3, S, S): the one plain view
                model(normalize(xs))
        for bn in layers:
            bn.eval()
        adapted += 1
    return adapted


def run_spec(info: RunInfo, forced: TTASpec | None, log: Log | None = None) -> TTASpec:
    """The TTA spec a run uses: ``forced`` (--tta) or the run's recipe default, minus crops it cannot take."""
    if forced is None:
        try:
            forced = parse_tta(info.cfg.tta)
        except UserError as e:
            raise UserError(
                f"run {info.name} has tta {info.cfg.tta!r} in its config.json: {e}; pass --tta"
            ) from None
    spec = effective_spec(forced, info.cfg)
    if spec != forced and log is not None:
        log(
            f"run {info.name}: resizes the whole image to its input size, so crops:{forced.crops} does not "
            f"apply; using {spec.name}"
        )
    if info.cfg.head == "finetune" and spec.name != info.oof_tta and log is not None:
        log(
            f"note: run {info.name}'s OOF rows were scored with TTA {info.oof_tta}, the test images now with "
            f"{spec.name}: the blend's weights and threshold were fitted on other scores than they cut; use "
            f"--tta {info.oof_tta}, or re-run cv with --tta {spec.name}"
        )
    unseen = unseen_views(spec, info.cfg)
    if unseen and log is not None:
        log(
            f"note: run {info.name} never saw {unseen} in training (its augmentation: hflip p={info.cfg.hflip:g}, "
            f"rotation up to {info.cfg.rotate:g} degrees); such views can lower its score: use the views it "
            "trained with (e.g. --tta hflip)"
        )
    return spec


def unseen_views(spec: TTASpec, cfg: RunConfig) -> str | None:
    """The TTA views of ``spec`` that the run's training augmentation never produced, in words, or None.

    Views outside the training distribution are not neutral: on CIFAKE, d4 TTA on runs trained with hflip
    only cost 2 F1 points against hflip (README).
    """
    views = set(spec.flip_views)
    missing = []
    if any(v.startswith(("rot", "hflip_rot")) for v in views) and cfg.rotate < 90:
        missing.append("rotated (90/180/270 degrees) or upside-down images")
    if "hflip" in views and cfg.hflip <= 0:
        missing.append("mirrored images")
    return " or ".join(missing) or None
