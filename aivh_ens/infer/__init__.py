"""Inference: the test-score cache, ``submit`` and ``predict`` (fold models and TTA views: :mod:`aivh_ens.score`)."""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "TTASpec": "aivh_ens.score.tta_spec",
        "parse_tta": "aivh_ens.score.tta_spec",
        "RunInfo": "aivh_ens.score.runs",
        "check_run": "aivh_ens.score.runs",
        "load_models": "aivh_ens.score.runs",
        "predict_folds": "aivh_ens.score.runs",
        "fold_average": "aivh_ens.score.runs",
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
