"""Training: models, the epoch loop, one (run, fold) job, the cv stage over a run's folds, and probe runs
(frozen-backbone features in a feature store, one head per fold)."""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "build_model": ".models",
        "create_backbone": ".models",
        "check_model_name": ".models",
        "check_weights_match": ".models",
        "choose_amp": ".precision",
        "resolve_precision": ".precision",
        "resolve_device": ".loop",
        "create_optimizer": ".loop",
        "lr_factor": ".loop",
        "train_one_epoch": ".loop",
        "evaluate": ".loop",
        "FoldJob": ".fold",
        "fit_fold": ".fold",
        "run_cv": ".cv",
        "CVResult": ".cv",
        "format_summary": ".cv",
        "FeatureStore": ".features",
        "ensure_features": ".features",
        "extract_features": ".features",
        "ProbeHead": ".probe",
        "fit_probe_fold": ".probe",
        "run_probe_cv": ".probe",
    },
)
