"""``aivh-ens auto``: from a data folder to a submission within a time limit, over the other stages.

``budget`` (time limits, the cost model, the plan that fits; no torch), ``candidates`` (pretrained or
from-scratch models for the device and the images), ``timing`` (the timed probe), ``plan`` (the sweep plan
and the state a later call resumes), ``planning`` (a new, resumed, extended or topped-up plan), ``gate`` (the
clock that starts only jobs it can finish), ``steps`` (the sweep with its progress lines and anytime
submission, blend, submit), ``stage`` (``run_auto``), ``table`` (the final and dry-run tables).
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "run_auto": ".stage",
        "AutoResult": ".stage",
        "AutoPlan": ".plan",
        "parse_time_limit": ".budget",
        "fit_plan": ".budget",
        "Speed": ".budget",
        "Candidate": ".candidates",
        "choose_candidates": ".candidates",
    },
)
