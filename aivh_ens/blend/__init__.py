"""Blending OOF predictions: the numpy core, the methods, the Optuna search, blend.json, the stage.

``core`` imports only numpy; ``search`` is the one module importing optuna, ``report`` the one importing
matplotlib.
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "SPACES": ".core",
        "blend": ".core",
        "combine": ".core",
        "to_space": ".core",
        "spaces": ".core",
        "rank01": ".core",
        "dirichlet_weights": ".core",
        "stack_scores": ".core",
        "Fit": ".methods",
        "fit_single": ".methods",
        "fit_mean": ".methods",
        "fit_caruana": ".methods",
        "fit_hill_climb": ".methods",
        "nested_cv": ".methods",
        "all_ai": ".methods",
        "fit_optuna": ".search",
        "fit_stack": ".stack",
        "OOFSet": ".oof",
        "load_oof": ".oof",
        "load_blend": ".artifact",
        "apply_blend": ".artifact",
        "run_blend": ".stage",
        "BlendResult": ".stage",
        "MethodResult": ".stage",
        "pick_method": ".stage",
        "format_table": ".stage",
        "all_ai_result": ".stage",
        "blend_warnings": ".stage",
    },
)
