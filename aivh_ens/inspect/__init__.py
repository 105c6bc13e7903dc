"""Dataset audit before training: shortcuts, train/test shift, pairs, duplicates (``aivh-ens inspect``).

Public names are imported lazily, so ``import aivh_ens.inspect`` costs nothing until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Audit",
    "Finding",
    "InspectResult",
    "audit_dataset",
    "format_findings",
    "run_inspect",
    "scan_images",
]

_WHERE = {
    "Audit": "stage",
    "audit_dataset": "stage",
    "Finding": "stage",
    "InspectResult": "stage",
    "format_findings": "stage",
    "run_inspect": "stage",
    "scan_images": "scan",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
