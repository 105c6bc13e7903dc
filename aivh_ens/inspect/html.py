"""The inspect page (``runs/inspect/report.html``): findings, feature tables, histograms, example images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aivh_ens.data import BadImageError, load_image
from aivh_ens.inspect.scan import CATEGORICAL, UNITS
from aivh_ens.report.html import esc, figure, figure_img, image_img, page, section, table

__all__ = ["findings_html", "inspect_page"]

_HIST = ("width", "height", "megapixels", "kbytes", "bytes_per_pixel", "jpeg_quality")
_SHOWN = 4  # example images per kind
_COLOURS = ("tab:red", "tab:blue")


def findings_html(findings: list[dict[str, Any]]) -> str:
    """The findings as coloured lines, each with its recommended flag."""
    lines = []
    for f in findings:
        flag = f" &rarr; <code>{esc(f['flag'])}</code>" if f.get("flag") else ""
        lines.append(
            f'<p class="finding {esc(f["level"])}"><b>{esc(f["level"])}</b>: {esc(f["message"])}{flag}</p>'
        )
    return "\n".join(lines)


def _hist(ax: Any, feature: str, groups: dict[str, pd.Series]) -> None:
    """Overlaid histograms of one numeric feature, as shares of each group's images."""
    values = {k: v.to_numpy(float)[np.isfinite(v.to_numpy(float))] for k, v in groups.items()}
    both = np.concatenate(list(values.values()))
    if not len(both):
        ax.text(0.5, 0.5, "no values (no JPEGs)", ha="center", va="center", transform=ax.transAxes)
    else:
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo - 0.5, hi + 0.5, 2) if lo == hi else np.histogram_bin_edges(both, bins=30)
        for (name, v), colour in zip(values.items(), _COLOURS, strict=False):
            if len(v):
                ax.hist(
                    v,
                    bins=bins,
                    weights=np.full(len(v), 1 / len(v)),
                    histtype="stepfilled",
                    alpha=0.5,
                    label=name,
                    color=colour,
                )
    ax.set(xlabel=f"{feature} ({UNITS[feature]})", ylabel="share of images", title=feature)


def _bars(ax: Any, feature: str, groups: dict[str, pd.Series]) -> None:
    """Side-by-side shares of each category of one categorical feature."""
    shares = pd.DataFrame({k: v.astype(str).value_counts(normalize=True) for k, v in groups.items()}).fillna(
        0
    )
    x = np.arange(len(shares))
    width = 0.8 / max(1, shares.shape[1])
    for i, (name, colour) in enumerate(zip(shares.columns, _COLOURS, strict=False)):
        ax.bar(x + i * width, shares[name].to_numpy(), width, label=name, color=colour, alpha=0.8)
    ax.set_xticks(x + width * (shares.shape[1] - 1) / 2, shares.index, rotation=20, fontsize=7)
    ax.set(ylabel="share of images", title=feature, ylim=(0, 1))


def _grid(groups: dict[str, pd.DataFrame], title: str) -> str:
    """Every feature's distribution per group, as one embedded figure of small panels."""
    feats = [*_HIST, *CATEGORICAL]
    fig = figure(12.0, 8.0, layout=None)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.08, top=0.92, wspace=0.28, hspace=0.55)
    fig.suptitle(title)
    axes = fig.subplots(3, 3).ravel()
    for ax, f in zip(axes, feats, strict=True):
        cols = {k: df[f] for k, df in groups.items()}
        (_bars if f in CATEGORICAL else _hist)(ax, f, cols)
    axes[0].legend(fontsize=8)  # one legend: every panel uses the same colours
    return figure_img(fig, title)


def _thumb(data: Path, rel: str, caption: str) -> str:
    """One captioned thumbnail, or the reason the image cannot be shown."""
    try:
        img = image_img(load_image(data / rel, max_side=128), rel)
    except BadImageError as e:
        img = f'<span class="warn">{esc(e.reason)}</span>'
    return f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>"


def _examples(data: Path, items: list[tuple[str, str]]) -> str:
    """A row of captioned thumbnails of ``(path, caption)`` items."""
    return "<div>" + "".join(_thumb(data, rel, cap) for rel, cap in items) + "</div>"


