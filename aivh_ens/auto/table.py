"""``auto``'s final table: what ran, minutes per run, OOF and nested scores, the shipped blend, the budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aivh_ens.auto.budget import format_duration
from aivh_ens.auto.plan import AutoPlan
from aivh_ens.layout import fold_dir


def run_rows(workdir: Path, plan: AutoPlan, blend: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per planned run, from its fold files and the blend's per-run scores."""
    import json

    singles = {b["method"].split(":", 1)[1]: b for b in (blend or {}).get("baselines", [])
               if b["method"].startswith("single:")}  # fmt: skip
    rows = []
    for r in plan.runs:
        done = []
        for k in range(plan.folds):
            path = fold_dir(workdir, r.name, k) / "done.json"
            if path.is_file():
                done.append(json.loads(path.read_text()))
        s = singles.get(r.name, {})
        rows.append({
            "run": r.name, "model": r.settings.get("model"), "kind": r.kind,
            "img_size": r.settings.get("img_size"), "epochs": r.epochs,
            "epochs_run": sum(d.get("epochs_run", 0) for d in done), "folds_done": len(done), "folds": plan.folds,
            "minutes": sum(d.get("minutes", 0.0) for d in done), "estimated_minutes": r.job_s * plan.folds / 60,
            "oof": s.get("oof_score"), "nested": s.get("nested_mean"),
            "in_blend": bool(blend and blend["weights"].get(r.name) is not None),
        })  # fmt: skip
    return rows


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def final_table(
    plan: AutoPlan,
    rows: list[dict[str, Any]],
    blend: dict[str, Any] | None,
    sub: Any,
    used_s: float,
    limit_s: float,
    steps: dict[str, float],
    note: str = "",
) -> str:
    """The table ``auto`` prints last (and writes to ``runs/auto/table.txt``); ``note``: a last line."""
    head = ("run", "model", "px", "epochs", "folds", "train min", "OOF F1", "nested F1")
    body = [
        (r["run"], str(r["model"]), str(r["img_size"]), f"{r['epochs_run'] / max(1, r['folds_done']):.0f}/{r['epochs']}"
         if r["folds_done"] else f"0/{r['epochs']}", f"{r['folds_done']}/{r['folds']}", f"{r['minutes']:.1f}",
         _num(r["oof"]), _num(r["nested"]))
        for r in rows
    ]  # fmt: skip
    if blend is not None:
        weights = ", ".join(f"{k} {w:.2f}" for k, w in blend["weights"].items())
        body.append((f"blend: {blend['method']}", f"{blend['space']} space", "", "", "", "",
                     _num(blend["oof_score"]), _num(blend["nested_score"]["mean"])))  # fmt: skip
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in (head, *body)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if blend is not None:
        lines.append(f"shipped blend: {blend['method']} ({weights}), threshold {blend['threshold']:.4f}")
    if sub is not None:
        lines.append(f"submission: {sub.out} ({sub.n} rows, predicted AI rate {sub.ai_rate:.1%}, threshold "
                     f"{sub.threshold:.4f})")  # fmt: skip
    spent = ", ".join(f"{k} {format_duration(v)}" for k, v in steps.items())
    lines.append(
        f"budget: used {format_duration(used_s)} of {format_duration(limit_s)} ({used_s / limit_s:.0%}): {spent}; "
        f"the plan ({len(plan.runs)} runs x {plan.folds} folds) was estimated at "
        f"{format_duration(plan.train_s + plan.finish_s)}"
    )
    return "\n".join([*lines, note] if note else lines)


def dry_run_table(plan: AutoPlan, timings: dict[str, Any], spent_s: float) -> str:
    """What ``auto --dry-run`` prints: the timed candidates, the plan's runs and its estimates (nothing trained
    or written)."""
    head = ("candidate", "kind", "model", "px", "train img/s", "eval img/s")
    cand = [(k, str(v.get("kind", "")), str(v.get("model", "")), str(v.get("img_size", "")),
             f"{v['train_img_s']:.0f}", f"{v['eval_img_s']:.0f}") for k, v in timings.items()]  # fmt: skip
    runs = [("run", "kind", "model", "px", "epochs", "per fold job")]
    runs += [(r.name, r.kind, str(r.settings.get("model")), str(r.settings.get("img_size")), str(r.epochs),
              format_duration(r.job_s)) for r in plan.runs]  # fmt: skip
    total = spent_s + plan.train_s + plan.finish_s
    return "\n".join([
        *_aligned(head, cand), "",
        f"plan: {len(plan.runs)} runs x {plan.folds} folds on {','.join(plan.devices)}; shared settings: "
        + (", ".join(f"{k} = {v}" for k, v in plan.shared.items()) or "none"),
        *_aligned(runs[0], runs[1:]), "",
        f"estimates: inspect + timing {format_duration(spent_s)} (done), training {format_duration(plan.train_s)}, "
        f"blend + submit + report {format_duration(plan.finish_s)}: {format_duration(total)} of "
        f"{format_duration(plan.limit_s)} ({total / plan.limit_s:.0%})",
        "dry run: nothing was trained or written",
    ])  # fmt: skip


def _aligned(head: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
