"""Test inference and the submission: fold models x TTA views per run (cached), the fitted blend, labels.

On disk (under the work dir): reads ``runs/blend/blend.json``, ``runs/<run>/config.json`` and
``runs/<run>/fold<k>/best.safetensors``; writes ``runs/<run>/test/<tta>.csv`` (``id,prob,fold0..``: the
run's test scores, P(label 1) per fold averaged over the TTA views, ``prob`` their mean), its sidecar
``runs/<run>/test/<tta>.json`` (the cache key: test ids with file sizes and mtimes, fold weight hashes, the
run config, the TTA spec), and ``submission.csv`` (``id,label``; with ``proba``, ``submission_proba.csv``).

The blend's weights, space and threshold are applied as fitted on the OOF rows, never re-tuned on test.
Folds are averaged in the blend's space (logit blends average fold logits; prob and rank blends average fold
probabilities, and :func:`aivh_ens.blend.apply_blend` ranks the averaged scores).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from aivh_ens import faults
from aivh_ens.blend import BLEND_DIR, apply_blend, blend, combine, load_blend
from aivh_ens.config import RunConfig, training_identity
from aivh_ens.cv import load_run, run_dir
from aivh_ens.data import BadImageError, image_size, read_test_table
from aivh_ens.errors import UserError
from aivh_ens.io import sha256_file, sha256_text, write_csv, write_json
from aivh_ens.loader import FileSource, ImageSource, Normalizer, default_workers, make_loader
from aivh_ens.models import DataConfig, build_model
from aivh_ens.train import BEST, DONE, eval_batch_size, load_weights, resolve_device
from aivh_ens.transforms import storage_step
from aivh_ens.tta import TTADataset, TTASpec, effective_spec, parse_tta, score_views

Log = Callable[[str], None]

CACHE_VERSION = 1
TEST_DIR = "test"  # runs/<run>/test/: cached test scores
RATE_WARN = 0.15  # warn when the predicted AI rate differs from the training rate by more than this


# ---- runs and models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """A finished run: its config, config.json document and one weights file per fold."""

    name: str
    cfg: RunConfig
    doc: dict[str, Any]
    weights: tuple[Path, ...]


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
    return RunInfo(name, cfg, doc, tuple(weights))


def load_models(info: RunInfo, device: torch.device) -> tuple[list[nn.Module], DataConfig]:
    """Build the run's architecture once per fold and load that fold's weights (eval mode, on ``device``)."""
    # The fold weights replace everything: no pretrained download, no --weights file needed here.
    cfg = dataclasses.replace(info.cfg, pretrained=False, weights=None)
    models, dc = [], None
    for path in info.weights:
        model, dc = build_model(cfg)
        try:
            load_weights(model, path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"cannot load {path} into {cfg.model} ({str(e).splitlines()[0][:160]}); "
                            f"re-train the fold with `aivh-ens cv --name {info.name} --force ...`") from None
        model.eval().to(device)
        if device.type == "cuda" and cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        models.append(model)
    assert dc is not None  # a run has at least two folds
    return models, dc


def predict_folds(models: Sequence[nn.Module], dc: DataConfig, cfg: RunConfig, source: ImageSource,
                  rows: Sequence[int], spec: TTASpec, device: torch.device, *, batch_size: int | None = None,
                  workers: int | None = None, progress: bool = False,
                  desc: str = "test") -> tuple[np.ndarray, dict[int, str]]:
    """P(label 1) of each row under each fold model, averaged over the TTA views.

    Args:
        models: the K fold models of one run (:func:`load_models`).
        dc, cfg: the run's data config and run config (preprocessing, AMP, channels_last).
        source: the images; ``rows`` index into it.
        spec: the TTA spec (:func:`aivh_ens.tta.effective_spec` for this run).
        batch_size: model inputs (images x views) per forward pass; default the run's evaluation batch.
        workers: DataLoader workers; default one per core (up to 8) on CUDA, none on CPU.

    Returns:
        ``(P, bad)``: P (K, N) float32 probabilities (NaN for bad rows) and ``{position: reason}`` for the
        images that could not be decoded.
    """
    spec = effective_spec(spec, cfg)
    bs = batch_size or eval_batch_size(cfg)
    ds = TTADataset(source, rows, cfg, dc.img_size, spec.crops)
    loader = make_loader(ds, max(1, bs // spec.n_views), train=False, device=device,  # type: ignore[arg-type]
                         workers=default_workers(device, workers if workers is not None else cfg.workers))
    channels_last = device.type == "cuda" and cfg.channels_last
    normalize = Normalizer(dc.mean, dc.std, device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    P = np.full((len(models), len(ds)), np.nan, dtype=np.float32)  # (K, N)
    done: list[tuple[np.ndarray, torch.Tensor]] = []  # (positions, (K, B) probs on the device) per batch
    bad: dict[int, str] = {}
    for x, pos, ok, reasons in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        faults.point("infer-batch")
        bad.update({int(i): r for i, r, good in zip(pos, reasons, ok, strict=True) if not good})
        if not bool(ok.any()):
            continue
        if not bool(ok.all()):  # masking copies the batch out of pinned memory: only when needed
            x, pos = x[ok], pos[ok]
        pos = pos.numpy()  # (B,) positions; x: (B, Vc, 3, S, S) uint8
        b, vc = x.shape[:2]
        xn = normalize(x.reshape(b * vc, *x.shape[2:])).reshape(b, vc, *x.shape[2:])
        p = score_views(models, xn, spec.flip_views, amp=cfg.amp, memory_format=fmt)  # (K, B, V)
        done.append((pos, p.mean(dim=2)))  # copied to the host once the pass ends: no wait per batch
    if done:
        P[:, np.concatenate([pos for pos, _ in done])] = torch.cat([p for _, p in done], dim=1).cpu().numpy()
    return P, bad


def fold_average(P: np.ndarray, space: str) -> np.ndarray:
    """Average fold probabilities ``P`` (K, N) into (N,): in logit space for logit blends, else their mean."""
    return blend(P, np.ones(len(P)), "logit" if space == "logit" else "prob")


# ---- cache -----------------------------------------------------------------------------------------------


def cache_paths(workdir: str | Path, run: str, spec: TTASpec) -> tuple[Path, Path]:
    """``runs/<run>/test/<tta>.csv`` and its sidecar ``.json``."""
    d = run_dir(Path(workdir), run) / TEST_DIR
    return d / f"{spec.file_stem}.csv", d / f"{spec.file_stem}.json"


def test_files_digest(data_dir: str | Path, ids: Sequence[str]) -> str:
    """sha256 of each test id with its file size and mtime: an added, removed or rewritten file changes it."""
    h = hashlib.sha256()
    for i in ids:
        st = os.stat(Path(data_dir) / i)
        h.update(f"{i}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_key(info: RunInfo, spec: TTASpec, data_dir: str | Path, test_csv: str,
              ids: Sequence[str]) -> dict[str, Any]:
    """What a run's cached test scores depend on (compared as a whole; any difference means re-predict)."""
    return {
        "version": CACHE_VERSION,
        "run": info.name,
        "config_sha256": sha256_text(json.dumps(training_identity(info.cfg), sort_keys=True)),
        "weights_sha256": [sha256_file(w) for w in info.weights],
        "tta": spec.name,
        "data": str(Path(data_dir).resolve()),
        "test_csv": test_csv,
        "n": len(ids),
        "files_sha256": test_files_digest(data_dir, ids),
    }


