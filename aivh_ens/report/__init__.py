"""The report page of a work dir: training curves, OOF results, the blend, the inspect findings.

matplotlib is imported only when a page is built.
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__, {"ReportResult": ".page", "build_report": ".page", "all_ai_f1": ".page"}
)
