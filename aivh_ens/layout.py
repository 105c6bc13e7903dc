"""Every path under the work dir, and the one reader of a run's ``config.json``.

The stages talk only through files (see the README's "On disk"); this module is the only place that knows
where they live, so a stage asks ``layout.oof_path(workdir, run)`` instead of joining strings.

    folds/k{K}_s{seed}[_g{group}].csv   fold files
    runs/<run>/config.json               the resolved run config (read by :func:`read_run_config`)
    runs/<run>/fold<k>/                  one (run, fold) job's files
    runs/<run>/test/                     cached test scores
    runs/<run>/pseudo.csv                a pseudo-labelled run's frozen id,prob source
    oof/<run>.csv                        the run's out-of-fold probabilities
    runs/blend/                          blend.json, study.db, plots
    runs/cache/                          the decode-once image cache
    runs/features/                       frozen-backbone feature stores
    runs/inspect/                        the dataset audit
    runs/auto/                           auto's plan, candidate timings and final table
    runs/report.html                     the report page

No heavy imports: the config module is imported only when a run config is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aivh_ens.errors import UserError

if TYPE_CHECKING:
    from aivh_ens.config import RunConfig

RUNS = "runs"
OOF = "oof"
FOLDS = "folds"
CONFIG = "config.json"
DONE = "done.json"  # a fold's record, written last: its presence means the fold is finished
BLEND_DIR = Path(RUNS) / "blend"
"""Relative to the work dir: the blend stage's folder."""
RESERVED_RUN_NAMES = ("auto", "blend", "cache", "features", "inspect")
"""Folders under runs/ that are not runs."""


def runs_dir(workdir: str | Path) -> Path:
    return Path(workdir) / RUNS


def run_dir(workdir: str | Path, name: str) -> Path:
    return Path(workdir) / RUNS / name


def fold_dir(workdir: str | Path, name: str, fold: int) -> Path:
    return run_dir(workdir, name) / f"fold{fold}"


def config_path(workdir: str | Path, name: str) -> Path:
    return run_dir(workdir, name) / CONFIG


def test_scores_dir(workdir: str | Path, name: str) -> Path:
    return run_dir(workdir, name) / "test"


def pseudo_path(workdir: str | Path, name: str) -> Path:
    return run_dir(workdir, name) / "pseudo.csv"


def oof_dir(workdir: str | Path) -> Path:
    return Path(workdir) / OOF


def oof_path(workdir: str | Path, name: str) -> Path:
    return Path(workdir) / OOF / f"{name}.csv"


def folds_dir(workdir: str | Path) -> Path:
    return Path(workdir) / FOLDS


def blend_dir(workdir: str | Path) -> Path:
    return Path(workdir) / BLEND_DIR


def blend_path(workdir: str | Path) -> Path:
    return blend_dir(workdir) / "blend.json"


def study_path(workdir: str | Path) -> Path:
    return blend_dir(workdir) / "study.db"


def cache_dir(workdir: str | Path) -> Path:
    return Path(workdir) / RUNS / "cache"


def features_dir(workdir: str | Path) -> Path:
    return Path(workdir) / RUNS / "features"


def inspect_dir(workdir: str | Path) -> Path:
    return Path(workdir) / RUNS / "inspect"


def auto_dir(workdir: str | Path) -> Path:
    return Path(workdir) / RUNS / "auto"


def report_path(workdir: str | Path) -> Path:
    return Path(workdir) / RUNS / "report.html"


def workdir_of_blend(path: str | Path) -> Path:
    """The work dir a blend file belongs to: the folder holding ``runs/`` when ``path`` is
    ``.../runs/blend/<file>``, else the current folder."""
    parent = Path(path).resolve().parent
    if parent.name == BLEND_DIR.name and parent.parent.name == RUNS:
        return parent.parent.parent
    return Path(".")


def is_pseudo(doc: Mapping[str, Any]) -> bool:
    """Whether a run trained on pseudo-labelled test rows: ``doc`` is its config.json document
    (:func:`read_run_doc`, :attr:`aivh_ens.score.runs.RunInfo.doc`) or its entry in blend.json's ``runs``.

    Such a run's test scores are in-sample on the test rows it trained on, unlike its OOF rows, so a comparison
    of test with OOF scores (the shift diagnosis) should leave it out."""
    return bool(doc.get("pseudo"))


def pseudo_kind(doc: Mapping[str, Any]) -> str | None:
    """``fold-consistent``, ``every-fold`` (its OOF scores are optimistic) or None for a run without pseudo-labels
    (``doc``: its config.json document)."""
    record = doc.get("pseudo")
    if not record:
        return None
    return "fold-consistent" if isinstance(record, dict) and record.get("fold_consistent") else "every-fold"


def read_run_doc(workdir: str | Path, name: str, missing_hint: str | None = None) -> dict[str, Any]:
    """The JSON object in ``runs/<name>/config.json``, as written by ``cv``.

    Args:
        workdir: the work dir.
        name: the run.
        missing_hint: what to do when the file does not exist (default: train the run with ``cv``).

    Raises:
        UserError: the file is missing, not JSON or not an object; the message names the file.
    """
    path = config_path(workdir, name)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        hint = missing_hint or f"train it with `aivh-ens cv --name {name} ...` first"
        raise UserError(f"run {name!r} has no {path}: {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); restore it or re-train run {name!r} with --force"
        ) from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} must hold a JSON object; restore it or re-train run {name!r} with --force")
    return doc


def read_run_config(
    workdir: str | Path, name: str, missing_hint: str | None = None
) -> tuple[RunConfig, dict[str, Any]]:
    """The run's :class:`~aivh_ens.config.RunConfig` and the whole ``config.json`` (fold file, versions...).

    Raises:
        UserError: as :func:`read_run_doc`, or the file is not a run config of this version.
    """
    from aivh_ens.config import CONFIG_VERSION, from_dict

    doc = read_run_doc(workdir, name, missing_hint)
    path = config_path(workdir, name)
    if doc.get("version") != CONFIG_VERSION or not isinstance(doc.get("config"), dict):
        raise UserError(f"{path}: expected a run config with version {CONFIG_VERSION} and a 'config' object")
    return from_dict(doc["config"]), doc
