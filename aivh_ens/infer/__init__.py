"""Inference: TTA views, a run's fold models, the test-score cache, ``submit`` and ``predict``."""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "TTASpec": ".tta",
        "parse_tta": ".tta",
        "RunInfo": ".runs",
        "check_run": ".runs",
        "load_models": ".runs",
        "predict_folds": ".runs",
        "fold_average": ".runs",
        "submit": ".submission",
        "SubmitResult": ".submission",
        "validate_submission": ".submission",
        "blend_test_scores": ".submission",
        "predict_images": ".predict",
        "ImagePrediction": ".predict",
        "format_predictions": ".predict",
        "scorer": ".predict",
        "blend_scores": ".predict",
        "rank_reference": "aivh_ens.blend.artifact",
    },
)
