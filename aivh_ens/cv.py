"""Cross-validation orchestration: resolve the config, make/check folds, run fold jobs, assemble OOF.

On disk (under the work dir): ``folds/<fold file>``, ``runs/<run>/config.json``, ``runs/<run>/fold<k>/``,
``oof/<run>.csv`` (written once, complete, by whichever process finishes the last fold).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aivh_ens import __version__, faults, metrics
from aivh_ens.config import (
    CONFIG_VERSION,
    RunConfig,
    default_run_name,
    from_dict,
    load_run_config,
    to_dict,
    training_identity,
)
from aivh_ens.data import BadImageError, image_size, load_image, read_train_table
from aivh_ens.errors import UserError
from aivh_ens.folds import ensure_fold_file
from aivh_ens.io import sha256_file, write_csv, write_json
from aivh_ens.locks import FileLock
from aivh_ens.recipes import get_recipe
from aivh_ens.train import DONE, FOLD_OOF, FoldJob, fit_fold

Log = Callable[[str], None]


def resolve_config(recipe: str = "none", **overrides: Any) -> RunConfig:
    """Defaults, then the recipe, then ``overrides`` (None values mean "not given")."""
    values = {**get_recipe(recipe), "recipe": recipe}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = from_dict({**to_dict(RunConfig()), **values})
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=default_run_name(cfg.model, recipe))
    return cfg


def run_dir(workdir: Path, name: str) -> Path:
    return Path(workdir) / "runs" / name


def oof_path(workdir: Path, name: str) -> Path:
    return Path(workdir) / "oof" / f"{name}.csv"


def library_versions() -> dict[str, str]:
    import albumentations
    import sklearn
    import timm
    import torch

    return {"aivh_ens": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "sklearn": sklearn.__version__, "albumentations": albumentations.__version__}


def load_train_table(cfg: RunConfig) -> pd.DataFrame:
    """The validated train table of a config's dataset (group column included when --group names one)."""
    group_col = cfg.group if cfg.group not in (None, "pairs") else None
    return read_train_table(cfg.data, cfg.train_csv, file_col=cfg.file_col, label_col=cfg.label_col,
                            group_col=group_col)


def scan_images(root: Path, files: Iterable[str], decode: bool, workers: int = 8) -> dict[int, str]:
    """Read every image's header (or fully decode it); returns {row: reason} for the bad ones."""
    files = list(files)
    check = (lambda p: load_image(p)) if decode else (lambda p: image_size(p))  # noqa: E731

    def one(i: int) -> tuple[int, str | None]:
        try:
            check(root / files[i])
            return i, None
        except BadImageError as e:
            return i, str(e)

    with ThreadPoolExecutor(max_workers=workers) as ex:  # PIL releases the GIL while decoding
        results = list(ex.map(one, range(len(files)), chunksize=256))
    return {i: msg for i, msg in results if msg is not None}


def write_run_config(cfg: RunConfig, workdir: Path, fold_path: Path, fold_sha: str, force: bool) -> Path:
    """Write runs/<run>/config.json, or check that an existing one describes the same training."""
    path = run_dir(workdir, cfg.name) / "config.json"
    doc = {"version": CONFIG_VERSION, "name": cfg.name, "model": cfg.model, "recipe": cfg.recipe,
           "fold_file": str(fold_path.relative_to(workdir)), "fold_sha256": fold_sha,
           "data": str(Path(cfg.data).resolve()), "config": to_dict(cfg), "versions": library_versions()}
    if path.exists() and not force:
        old_cfg, old = load_run_config(path)
        if old.get("fold_sha256") != fold_sha:
            raise UserError(
                f"run {cfg.name} was trained on fold file {old.get('fold_file')} with sha256 "
                f"{str(old.get('fold_sha256'))[:12]}..., which has changed since; its OOF would not line up. "
                "Use --force to retrain the run, or --name for a new one"
            )
        a, b = training_identity(old_cfg), training_identity(cfg)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise UserError(
                f"run {cfg.name} already exists with a different config ({', '.join(diff)}); use --name NEW "
                "for a new run, or --force to retrain this one"
            )
    write_json(path, doc)
    return path


