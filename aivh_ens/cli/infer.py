"""Commands of the inference stage: submit, predict."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from aivh_ens.cli.options import BLEND, TTA, WORKDIR, cpu_threads, user_errors

# ---- submit / predict ----------------------------------------------------------------------------------
# (the submit and predict commands are defined below this line)


@click.command("submit")
@BLEND
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Dataset folder with test.csv and the test images.  [default: the runs' training data]",
)
@TTA
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Submission file (id,label).  [default: WORKDIR/submission.csv]",
)
@click.option("--proba", is_flag=True, help="Also write the blended scores (id,prob) to <out>_proba.csv.")
@click.option(
    "--threshold",
    "threshold",
    default="auto",
    show_default=True,
    metavar="MODE",
    help="How the test scores are cut: oof (the blend's OOF threshold), share:P (the top P of test rows are AI), "
    "prior:P (the OOF threshold re-tuned for an AI share P), auto (chosen from the shift diagnosis), or a "
    "number in [0, 1].",
)
@click.option(
    "--adapt-bn",
    type=click.Choice(["off", "auto", "on"]),
    default="off",
    show_default=True,
    help="Re-estimate every fold model's BatchNorm statistics on the test images before scoring (AdaBN; the "
    "saved weights do not change). auto: only when the shift diagnosis finds the scores moved.",
)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Model inputs (images x TTA views) per forward pass.  [default: the run's eval batch]",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="DataLoader workers.  [default: cores on CUDA, 0 on CPU]",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@WORKDIR
@cpu_threads
@user_errors
def submit_cmd(
    blend_path, data, tta, out, proba, threshold, adapt_bn, device, batch_size, workers, quiet, workdir
) -> None:
    """Predict test.csv with every run of the blend (folds x TTA, cached per run) and write the submission.

    The blend's weights and space are applied as fitted on the OOF rows. The test scores are then compared
    with the OOF scores (predicted AI share, score shift, estimated test AI share) and cut by --threshold;
    <out stem>.json records the mode, the threshold, the reason and the diagnosis. A second submit with
    another threshold reuses each run's cached test scores (runs/<run>/test/).

    \b
    aivh-ens submit --data data/
    aivh-ens submit --data data/ --threshold share:0.5      # the test set is known to be balanced
    aivh-ens submit --data data/ --tta hflip+crops:5 --out sub_tta.csv --proba --adapt-bn on
    aivh-ens submit --blend runs/blend/blend.json --device cuda:0 --batch-size 256 --threshold oof
    """
    from aivh_ens.blend.shift import parse_threshold
    from aivh_ens.infer.submission import submit

    mode = parse_threshold(threshold)  # a bad mode fails here, before any model loads

    r = submit(
        workdir,
        blend_path=blend_path,
        data=data,
        tta=tta,
        out=out,
        proba=proba,
        threshold=mode,
        adapt_bn=adapt_bn,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=not quiet,
        log=click.echo,
    )
    runs = [f"{s.name} ({s.tta}, {'cached' if s.cached else f'{s.seconds:.1f}s'})" for s in r.runs]
    click.echo(f"blend: {r.space} space, OOF threshold {r.oof_threshold:.4f}; runs: {', '.join(runs)}")
    click.echo("shift diagnosis (test scores against OOF scores):")
    for line in r.diagnosis.lines():
        click.echo(f"  {line}")
    c = r.choice
    if r.adapted_bn:
        click.echo("scores from BatchNorm statistics re-estimated on the test images (AdaBN)")
    click.echo(f"threshold {c.threshold:.4f} by --threshold {c.mode}: {c.reason}")
    click.echo(f"predicted AI rate {r.ai_rate:.1%} (training rate {r.train_rate:.1%})")
    click.echo(
        f"wrote {r.out} ({r.n} rows)"
        + (f", {r.proba}" if r.proba else "")
        + f" and {r.record} (how it was cut)"
    )
    if r.warning:
        click.echo(f"warning: {r.warning}", err=True)


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@BLEND
@click.option(
    "--run",
    default=None,
    help="Score with this one run instead of a blend (threshold 0.5).  [default: the blend]",
)
@TTA
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Model inputs (images x TTA views) per forward pass.  [default: the run's eval batch]",
)
@WORKDIR
@cpu_threads
@user_errors
def predict_cmd(images, blend_path, run, tta, as_json, device, batch_size, workdir) -> None:
    """P(AI) and the label of single images; unreadable ones are reported and the rest still scored.

    \b
    aivh-ens predict photo.jpg render.png
    aivh-ens predict data/test_data_v2/*.jpg --json > preds.json
    aivh-ens predict photo.jpg --run efficientnet_b4-effnet-b4-adam --tta d4
    """
    import json

    from aivh_ens.infer.predict import format_predictions, predict_images

    preds, source = predict_images(
        list(images), workdir, blend_path=blend_path, run=run, tta=tta, device=device, batch_size=batch_size
    )
    if as_json:
        results = [{"image": p.image, "prob": p.prob, "label": p.label, "error": p.error} for p in preds]
        click.echo(json.dumps({**source, "results": results}, indent=2))
    else:
        click.echo(format_predictions(preds, source["space"]))
    failed = [p for p in preds if p.error is not None]
    for p in failed:
        click.echo(f"error: {p.error}", err=True)
    if failed:
        sys.exit(2)