def read_cache(csv_path: Path, meta_path: Path, key: dict[str, Any], ids: Sequence[str]) -> np.ndarray | None:
    """The cached fold scores (K, N) if the sidecar's key equals ``key`` and the CSV is intact, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or sha256_file(csv_path) != meta.get("csv_sha256"):
            return None
        df = pd.read_csv(csv_path, dtype={"id": str}, keep_default_na=False)
    except (OSError, ValueError):
        return None
    cols = [f"fold{k}" for k in range(len(key["weights_sha256"]))]
    if df["id"].tolist() != list(ids) or not set(cols) <= set(df.columns):
        return None
    P = df[cols].to_numpy(dtype=np.float32).T  # (K, N)
    return P if bool(np.all((P >= 0) & (P <= 1))) else None


def write_cache(csv_path: Path, meta_path: Path, key: dict[str, Any], ids: Sequence[str], P: np.ndarray,
                info: dict[str, Any]) -> None:
    """Write the scores, then the sidecar (removed first, so a crash in between leaves no stale match)."""
    meta_path.unlink(missing_ok=True)
    df = pd.DataFrame({"id": list(ids), "prob": P.astype(np.float64).mean(axis=0)})
    for k, row in enumerate(P):
        df[f"fold{k}"] = row
    write_csv(csv_path, df, float_format="%.9g")  # 9 digits: float32 round-trips exactly
    write_json(meta_path, {"key": key, "csv_sha256": sha256_file(csv_path), **info})


def scan_test_images(data_dir: str | Path, ids: Sequence[str], csv: str, workers: int = 8) -> None:
    """Read every test image's header; UserError naming the first unreadable one."""

    def one(i: str) -> tuple[str, str | None]:
        try:
            image_size(Path(data_dir) / i)
            return i, None
        except BadImageError as e:
            return i, e.reason

    with ThreadPoolExecutor(max_workers=workers) as ex:
        bad = [(i, r) for i, r in ex.map(one, ids, chunksize=256) if r is not None]
    if bad:
        raise UserError(f"{len(bad)} unreadable test image(s) in {csv}; first: {bad[0][0]}: {bad[0][1]}; "
                        "replace the file (every test id needs a prediction)")


