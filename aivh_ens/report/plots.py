"""The report's figures: matplotlib ``Figure`` objects (Agg canvas, no pyplot), returned as ``<img>`` HTML."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from aivh_ens.metrics import threshold_sweep
from aivh_ens.report.html import figure, figure_img

__all__ = ["confusion_and_threshold", "correlation", "shift_histogram", "training_curves", "weights"]


def training_curves(run: str, history: Mapping[int, pd.DataFrame]) -> str:
    """Loss, F1 and AUC per epoch, one line per fold (train loss solid, validation loss dashed)."""
    fig = figure(12.0, 3.6)
    fig.suptitle(f"{run}: training curves per fold")
    ax_loss, ax_f1, ax_auc = fig.subplots(1, 3)
    for k, m in sorted(history.items()):
        colour = f"C{k % 10}"
        ax_loss.plot(m["epoch"], m["train_loss"], color=colour, marker=".", label=f"fold {k} train")
        ax_loss.plot(
            m["epoch"], m["val_loss"], color=colour, marker=".", linestyle="--", label=f"fold {k} valid"
        )
        ax_f1.plot(m["epoch"], m["val_f1"], color=colour, marker=".", label=f"fold {k}")
        ax_auc.plot(m["epoch"], m["val_auc"], color=colour, marker=".", label=f"fold {k}")
    ax_loss.set(
        xlabel="epoch", ylabel="cross-entropy (nats per image)", title="loss (solid: train, dashed: valid)"
    )
    ax_f1.set(xlabel="epoch", ylabel="F1 of label 1 at threshold 0.5", title="validation F1")
    ax_auc.set(xlabel="epoch", ylabel="ROC AUC", title="validation AUC")
    for ax in (ax_loss, ax_f1, ax_auc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_f1.legend(fontsize=7)
    return figure_img(fig, f"{run} training curves")


def _confusion(ax: object, y: np.ndarray, pred: np.ndarray, title: str) -> None:
    """A 2x2 confusion matrix with counts and row shares, on ``ax``."""
    cm = np.array([[np.sum(~y & ~pred), np.sum(~y & pred)], [np.sum(y & ~pred), np.sum(y & pred)]])
    ax.imshow(cm, cmap="Blues", vmin=0)
    for (i, j), v in np.ndenumerate(cm):
        share = v / max(1, cm[i].sum())
        ax.text(
            j,
            i,
            f"{v:,}\n({share:.1%} of row)",
            ha="center",
            va="center",
            color="white" if v > cm.max() / 2 else "black",
            fontsize=9,
        )
    ax.set_xticks([0, 1], ["human (0)", "AI (1)"])
    ax.set_yticks([0, 1], ["human (0)", "AI (1)"])
    ax.set(xlabel="predicted", ylabel="true label", title=title)


def confusion_and_threshold(
    name: str, y: np.ndarray, p: np.ndarray, threshold: float, space: str = "prob"
) -> str:
    """OOF confusion matrix at ``threshold`` beside F1 against threshold (shipped and best marked)."""
    y = np.asarray(y).astype(bool)
    fig = figure(11.0, 3.8)
    ax_cm, ax_f1 = fig.subplots(1, 2, width_ratios=[1, 1.6])
    _confusion(ax_cm, y, np.asarray(p) >= threshold, f"OOF confusion at threshold {threshold:.3f}")
    thresholds, scores = threshold_sweep(y, p, "f1")
    ax_f1.plot(thresholds, scores, color="tab:blue", label="F1")
    i = int(np.argmax(scores))
    ax_f1.axvline(threshold, color="tab:red", linestyle=":", label=f"shipped {threshold:.3f}")
    ax_f1.plot(
        [thresholds[i]],
        [scores[i]],
        "o",
        color="tab:green",
        label=f"best {scores[i]:.4f} at {thresholds[i]:.3f}",
    )
    all_ai = 2 * y.mean() / (1 + y.mean())
    ax_f1.axhline(all_ai, color="gray", linestyle="--", label=f"all AI {all_ai:.3f}")
    ax_f1.set(
        xlabel=f"threshold on the {space} score (predict AI when score >= t)",
        ylabel="OOF F1 of label 1",
        title=f"{name}: F1 against threshold",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax_f1.grid(alpha=0.3)
    ax_f1.legend(fontsize=8, loc="lower center")
    return figure_img(fig, f"{name} confusion matrix and F1 against threshold")


def correlation(corr: pd.DataFrame) -> str:
    """Heat map of the correlation of the runs' OOF logits (low = diverse runs, what a blend feeds on)."""
    n = len(corr)
    fig = figure(max(4.5, 1.0 * n + 2.5), max(3.5, 0.8 * n + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(corr.to_numpy(), cmap="viridis", vmin=min(0.0, float(corr.to_numpy().min())), vmax=1)
    for (i, j), v in np.ndenumerate(corr.to_numpy()):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.8 else "black", fontsize=9)
    ax.set_xticks(range(n), corr.columns, rotation=30, ha="right")
    ax.set_yticks(range(n), corr.index)
    ax.set_title("Pearson correlation of OOF logits")
    fig.colorbar(im, ax=ax, label="correlation")
    return figure_img(fig, "correlation of OOF logits")


def weights(w: Mapping[str, float], title: str) -> str:
    """The blend weights as bars."""
    fig = figure(max(4.0, 0.9 * len(w) + 2.5), 3.2)
    ax = fig.add_subplot()
    bars = ax.bar(list(w), list(w.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set(ylabel="weight (sums to 1)", title=title, ylim=(0, 1.1))
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(axis="y", alpha=0.3)
    return figure_img(fig, title)


SHIFT_ALT = "test scores over the OOF classes re-weighted to the estimated AI share"


def shift_histogram(
    hist: Mapping[str, list[float]], share: float, oof_threshold: float, shipped: float
) -> str:
    """The test scores' histogram over the OOF class histograms re-weighted to AI share ``share``, on the
    logit axis, with the OOF and the shipped thresholds marked: where the test lumps are against where OOF
    says they should be (``hist``: :func:`aivh_ens.blend.shift_stats.histograms`)."""
    from aivh_ens.blend.shift_stats import logits

    edges = np.asarray(hist["edges"])
    ai, human = share * np.asarray(hist["oof_ai"]), (1 - share) * np.asarray(hist["oof_human"])
    fig = figure(8.0, 3.8)
    ax = fig.add_subplot()
    ax.stairs(
        hist["test"], edges, fill=True, color="0.75", label="test scores (one fold model per run, pooled)"
    )
    ax.stairs(human, edges, color="tab:blue", linestyle="--", label=f"OOF human x {1 - share:.0%}")
    ax.stairs(ai, edges, color="tab:red", linestyle="--", label=f"OOF AI x {share:.0%}")
    ax.stairs(ai + human, edges, color="black", label="their sum: what label shift alone predicts")
    for t, colour, name in ((oof_threshold, "tab:green", "OOF"), (shipped, "tab:purple", "shipped")):
        x = float(np.clip(logits(np.array([t]))[0], edges[0], edges[-1]))
        ax.axvline(x, color=colour, linestyle=":", label=f"{name} threshold {t:.3f}")
    ax.set(xlabel="logit of the blended score", ylabel="density", title=f"test vs OOF scores ({SHIFT_ALT})")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_img(fig, SHIFT_ALT)
