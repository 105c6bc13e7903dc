"""Pseudo-labels (``cv --pseudo``): confident test predictions as extra training rows; the OOF stays honest
only when they are fold-consistent.

The source, an ``id,prob`` file (``submit --proba`` writes one) or ``blend`` (the current blend's test
scores), is checked and frozen as ``runs/<run>/pseudo.csv``; its sha256 becomes the run's ``pseudo_sha256``,
so it is part of what the run trains (``config.json``, every job's hash). Fold jobs read the frozen copy, never
the source, so a later ``submit`` that overwrites the source changes nothing, and a sweep or ``--resume``
given a changed source is refused, naming ``pseudo_sha256``.

The chosen rows are appended to the fold table with fold :data:`PSEUDO_FOLD` (-1): no fold validates on them,
and ``oof/<run>.csv`` is assembled from the fold table's own rows only.

- **Fold-consistent** (``--pseudo blend`` when the blend's runs were made from this run's fold file): the frozen
  copy also holds ``fold<k>``, the blend of the teachers' fold k models alone, which never trained on fold k's
  rows. Fold k trains on the rows chosen from ``fold<k>`` only (column ``only_fold``), so no label of a fold k
  validation row reaches fold k's model through a pseudo-label, and the OOF rows still measure unseen rows.
- **Every fold** (an ``id,prob`` file, or a blend made from other folds): one set of rows, chosen from the
  fold-averaged scores, trains in every fold. Those scores came from models that trained on each fold's
  validation rows, so the run's OOF and nested scores are optimistic (:data:`PSEUDO_WARNING`).

Either way the run's test scores are in-sample on the rows it trained on; :func:`aivh_ens.layout.is_pseudo`
names such runs (blend.json and the blend table flag them).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aivh_ens.config import RunConfig
from aivh_ens.data.tables import read_score_table, read_test_table, read_train_table
from aivh_ens.errors import UserError
from aivh_ens.io import atomic_path
from aivh_ens.layout import FOLDS, blend_path, pseudo_path, read_run_doc

PSEUDO_FOLD = -1
"""The fold of a pseudo row: never equal to a fold index, so always a training row and never a validation row."""
BLEND_SOURCE = "blend"
"""``--pseudo blend``: the current blend's test scores (``runs/blend/blend.json``), as ``submit`` computes them."""
FIX = "pass --pseudo FILE (id,prob) or --pseudo blend"
PSEUDO_WARNING = (
    "note: the OOF and nested scores of a pseudo-labelled run no longer measure test performance: its "
    "pseudo-labels come from models that trained on every train row (each fold's validation rows included) and "
    "it is scored on rows like those it learnt from. Judge it on a labelled hold-out that looks like the test "
    "set (README: Pseudo-labels)"
)
FOLD_CONSISTENT_NOTE = (
    "note: fold-consistent pseudo-labels: fold k trains on test rows labelled by the blend's fold k models, "
    "which never saw fold k's rows, so the OOF rows stay unseen; the run's test scores are still in-sample on "
    "the pseudo rows it trained on"
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class PseudoSource:
    """A checked pseudo-label source: where it came from, the bytes frozen as ``runs/<run>/pseudo.csv``,
    their sha256 and the scores they hold (``id,prob``)."""

    where: str
    data: bytes
    sha256: str
    scores: pd.DataFrame  # id,prob[,fold0..fold{K-1}] (fold columns: fold-consistent)


def resolve_pseudo(
    cfg: RunConfig, workdir: str | Path, log: Log | None = None
) -> tuple[RunConfig, PseudoSource | None]:
    """The config with ``pseudo_sha256`` set from its ``pseudo`` source, and the checked source (None without).

    Raises:
        UserError: the source is missing or malformed (no ``id,prob``, a score outside [0, 1] or NaN, a
            repeated id), names an id that is not in test.csv or that is a train image; nothing is written.
    """
    if cfg.pseudo is None:
        return dataclasses.replace(cfg, pseudo_sha256=None), None
    if cfg.pseudo == BLEND_SOURCE:
        source = _blend_source(cfg, workdir, log)
    else:
        path = Path(cfg.pseudo)
        scores = read_score_table(path, FIX)
        data = path.read_bytes()
        source = PseudoSource(str(path), data, hashlib.sha256(data).hexdigest(), scores)
    _check_ids(cfg, source)
    return dataclasses.replace(cfg, pseudo_sha256=source.sha256), source


def _blend_source(cfg: RunConfig, workdir: str | Path, log: Log | None) -> PseudoSource:
    """The blend's test scores of ``cfg.data`` (cached test scores, predicted where missing), as CSV bytes;
    with each fold's own blend (``fold<k>``) when the blend's runs were made from this run's fold file."""
    from aivh_ens.infer.submission import blend_test_scores

    scores = blend_test_scores(workdir, data=cfg.data, progress=False, log=log or (lambda _m: None))
    other = _other_folds(cfg, workdir)
    if other is not None:
        (log or print)(
            f"note: {other}, so fold k's pseudo-labels cannot come from models that never saw fold k's rows; "
            "pass the blend's --folds, --seed and --group for fold-consistent pseudo-labels"
        )
        scores = scores[["id", "prob"]]
    data = scores.to_csv(index=False, float_format="%.8g", lineterminator="\n").encode()
    return PseudoSource(f"the blend's test scores ({blend_path(workdir)})", data,
                        hashlib.sha256(data).hexdigest(), scores)  # fmt: skip


def _other_folds(cfg: RunConfig, workdir: str | Path) -> str | None:
    """Why the blend's runs' folds are not this run's (in words), or None when they share its fold file."""
    import json

    from aivh_ens.data.folds import fold_file_name
    from aivh_ens.io import sha256_file

    doc = json.loads(blend_path(workdir).read_text())
    theirs = read_run_doc(workdir, doc["runs"][0]["name"]).get("fold_file")
    mine = f"{FOLDS}/{fold_file_name(cfg.folds, cfg.seed, cfg.group)}"
    path = Path(workdir) / mine
    if theirs == mine and path.is_file() and sha256_file(path) == doc["fold_sha256"]:
        return None
    return f"the blend's runs were made from fold file {theirs}, this run from {mine}"


def _check_ids(cfg: RunConfig, source: PseudoSource) -> None:
    """Every id must be a test image of ``cfg.data`` and none a train image."""
    ids = source.scores["id"]
    test = set(read_test_table(cfg.data, cfg.test_csv, id_col=cfg.id_col, check_files=False)["id"])
    missing = ids[~ids.isin(test)]
    if len(missing):
        raise UserError(
            f"{source.where}: {len(missing)} id(s) are not in {Path(cfg.data) / cfg.test_csv} (first: "
            f"{missing.iloc[0]}); pseudo-labels must score the test images of --data; {FIX}"
        )
    train = read_train_table(cfg.data, cfg.train_csv, file_col=cfg.file_col, label_col=cfg.label_col,
                             check_files=False)["file_name"]  # fmt: skip
    both = ids[ids.isin(set(train))]
    if len(both):
        raise UserError(
            f"{source.where}: {len(both)} id(s) are also train images in {Path(cfg.data) / cfg.train_csv} "
            f"(first: {both.iloc[0]}); a labelled image must not get a pseudo-label; {FIX}"
        )


def select_pseudo(scores: pd.DataFrame, cfg: RunConfig, labels: np.ndarray) -> pd.DataFrame:
    """The confident rows of ``scores`` (``id,prob``) as ``id,label,prob``, in the source's order.

    ``prob >= pseudo_min_conf`` -> 1, ``prob <= 1 - pseudo_min_conf`` -> 0; at most ``pseudo_max_share`` rows
    per labelled row (``labels`` (N,), the train labels), the most confident first; with ``pseudo_balance``
    the larger class is then cut to its most confident rows until the two are in the train set's proportion.
    """
    p = scores["prob"].to_numpy(np.float64)  # (M,)
    c = cfg.pseudo_min_conf
    label = np.where(p >= c, 1, np.where(p <= 1 - c, 0, -1))
    conf = np.maximum(p, 1 - p)
    keep = _most_confident(np.flatnonzero(label >= 0), conf, int(cfg.pseudo_max_share * len(labels)))
    if cfg.pseudo_balance and len(labels):
        share = float(np.mean(labels))  # the train AI share
        ai, hu = keep[label[keep] == 1], keep[label[keep] == 0]
        n_ai = min(len(ai), round(len(hu) * share / (1 - share))) if share < 1 else len(ai)
        n_hu = min(len(hu), round(len(ai) * (1 - share) / share)) if share > 0 else len(hu)
        keep = np.sort(np.r_[_most_confident(ai, conf, n_ai), _most_confident(hu, conf, n_hu)])
    return pd.DataFrame({"id": scores["id"].to_numpy()[keep], "label": label[keep], "prob": p[keep]})


def _most_confident(rows: np.ndarray, conf: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``rows`` with the highest ``conf`` (ties: the earlier row), in row order."""
    if len(rows) <= n:
        return rows
    return np.sort(rows[np.argsort(-conf[rows], kind="stable")[:n]])


def freeze_pseudo(cfg: RunConfig, workdir: str | Path, source: PseudoSource) -> Path:
    """Write the source's bytes to ``runs/<run>/pseudo.csv`` (atomically), the copy every fold job reads."""
    path = pseudo_path(workdir, cfg.name)
    with atomic_path(path) as tmp:
        tmp.write_bytes(source.data)
    return path


def frozen_scores(cfg: RunConfig, workdir: str | Path) -> pd.DataFrame:
    """The run's frozen ``id,prob`` scores, checked against ``cfg.pseudo_sha256``, with their ``fold<k>``
    columns when the copy is fold-consistent."""
    path = pseudo_path(workdir, cfg.name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"run {cfg.name} trains on pseudo-labels but {path} is missing; re-run `aivh-ens cv` with the same "
            "--pseudo (or --force)"
        ) from None
    if hashlib.sha256(data).hexdigest() != cfg.pseudo_sha256:
        raise UserError(
            f"{path} changed since run {cfg.name} was set up (sha256 {str(cfg.pseudo_sha256)[:12]} expected); "
            "re-run `aivh-ens cv` with the same --pseudo, or --force to retrain the run"
        )
    scores = read_score_table(path, FIX)
    cols = [f"fold{k}" for k in range(cfg.folds)]
    full = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    if set(cols) <= set(full.columns):  # written by this module from the blend: same rows, same order
        scores[cols] = full[cols].to_numpy(np.float64)
    return scores


def fold_consistent(scores: pd.DataFrame, folds: int) -> bool:
    """Whether pseudo-label scores hold each fold's own column (``fold0`` .. ``fold{folds-1}``)."""
    return all(f"fold{k}" in scores.columns for k in range(folds))


def training_table(cfg: RunConfig, workdir: str | Path, fold_table: pd.DataFrame) -> pd.DataFrame:
    """The rows fold jobs draw from: the fold table, then (for a pseudo run) the chosen pseudo rows with fold
    :data:`PSEUDO_FOLD` and a ``weight`` column (1 for labelled rows, ``pseudo_weight`` for pseudo rows).

    Fold-consistent scores give each fold its own rows, chosen from its ``fold<k>`` column, with ``only_fold``
    k (labelled rows: -1, every fold); otherwise one set, chosen from ``prob``, trains in every fold.
    Row ``i < len(fold_table)`` is the fold table's row ``i``, so skipped-row indices keep their meaning. In a
    grouped fold table each pseudo row is a group of its own (groups become strings).
    """
    if cfg.pseudo_sha256 is None:
        return fold_table
    scores, labels = frozen_scores(cfg, workdir), fold_table["label"].to_numpy()
    per_fold = fold_consistent(scores, cfg.folds)
    picks = [(k, select_pseudo(scores.assign(prob=scores[f"fold{k}"]) if per_fold else scores, cfg, labels))
             for k in (range(cfg.folds) if per_fold else [-1])]  # fmt: skip
    extra = pd.concat([pd.DataFrame({"file_name": p["id"], "label": p["label"].astype(np.int64),
                                     "fold": PSEUDO_FOLD, "weight": cfg.pseudo_weight, "only_fold": k})
                       for k, p in picks], ignore_index=True)  # fmt: skip
    base = fold_table.assign(weight=1.0, only_fold=-1)
    if "group" in fold_table.columns:
        base["group"] = base["group"].astype(str)
        extra["group"] = "pseudo:" + extra["file_name"]
    return pd.concat([base, extra], ignore_index=True)


def pseudo_record(cfg: RunConfig, source: PseudoSource, labels: np.ndarray) -> dict[str, Any]:
    """``config.json``'s ``pseudo`` entry: the source, the frozen copy, its sha256, the rows used per class
    (``labels`` (N,): the train labels)."""
    picked = select_pseudo(source.scores, cfg, labels)
    return {
        "fold_consistent": fold_consistent(source.scores, cfg.folds),
        **(
            {
                "rows_per_fold": [
                    len(select_pseudo(source.scores.assign(prob=source.scores[f"fold{k}"]), cfg, labels))
                    for k in range(cfg.folds)
                ]
            }
            if fold_consistent(source.scores, cfg.folds)
            else {}
        ),
        "source": source.where,
        "file": str(pseudo_path(".", cfg.name)),  # relative to the work dir
        "sha256": source.sha256,
        "scored": len(source.scores),
        "rows": {"ai": int((picked["label"] == 1).sum()), "human": int((picked["label"] == 0).sum())},
        "min_conf": cfg.pseudo_min_conf,
        "max_share": cfg.pseudo_max_share,
        "weight": cfg.pseudo_weight,
        "balance": cfg.pseudo_balance,
    }


def describe_pseudo(record: dict[str, Any]) -> str:
    """One line for ``cv``'s output."""
    r = record["rows"]
    return (
        f"pseudo-labels: {r['ai'] + r['human']} of {record['scored']} test rows ({r['ai']} AI, {r['human']} "
        f"human; prob >= {record['min_conf']} or <= {1 - record['min_conf']:.4g}, at most "
        f"{record['max_share']:g} per labelled row{', classes in the train share' if record['balance'] else ''}) "
        f"from {record['source']} join "
        + (f"each fold's training rows, chosen by that fold's own models ({', '.join(map(str, record['rows_per_fold']))} "
           "rows)" if record.get("fold_consistent") else "every fold's training rows")
        + f" with weight {record['weight']:g}, never its validation rows (frozen copy: {record['file']}, sha256 "
        f"{record['sha256'][:12]})"
    )  # fmt: skip


def pseudo_warning(record: dict[str, Any]) -> str:
    """What a pseudo run's OOF scores still mean: :data:`FOLD_CONSISTENT_NOTE` or :data:`PSEUDO_WARNING`."""
    return FOLD_CONSISTENT_NOTE if record.get("fold_consistent") else PSEUDO_WARNING