# ---- submit ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunScores:
    """One run's test scores: fold probabilities (K, N), the TTA spec used, whether they were cached."""

    name: str
    P: np.ndarray
    tta: str
    cached: bool
    seconds: float


@dataclass(frozen=True)
class SubmitResult:
    """What :func:`submit` wrote and what it predicted."""

    out: Path
    proba: Path | None
    n: int
    ai_rate: float  # share of label 1 in the submission
    train_rate: float  # share of label 1 in the OOF (training) labels
    warning: str | None
    space: str
    threshold: float
    runs: list[RunScores]


def default_blend_path(workdir: str | Path) -> Path:
    return Path(workdir) / BLEND_DIR / "blend.json"


def run_spec(info: RunInfo, forced: TTASpec | None, log: Log | None = None) -> TTASpec:
    """The TTA spec a run uses: ``forced`` (--tta) or the run's recipe default, minus crops it cannot take."""
    if forced is None:
        try:
            forced = parse_tta(info.cfg.tta)
        except UserError as e:
            raise UserError(f"run {info.name} has tta {info.cfg.tta!r} in its config.json: {e}; "
                            "pass --tta") from None
    spec = effective_spec(forced, info.cfg)
    if spec != forced and log is not None:
        log(f"run {info.name}: resizes the whole image to its input size, so crops:{forced.crops} does not "
            f"apply; using {spec.name}")
    unseen = unseen_views(spec, info.cfg)
    if unseen and log is not None:
        log(f"note: run {info.name} never saw {unseen} in training (its augmentation: hflip p={info.cfg.hflip:g}, "
            f"rotation up to {info.cfg.rotate:g} degrees); such views can lower its score: use the views it "
            "trained with (e.g. --tta hflip)")
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


