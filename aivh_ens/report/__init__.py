"""The report page of a work dir: training curves, OOF results, the blend, the inspect findings.

Public names are imported lazily (matplotlib is loaded only when a page is built).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["REPORT_FILE", "ReportResult", "build_report"]

_WHERE = {"REPORT_FILE": "page", "ReportResult": "page", "build_report": "page"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
