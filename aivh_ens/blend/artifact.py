"""``runs/blend/blend.json``: its schema, :func:`load_blend` and :func:`apply_blend` (what submit uses)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aivh_ens.blend.core import SPACES, combine, stack_scores, to_space, view_average
from aivh_ens.errors import UserError
from aivh_ens.io import sha256_file
from aivh_ens.layout import workdir_of_blend
from aivh_ens.metrics import METRICS

if TYPE_CHECKING:
    pass


BLEND_VERSION = 1


RANK_REFERENCE = "oof"
"""How rank-space blends rank new scores: among each run's OOF scores (:func:`aivh_ens.blend.core.rank_against`).
Blends written before it say ``within_set``: ``submit`` then ranks the test rows among themselves."""

RANK_REFERENCES = ("oof", "within_set")


_REQUIRED_KEYS = frozenset(
    {
        "version",
        "runs",
        "fold_sha256",
        "space",
        "weights",
        "threshold",
        "metric",
        "method",
        "oof_score",
        "nested_score",
        "baselines",
        "trials",
        "seed",
    }
)


_OPTIONAL_KEYS = frozenset({"rank_reference", "all_ai", "warnings", "stack"})


_STACK_KEYS = frozenset({"coef", "intercept", "C", "features"})


_RUN_KEYS = frozenset({"name", "config", "oof", "oof_sha256"})


_NESTED_KEYS = frozenset({"mean", "std", "per_fold"})


_NESTED_OPTIONAL = frozenset({"bbc_mean", "bbc_std"})  # the bootstrap bias-corrected estimate


_BASELINE_KEYS = frozenset({"method", "oof_score", "nested_mean", "nested_std", "threshold"})


_BASELINE_OPTIONAL = frozenset({"per_fold"})  # the nested score on each outer fold


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _keys(obj: Any, required: frozenset[str], where: str, optional: frozenset[str] = frozenset()) -> None:
    if not isinstance(obj, dict):
        raise UserError(f"{where} must be a JSON object, got {type(obj).__name__}")
    missing, unknown = sorted(required - obj.keys()), sorted(obj.keys() - required - optional)
    if missing:
        raise UserError(f"{where} lacks key(s) {', '.join(missing)}")
    if unknown:
        raise UserError(
            f"{where} has unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(required | optional))}"
        )


def _check_blend_doc(doc: Any, where: str = "blend.json") -> None:
    """Validate a blend document as data (no file access); raise UserError naming the first problem."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"{where}: {what}; re-create it with `aivh-ens blend`")

    if isinstance(doc, dict) and doc.get("version") != BLEND_VERSION:
        raise UserError(
            f"{where} has version {doc.get('version')!r}; this aivh-ens reads version {BLEND_VERSION}"
        )
    _keys(doc, _REQUIRED_KEYS, where, _OPTIONAL_KEYS)
    names = _check_runs(doc, where, need)
    need(_is_sha256(doc["fold_sha256"]), "fold_sha256 must be a hex sha256")
    need(doc["space"] in SPACES, f"space must be one of {', '.join(SPACES)}")
    need(doc["metric"] in METRICS, f"metric must be one of {', '.join(METRICS)}")
    need(isinstance(doc["method"], str) and doc["method"], "method must be a non-empty string")
    w = doc["weights"]
    need(
        isinstance(w, dict) and sorted(w) == sorted(names),  # JSON objects are unordered: key set only
        "weights must map each run of runs (and no other) to a number",
    )
    need(all(_is_number(v) and v >= 0 for v in w.values()), "weights must be finite and >= 0")
    need(abs(sum(w.values()) - 1.0) <= 1e-6, f"weights must sum to 1 (within 1e-6), got {sum(w.values())!r}")
    need(
        _is_number(doc["threshold"]) and 0.0 <= doc["threshold"] <= 1.0,
        "threshold must be a number in [0, 1]",
    )
    need(_is_number(doc["oof_score"]), "oof_score must be a number")
    _keys(doc["nested_score"], _NESTED_KEYS, f"{where} nested_score", _NESTED_OPTIONAL)
    nested = doc["nested_score"]
    need(
        _is_number(nested["mean"]) and _is_number(nested["std"]), "nested_score mean and std must be numbers"
    )
    need(
        isinstance(nested["per_fold"], list) and all(map(_is_number, nested["per_fold"])), "per_fold: numbers"
    )
    need(all(_is_number(nested[k]) for k in _NESTED_OPTIONAL & nested.keys()), "bbc_mean/bbc_std: numbers")
    need(isinstance(doc["baselines"], list), "baselines must be a list")
    for i, b in enumerate(doc["baselines"]):
        _keys(b, _BASELINE_KEYS, f"{where} baselines[{i}]", _BASELINE_OPTIONAL)
        need(
            isinstance(b.get("per_fold", []), list) and all(map(_is_number, b.get("per_fold", []))),
            f"baselines[{i}].per_fold must be a list of numbers",
        )
        need(isinstance(b["method"], str), f"baselines[{i}].method must be a string")
        need(all(_is_number(b[k]) for k in _BASELINE_KEYS - {"method"}), f"baselines[{i}] needs numbers")
    need(
        isinstance(doc["trials"], int) and not isinstance(doc["trials"], bool) and doc["trials"] >= 0,
        "trials: int",
    )
    need(isinstance(doc["seed"], int) and not isinstance(doc["seed"], bool), "seed must be an integer")
    _check_optional(doc, where, need)
    _check_stack(doc, names, where, need)