def _resolve_data(infos: Sequence[RunInfo], data: str | Path | None) -> Path:
    if data is not None:
        return Path(data)
    dirs = sorted({str(i.doc.get("data") or i.cfg.data) for i in infos})
    if len(dirs) > 1:
        raise UserError(f"the blended runs were trained on different data folders ({', '.join(dirs)}); "
                        "pass --data DIR with the folder holding test.csv")
    return Path(dirs[0])


def validate_submission(path: str | Path, ids: Sequence[str]) -> pd.DataFrame:
    """Check a submission file: columns ``id,label``, the test ids in order, labels 0/1; UserError if not."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != ["id", "label"]:
        raise UserError(f"{path}: expected columns id,label, got {','.join(df.columns)}")
    if len(df) != len(ids):
        raise UserError(f"{path}: {len(df)} rows, but the test table has {len(ids)}")
    if df["id"].tolist() != list(ids):
        missing = sorted(set(ids) - set(df["id"]))
        what = f"lacks id {missing[0]}" if missing else "has the ids in another order or repeated"
        raise UserError(f"{path} {what}; expected the ids of the test table, in its order")
    bad = ~df["label"].isin(["0", "1"])
    if bad.any():
        raise UserError(f"{path}: label {df['label'][bad].iloc[0]!r} of id {df['id'][bad].iloc[0]}; "
                        "labels must be 0 or 1")
    return df


def run_test_scores(workdir: str | Path, infos: Sequence[RunInfo], specs: dict[str, TTASpec],
                    data_dir: Path, test_csv: str, ids: Sequence[str], device: torch.device, *,
                    batch_size: int | None = None, workers: int | None = None, progress: bool = True,
                    log: Log = print) -> list[RunScores]:
    """Each run's fold scores (K, N) on the test ids: from the cache when its key matches, else predicted."""
    keys = {i.name: cache_key(i, specs[i.name], data_dir, test_csv, ids) for i in infos}
    cached = {i.name: read_cache(*cache_paths(workdir, i.name, specs[i.name]), keys[i.name], ids)
              for i in infos}
    if any(P is None for P in cached.values()):
        scan_test_images(data_dir, ids, test_csv)
    out = []
    for info in infos:
        spec = specs[info.name]
        P, t0 = cached[info.name], time.perf_counter()
        if P is None:
            log(f"run {info.name}: predicting {len(ids)} images x {spec.n_views} view(s) ({spec.name}) "
                f"x {len(info.weights)} folds on {device}")
            models, dc = load_models(info, device)
            # The run's own storage step, as in training (the cache and the uncached path share it).
            source = FileSource(data_dir, list(ids), storage_step(info.cfg, dc.img_size))
            P, bad = predict_folds(models, dc, info.cfg, source, np.arange(len(ids)), spec, device,
                                   batch_size=batch_size, workers=workers, progress=progress,
                                   desc=f"{info.name} test")
            del models
            if bad:
                first = min(bad)
                raise UserError(f"cannot decode test image {ids[first]}: {bad[first]}; replace the file "
                                "(every test id needs a prediction)")
            csv_path, meta_path = cache_paths(workdir, info.name, spec)
            write_cache(csv_path, meta_path, keys[info.name], ids, P,
                        {"device": str(device), "amp": info.cfg.amp if device.type == "cuda" else "none",
                         "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
        else:
            log(f"run {info.name}: cached test scores ({spec.name}, {len(info.weights)} folds)")
        seconds = time.perf_counter() - t0
        out.append(RunScores(info.name, P, spec.name, cached[info.name] is not None, seconds))
    return out


def submit(workdir: str | Path = ".", *, blend_path: str | Path | None = None, data: str | Path | None = None,
           tta: str | None = None, out: str | Path | None = None, proba: bool = False,
           device: str | None = None, batch_size: int | None = None, workers: int | None = None,
           progress: bool = True, log: Log = print) -> SubmitResult:
    """Predict the test set with every run of a fitted blend and write the submission.

    Args:
        workdir: project folder holding runs/ and oof/.
        blend_path: the blend file (default ``runs/blend/blend.json``).
        data: dataset folder with test.csv and the images (default: the folder the runs were trained on).
        tta: TTA spec for every run (see :mod:`aivh_ens.tta`); default each run's recipe default.
        out: submission path (default ``<workdir>/submission.csv``).
        proba: also write the blended scores, ``id,prob``, to ``<out stem>_proba.csv``.
        device, batch_size, workers: inference settings (default auto, the run's eval batch, per device).

    Raises:
        UserError: a bad TTA spec, a blend whose runs, fold weights or OOF files are missing or changed, a
            missing or invalid test table, or an unreadable test image; all found before anything is written.
    """
    workdir = Path(workdir)
    forced = parse_tta(tta) if tta is not None else None
    bpath = Path(blend_path) if blend_path is not None else default_blend_path(workdir)
    doc = load_blend(bpath, workdir)  # also checks every run's config and OOF sha256
    weights = doc["weights"]
    names = [r["name"] for r in doc["runs"] if weights[r["name"]] > 0]
    infos = [check_run(workdir, n) for n in names]
    for info in infos:
        if info.doc.get("fold_sha256") != doc["fold_sha256"]:
            raise UserError(f"run {info.name} was re-trained on another fold file since {bpath} was fitted; "
                            "re-fit with `aivh-ens blend`")
    specs = {i.name: run_spec(i, forced, log) for i in infos}
    data_dir = _resolve_data(infos, data)
    cfg0 = infos[0].cfg
    ids = read_test_table(data_dir, cfg0.test_csv, id_col=cfg0.id_col)["id"].tolist()
    dev = resolve_device(device or "auto")
    out_path = Path(out) if out is not None else workdir / "submission.csv"

    scores = run_test_scores(workdir, infos, specs, data_dir, cfg0.test_csv, ids, dev, batch_size=batch_size,
                             workers=workers, progress=progress, log=log)
    space = doc["space"]
    probs, labels = apply_blend(doc, {s.name: fold_average(s.P, space) for s in scores})  # (N,), (N,)

    write_csv(out_path, pd.DataFrame({"id": ids, "label": labels.astype(np.int64)}))
    try:
        validate_submission(out_path, ids)
    except UserError as e:  # our own output failed its check: a bug, never leave the file behind
        out_path.unlink(missing_ok=True)
        raise RuntimeError(f"the written submission failed validation: {e}") from e
    proba_path = None
    if proba:
        proba_path = out_path.with_name(f"{out_path.stem}_proba.csv")
        write_csv(proba_path, pd.DataFrame({"id": ids, "prob": probs}), float_format="%.8g")

    oof = pd.read_csv(workdir / doc["runs"][0]["oof"], usecols=["label"])
    train_rate, ai_rate = float(oof["label"].mean()), float(labels.mean())
    warning = None
    if abs(ai_rate - train_rate) > RATE_WARN:
        warning = (f"the predicted AI rate {ai_rate:.1%} differs from the training rate {train_rate:.1%} by "
                   f"more than {RATE_WARN * 100:.0f} points: the threshold ({doc['threshold']:.4f}, {space} "
                   "space) may not transfer to this test set")
    return SubmitResult(out_path, proba_path, len(ids), ai_rate, train_rate, warning, space,
                        float(doc["threshold"]), scores)


# ---- predict ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePrediction:
    """P(AI) and the label of one image, or why it could not be scored."""

    image: str
    prob: float | None = None  # P(AI); for a rank-space blend the blended rank score in [0, 1]
    label: int | None = None
    error: str | None = None


def rank_against(reference: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Normalised rank (N,) of scores ``p`` among ``reference`` scores: the share below, ties count half."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    lo, hi = np.searchsorted(ref, p, "left"), np.searchsorted(ref, p, "right")
    return (lo + hi) / (2.0 * len(ref))


def predict_images(images: Sequence[str | Path], workdir: str | Path = ".", *,
                   blend_path: str | Path | None = None, run: str | None = None, tta: str | None = None,
                   device: str | None = None, batch_size: int | None = None,
                   workers: int | None = None) -> tuple[list[ImagePrediction], dict[str, Any]]:
    """P(AI) and the label of single images, from a fitted blend or from one run (threshold 0.5).

    Each run's fold models are loaded once and score all images in batches. A rank-space blend ranks each
    image's score among that run's OOF scores (the rows the blend was fitted on), since a handful of images
    cannot be ranked among themselves. Unreadable images get an ``error`` and do not stop the others.

    Returns:
        ``(predictions in input order, source)``: source describes what scored them (blend or run, space,
        threshold).
    """
    workdir = Path(workdir)
    forced = parse_tta(tta) if tta is not None else None
    if blend_path is not None and run is not None:
        raise UserError("give either --blend or --run, not both")
    if run is not None:
        infos, space, threshold, w = [check_run(workdir, run)], "prob", 0.5, {run: 1.0}
        doc = None
        source_info = {"run": run, "space": space, "threshold": threshold}
    else:
        bpath = Path(blend_path) if blend_path is not None else default_blend_path(workdir)
        doc = load_blend(bpath, workdir)
        w = {n: v for n, v in doc["weights"].items() if v > 0}
        infos = [check_run(workdir, n) for n in w]
        space, threshold = doc["space"], float(doc["threshold"])
        source_info = {"blend": str(bpath), "space": space, "threshold": threshold}
    paths = [str(p) for p in images]
    dev = resolve_device(device or "auto")
    errors: dict[int, str] = {}
    scores: dict[str, np.ndarray] = {}
    good = np.arange(len(paths))
    for info in infos:
        spec = run_spec(info, forced)
        models, dc = load_models(info, dev)
        source = FileSource(Path("."), paths, storage_step(info.cfg, dc.img_size))
        P, bad = predict_folds(models, dc, info.cfg, source, good, spec, dev, batch_size=batch_size,
                               workers=workers)
        del models
        errors.update({int(good[i]): r for i, r in bad.items()})
        keep = np.array([i not in bad for i in range(len(good))], dtype=bool)
        good = good[keep]
        scores = {n: s[keep] for n, s in scores.items()}
        scores[info.name] = fold_average(P[:, keep], space)  # (N_good,)
    probs = np.zeros(0)
    if len(good):
        if doc is None:
            probs = scores[infos[0].name]
        elif space == "rank":
            oof_files = {r["name"]: workdir / r["oof"] for r in doc["runs"]}
            ref = {n: pd.read_csv(oof_files[n], usecols=["prob"])["prob"].to_numpy() for n in w}  # (N_oof,)
            R = np.stack([rank_against(ref[n], scores[n]) for n in w])  # (M, N_good)
            probs = combine(R, np.array(list(w.values())), "rank")
        else:
            probs, _ = apply_blend(doc, scores)
    by_pos = dict(zip(good.tolist(), probs.tolist(), strict=True))
    out = []
    for i, p in enumerate(paths):
        if i in by_pos:
            out.append(ImagePrediction(p, by_pos[i], int(by_pos[i] >= threshold)))
        else:
            out.append(ImagePrediction(p, error=f"bad image {p}: {errors.get(i, 'not scored')}"))
    return out, source_info


def format_predictions(preds: Sequence[ImagePrediction], space: str = "prob") -> str:
    """A table: P(AI) (the blended rank score for rank blends), label, image; one line per scored image."""
    lines = [f"{'rank' if space == 'rank' else 'p_ai':>7}  {'label':<8}  image"]
    for p in preds:
        if p.error is None:
            lines.append(f"{p.prob:>7.4f}  {p.label} {'(AI)' if p.label else '(human)':<6}  {p.image}")
    return "\n".join(lines)
