"""Scoring fold models: TTA views, a run's fold models (fine-tuned or probe heads) loaded and run over images,
views and folds averaged in the blend's space.

One layer below both ``train`` (a fold job's OOF pass) and ``infer`` (submit, predict) and ``serve``: they
import it, it imports neither. Of ``train`` it uses only the model pieces (models, loop, precision, features).
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "TTASpec": ".tta_spec",
        "parse_tta": ".tta_spec",
        "effective_spec": ".tta",
        "own_spec": ".tta",
        "RunInfo": ".runs",
        "check_run": ".runs",
        "load_models": ".runs",
        "predict_folds": ".runs",
        "view_average": ".runs",
        "fold_average": ".runs",
        "run_spec": ".runs",
        "adapt_batchnorm": ".runs",
        "probe_test_scores": ".probe",
        "DataConfig": "aivh_ens.train.models",
        "resolve_device": "aivh_ens.train.loop",
        "inference_amp": "aivh_ens.train.precision",
    },
)
