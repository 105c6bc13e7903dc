"""The inspect command (before training) and the report command (after it)."""

from __future__ import annotations

from pathlib import Path

import click

from aivh_ens.cli.options import WORKDIR, user_errors


@click.command("inspect")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Dataset folder with train.csv (and test.csv) and the images.  [default: .]",
)
@click.option("--train-csv", default="train.csv", show_default=True, help="Train table inside --data.")
@click.option("--test-csv", default=None, help="Test table inside --data.  [default: test.csv when present]")
@click.option("--file-col", default="file_name", show_default=True, help="Column of image paths (train).")
@click.option("--label-col", default="label", show_default=True, help="Column of 0/1 labels (1 = AI).")
@click.option("--id-col", default="id", show_default=True, help="Column of image paths (test).")
@click.option(
    "--jobs", type=click.IntRange(min=1), default=None, help="Scanning threads.  [default: every core]"
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@WORKDIR
@user_errors
def inspect_cmd(data, train_csv, test_csv, file_col, label_col, id_col, jobs, quiet, workdir) -> None:
    """Audit a data set before training: label shortcuts, train/test shift, pairs, duplicates and leaks.

    Writes runs/inspect/inspect.json and runs/inspect/report.html; prints one line per finding with the
    flag it recommends.

    \b
    aivh-ens inspect --data data/
    aivh-ens inspect --data data/ --workdir experiments/ --jobs 8
    """
    from aivh_ens.inspect import format_findings, run_inspect

    r = run_inspect(
        data,
        workdir,
        train_csv=train_csv,
        test_csv=test_csv,
        file_col=file_col,
        label_col=label_col,
        id_col=id_col,
        jobs=jobs,
        progress=not quiet,
        log=click.echo,
    )
    click.echo(format_findings(r.findings))
    click.echo("wrote " + ", ".join(str(p) for p in r.written))


@click.command("report")
@click.argument("runs", nargs=-1)
@click.option(
    "--blend/--no-blend",
    "with_blend",
    default=None,
    help="Include the blend (runs/blend/blend.json); --blend fails when there is none.  "
    "[default: when present]",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Page to write.  [default: WORKDIR/runs/report.html]",
)
@click.option(
    "--submission",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The record submit wrote beside its submission (<out stem>.json): its shift diagnosis and threshold "
    "choice.  [default: WORKDIR/submission.json when present]",
)
@WORKDIR
@user_errors
def report_cmd(runs, with_blend, out, submission, workdir) -> None:
    """Write one self-contained HTML page about a work dir's runs, blend, submission and inspect findings.

    Training curves, per-fold tables, OOF confusion matrices and F1 against threshold per run; across runs a
    leaderboard, the correlation of the runs' OOF logits and the blend weights. RUN names pick runs
    (default: every run under runs/; a run still training shows its finished epochs).

    \b
    aivh-ens report
    aivh-ens report tiny-effnet tiny-convnext --no-blend --out /tmp/two-runs.html
    """
    from aivh_ens.report import build_report

    r = build_report(workdir, runs=list(runs) or None, blend=with_blend, out=out, submission=submission)
    click.echo(r.summary)
    click.echo(f"wrote {r.path}")