def _pair_examples(data: Path, train_t: pd.DataFrame) -> str:
    """Thumbnails of the first pairs of train rows (2k, 2k+1) with their labels."""
    items = []
    for k in range(min(_SHOWN, len(train_t) // 2)):
        for r in (2 * k, 2 * k + 1):
            items.append((train_t["file_name"][r], f"row {r}, label {train_t['label'][r]}"))
    return _examples(data, items)


def _duplicate_examples(data: Path, dups: dict[str, Any]) -> str:
    """Side-by-side thumbnails of the first conflicting copies, leaks and near-duplicates."""
    parts = []
    for title, pairs in (
        ("conflicting byte-identical train images", [(g[0], g[1]) for g in dups["train_exact_conflicts"]]),
        ("test images identical to train images", [(d["test"], d["train"]) for d in dups["test_exact"]]),
        ("test images near train images", [(d["test"], d["train"]) for d in dups["test_near"]]),
        ("near-duplicate train images", [(d["a"], d["b"]) for d in dups["train_near"]]),
    ):
        if pairs:
            items = [(rel, rel) for pair in pairs[:_SHOWN] for rel in pair]
            parts.append(f"<h3>{esc(title)} (first {min(_SHOWN, len(pairs))} of {len(pairs)} listed)</h3>")
            parts.append(_examples(data, items))
    return "\n".join(parts) or '<p class="muted">no duplicates to show</p>'


def _summary(doc: dict[str, Any]) -> str:
    """The counts, AI share and scan speed as a small table."""
    rows = [
        {"": "train images", "value": doc["n_train"]},
        {"": "test images", "value": doc["n_test"] if doc["n_test"] is not None else "no test.csv"},
        {"": "train share of label 1 (AI)", "value": f"{doc['train_ai_rate']:.1%}"},
        {"": "scan speed", "value": f"{doc['img_per_s']:.0f} img/s"},
        {"": "inspect time", "value": f"{doc['seconds']:.1f} s"},
    ]
    return table(rows)


def inspect_page(
    doc: dict[str, Any],
    data: Path,
    train_t: pd.DataFrame,
    test_t: pd.DataFrame | None,
    train: pd.DataFrame,
    test: pd.DataFrame | None,
) -> str:
    """The whole inspect page as one self-contained HTML string."""
    y = train_t["label"].to_numpy().astype(bool)
    sc = doc["shortcut"]
    parts = [
        section("Findings", findings_html(doc["findings"]), _summary(doc)),
        section(
            "Shortcut check: does metadata predict the label?",
            f"<p>Gradient boosting on metadata alone, cross-validated ROC AUC <b>{sc['auc']:.3f}</b> "
            f"(warning above {sc['threshold']}). Each feature alone (AUC folded to &ge; 0.5):</p>",
            table(sc["features"], ["feature", "auc", "difference"], 3),
            _grid({"AI (1)": train[y], "human (0)": train[~y]}, "train images by class"),
        ),
    ]
    if "shift" in doc and test is not None:
        sh = doc["shift"]
        parts.append(
            section(
                "Adversarial validation: does test look like train?",
                f"<p>Gradient boosting separating test from train on metadata, cross-validated ROC AUC "
                f"<b>{sh['auc']:.3f}</b> (warning above {sh['threshold']}). Distance per feature (KS for numbers, "
                "total variation for categories):</p>",
                table(sh["features"], ["feature", "distance", "kind", "difference"], 3),
                _grid({"test": test, "train": train}, "test vs train images"),
            )
        )
    p = doc["pairs"]
    parts.append(
        section(
            "Structure: pairs of rows 2k, 2k+1",
            table([{k: v for k, v in p.items()}]),
            "<p>The first pairs of the train table:</p>",
            _pair_examples(data, train_t),
        )
    )
    d = doc["duplicates"]
    counts = [{"kind": k, "count": len(d[k])} for k in ("train_exact", "train_exact_conflicts", "test_exact")]
    counts += [
        {"kind": "train_near", "count": d["n_train_near"]},
        {"kind": "test_near", "count": d["n_test_near"]},
    ]
    parts.append(section("Duplicates and leaks", table(counts), _duplicate_examples(data, d)))
    return page("aivh-ens inspect", *parts, subtitle=f"data: {doc['data']}")
