"""The blend command."""

from __future__ import annotations

import click

from aivh_ens.cli.options import WORKDIR, report_line, user_errors

# ---- blend ---------------------------------------------------------------------------------------------
# (the blend command is defined below this line)


@click.command("blend")
@click.option(
    "--runs",
    default=None,
    metavar="A,B,..",
    help="Runs to blend (names in oof/).  [default: every oof/*.csv]",
)
@click.option(
    "--metric",
    type=click.Choice(["f1", "macro_f1", "accuracy"]),
    default="f1",
    show_default=True,
    help="Metric the weights and threshold are tuned for (f1: of label 1, the competition's).",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Optuna trials of the shipped search, in a fresh study (each nested-CV fold gets the same budget).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop the search after this many seconds.  [default: no limit: --trials decides]",
)
@click.option(
    "--storage",
    default=None,
    metavar="URL",
    help="Optuna storage URL: sqlite:///..., postgresql://... (several machines), or journal:///path/study.log "
    "(Optuna's JournalStorage: several processes on one node).  [default: sqlite at runs/blend/study.db]",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the TPE samplers.")
@click.option(
    "--nested-trials",
    type=click.IntRange(min=1),
    default=None,
    help="Optuna trials per fold in the nested-CV estimate.  [default: --trials]",
)
@click.option(
    "--resume-study",
    is_flag=True,
    help="Add --trials to the study of the same inputs instead of starting a fresh one (the nested estimate "
    "then scores a smaller search than the one that ships).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@WORKDIR
@user_errors
def blend_cmd(
    runs, metric, trials, timeout, storage, seed, nested_trials, resume_study, quiet, workdir
) -> None:
    """Tune blend weights, space and threshold on oof/*.csv; write runs/blend/blend.json.

    Scores every single run, the equal-weight means, Caruana selection, hill climbing, an Optuna search and
    a stack in-sample and by nested CV, and ships the simplest method within one paired standard error of
    the best nested score. One run blends as itself (its threshold tuned on its OOF rows).

    \b
    aivh-ens blend
    aivh-ens blend --runs effnet_b4,convnext_tiny --trials 1000 --metric macro_f1
    aivh-ens blend --storage sqlite:///shared/study.db --timeout 600
    """
    from aivh_ens.blend.search import sqlite_network_note
    from aivh_ens.blend.stage import format_table, run_blend

    note = sqlite_network_note(storage, workdir)
    if note:
        click.echo(note, err=True)
    result = run_blend(
        workdir,
        runs=runs.split(",") if runs is not None else None,
        metric=metric,
        trials=trials,
        timeout=timeout,
        storage=storage,
        seed=seed,
        nested_trials=nested_trials,
        resume_study=resume_study,
        progress=not quiet,
    )
    b = result.blend
    click.echo(f"{len(b['runs'])} runs, {b['trials']} trials in the study; in-sample and nested-CV {metric}:")
    pseudo = {r["name"]: r["pseudo"] for r in b["runs"] if "pseudo" in r}
    click.echo(format_table(result.methods, metric, result.picked.name, result.all_ai, pseudo))
    click.echo(result.reason)
    nested = b["nested_score"]
    if "bbc_mean" in nested:
        click.echo(
            f"nested {metric} of the shipped method {nested['mean']:.4f}; bootstrap bias-corrected for choosing "
            f"among {len(result.methods)} methods (BBC-CV): {nested['bbc_mean']:.4f} ± {nested['bbc_std']:.4f}"
        )
    click.echo(
        f"space {b['space']}, threshold {b['threshold']:.4f}, weights "
        + ", ".join(f"{r} {w:.3f}" for r, w in b["weights"].items())
        + (" (shares of |coef|)" if "stack" in b else "")
    )
    if "stack" in b:  # what apply_blend computes: sigmoid(intercept + sum coef * logit(p))
        st = b["stack"]
        click.echo(
            f"stack: sigmoid({st['intercept']:+.4f} "
            + " ".join(f"{c:+.4f} * logit({r})" for r, c in st["coef"].items())
            + f"), C {st['C']:g}"
        )
    click.echo("wrote " + ", ".join(str(p) for p in result.written))
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(report_line(workdir))
