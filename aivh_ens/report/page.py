"""The report stage: read what cv, blend and inspect wrote under a work dir, write one HTML page.

Reads ``runs/<run>/config.json``, ``runs/<run>/fold<k>/metrics.csv`` and ``done.json``, ``oof/<run>.csv``,
``runs/blend/blend.json`` and ``runs/inspect/inspect.json``; writes ``runs/report.html`` (atomically). A run
still training shows what its finished epochs and folds wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aivh_ens import layout
from aivh_ens.errors import UserError
from aivh_ens.io import write_text
from aivh_ens.metrics import best_threshold, summary_at
from aivh_ens.report import plots
from aivh_ens.report.html import esc, page, section, table

__all__ = ["ReportResult", "all_ai_f1", "build_report"]

_FOLD_COLUMNS = [
    "fold",
    "best_epoch",
    "epochs_run",
    "val_f1",
    "val_auc",
    "val_acc",
    "val_loss",
    "minutes",
    "n_train",
    "n_val",
    "status",
]


@dataclass(frozen=True)
class ReportResult:
    """The written page and a one-line summary of what it shows."""

    path: Path
    summary: str


def all_ai_f1(y: np.ndarray) -> float:
    """F1 of predicting every row AI (label 1): 2p / (1 + p) for a share p of label 1."""
    p = float(np.mean(np.asarray(y) == 1)) if len(y) else 0.0
    return 2 * p / (1 + p)


def _run_names(workdir: Path, runs: list[str] | None) -> list[str]:
    """The runs to show: ``runs`` checked against the work dir, or every run with a config.json."""
    root = layout.runs_dir(workdir)
    names = [p.parent.name for p in root.glob(f"*/{layout.CONFIG}")] if root.is_dir() else []
    found = sorted(r for r in names if r not in layout.RESERVED_RUN_NAMES)
    if runs is None:
        return found
    missing = [r for r in runs if r not in found]
    if missing:
        raise UserError(
            f"no run {', '.join(map(repr, missing))} under {root} (runs there: {', '.join(found) or 'none'}); "
            "name runs as `aivh-ens cv --name` made them"
        )
    return list(dict.fromkeys(runs))


def _read_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    """A CSV a stage wrote, with the columns the page needs, or a UserError naming the file."""
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV ({e}); re-run the stage that wrote it") from None
    lacking = [c for c in needed if c not in df.columns]
    if lacking:
        raise UserError(f"{path} lacks column(s) {', '.join(lacking)}; re-run the stage that wrote it")
    return df


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object a stage wrote, or a UserError naming the file."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}); re-run the stage that wrote it") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a JSON object; re-run the stage that wrote it")
    return doc


@dataclass(frozen=True)
class _Run:
    name: str
    config: dict[str, Any]
    history: dict[int, pd.DataFrame]  # fold -> metrics.csv
    folds: list[dict[str, Any]]  # one row per fold: done.json, or the progress of an unfinished fold
    oof: pd.DataFrame | None  # file_name,label,fold,prob once every fold is done


def _load_run(workdir: Path, name: str) -> _Run:
    """One run's config, per-epoch metrics and fold summaries, and its OOF file once complete."""
    rdir = layout.run_dir(workdir, name)
    config = layout.read_run_doc(workdir, name).get("config", {})
    history, folds = {}, []
    for fdir in sorted(rdir.glob("fold*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1):
        if not fdir.name[4:].isdigit() or not (fdir / "metrics.csv").is_file():
            continue
        k = int(fdir.name[4:])
        history[k] = _read_csv(fdir / "metrics.csv", ("epoch", "train_loss", "val_loss", "val_f1", "val_auc"))
        if (fdir / "done.json").is_file():
            folds.append({**_read_json(fdir / "done.json"), "status": "done"})
        else:
            last = history[k].iloc[-1]
            folds.append(
                {
                    "fold": k,
                    "epochs_run": int(last["epoch"]),
                    "val_f1": float(last["val_f1"]),
                    "val_auc": float(last["val_auc"]),
                    "status": "training",
                }
            )
    oof_path = layout.oof_path(workdir, name)
    oof = _read_csv(oof_path, ("file_name", "label", "fold", "prob")) if oof_path.is_file() else None
    return _Run(name, config, history, folds, oof)


def _run_section(run: _Run) -> str:
    """A run's section: config, training curves, per-fold table, OOF confusion and F1 curve."""
    c = run.config
    facts = ", ".join(
        f"{k} {c[k]}" for k in ("model", "recipe", "mode", "img_size", "epochs", "batch_size", "lr") if k in c
    )
    parts = [f'<p class="muted">{esc(facts)}</p>']
    if run.history:
        parts.append(plots.training_curves(run.name, run.history))
    parts.append(table(run.folds, [c for c in _FOLD_COLUMNS if any(c in f for f in run.folds)], 4))
    if run.oof is not None:
        y, p = run.oof["label"].to_numpy(), run.oof["prob"].to_numpy(float)
        parts.append(plots.confusion_and_threshold(run.name, y, p, 0.5))
    else:
        parts.append('<p class="muted">no oof/ file yet: it appears when every fold is done</p>')
    return section(f"Run {run.name}", *parts, anchor=f"run-{run.name}")


def _leaderboard(runs: list[_Run], blend: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per run (OOF F1, AUC, best threshold, nested score), then the all-AI baseline."""
    nested = {b["method"]: b for b in (blend or {}).get("baselines", [])}
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "model": r.config.get("model", "")}
        if r.oof is not None:
            y, p = r.oof["label"].to_numpy(), r.oof["prob"].to_numpy(float)
            s = summary_at(y, p, 0.5)
            t, best = best_threshold(y, p, "f1")
            row.update(
                {"OOF F1 at 0.5": s["f1"], "OOF AUC": s["auc"], "best OOF F1": best, "at threshold": t}
            )
        b = nested.get(f"single:{r.name}")
        if b:
            row["nested F1 (blend CV)"] = f"{b['nested_mean']:.4f} ± {b['nested_std']:.4f}"
        rows.append(row)
    y = next((r.oof["label"].to_numpy() for r in runs if r.oof is not None), None)
    if y is not None:  # the score any blend must beat: the F1-optimal threshold drifts here on weak runs
        rows.append(
            {
                "run": "(predict all AI)",
                "model": "baseline",
                "OOF F1 at 0.5": all_ai_f1(y),
                "OOF AUC": 0.5,
                "best OOF F1": all_ai_f1(y),
                "at threshold": 0.0,
            }
        )
    return rows


def _logit_correlation(runs: list[_Run]) -> pd.DataFrame | None:
    """Pearson correlation of the runs' OOF logits over the rows every run scored."""
    have = [r for r in runs if r.oof is not None]
    if len(have) < 2:
        return None
    eps = 1e-6
    cols = {}
    for r in have:
        p = r.oof.set_index("file_name")["prob"].clip(eps, 1 - eps)
        cols[r.name] = np.log(p / (1 - p))
    logits = pd.DataFrame(cols).dropna()
    return logits.corr() if len(logits) >= 2 else None


def _blend_section(workdir: Path, blend: dict[str, Any], runs: list[_Run]) -> str:
    """The blend's section: choice, warnings, every method's scores, weights, blended OOF."""
    from aivh_ens.blend import apply_blend
    from aivh_ens.blend.artifact import ranks_among_oof

    metric = blend["metric"]
    rows = [
        {
            "method": b["method"],
            f"OOF {metric}": b["oof_score"],
            f"nested {metric}": b["nested_mean"],
            "± (std over folds)": b["nested_std"],
            "threshold": b["threshold"],
            "shipped": "<- shipped"
            if b["method"] == blend["method"]
            else "baseline: every row AI"
            if b["method"] == "all_ai"
            else "",
        }
        for b in [*blend["baselines"], *([blend["all_ai"]] if "all_ai" in blend else [])]
    ]
    warn = "".join(f'<p class="finding warn"><b>warning</b>: {esc(w)}</p>' for w in blend.get("warnings", []))
    parts = [
        f"<p>Shipped: <b>{esc(blend['method'])}</b> in {esc(blend['space'])} space, threshold "
        f"{blend['threshold']:.4f}, nested {esc(metric)} {blend['nested_score']['mean']:.4f} ± "
        f"{blend['nested_score']['std']:.4f} (in-sample {blend['oof_score']:.4f}).</p>{warn}",
        table(rows, digits=4),
        plots.weights(blend["weights"], f"{blend['method']} weights ({blend['space']} space)"),
    ]
    by_name = {r.name: r for r in runs}
    names = [r["name"] for r in blend["runs"]]
    if all(n in by_name and by_name[n].oof is not None for n in names):
        first = by_name[names[0]].oof
        scores = {
            n: by_name[n].oof.set_index("file_name")["prob"].reindex(first["file_name"]).to_numpy()
            for n in names
        }
        if not any(np.isnan(s).any() for s in scores.values()):
            # a rank blend places scores among the OOF scores: here the OOF scores themselves
            reference = scores if ranks_among_oof(blend) else None
            probs, _ = apply_blend(blend, scores, reference)
            parts.append(
                plots.confusion_and_threshold(
                    "blend", first["label"].to_numpy(), probs, blend["threshold"], blend["space"]
                )
            )
    return section("Blend", *parts, anchor="blend")


def _load_blend(workdir: Path, wanted: bool | None) -> tuple[dict[str, Any] | None, str]:
    """The blend document (None when absent or left out) and a note when it was left out."""
    path = layout.blend_path(workdir)
    if wanted is False:
        return None, ""
    if not path.is_file():
        if wanted:
            raise UserError(
                f"--blend asks for the blend but {path} does not exist; run `aivh-ens blend` first"
            )
        return None, ""
    from aivh_ens.blend import load_blend

    try:
        return load_blend(path, workdir), ""
    except UserError as e:
        if wanted:
            raise
        return None, f"blend left out: {e}"


def _inspect_section(workdir: Path) -> str | None:
    """The inspect findings, when ``runs/inspect/inspect.json`` exists."""
    path = layout.inspect_dir(workdir) / "inspect.json"
    if not path.is_file():
        return None
    from aivh_ens.inspect.html import findings_html

    doc = _read_json(path)
    return section(
        "Inspect findings",
        f'<p class="muted">data {esc(doc.get("data", ""))}: {doc.get("n_train")} train and '
        f'{doc.get("n_test")} test images; the full audit is in <a href="inspect/report.html">'
        "inspect/report.html</a>.</p>",
        findings_html(doc.get("findings", [])),
        anchor="inspect",
    )


def _submission_section(path: Path) -> str | None:
    """How the submission beside the work dir was cut (``submission.json``, written by ``submit``)."""
    if not path.is_file():
        return None
    from aivh_ens.blend.shift import ShiftDiagnosis

    doc = _read_json(path)
    try:
        diag = ShiftDiagnosis.from_dict(doc["diagnosis"])
        lines = diag.lines()
        cut = (
            f"threshold {float(doc['threshold']):.4f} by --threshold {doc['threshold_mode']} "
            f"(OOF threshold {float(doc['oof_threshold']):.4f}): {doc['reason']}"
        )
    except (KeyError, TypeError, ValueError) as e:
        return section("Submission", f'<p class="note">{esc(path)} is not a submit record ({esc(e)})</p>')
    items = "".join(f"<li>{esc(x)}</li>" for x in lines)
    em = diag.estimate("EM on calibrated scores (Saerens 2002)")
    plot = (
        plots.shift_histogram(diag.histogram, em, diag.oof_threshold, float(doc["threshold"]))
        if diag.histogram and em is not None
        else ""
    )
    return section(
        "Submission: train/test shift",
        f'<p class="muted">{esc(path.name)}: {len(lines)} findings from comparing the blended test scores with '
        "the OOF scores, without test labels.</p>",
        f"<ul>{items}</ul><p>{esc(cut)}; predicted AI share {float(doc['predicted_ai_share']):.1%}.</p>",
        plot,
        anchor="submission",
    )


def expected_seconds(n_runs: int) -> float:
    """Seconds :func:`build_report` is expected to take for ``n_runs`` runs (the page, its plots per run)."""
    return 2.0 + 0.5 * n_runs


def build_report(
    workdir: str | Path = ".",
    runs: list[str] | None = None,
    blend: bool | None = None,
    out: str | Path | None = None,
    submission: str | Path | None = None,
) -> ReportResult:
    """Write the work dir's report page.

    Args:
        workdir: project folder holding ``runs/`` and ``oof/``.
        runs: run names (default every run under ``runs/``).
        blend: include the blend; None: when ``runs/blend/blend.json`` exists (and still matches its runs);
            True: fail without it; False: leave it out.
        out: the page's path (default ``runs/report.html``).
        submission: the record ``submit`` wrote beside its submission (default ``<workdir>/submission.json``
            when it exists): its shift diagnosis and threshold choice.

    Raises:
        UserError: an unknown run, a file that cannot be read, or ``blend=True`` without a valid blend.
    """
    workdir = Path(workdir)
    loaded = [_load_run(workdir, r) for r in _run_names(workdir, runs)]
    blend_doc, blend_note = _load_blend(workdir, blend)
    inspect_part = _inspect_section(workdir)
    if not loaded and blend_doc is None and inspect_part is None:
        raise UserError(
            f"nothing to report in {workdir}: no runs, blend or inspect results; run "
            "`aivh-ens inspect`, `aivh-ens cv` or `aivh-ens blend` first (or pass --workdir)"
        )
    parts = [inspect_part] if inspect_part else []
    if loaded:
        parts.append(section("Leaderboard", table(_leaderboard(loaded, blend_doc)), anchor="leaderboard"))
        corr = _logit_correlation(loaded)
        if corr is not None:
            parts.append(
                section(
                    "Diversity",
                    "<p>Correlation of the runs' OOF logits over the rows all of "
                    "them scored: the lower, the more a blend can gain.</p>",
                    plots.correlation(corr),
                )
            )
    if blend_doc is not None:
        parts.append(_blend_section(workdir, blend_doc, loaded))
    elif blend_note:
        parts.append(section("Blend", f'<p class="note">{esc(blend_note)}</p>'))
    sub_part = _submission_section(Path(submission) if submission else workdir / "submission.json")
    if sub_part:
        parts.append(sub_part)
    parts += [_run_section(r) for r in loaded]
    path = Path(out) if out is not None else layout.report_path(workdir)
    write_text(path, page("aivh-ens report", *parts, subtitle=f"work dir: {workdir.resolve()}"))
    blend_txt = f", blend {blend_doc['method']}" if blend_doc else ""
    summary = f"report: {len(loaded)} run(s){blend_txt}" + (", inspect findings" if inspect_part else "")
    return ReportResult(path, summary)
