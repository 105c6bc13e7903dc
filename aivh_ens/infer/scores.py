"""Each blended run's fold scores on the test images (:func:`run_test_scores`): from the test-score cache
(``runs/<run>/test/``, keyed by the run, the TTA views and the test images) or predicted and cached."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from aivh_ens.config import training_identity
from aivh_ens.data.images import image_size, scan_files
from aivh_ens.data.loader import FileSource
from aivh_ens.data.transforms import storage_step
from aivh_ens.errors import UserError
from aivh_ens.io import sha256_file, sha256_text, write_csv, write_json
from aivh_ens.layout import test_scores_dir
from aivh_ens.score import inference_amp
from aivh_ens.score.runs import Log, RunInfo, adapt_batchnorm, load_models, predict_folds
from aivh_ens.score.tta import TTASpec

CACHE_VERSION = 1


def cache_paths(
    workdir: str | Path, run: str, spec: TTASpec, average: str = "prob", adapt_bn: bool = False
) -> tuple[Path, Path]:
    """``runs/<run>/test/<tta>[_logit][_adabn].csv`` and its sidecar ``.json``."""
    d = test_scores_dir(workdir, run)
    stem = spec.file_stem + ("_logit" if average == "logit" else "") + ("_adabn" if adapt_bn else "")
    return d / f"{stem}.csv", d / f"{stem}.json"


def test_files_digest(data_dir: str | Path, ids: Sequence[str]) -> str:
    """sha256 of each test id with its file size and mtime: an added, removed or rewritten file changes it."""
    h = hashlib.sha256()
    for i in ids:
        st = os.stat(Path(data_dir) / i)
        h.update(f"{i}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def scores_key(
    info: RunInfo,
    spec: TTASpec,
    data_dir: str | Path,
    test_csv: str,
    ids: Sequence[str],
    average: str = "prob",
    adapt_bn: bool = False,
) -> dict[str, Any]:
    """What a run's cached test scores depend on (compared as a whole; any difference means re-predict)."""
    return {
        "version": CACHE_VERSION,
        "run": info.name,
        "config_sha256": sha256_text(json.dumps(training_identity(info.cfg), sort_keys=True)),
        "weights_sha256": list(info.weights_sha256),
        "tta": spec.name,
        "average": average,
        "adapt_bn": adapt_bn,
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


def write_cache(
    csv_path: Path,
    meta_path: Path,
    key: dict[str, Any],
    ids: Sequence[str],
    P: np.ndarray,
    info: dict[str, Any],
) -> None:
    """Write the scores, then the sidecar (removed first, so a crash in between leaves no stale match)."""
    meta_path.unlink(missing_ok=True)
    df = pd.DataFrame({"id": list(ids), "prob": P.astype(np.float64).mean(axis=0)})
    for k, row in enumerate(P):
        df[f"fold{k}"] = row
    write_csv(csv_path, df, float_format="%.9g")  # 9 digits: float32 round-trips exactly
    write_json(meta_path, {"key": key, "csv_sha256": sha256_file(csv_path), **info})


def scan_test_images(data_dir: str | Path, ids: Sequence[str], csv: str, workers: int = 8) -> None:
    """Read every test image's header; UserError naming the first unreadable one."""
    bad = scan_files(Path(data_dir), list(ids), image_size, workers)
    if bad:
        first = min(bad)
        raise UserError(
            f"{len(bad)} unreadable test image(s) in {csv}; first: {ids[first]}: {bad[first].reason}; "
            "replace the file (every test id needs a prediction)"
        )


@dataclass(frozen=True)
class RunScores:
    """One run's test scores: fold probabilities (K, N), the TTA spec used, whether they were cached."""

    name: str
    P: np.ndarray
    tta: str
    cached: bool
    seconds: float


def run_test_scores(
    workdir: str | Path,
    infos: Sequence[RunInfo],
    specs: dict[str, TTASpec],
    data_dir: Path,
    test_csv: str,
    ids: Sequence[str],
    device: torch.device,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Log = print,
    average: str = "prob",
    adapt_bn: bool = False,
) -> list[RunScores]:
    """Each run's fold scores (K, N) on the test ids: from the cache when its key matches, else predicted.

    ``average``: how TTA views are averaged (:func:`aivh_ens.score.runs.view_average`); ``adapt_bn``:
    re-estimate BatchNorm statistics on the test images first (:func:`aivh_ens.score.runs.adapt_batchnorm`).
    """
    keys = {i.name: scores_key(i, specs[i.name], data_dir, test_csv, ids, average, adapt_bn) for i in infos}
    paths = {i.name: cache_paths(workdir, i.name, specs[i.name], average, adapt_bn) for i in infos}
    cached = {i.name: read_cache(*paths[i.name], keys[i.name], ids) for i in infos}
    if any(P is None for P in cached.values()):
        scan_test_images(data_dir, ids, test_csv)
    out = []
    for info in infos:
        spec = specs[info.name]
        P, t0 = cached[info.name], time.perf_counter()
        if info.cfg.head != "finetune":  # a probe run: its heads on the (cached) test feature store
            out.append(_probe_scores(workdir, info, data_dir, ids, device, progress, log))
            continue
        if P is None:
            opts = PredictOptions(device, batch_size, workers, progress, log, average, adapt_bn)
            P = _predict_run(paths[info.name], info, spec, keys[info.name], data_dir, ids, opts)
        else:
            log(f"run {info.name}: cached test scores ({spec.name}, {len(info.weights)} folds)")
        seconds = time.perf_counter() - t0
        out.append(RunScores(info.name, P, spec.name, cached[info.name] is not None, seconds))
    return out


@dataclass(frozen=True)
class PredictOptions:
    """How one run's test images are predicted (device, batching, progress, view averaging, AdaBN)."""

    device: torch.device
    batch_size: int | None
    workers: int | None
    progress: bool
    log: Log
    average: str
    adapt_bn: bool


def _predict_run(
    paths: tuple[Path, Path],
    info: RunInfo,
    spec: TTASpec,
    key: dict[str, Any],
    data_dir: Path,
    ids: Sequence[str],
    o: PredictOptions,
) -> np.ndarray:
    """Predict the test ids with every fold model of one run and cache the (K, N) scores under ``key``."""
    device = o.device
    o.log(
        f"run {info.name}: predicting {len(ids)} images x {spec.n_views} view(s) ({spec.name}) "
        f"x {len(info.weights)} folds on {device}"
    )
    models, dc = load_models(info, device)
    # The run's own storage step, as in training (the cache and the uncached path share it).
    source = FileSource(data_dir, list(ids), storage_step(info.cfg, dc.img_size))
    rows = np.arange(len(ids))
    if o.adapt_bn:
        n = adapt_batchnorm(
            models, dc, info.cfg, source, rows, device, batch_size=o.batch_size, workers=o.workers
        )
        o.log(
            f"run {info.name}: BatchNorm statistics re-estimated on the {len(ids)} test images in {n} of "
            f"{len(models)} fold models" + ("" if n else " (the architecture has no BatchNorm)")
        )
    P, bad = predict_folds(
        models,
        dc,
        info.cfg,
        source,
        rows,
        spec,
        device,
        batch_size=o.batch_size,
        workers=o.workers,
        progress=o.progress,
        desc=f"{info.name} test",
        average=o.average,
    )
    del models
    if bad:
        first = min(bad)
        raise UserError(
            f"cannot decode test image {ids[first]}: {bad[first]}; replace the file (every test id needs a prediction)"
        )
    meta = {
        "device": str(device),
        "amp": inference_amp(info.cfg, device),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_cache(*paths, key, ids, P, meta)
    return P


def _probe_scores(
    workdir: str | Path,
    info: RunInfo,
    data_dir: Path,
    ids: Sequence[str],
    device: torch.device,
    progress: bool,
    log: Log,
) -> RunScores:
    """A probe run's fold scores: its heads on the test feature store (extracted only when not cached)."""
    from aivh_ens.score.probe import probe_test_scores

    t0 = time.perf_counter()
    P = probe_test_scores(
        info.cfg, info.weights, workdir, data_dir, list(ids), device, progress=progress, log=log
    )
    return RunScores(info.name, P, f"features:{info.cfg.probe_views}", False, time.perf_counter() - t0)
