"""Cross-validation orchestration: resolve the config, make/check folds, run fold jobs, assemble OOF.

On disk (under the work dir): ``folds/<fold file>``, ``runs/<run>/config.json``, ``runs/<run>/fold<k>/``,
``oof/<run>.csv`` (written once, complete, by whichever process finishes the last fold).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from aivh_ens import faults, metrics
from aivh_ens.config import CONFIG_VERSION, RunConfig, config_change, to_dict
from aivh_ens.data.folds import ensure_fold_file
from aivh_ens.data.images import load_image, scan_files
from aivh_ens.data.tables import read_train_table
from aivh_ens.errors import UserError
from aivh_ens.fence import unvouched
from aivh_ens.io import sha256_file, write_csv, write_json
from aivh_ens.layout import config_path, fold_dir, inspect_dir, oof_path, read_run_config, run_dir
from aivh_ens.locks import FileLock, LockLost, fenced
from aivh_ens.system import cpu_contention_note, interrupt_main, library_versions
from aivh_ens.train.fold import DONE, FOLD_OOF, FoldJob, fit_fold
from aivh_ens.train.loop import resolve_device
from aivh_ens.train.models import random_init_note
from aivh_ens.train.precision import resolve_precision
from aivh_ens.train.pseudo import (
    PSEUDO_FOLD,
    PseudoSource,
    describe_pseudo,
    freeze_pseudo,
    pseudo_record,
    pseudo_warning,
    resolve_pseudo,
    training_table,
)

Log = Callable[[str], None]


def load_train_table(cfg: RunConfig) -> pd.DataFrame:
    """The validated train table of a config's dataset (group column included when --group names one)."""
    group_col = cfg.group if cfg.group not in (None, "pairs") else None
    return read_train_table(
        cfg.data, cfg.train_csv, file_col=cfg.file_col, label_col=cfg.label_col, group_col=group_col
    )


def write_run_config(
    cfg: RunConfig,
    workdir: Path,
    fold_path: Path,
    fold_sha: str,
    force: bool,
    pseudo: dict[str, Any] | None = None,
) -> Path:
    """Write runs/<run>/config.json, or check that an existing one describes the same training. ``pseudo``:
    the pseudo-label record (:func:`aivh_ens.train.pseudo.pseudo_record`)."""
    path = config_path(workdir, cfg.name)
    doc = {
        "version": CONFIG_VERSION,
        "name": cfg.name,
        "model": cfg.model,
        "recipe": cfg.recipe,
        "fold_file": str(fold_path.relative_to(workdir)),
        "fold_sha256": fold_sha,
        "data": str(Path(cfg.data).resolve()),
        "config": to_dict(cfg),
        "versions": library_versions(),
    }
    if pseudo is not None:
        doc["pseudo"] = pseudo
    check_same_run(cfg, workdir, fold_sha, force)
    write_json(path, doc)
    return path


def check_same_run(cfg: RunConfig, workdir: Path, fold_sha: str, force: bool) -> None:
    """Unless ``force``: an existing config.json of the run must describe the same training on the same folds."""
    path = config_path(workdir, cfg.name)
    if path.exists() and not force:
        old_cfg, old = read_run_config(workdir, cfg.name)
        if old.get("fold_sha256") != fold_sha:
            raise UserError(
                f"run {cfg.name} was trained on fold file {old.get('fold_file')} with sha256 "
                f"{str(old.get('fold_sha256'))[:12]}..., which has changed since; its OOF would not line up. "
                "Use --force to retrain the run, or --name for a new one"
            )
        change = config_change(old_cfg, cfg)
        if change:
            raise UserError(f"{change}; use --name NEW for a new run, or --force to retrain this one")


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