def _check_runs(doc: dict[str, Any], where: str, need: Any) -> list[str]:
    """The ``runs`` list: one object per run (name, config and OOF paths, OOF sha256), no run twice."""
    need(isinstance(doc["runs"], list) and len(doc["runs"]) >= 1, "runs must be a non-empty list")
    for i, run in enumerate(doc["runs"]):
        _keys(run, _RUN_KEYS, f"{where} runs[{i}]", frozenset({"pseudo"}))
        need(
            all(isinstance(run[k], str) and run[k] for k in ("name", "config", "oof")),
            f"runs[{i}] needs strings",
        )
        need(_is_sha256(run["oof_sha256"]), f"runs[{i}].oof_sha256 must be a hex sha256")
    names = [run["name"] for run in doc["runs"]]
    need(len(set(names)) == len(names), "runs lists a run twice")
    return names


def _check_optional(doc: dict[str, Any], where: str, need: Any) -> None:
    """``rank_reference``, ``all_ai`` (a baselines row) and ``warnings``, where present."""
    if "rank_reference" in doc:
        need(doc["rank_reference"] in RANK_REFERENCES, f"rank_reference must be one of {RANK_REFERENCES}")
    if "all_ai" in doc:  # the score of predicting every row AI, in the form of a baselines row
        _keys(doc["all_ai"], _BASELINE_KEYS, f"{where} all_ai", _BASELINE_OPTIONAL)
        need(all(_is_number(doc["all_ai"][k]) for k in _BASELINE_KEYS - {"method"}), "all_ai needs numbers")
    if "warnings" in doc:
        need(
            isinstance(doc["warnings"], list) and all(isinstance(w, str) for w in doc["warnings"]),
            "warnings must be a list of strings",
        )


def _check_stack(doc: dict[str, Any], names: list[str], where: str, need: Any) -> None:
    """A ``stack`` section goes with method ``stack`` (and only with it): coefficients for exactly the runs,
    a finite intercept, C > 0, space ``logit``, and weights equal to the shares of ``|coef|``."""
    need(
        ("stack" in doc) == (doc["method"] == "stack"),
        "a stack section goes with method 'stack', and only with it",
    )
    if "stack" not in doc:
        return
    st = doc["stack"]
    _keys(st, _STACK_KEYS, f"{where} stack")
    coef = st["coef"]
    need(
        isinstance(coef, dict) and sorted(coef) == sorted(names),
        "stack.coef must map each run of runs (and no other) to a number",
    )
    need(all(_is_number(v) for v in coef.values()), "stack.coef values must be finite numbers")
    total = sum(abs(v) for v in coef.values())
    need(total > 0, "stack.coef must not be all zero")
    need(_is_number(st["intercept"]), "stack.intercept must be a finite number")
    need(_is_number(st["C"]) and st["C"] > 0, "stack.C must be a number > 0")
    need(
        st["features"] == "logit" and doc["space"] == "logit",
        "a stack reads logits: features and space logit",
    )
    need(
        all(abs(doc["weights"][r] - abs(coef[r]) / total) <= 1e-6 for r in names),
        "weights of a stack must be the shares of |stack.coef| (within 1e-6)",
    )


def load_blend(
    path: str | Path, workdir: str | Path | None = None, check_files: bool = True
) -> dict[str, Any]:
    """Read and validate ``blend.json``.

    Args:
        path: the blend file.
        workdir: the project folder its relative paths start from; default the folder holding ``runs/``
            when ``path`` is ``.../runs/blend/<file>``, else the current folder.
        check_files: also require each run's config and OOF file to exist and the OOF file to be the one
            the blend was fitted on (same sha256).

    Raises:
        UserError: a missing or invalid file, an unknown version, missing or unknown keys, weights that do
            not sum to 1, a threshold outside [0, 1], or runs whose files are gone or changed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no blend file at {path}; fit one with `aivh-ens blend`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-create it with `aivh-ens blend`") from e
    _check_blend_doc(doc, str(path))
    if check_files:
        root = Path(workdir) if workdir is not None else workdir_of_blend(path)
        for run in doc["runs"]:
            for key in ("config", "oof"):
                if not (root / run[key]).is_file():
                    raise UserError(
                        f"{path} blends run {run['name']!r} but {root / run[key]} does not exist; restore the run "
                        "or re-fit the blend with `aivh-ens blend`"
                    )
            if sha256_file(root / run["oof"]) != run["oof_sha256"]:
                raise UserError(
                    f"{root / run['oof']} changed since {path} was fitted (sha256 differs); re-fit with `aivh-ens blend`"
                )
    return doc


def rank_reference(workdir: str | Path, doc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each blended run's OOF probabilities (N_oof,), read from ``oof/<run>.csv``: what a rank-space blend
    places new scores among."""
    return oof_probs(workdir, doc, "prob")


