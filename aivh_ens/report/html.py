"""Self-contained HTML pieces: one page, tables, and figures and images embedded as base64 PNG.

A page built from these opens from disk with no server and no network: styles are inline, every image
is a ``data:image/png;base64`` URI. Figures are matplotlib ``Figure`` objects on the Agg canvas, never
pyplot, so nothing touches matplotlib's global state.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np

__all__ = ["esc", "figure", "figure_img", "image_img", "page", "section", "table"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.warn{color:#a40000}.ok{color:#2a6b2a}.note{color:#8a5a00}
.finding{margin:.3em 0}.muted{color:#777;font-size:.9em}img{max-width:100%}
figure{display:inline-block;margin:.4em;text-align:center;vertical-align:top}
figcaption{font-size:.8em;color:#555;max-width:220px;word-break:break-all}
"""


def esc(x: Any) -> str:
    """HTML-escaped text of ``x``."""
    return html.escape(str(x))


def _cell(v: Any, digits: int) -> tuple[str, str]:
    """(text, css class) of one table cell: numbers right-aligned and rounded, text left-aligned."""
    if isinstance(v, bool) or v is None:
        return ("" if v is None else str(v)), "l"
    if isinstance(v, int | np.integer):
        return f"{int(v):,}", ""
    if isinstance(v, float | np.floating):
        return ("" if not math.isfinite(v) else f"{v:.{digits}f}"), ""
    return esc(v), "l"


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """An HTML table of dicts (one per row), columns in ``columns`` order (default the first row's keys)."""
    rows = list(rows)
    if not rows:
        return '<p class="muted">(none)</p>'
    cols = list(columns or rows[0].keys())
    head = "".join(f'<th class="{"l" if not _numeric(rows, c) else ""}">{esc(c)}</th>' for c in cols)
    body = []
    for r in rows:
        cells = (_cell(r.get(c), digits) for c in cols)
        body.append("<tr>" + "".join(f'<td class="{k}">{t}</td>' for t, k in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _numeric(rows: list[dict[str, Any]], col: str) -> bool:
    """Whether column ``col`` holds numbers (right-aligned)."""
    v = next((r.get(col) for r in rows if r.get(col) is not None), None)
    return isinstance(v, int | float | np.number) and not isinstance(v, bool)


def figure(width: float = 7.0, height: float = 4.0, layout: str | None = "constrained") -> Any:
    """A matplotlib Figure on its own Agg canvas (pyplot's global state stays untouched).

    ``layout=None`` leaves spacing to ``fig.subplots_adjust``: constrained layout costs ~1 s per grid of
    nine panels on a busy 2-core machine.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    """An ``<img>`` with PNG bytes as a data URI."""
    size = f' width="{width}"' if width else ""
    return f'<img alt="{esc(alt)}"{size} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure_img(fig: Any, alt: str, dpi: int = 100) -> str:
    """``fig`` as an embedded PNG ``<img>``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return _img(buf.getvalue(), alt)


def image_img(rgb: np.ndarray, alt: str, side: int = 128) -> str:
    """An (H, W, 3) uint8 RGB image as an embedded PNG thumbnail whose longer side is at most ``side``."""
    h, w = rgb.shape[:2]
    s = min(1.0, side / max(h, w))
    if s < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return _img(png.tobytes(), alt)


def section(title: str, *parts: str, anchor: str | None = None) -> str:
    """An ``<h2>`` section of the given HTML parts."""
    aid = f' id="{esc(anchor)}"' if anchor else ""
    return f"<h2{aid}>{esc(title)}</h2>\n" + "\n".join(parts)


def page(title: str, *parts: str, subtitle: str = "") -> str:
    """A complete HTML document; ``parts`` are HTML strings (sections)."""
    sub = f'<p class="muted">{esc(subtitle)}</p>' if subtitle else ""
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body><h1>{esc(title)}</h1>{sub}\n{body}\n</body></html>\n"
    )
