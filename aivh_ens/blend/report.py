"""The blend stage's plots (threshold curves, weights) as PNG files; the only blend module importing matplotlib."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aivh_ens.io import atomic_path
from aivh_ens.metrics import threshold_sweep

if TYPE_CHECKING:
    pass


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def plot_threshold_curves(
    path: Path, y: np.ndarray, curves: Mapping[str, tuple[np.ndarray, float]], metric: str
) -> Path:
    """Metric against threshold for each ``{label: (scores (N,), chosen threshold)}``, as a PNG."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, (s, t) in curves.items():
        thresholds, scores = threshold_sweep(y, s, metric)
        (line,) = ax.plot(thresholds, scores, label=f"{label} (t={t:.3f}, {metric}={scores.max():.4f})")
        ax.axvline(t, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(xlabel="threshold (predict 1 when score >= t)", ylabel=metric, title=f"OOF {metric} by threshold")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", fontsize=8)
    return _save(fig, path)


def plot_weights(path: Path, weights: Mapping[str, float], title: str) -> Path:
    """The blend weights as bars, as a PNG."""
    fig = _figure(max(4.0, 0.6 * len(weights) + 2), 3.5)
    ax = fig.add_subplot()
    ax.bar(list(weights), list(weights.values()), color="tab:blue")
    ax.set(ylabel="weight", title=title, ylim=(0, 1))
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