def assemble_oof(
    workdir: Path, cfg: RunConfig, fold_table: pd.DataFrame, exclude: set[int], log: Log
) -> Path | None:
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
        sources = {d.name: sha256_file(d / FOLD_OOF) for d in fdirs}
        for k, d in enumerate(fdirs):
            why = unvouched(d, read_fold_summary(d), FOLD_OOF, sources[d.name])
            if why:
                raise UserError(f"run {cfg.name}: fold {k}: {why}; retrain it with --fold {k} --force")
        parts = [pd.read_csv(d / FOLD_OOF, dtype={"file_name": str}) for d in fdirs]
        oof = pd.concat(parts, ignore_index=True)
        order = {n: i for i, n in enumerate(fold_table["file_name"])}
        oof["_row"] = oof["file_name"].map(order)
        expected = sorted(set(range(len(fold_table))) - exclude)
        got = sorted(oof["_row"].dropna().astype(int))
        if got != expected:
            raise UserError(
                f"the fold OOF files of run {cfg.name} do not cover every row exactly once; "
                "re-run with --force"
            )
        cols = ["file_name", "label", "fold", "prob"]
        if "prob_logit" in oof.columns and not oof["prob_logit"].isna().any():  # TTA views averaged as logits
            cols.append("prob_logit")
        if "group" in fold_table.columns:  # grouped folds: blend's inner folds (the stack) keep groups whole
            oof["group"] = oof["_row"].map(fold_table["group"])
            cols.append("group")
        oof = oof.sort_values("_row").drop(columns="_row")[cols]
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
    from aivh_ens.data.cache import model_img_size
    from aivh_ens.data.loader import default_workers, ring_prefetch
    from aivh_ens.train.loop import eval_batch_size, resolve_device
    from aivh_ens.train.models import check_model_name, check_weights_match, local_pretrained, weights_files

    for name in cfg.backbones:
        check_model_name(name)
    for name, file in zip(cfg.backbones, weights_files(cfg), strict=True):
        if file is not None:
            check_weights_match(name, file, cfg.img_size)
        elif cfg.head != "finetune" and cfg.pretrained == "auto" and not local_pretrained(name):
            raise UserError(
                f"--head {cfg.head} probes pretrained features, and there are no local weights for {name} "
                "(Hugging Face cache); pass --weights PATH, or run once online (HF_HUB_OFFLINE=0) with --pretrained"
            )
    device = resolve_device(cfg.device)
    workers = default_workers(device, cfg.workers)
    if workers > 0:  # the training and the validation loader of a fold, as fit_fold makes them
        size = model_img_size(cfg)
        for batch in (cfg.batch_size, eval_batch_size(cfg)):
            ring_prefetch(workers, batch, size)


@dataclass(frozen=True)
class CVResult:
    """What :func:`run_cv` did: the fold summaries (``done.json`` contents), the OOF file when every fold is
    done, and its metrics at threshold 0.5."""

    run: str
    folds: tuple[dict[str, Any], ...]
    oof: Path | None
    oof_metrics: dict[str, float] | None


