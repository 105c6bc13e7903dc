"""aivh-ens: cross-validated timm ensembles for AI-generated vs human-made image classification.

The same functions the CLI calls, for a notebook (every name is imported on first use, so ``import aivh_ens``
loads no torch, optuna or matplotlib)::

    import aivh_ens as ae

    ae.make_demo_dataset("demo/data", n=400)
    print(ae.run_inspect("demo/data", "demo").findings)
    for model in ("test_efficientnet", "test_convnext"):
        cfg = ae.resolve_config("tiny", model=model, name=model, data="demo/data", group="pairs", folds=3)
        print(ae.run_cv(cfg, "demo").oof_metrics)
    print(ae.run_blend("demo", trials=100).reason)
    print(ae.submit("demo", data="demo/data", out="demo/submission.csv").ai_rate)
    print(ae.build_report("demo").path)

Stages: :mod:`aivh_ens.auto` (all of them within a time limit), :mod:`aivh_ens.inspect`, :mod:`aivh_ens.data`, :mod:`aivh_ens.train`, :mod:`aivh_ens.scale` (sweeps),
:mod:`aivh_ens.blend`, :mod:`aivh_ens.infer`, :mod:`aivh_ens.report`;
every path under the work dir: :mod:`aivh_ens.layout`.
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "UserError": ".errors",
        "RunConfig": ".config",
        "resolve_config": ".config",
        "RECIPES": ".recipes",
        "best_threshold": ".metrics",
        "make_demo_dataset": ".synth",
        "read_train_table": ".data.tables",
        "read_test_table": ".data.tables",
        "load_image": ".data.images",
        "make_fold_table": ".data.folds",
        "run_cv": ".train.cv",
        "CVResult": ".train.cv",
        "load_plan": ".scale.plan",
        "run_sweep": ".scale.sweep",
        "SweepResult": ".scale.sweep",
        "status_rows": ".scale.status",
        "load_oof": ".blend.oof",
        "run_blend": ".blend.stage",
        "BlendResult": ".blend.stage",
        "load_blend": ".blend.artifact",
        "apply_blend": ".blend.artifact",
        "submit": ".infer.submission",
        "SubmitResult": ".infer.submission",
        "predict_images": ".infer.predict",
        "ImagePrediction": ".infer.predict",
        "run_inspect": ".inspect.stage",
        "audit_dataset": ".inspect.stage",
        "InspectResult": ".inspect.stage",
        "build_report": ".report.page",
        "run_auto": ".auto.stage",
        "AutoResult": ".auto.stage",
        "ReportResult": ".report.page",
    },
)
__all__ = [*__all__, "__version__"]