def parse_fold_list(spec: str | None, k: int) -> list[int]:
    """``"0,2"`` -> [0, 2]; None -> all folds."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(k))
    try:
        folds = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--fold must be comma-separated integers like 0,2 (got {spec!r})") from None
    bad = [f for f in folds if not 0 <= f < k]
    if bad or not folds:
        raise UserError(f"--fold {spec}: folds are numbered 0..{k - 1}")
    return folds


def fold_done(fdir: Path) -> bool:
    return (fdir / DONE).exists() and (fdir / FOLD_OOF).exists()


def read_fold_summary(fdir: Path) -> dict[str, Any]:
    """The summary a finished fold wrote to done.json."""
    return json.loads((fdir / DONE).read_text())


def assemble_oof(workdir: Path, cfg: RunConfig, fold_table: pd.DataFrame, exclude: set[int],
                 log: Log) -> Path | None:
    """Write oof/<run>.csv if every fold is done and it is not already written for these folds."""
    rdir = run_dir(workdir, cfg.name)
    fdirs = [rdir / f"fold{k}" for k in range(cfg.folds)]
    if not all(fold_done(d) for d in fdirs):
        return None
    out = oof_path(workdir, cfg.name)
    lock = FileLock(rdir / "oof.lock", what=f"OOF assembly of run {cfg.name}")
    try:
        lock.acquire()
    except UserError:
        return None  # another process is assembling it right now
    try:
        parts = [pd.read_csv(d / FOLD_OOF, dtype={"file_name": str}) for d in fdirs]
        oof = pd.concat(parts, ignore_index=True)
        order = {n: i for i, n in enumerate(fold_table["file_name"])}
        oof["_row"] = oof["file_name"].map(order)
        expected = sorted(set(range(len(fold_table))) - exclude)
        got = sorted(oof["_row"].dropna().astype(int))
        if got != expected:
            raise UserError(f"the fold OOF files of run {cfg.name} do not cover every row exactly once; "
                            "re-run with --force")
        oof = oof.sort_values("_row").drop(columns="_row")[["file_name", "label", "fold", "prob"]]
        sources = {d.name: sha256_file(d / FOLD_OOF) for d in fdirs}
        meta_path = rdir / "oof_sources.json"
        if out.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == sources:
            return out  # already assembled from exactly these folds
        write_csv(out, oof, float_format="%.8g")
        write_json(meta_path, sources)
        log(f"wrote {out} ({len(oof)} rows)")
        return out
    finally:
        lock.release()


def check_run_inputs(cfg: RunConfig) -> None:
    """Model names, weight files, the device and the loaders' shared memory, checked before any file is
    written."""
    from aivh_ens.cache import model_img_size
    from aivh_ens.loader import default_workers, ring_prefetch
    from aivh_ens.models import check_model_name, weights_files
    from aivh_ens.train import eval_batch_size, resolve_device

    for name in cfg.backbones:
        check_model_name(name)
    weights_files(cfg)
    device = resolve_device(cfg.device)
    workers = default_workers(device, cfg.workers)
    if workers > 0:  # the training and the validation loader of a fold, as fit_fold makes them
        size = model_img_size(cfg)
        for batch in (cfg.batch_size, eval_batch_size(cfg)):
            ring_prefetch(workers, batch, size)


def busy_elsewhere(samples: int = 5, interval: float = 0.05) -> int | None:
    """Runnable tasks on this machine besides the caller, the least of a few instant samples of
    /proc/loadavg (not the load average, which still counts a process that finished a minute ago);
    None where that file does not exist."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, min(counts) - 1)  # the reading thread itself is running


def cpu_contention_note(device_name: str) -> str | None:
    """A hint when CPU training would run several torch threads on cores other processes already use.

    OpenMP threads wait for each other at every operator; when another process holds one of their cores,
    each step waits for the slowest. Measured on 2 cores: 2 threads trained at 91-159 img/s beside other
    work, against ~1,000 img/s with 1 thread in each of two processes (README, "CPU threads").
    """
    import torch

    from aivh_ens.train import resolve_device

    if resolve_device(device_name).type != "cpu" or torch.get_num_threads() <= 1:
        return None
    others = busy_elsewhere()
    if not others:
        return None
    return (f"note: {others} other process(es) are running on the CPU and torch uses {torch.get_num_threads()} "
            "threads; with shared cores --threads 1 per process is often several times faster")