def run_cv(
    cfg: RunConfig,
    workdir: str | Path = ".",
    *,
    fold_spec: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Log = print,
) -> CVResult:
    """Train the requested folds of a run and assemble its OOF when every fold is done.

    Args:
        cfg: the resolved run config (:func:`aivh_ens.config.resolve_config`).
        workdir: the project folder (``--workdir``) holding ``folds/``, ``runs/``, ``oof/``.
        fold_spec: folds to train, ``"0,2"`` (``--fold``); None trains every fold.
        resume: continue an interrupted fold from its last finished epoch (``--resume``).
        force: retrain the requested folds from scratch (``--force``).
        progress: progress bars; log: where one-line messages go.

    Raises:
        UserError: any bad input, before the first file is written.
    """
    workdir = Path(workdir)
    cfg, pseudo = resolve_pseudo(
        cfg, workdir, log
    )  # checked (and its hash in cfg) before anything is written
    if cfg.head != "finetune":  # a frozen-feature probe: features once, then a head per fold
        from aivh_ens.train.probe import run_probe_cv

        return run_probe_cv(
            cfg,
            workdir,
            fold_spec=fold_spec,
            resume=resume,
            force=force,
            progress=progress,
            log=log,
            pseudo=pseudo,
        )
    folds_to_run, table, bad = check_inputs(cfg, fold_spec, workdir)  # every check before the first write
    fold_table = prepare_run(cfg, workdir, table, bad, folds_to_run, force, log, pseudo)
    train_table = training_table(cfg, workdir, fold_table)  # + pseudo rows, fold -1
    from aivh_ens.data.cache import open_source

    source = open_source(
        cfg, Path(cfg.data), train_table["file_name"].tolist(), workdir, progress=progress, log=log
    )
    summaries = [
        run_fold(
            cfg, k, workdir, train_table, frozenset(bad), source, resume=resume, progress=progress, log=log
        )
        for k in folds_to_run
    ]
    return finish_run(cfg, workdir, fold_table, set(bad), summaries, log)


def check_inputs(
    cfg: RunConfig, fold_spec: str | None, workdir: str | Path | None = None
) -> tuple[list[int], pd.DataFrame, dict[int, str]]:
    """The folds to train, the validated train table and ``{row: reason}`` of unreadable images.

    Images: every one is fully decoded (a truncated JPEG has a fine header), so a bad image stops the run, or
    is known to be skipped, before the fold file or anything else is written.
    """
    folds_to_run = parse_fold_list(fold_spec, cfg.folds)
    check_run_inputs(cfg)
    table, bad = load_checked_table(cfg, workdir)
    return folds_to_run, table, bad


VERDICTS = "decode_verdicts"  # the table's attrs key: the verdicts prepare_run keeps once inputs are valid


def load_checked_table(
    cfg: RunConfig, workdir: str | Path | None = None
) -> tuple[pd.DataFrame, dict[int, str]]:
    """The validated train table and ``{row: reason}`` of images that fail a full decode.

    With ``workdir``, the verdicts of earlier calls (:mod:`aivh_ens.data.verdicts`) are reused: only images
    that are new or changed since are decoded. The updated verdicts travel with the table
    (``table.attrs``) and :func:`prepare_run` writes them once every input is valid.

    Raises:
        UserError: an image fails and ``cfg.on_bad_image`` is ``error``; names the file and ``--on-bad-image``.
    """
    from aivh_ens.data.cache import default_cache_dir
    from aivh_ens.data.verdicts import Verdicts, verdicts_path

    table = load_train_table(cfg)
    root, files = Path(cfg.data), table["file_name"].tolist()
    path = verdicts_path(default_cache_dir(cfg, workdir), root) if workdir is not None else None
    verdicts = Verdicts.read(path)

    def decode(rows: list[int]) -> dict[int, str]:  # load_image looked up here, at each call (tests count it)
        found = scan_files(root, [files[i] for i in rows], lambda p: load_image(p))
        return {rows[j]: str(e) for j, e in found.items()}

    bad, _ = verdicts.check(root, files, decode)
    table.attrs[VERDICTS] = verdicts
    if bad and cfg.on_bad_image == "error":
        first = min(bad)
        raise UserError(
            f"{len(bad)} unreadable image(s) in {cfg.train_csv}; first: {bad[first]}; replace or remove it, "
            "or pass --on-bad-image skip (on_bad_image) to train without it"
        )
    return table, bad


