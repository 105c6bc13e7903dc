"""Dataset audit before training: shortcuts, train/test shift, pairs, duplicates (``aivh-ens inspect``).

``scan`` and ``audit`` import no torch; ``html`` imports matplotlib (on first use of the page).
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "Audit": ".stage",
        "Finding": ".stage",
        "InspectResult": ".stage",
        "audit_dataset": ".stage",
        "format_findings": ".stage",
        "run_inspect": ".stage",
        "write_audit": ".stage",
        "scan_images": ".scan",
    },
)
