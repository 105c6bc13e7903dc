"""The ``aivh-ens`` command line: thin click commands, each parsing options and making one library call.

Exit codes: 0 success, 2 bad input (a one-line ``error: ...`` on stderr, no traceback), 1 a bug or a failed
job. One module per stage: :mod:`~aivh_ens.cli.auto`, :mod:`~aivh_ens.cli.train` (folds, cv, cache, demo-data),
:mod:`~aivh_ens.cli.sweep` (sweep, status), :mod:`~aivh_ens.cli.blend`, :mod:`~aivh_ens.cli.infer` (submit,
predict), :mod:`~aivh_ens.cli.report` (inspect, report), :mod:`~aivh_ens.cli.serve`.
"""

from __future__ import annotations

import click

from aivh_ens.cli import offline  # noqa: F401 - first: sets HF_HUB_OFFLINE before any hub import

# isort: split
from aivh_ens.cli import auto, blend, infer, info, report, serve, sweep, train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aivh-ens")
def main() -> None:
    """aivh-ens: cross-validated timm ensembles for "AI-generated or human-made?" competitions.

    \b
    aivh-ens auto --data data/ --time-limit 20m       # everything below, planned for the budget
    aivh-ens cv --model efficientnet_b4 --folds 5 --data data/
    aivh-ens cv --model convnext_tiny --folds 5 --data data/
    aivh-ens blend
    aivh-ens submit --data data/
    aivh-ens recipes                                  # the presets; cv --print-config: resolved settings
    aivh-ens checks                                   # torch, devices, precision, weights, disk

    Offline by default: the CLI sets HF_HUB_OFFLINE=1 unless it is set already; HF_HUB_OFFLINE=0 aivh-ens ...
    lets timm download pretrained weights. Docs: docs/ (make docs), or README.md.
    """


for _command in (
    auto.auto_cmd,
    report.inspect_cmd,
    train.folds_cmd,
    train.cv_cmd,
    sweep.sweep_cmd,
    sweep.status_cmd,
    train.cache_cmd,
    blend.blend_cmd,
    infer.submit_cmd,
    infer.predict_cmd,
    report.report_cmd,
    serve.serve_cmd,
    train.demo_data_cmd,
    info.recipes_cmd,
    info.checks_cmd,
):
    main.add_command(_command)