def pair_layout_hint(cfg: RunConfig, table: pd.DataFrame, workdir: Path) -> str | None:
    """One line when the rows look like the Kaggle pair layout (2k and 2k+1 show the same content) and the
    folds are not grouped: ``inspect``'s finding when it checked this data, else labels that alternate."""
    if cfg.group is not None:
        return None
    doc_path = inspect_dir(workdir) / "inspect.json"
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError):
        doc = None
    same_data = (
        bool(doc) and doc.get("data") == str(Path(cfg.data).resolve()) and doc.get("n_train") == len(table)
    )
    if same_data:
        found = any(f.get("key") == "pairs" and f.get("level") == "warn" for f in doc.get("findings", []))
        why = f"{doc_path} found rows 2k and 2k+1 to be pairs of the same content"
    else:
        y = table["label"].to_numpy()
        n = len(y) // 2
        found = n >= 10 and float((y[0 : 2 * n : 2] != y[1 : 2 * n : 2]).mean()) >= 0.95
        why = (
            "labels alternate in rows 2k, 2k+1 (the Kaggle pair layout; `aivh-ens inspect` checks the images)"
        )
    if not found:
        return None
    return f"note: {why}; random folds put the two halves of a pair on both sides: pass --group pairs"


def prepare_run(
    cfg: RunConfig,
    workdir: Path,
    table: pd.DataFrame,
    bad: dict[int, str],
    folds_to_run: list[int],
    force: bool,
    log: Log,
    pseudo: PseudoSource | None = None,
) -> pd.DataFrame:
    """Make or reuse the fold file, clear forced folds, freeze the pseudo-labels, write config.json and
    skipped.csv; the fold table."""
    hint = pair_layout_hint(cfg, table, workdir)
    if hint:
        log(hint)
    fold_path, fold_sha, fold_table, created = ensure_fold_file(
        workdir, table, cfg.folds, cfg.seed, cfg.group
    )
    if VERDICTS in table.attrs:  # every input is valid now: keep the decode verdicts for the next call
        table.attrs[VERDICTS].save()
    log(
        f"fold file: {fold_path} ({'created' if created else 'reused'}, sha256 {fold_sha[:12]}, "
        f"{len(fold_table)} rows, {cfg.folds} folds{', grouped by ' + cfg.group if cfg.group else ''})"
    )
    note = cpu_contention_note(cfg.device)
    if note:
        log(note)
    if cfg.head == "finetune":
        log(resolve_precision(cfg.amp, resolve_device(cfg.device)).line())
        init_note = random_init_note(cfg)
        if init_note:
            log(init_note)
    rdir = run_dir(workdir, cfg.name)
    if force:
        for k in folds_to_run:
            shutil.rmtree(fold_dir(workdir, cfg.name, k), ignore_errors=True)
        oof_path(workdir, cfg.name).unlink(missing_ok=True)
    record = None
    if pseudo is not None:
        check_same_run(cfg, workdir, fold_sha, force)  # a changed source must not replace the frozen copy
        freeze_pseudo(cfg, workdir, pseudo)  # before config.json, which names it
        record = pseudo_record(cfg, pseudo, fold_table["label"].to_numpy())
        log(describe_pseudo(record))
        log(pseudo_warning(record))
    write_run_config(cfg, workdir, fold_path, fold_sha, force, record)
    if bad:
        rows = sorted(bad)
        write_csv(
            rdir / "skipped.csv",
            pd.DataFrame(
                {"file_name": fold_table["file_name"].to_numpy()[rows], "reason": [bad[i] for i in rows]}
            ),
        )
        log(f"skipping {len(bad)} unreadable image(s) (listed in {rdir / 'skipped.csv'})")
    return fold_table