def oof_probs(
    workdir: str | Path, doc: Mapping[str, Any], average: str | None = None
) -> dict[str, np.ndarray]:
    """Each blended run's OOF probabilities (N_oof,) with its TTA views averaged as ``average`` (default: the
    way the blend's space averages them, :func:`aivh_ens.blend.core.view_average`), like the test scores
    submit cuts; a run without a ``prob_logit`` column scored one view, so its ``prob`` serves both."""
    import pandas as pd

    col = "prob_logit" if (average or view_average(doc["space"])) == "logit" else "prob"
    out = {}
    for r in doc["runs"]:
        if doc["weights"][r["name"]] > 0:
            df = pd.read_csv(Path(workdir) / r["oof"])
            out[r["name"]] = df[col if col in df.columns else "prob"].to_numpy(dtype=np.float64)
    return out


def ranks_among_oof(blend_json: Mapping[str, Any]) -> bool:
    """Whether the blend places new scores among the OOF scores (rank space, ``rank_reference: oof``)."""
    return (
        blend_json["space"] == "rank"
        and "stack" not in blend_json
        and (blend_json.get("rank_reference", "within_set") == "oof")
    )


def apply_blend(
    blend_json: Mapping[str, Any],
    scores: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a fitted blend to new scores, as ``submit``, ``predict`` and ``serve`` do.

    Args:
        blend_json: a blend document (see :func:`load_blend`).
        scores: ``{run: (N,) P(label 1)}`` for the same N rows; runs with weight 0 may be left out.
        reference: ``{run: (N_oof,) OOF probabilities}`` (:func:`rank_reference`); needed by rank-space
            blends, which place each score among its run's OOF scores.

    Returns:
        ``(probs, labels)``: the (N,) blended scores in [0, 1] and the (N,) int64 labels
        (``probs >= threshold``).
    """
    _check_blend_doc(dict(blend_json))
    runs = [run["name"] for run in blend_json["runs"]]
    weights = np.array([blend_json["weights"][r] for r in runs], dtype=np.float64)  # (M,)
    unknown = sorted(set(scores) - set(runs))
    if unknown:
        raise UserError(
            f"scores given for run(s) {', '.join(unknown)} that the blend does not use ({', '.join(runs)})"
        )
    missing = [r for r, w in zip(runs, weights, strict=True) if w > 0 and r not in scores]
    if missing:
        raise UserError(f"the blend needs scores of run(s) {', '.join(missing)}; predict with them first")
    arrays = {r: np.asarray(scores[r], dtype=np.float64) for r in scores}
    shapes = {r: a.shape for r, a in arrays.items()}
    if (
        len(set(shapes.values())) != 1
        or len(next(iter(shapes.values()))) != 1
        or next(iter(arrays.values())).size == 0
    ):
        raise UserError(f"scores must be 1-D arrays of one common length N >= 1, got shapes {shapes}")
    n = next(iter(arrays.values())).size
    for r, a in arrays.items():
        if not np.all((a >= 0) & (a <= 1)):  # also catches NaN
            raise UserError(f"scores of run {r!r} must be probabilities in [0, 1] without NaN")
    # Runs with weight 0 that were left out get a constant row: 0 * anything adds nothing, and keeping
    # all M rows makes the arithmetic identical to the OOF blend's.
    P = np.stack([arrays.get(r, np.full(n, 0.5)) for r in runs])  # (M, N)
    space = blend_json["space"]
    ref = None
    if ranks_among_oof(blend_json):
        if reference is None:
            raise UserError(
                "a rank-space blend needs reference=rank_reference(workdir, blend) (the OOF scores)"
            )
        # a list: runs left out (weight 0) get a one-score placeholder, their rank row is multiplied by 0
        ref = [np.asarray(reference[r], dtype=np.float64) if r in arrays else np.full(1, 0.5) for r in runs]
    if "stack" in blend_json:  # sigmoid(intercept + coef @ logits), exactly as the stack was scored on OOF
        st = blend_json["stack"]
        coef = np.array([st["coef"][r] for r in runs], dtype=np.float64)  # (M,)
        probs = stack_scores(to_space(P, "logit"), coef, float(st["intercept"]))
    else:
        probs = combine(to_space(P, space, ref), weights, space)  # (N,)
    return probs, (probs >= blend_json["threshold"]).astype(np.int64)