def run_cv(cfg: RunConfig, workdir: str | Path = ".", *, fold_spec: str | None = None, resume: bool = False,
           force: bool = False, progress: bool = True, log: Log = print) -> dict[str, Any]:
    """Train the requested folds of a run and assemble its OOF when every fold is done.

    Returns ``{"run", "folds": [fold summaries], "oof": path or None, "oof_metrics": {...} or None}``.
    """
    workdir = Path(workdir)
    # Everything that can be checked is checked before the first file is written.
    folds_to_run = parse_fold_list(fold_spec, cfg.folds)
    check_run_inputs(cfg)
    table = load_train_table(cfg)
    # Images: headers always (cheap); full decode with --on-bad-image skip, so bad rows are known up front.
    root = Path(cfg.data)
    bad = scan_images(root, table["file_name"], decode=cfg.on_bad_image == "skip")
    if bad and cfg.on_bad_image == "error":
        first = min(bad)
        raise UserError(f"{len(bad)} unreadable image(s) in {cfg.train_csv}; first: {bad[first]}")
    fold_path, fold_sha, fold_table, created = ensure_fold_file(workdir, table, cfg.folds, cfg.seed, cfg.group)
    log(f"fold file: {fold_path} ({'created' if created else 'reused'}, sha256 {fold_sha[:12]}, "
        f"{len(fold_table)} rows, {cfg.folds} folds{', grouped by ' + cfg.group if cfg.group else ''})")
    note = cpu_contention_note(cfg.device)
    if note:
        log(note)
    rdir = run_dir(workdir, cfg.name)
    if force:
        for k in folds_to_run:
            shutil.rmtree(rdir / f"fold{k}", ignore_errors=True)
        oof_path(workdir, cfg.name).unlink(missing_ok=True)
    write_run_config(cfg, workdir, fold_path, fold_sha, force)
    exclude = set(bad)
    if exclude:
        write_csv(rdir / "skipped.csv", pd.DataFrame({
            "file_name": fold_table["file_name"].to_numpy()[sorted(exclude)],
            "reason": [bad[i] for i in sorted(exclude)]}))
        log(f"skipping {len(exclude)} unreadable image(s) (listed in {rdir / 'skipped.csv'})")

    from aivh_ens.cache import open_source

    source = open_source(cfg, root, fold_table["file_name"].tolist(), workdir, progress=progress, log=log)
    summaries = []
    for k in folds_to_run:
        fdir = rdir / f"fold{k}"
        if fold_done(fdir):
            log(f"fold {k}: already done (use --force to retrain)")
            summaries.append(read_fold_summary(fdir))
            continue
        with FileLock(rdir / f"fold{k}.lock", what=f"fold {k} of run {cfg.name}"):
            if fold_done(fdir):  # finished by another process while we waited
                summaries.append(read_fold_summary(fdir))
                continue
            for tmp in fdir.glob(".*.tmp"):  # left by a process killed mid-write; never read, safe to drop
                tmp.unlink(missing_ok=True)
            log(f"fold {k}/{cfg.folds - 1}: training {cfg.model} on {int((fold_table['fold'] != k).sum())} rows, "
                f"validating on {int((fold_table['fold'] == k).sum())}")
            job = FoldJob(cfg, k, fdir, root, fold_table[["file_name", "label", "fold"]], frozenset(exclude))
            summaries.append(fit_fold(job, source, resume=resume, progress=progress, log=log))
        faults.point("fold-done")

    oof = assemble_oof(workdir, cfg, fold_table, exclude, log)
    result: dict[str, Any] = {"run": cfg.name, "folds": summaries, "oof": oof, "oof_metrics": None}
    if oof is not None:
        df = pd.read_csv(oof)
        result["oof_metrics"] = metrics.summary_at(df["label"].to_numpy(), df["prob"].to_numpy())
    else:
        missing = [k for k in range(cfg.folds) if not fold_done(rdir / f"fold{k}")]
        log(f"OOF not written yet: fold(s) {', '.join(map(str, missing))} still to train")
    return result


def format_summary(result: dict[str, Any]) -> str:
    """The end-of-run table: one row per fold, then OOF metrics at threshold 0.5."""
    lines = [f"run {result['run']}",
             f"{'fold':>4} {'f1':>7} {'acc':>7} {'auc':>7} {'loss':>7} {'best_ep':>7} {'minutes':>8}"]
    for s in result["folds"]:
        lines.append(f"{s['fold']:>4} {s['val_f1']:>7.4f} {s['val_acc']:>7.4f} {s['val_auc']:>7.4f} "
                     f"{s['val_loss']:>7.4f} {s['best_epoch']:>7} {s['minutes']:>8.2f}")
    m = result.get("oof_metrics")
    if m:
        lines.append(f"OOF at 0.5: f1 {m['f1']:.4f}  acc {m['acc']:.4f}  auc {m['auc']:.4f}  -> {result['oof']}")
    return "\n".join(lines)


def load_run(workdir: Path, name: str) -> tuple[RunConfig, dict[str, Any]]:
    """The saved config of run ``name`` (for blend/submit)."""
    return load_run_config(run_dir(workdir, name) / "config.json")