def run_fold(
    cfg: RunConfig,
    k: int,
    workdir: Path,
    fold_table: pd.DataFrame,
    exclude: frozenset[int],
    source: Any,
    *,
    resume: bool,
    progress: bool,
    log: Log,
    fit: Callable[..., dict[str, Any]] = fit_fold,
) -> dict[str, Any]:
    """One (run, fold) job under the fold's lock: skipped when done, else trained; its done.json summary.

    ``fit(job, source, resume=, progress=, log=)`` trains the fold: :func:`fit_fold`, or a probe head's.
    """
    rdir, fdir = run_dir(workdir, cfg.name), fold_dir(workdir, cfg.name, k)
    if fold_done(fdir):
        log(f"fold {k}: already done (use --force to retrain)")
        return read_fold_summary(fdir)
    # Another process (another host) that took the lock over, thinking this one dead, interrupts it: no
    # checkpoint of this fold is written from then on, and the call stops with one line.
    lock = FileLock(rdir / f"fold{k}.lock", what=f"fold {k} of run {cfg.name}", on_lost=interrupt_main)
    try:
        with fenced(lock, fdir):
            if fold_done(fdir):  # finished by another process while we waited
                return read_fold_summary(fdir)
            for tmp in fdir.glob(".*.tmp"):  # left by a process killed mid-write; never read, safe to drop
                tmp.unlink(missing_ok=True)
            what = cfg.model if cfg.head == "finetune" else f"a {cfg.head} head on {cfg.model} features"
            n_pseudo = int((fold_table["fold"] == PSEUDO_FOLD).sum())
            log(
                f"fold {k}/{cfg.folds - 1}: training {what} on {int((fold_table['fold'] != k).sum())} rows"
                f"{f' ({n_pseudo} pseudo-labelled)' if n_pseudo else ''}, validating on "
                f"{int((fold_table['fold'] == k).sum())}"
            )
            job = FoldJob(cfg, k, fdir, Path(cfg.data), job_table(fold_table), exclude)
            summary = fit(job, source, resume=resume, progress=progress, log=log)
    except LockLost as e:
        raise UserError(f"{e}; `aivh-ens status` shows who trains it now") from None
    faults.point("fold-done")
    return summary


def job_table(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a fold job reads from a training table: ``file_name,label,fold``, ``weight`` and
    ``only_fold`` (fold-consistent pseudo rows) if any."""
    return table[[c for c in ("file_name", "label", "fold", "weight", "only_fold") if c in table.columns]]


def finish_run(
    cfg: RunConfig,
    workdir: Path,
    fold_table: pd.DataFrame,
    exclude: set[int],
    summaries: list[dict[str, Any]],
    log: Log,
) -> CVResult:
    """Assemble the OOF when every fold is done and score it at 0.5; else say which folds remain."""
    oof = assemble_oof(workdir, cfg, fold_table, exclude, log)
    scores = None
    if oof is not None:
        df = pd.read_csv(oof)
        scores = metrics.summary_at(df["label"].to_numpy(), df["prob"].to_numpy())
    else:
        missing = [k for k in range(cfg.folds) if not fold_done(fold_dir(workdir, cfg.name, k))]
        log(f"OOF not written yet: fold(s) {', '.join(map(str, missing))} still to train")
    return CVResult(cfg.name, tuple(summaries), oof, scores)


def _num(v: float | None) -> float:
    """A done.json metric; null (a NaN when it was written: ``nulls`` says why) prints as nan."""
    return float("nan") if v is None else v


def format_summary(result: CVResult) -> str:
    """The end-of-run table: one row per fold, then OOF metrics at threshold 0.5."""
    lines = [
        f"run {result.run}",
        f"{'fold':>4} {'f1':>7} {'acc':>7} {'auc':>7} {'loss':>7} {'best_ep':>7} {'minutes':>8}",
    ]
    for s in result.folds:
        f1, acc, auc, loss = (_num(s[k]) for k in ("val_f1", "val_acc", "val_auc", "val_loss"))
        lines.append(
            f"{s['fold']:>4} {f1:>7.4f} {acc:>7.4f} {auc:>7.4f} {loss:>7.4f} {s['best_epoch']:>7} {s['minutes']:>8.2f}"
        )
    m = result.oof_metrics
    if m:
        lines.append(f"OOF at 0.5: f1 {m['f1']:.4f}  acc {m['acc']:.4f}  auc {m['auc']:.4f}  -> {result.oof}")
    return "\n".join(lines)
