"""Blend the out-of-fold predictions of several runs: weights, blend space and threshold, tuned for a metric.

Reads ``oof/<run>.csv`` and ``runs/<run>/config.json``; writes ``runs/blend/blend.json``, the Optuna study
(``runs/blend/study.db`` unless another storage is given) and two plots. The core is pure numpy:

- :func:`to_space` / :func:`combine` / :func:`blend`: a weighted blend of M runs in probability, logit or
  rank space, ``(M, N) -> (N,)``, always a score in [0, 1] so one threshold rule fits every space.
- ``fit_*``: one function per method (single run, equal-weight mean, Caruana selection, hill climbing,
  Optuna), each returning the weights, the space and the exact best threshold of its blend.
- :func:`nested_cv`: per fold, every method fitted on the other folds and scored on that fold with the
  weights and threshold it fitted, the honest estimate used to pick the method to ship.

Applying a blend to new (test) scores, see :func:`apply_blend`:

- ``prob``: ``sum_i w_i p_i``.
- ``logit``: ``sigmoid(sum_i w_i logit(clip(p_i, eps, 1 - eps)))`` with ``eps =`` :data:`LOGIT_EPS`.
- ``rank``: ``sum_i w_i r_i`` with ``r_i = rank / (n - 1)``: the 0-based rank of each of run i's scores
  among the n rows scored together (ties share their mean rank), so 0 for the lowest score, 1 for the
  highest, 0.5 when n == 1 (:func:`rank01`). The OOF blend ranks all OOF rows together; at submission time
  the test rows are ranked among themselves, per run. The threshold then cuts at a fraction of the rows,
  so it transfers only as far as the test set's share of positives resembles the OOF one.

The label is 1 (AI-generated) when the blended score is ``>= threshold``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from aivh_ens import faults
from aivh_ens.errors import UserError
from aivh_ens.io import atomic_path, sha256_file, write_json
from aivh_ens.metrics import METRICS, average_ranks, best_threshold, check_metric, threshold_sweep

if TYPE_CHECKING:
    import optuna

SPACES: tuple[str, ...] = ("prob", "logit", "rank")
"""Blend spaces: average probabilities, average logits, or average normalised ranks."""
LOGIT_EPS = 1e-7
"""Probabilities are clipped to [eps, 1 - eps] before the logit, so 0 and 1 map to about -16 and +16."""
CARUANA_ROUNDS = 25
HILL_STEPS: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05, 0.02)
"""Step sizes hill climbing tries: move this fraction of the total weight onto one run."""
TIE_TOL = 1e-4
"""Nested-CV means closer than this count as a tie, and the simpler method is shipped."""
BLEND_VERSION = 1
RANK_REFERENCE = "within_set"
"""How rank-space blends rank new scores: among the rows scored together (see the module docstring)."""
OOF_COLUMNS: tuple[str, ...] = ("file_name", "label", "fold", "prob")
BLEND_DIR = Path("runs") / "blend"

# Simplest first: on a nested-CV tie the method with the lower number ships.
_COMPLEXITY = {
    "single": 0,
    "mean_prob": 1,
    "mean_logit": 1,
    "mean_rank": 1,
    "caruana": 2,
    "hill_climb": 3,
    "optuna": 4,
}


# ---- pure numpy core ---------------------------------------------------------------------------------


def check_space(space: str) -> str:
    """Return ``space`` if it names a blend space, else raise a UserError listing the valid ones."""
    if space not in SPACES:
        raise UserError(f"unknown blend space {space!r}; expected one of {', '.join(SPACES)}")
    return space


def rank01(p: np.ndarray) -> np.ndarray:
    """Average ranks of ``p`` (N,) scaled to [0, 1]: ``(rank - 1) / (N - 1)``, 0.5 when N == 1."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 1:
        return np.full(1, 0.5)
    return (average_ranks(p) - 1.0) / (len(p) - 1)


def to_space(P: np.ndarray, space: str) -> np.ndarray:
    """Map probabilities ``P`` (M, N) to the blend space, as a float64 C-contiguous (M, N) array."""
    check_space(space)
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"expected P of shape (M, N), got {P.shape}")
    if space == "prob":
        return np.ascontiguousarray(P)
    if space == "logit":
        q = np.clip(P, LOGIT_EPS, 1.0 - LOGIT_EPS)
        return np.ascontiguousarray(np.log(q) - np.log1p(-q))
    return np.ascontiguousarray(np.stack([rank01(row) for row in P]) if len(P) else P)


def spaces(P: np.ndarray) -> dict[str, np.ndarray]:
    """Every blend space of ``P`` (M, N), computed once: ``{space: (M, N) float64}``."""
    return {space: to_space(P, space) for space in SPACES}


def combine(S: np.ndarray, w: np.ndarray, space: str) -> np.ndarray:
    """Blend rows already in ``space`` (``S`` (M, N), from :func:`to_space`) with weights ``w`` (M,) -> (N,)."""
    # einsum, not BLAS: a multi-threaded gemv spins for milliseconds on a busy machine, and one fixed
    # summation order keeps apply_blend bit-identical to the OOF blend.
    s = np.einsum("m,mn->n", w, S)  # (N,)
    if space == "logit":
        return 1.0 / (1.0 + np.exp(-s))  # |s| <= ~16.2 because the weights sum to 1: no overflow
    # Weights that sum to 1 only up to rounding can carry an average of values in [0, 1] one ulp outside.
    return np.clip(s, 0.0, 1.0, out=s)


def _normalised(w: np.ndarray, m: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (m,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"expected {m} finite non-negative weights with a positive sum, got {w!r}")
    return w / w.sum()


def blend(P: np.ndarray, w: np.ndarray, space: str = "prob") -> np.ndarray:
    """Blend probabilities ``P`` (M, N) with weights ``w`` (M,) (normalised to sum 1) into scores (N,) in [0, 1]."""
    P = np.asarray(P, dtype=np.float64)
    return combine(to_space(P, space), _normalised(w, len(P)), space)


def dirichlet_weights(u: np.ndarray) -> np.ndarray:
    """Weights (M,) from uniforms ``u`` (M,) in [0, 1]: ``x = -log(u)``, normalised (a flat Dirichlet draw)."""
    x = -np.log(np.maximum(np.asarray(u, dtype=np.float64), np.finfo(np.float64).tiny))
    total = x.sum()
    return x / total if total > 0 else np.full(len(x), 1.0 / len(x))


# ---- methods -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """A fitted blend: weights (M,) summing to 1 in ``space``, its threshold and its score where fitted."""

    method: str
    space: str
    weights: np.ndarray
    threshold: float
    score: float


def evaluate(
    S: Mapping[str, np.ndarray], y: np.ndarray, w: np.ndarray, space: str, metric: str
) -> tuple[float, float]:
    """Exact best ``(threshold, score)`` of the blend with weights ``w`` (M,) of precomputed spaces ``S``."""
    return best_threshold(y, combine(S[space], w, space), metric)


def _fit(
    method: str, S: Mapping[str, np.ndarray], y: np.ndarray, w: np.ndarray, space: str, metric: str
) -> Fit:
    t, score = evaluate(S, y, w, space, metric)
    return Fit(method, space, w, t, score)


def fit_single(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, m: int, method: str = "single"
) -> Fit:
    """Run ``m`` alone: weight 1 on it, threshold tuned on its probabilities."""
    w = np.zeros(len(S["prob"]))
    w[m] = 1.0
    return _fit(method, S, y, w, "prob", metric)


def fit_mean(S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, space: str) -> Fit:
    """Equal weights in ``space``, threshold tuned."""
    m = len(S[space])
    return _fit(f"mean_{space}", S, y, np.full(m, 1.0 / m), space, metric)


def fit_caruana(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, rounds: int = CARUANA_ROUNDS, space: str = "prob"
) -> Fit:
    """Greedy ensemble selection with replacement (Caruana et al. 2004, AutoGluon's weighted ensemble).

    Each round adds the run whose inclusion scores best (exact best threshold each time); the weights are
    the counts of the best prefix of rounds, divided by its length. Ties go to the lower run index.
    """
    m = len(S[space])
    counts = np.zeros(m)
    best: tuple[float, float, np.ndarray] | None = None  # (score, threshold, counts)
    for r in range(rounds):
        pick: tuple[float, float, int] | None = None
        for i in range(m):
            trial = counts.copy()
            trial[i] += 1
            t, score = evaluate(S, y, trial / (r + 1), space, metric)
            if pick is None or score > pick[0]:
                pick = (score, t, i)
        assert pick is not None
        counts[pick[2]] += 1
        if best is None or pick[0] > best[0]:
            best = (pick[0], pick[1], counts.copy())
    assert best is not None
    return Fit("caruana", space, best[2] / best[2].sum(), best[1], best[0])


def fit_hill_climb(
    S: Mapping[str, np.ndarray],
    y: np.ndarray,
    metric: str,
    space: str = "prob",
    steps: Sequence[float] = HILL_STEPS,
    max_iter: int = 100,
) -> Fit:
    """Hill climbing from the best single run: move a fraction of the weight onto one run while it helps.

    Every iteration tries each run with each step size in ``steps`` and takes the best strict improvement;
    it stops when none improves the score or after ``max_iter`` moves.
    """
    m = len(S[space])
    start = max((fit_single(S, y, metric, i) for i in range(m)), key=lambda f: f.score)
    w = start.weights
    t, best = evaluate(S, y, w, space, metric)
    for _ in range(max_iter):
        move: tuple[float, float, np.ndarray] | None = None
        for i in range(m):
            for step in steps:
                cand = (1.0 - step) * w
                cand[i] += step
                ct, score = evaluate(S, y, cand, space, metric)
                if score > best and (move is None or score > move[0]):
                    move = (score, ct, cand)
        if move is None:
            break
        best, t, w = move
    return Fit("hill_climb", space, w / w.sum(), t, best)


def _param_names(runs: Sequence[str]) -> list[str]:
    return [f"u_{run}" for run in runs]


def fit_from_params(
    params: Mapping[str, Any], runs: Sequence[str], S: Mapping[str, np.ndarray], y: np.ndarray, metric: str
) -> Fit:
    """The blend an Optuna trial's parameters describe, with its exact best threshold."""
    u = np.array([params[name] for name in _param_names(runs)])
    return _fit("optuna", S, y, dirichlet_weights(u), params["space"], metric)


def make_objective(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, runs: Sequence[str]
) -> Callable[[optuna.Trial], float]:
    """Optuna objective: Dirichlet weights (one uniform per run), a blend space, the exact best threshold."""
    names = _param_names(runs)
    y = np.ascontiguousarray(y, dtype=bool)

    def objective(trial: optuna.Trial) -> float:
        u = np.array([trial.suggest_float(name, 0.0, 1.0) for name in names])  # (M,)
        space = trial.suggest_categorical("space", SPACES)
        faults.point("trial")
        return evaluate(S, y, dirichlet_weights(u), space, metric)[1]

    return objective


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no INFO line per trial
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def open_study(
    storage: str | optuna.storages.BaseStorage | None, name: str | None, seed: int
) -> optuna.Study:
    """Create or load (``load_if_exists``) a maximising study with a seeded TPE sampler.

    The sampler is seeded with ``seed + number of trials already in the study``, so a resumed study does
    not replay the random draws of the session before it, and the same sequence of sessions repeats.
    """
    import optuna
    import sqlalchemy.exc

    try:
        with _quiet_optuna():
            study = optuna.create_study(
                storage=storage, study_name=name, direction="maximize", load_if_exists=True
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise UserError(
            f"cannot open Optuna storage {storage!r}: {e}; expected a URL such as sqlite:///runs/blend/study.db"
        ) from e
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"study {name!r} in {storage!r} minimises; delete it or pass another --storage")
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def default_storage(workdir: str | Path) -> optuna.storages.RDBStorage:
    """SQLite storage at ``runs/blend/study.db`` in WAL mode.

    Optuna commits several times per trial; with the default rollback journal every commit waits for an
    fsync (~10 ms on many cloud disks). WAL with ``synchronous=NORMAL`` keeps the file consistent after a
    crash and makes the study about 6x faster to write.
    """
    import optuna

    path = (Path(workdir) / BLEND_DIR / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"creator": connect})


def optimize(
    study: optuna.Study,
    S: Mapping[str, np.ndarray],
    y: np.ndarray,
    metric: str,
    runs: Sequence[str],
    n_trials: int,
    timeout: float | None = None,
    progress: bool = False,
) -> Fit:
    """Run ``n_trials`` more trials of ``study`` (or until ``timeout`` s) and return its best trial's blend."""
    from tqdm.auto import tqdm

    done = _completed(study)
    best = [max((t.value for t in done), default=-math.inf)]
    with (
        _quiet_optuna(),
        tqdm(total=n_trials, desc="blend search", unit="trial", disable=not progress) as bar,
    ):

        def report(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if trial.value is not None and trial.value > best[0]:
                best[0] = trial.value
            bar.update(1)
            bar.set_postfix_str(f"best {metric} {best[0]:.5f}", refresh=False)

        study.optimize(
            make_objective(S, y, metric, runs), n_trials=n_trials, timeout=timeout, callbacks=[report]
        )
    if best[0] == -math.inf:
        raise UserError(f"the search completed no trial within --timeout {timeout} s; allow more time")
    return fit_from_params(study.best_trial.params, runs, S, y, metric)


def fit_optuna(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, runs: Sequence[str], n_trials: int, seed: int
) -> Fit:
    """Optuna search in a throw-away in-memory study (the nested-CV refits)."""
    return optimize(open_study(None, None, seed), S, y, metric, runs, n_trials)


@dataclass(frozen=True)
class Method:
    """A blend method: its name, how simple it is (lower ships on a tie) and how to fit it."""

    name: str
    complexity: int
    fit: Callable[[Mapping[str, np.ndarray], np.ndarray, int], Fit]  # (spaces, labels, seed) -> Fit


def methods(runs: Sequence[str], metric: str, optuna_trials: int) -> list[Method]:
    """Every method in table order: each single run, the three means, Caruana, hill climbing, Optuna."""

    def single(i: int) -> Callable[[Mapping[str, np.ndarray], np.ndarray, int], Fit]:
        return lambda S, y, _seed: fit_single(S, y, metric, i, f"single:{runs[i]}")

    def mean(space: str) -> Callable[[Mapping[str, np.ndarray], np.ndarray, int], Fit]:
        return lambda S, y, _seed: fit_mean(S, y, metric, space)

    out = [Method(f"single:{run}", _COMPLEXITY["single"], single(i)) for i, run in enumerate(runs)]
    out += [Method(f"mean_{space}", _COMPLEXITY[f"mean_{space}"], mean(space)) for space in SPACES]
    out += [
        Method("caruana", _COMPLEXITY["caruana"], lambda S, y, _seed: fit_caruana(S, y, metric)),
        Method("hill_climb", _COMPLEXITY["hill_climb"], lambda S, y, _seed: fit_hill_climb(S, y, metric)),
        Method(
            "optuna",
            _COMPLEXITY["optuna"],
            lambda S, y, seed: fit_optuna(S, y, metric, runs, optuna_trials, seed),
        ),
    ]
    return out


def nested_cv(
    P: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    metric: str,
    candidates: Sequence[Method],
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Per fold k: fit every method on the other folds, score fold k with the fitted weights AND threshold.

    Spaces are recomputed on each side of the split, so rank-space blends rank the held-out fold among
    itself, as the test set is ranked at submission time.

    Args:
        P: (M, N) OOF probabilities.
        y: (N,) labels.
        folds: (N,) fold ids.
        metric: a name in :data:`METRICS`.
        candidates: the methods to fit.
        seed: Optuna methods use ``seed + 1 + fold index``.
        progress: show a progress bar over folds.

    Returns:
        ``{method name: [score on each fold, in sorted fold order]}``.
    """
    from tqdm.auto import tqdm

    score = METRICS[check_metric(metric)]
    y = np.asarray(y, dtype=bool)
    per_fold: dict[str, list[float]] = {m.name: [] for m in candidates}
    for k, fold in enumerate(tqdm(np.unique(folds), desc="nested CV", unit="fold", disable=not progress)):
        test = folds == fold
        S_train, S_test = spaces(P[:, ~test]), spaces(P[:, test])
        for m in candidates:
            fit = m.fit(S_train, y[~test], seed + 1 + k)
            pred = combine(S_test[fit.space], fit.weights, fit.space) >= fit.threshold  # (N_k,)
            per_fold[m.name].append(float(score(y[test], pred)))
    return per_fold


# ---- inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OOFSet:
    """The validated OOF predictions of M runs over the same N rows."""

    workdir: Path
    runs: tuple[str, ...]
    file_names: np.ndarray  # (N,) str
    y: np.ndarray  # (N,) int8 labels
    folds: np.ndarray  # (N,) int64
    P: np.ndarray  # (M, N) float64 probs
    fold_file: str
    fold_sha256: str
    oof_sha256: tuple[str, ...]


def _run_names(oof_dir: Path, runs: Sequence[str] | None) -> list[str]:
    available = sorted(p.stem for p in oof_dir.glob("*.csv") if not p.name.startswith("."))
    if runs is None:
        if not available:
            raise UserError(
                f"no OOF files in {oof_dir}; train runs first with `aivh-ens cv --model NAME --folds K`"
            )
        names = available
    else:
        names = [r.strip() for r in runs if r.strip()]
        dupes = sorted({r for r in names if names.count(r) > 1})
        if dupes:
            raise UserError(f"--runs lists {', '.join(dupes)} more than once; list each run once")
        for r in names:
            if r not in available:
                raise UserError(
                    f"run {r!r} has no OOF file {oof_dir / (r + '.csv')}; available runs: "
                    f"{', '.join(available) or 'none'} (a run's OOF appears when all its folds are done)"
                )
    if len(names) < 2:
        raise UserError(
            f"a blend needs at least two runs, got {len(names)} ({', '.join(names)}); train another model with "
            "`aivh-ens cv --model NAME` or list more with --runs a,b"
        )
    return names


def _read_oof(run: str, path: Path) -> pd.DataFrame:
    rerun = f"re-train the run (`aivh-ens cv --name {run} --force ...`) or leave it out with --runs"
    try:
        df = pd.read_csv(path, dtype={"file_name": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"oof/{run}.csv is not a readable CSV ({e}); {rerun}") from e
    missing = [c for c in OOF_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(
            f"oof/{run}.csv lacks column(s) {', '.join(missing)}; expected {','.join(OOF_COLUMNS)}"
        )
    if df.empty:
        raise UserError(f"oof/{run}.csv has no rows; {rerun}")

    def first_bad(bad: np.ndarray, what: str) -> None:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(
                f"oof/{run}.csv has {int(bad.sum())} row(s) with {what} (first: line {i + 2}, "
                f"file_name {df['file_name'].iloc[i]!r}); {rerun}"
            )

    prob = pd.to_numeric(df["prob"], errors="coerce").to_numpy(dtype=np.float64)
    first_bad(np.isnan(prob), "a missing or NaN prob")
    first_bad((prob < 0) | (prob > 1), "a prob outside [0, 1]")
    for col in ("label", "fold"):
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        first_bad(~np.isfinite(v) | (v != np.round(v)), f"a non-integer {col}")
    first_bad(~df["label"].isin([0, 1]).to_numpy(), "a label other than 0 or 1")
    first_bad(df["file_name"].isna().to_numpy(), "an empty file_name")
    return pd.DataFrame(
        {
            "file_name": df["file_name"].astype(str).to_numpy(dtype=object),
            "label": df["label"].to_numpy(dtype=np.int8),
            "fold": df["fold"].to_numpy(dtype=np.int64),
            "prob": prob,
        }
    )


def _read_config(workdir: Path, run: str) -> dict[str, Any]:
    path = workdir / "runs" / run / "config.json"
    if not path.is_file():
        raise UserError(
            f"run {run!r} has oof/{run}.csv but no runs/{run}/config.json, so the fold file it was made from "
            f"is unknown; restore runs/{run}/ or re-train with `aivh-ens cv --name {run}`"
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"runs/{run}/config.json is not valid JSON ({e}); restore it or re-train {run}"
        ) from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("fold_sha256"), str):
        raise UserError(f"runs/{run}/config.json has no fold_sha256; it must record the fold file's sha256")
    return cfg


def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.flatnonzero(a != b)[0])


def load_oof(workdir: str | Path, runs: Sequence[str] | None = None) -> OOFSet:
    """Read and cross-check the OOF files of ``runs`` (default: every ``oof/*.csv``) before any work.

    Raises:
        UserError: fewer than two runs, an unreadable file, NaN or out-of-range probabilities, a missing
            run config, runs made from different fold files, or rows/labels/folds that differ between runs.
    """
    workdir = Path(workdir)
    names = _run_names(workdir / "oof", runs)
    frames = {r: _read_oof(r, workdir / "oof" / f"{r}.csv") for r in names}
    configs = {r: _read_config(workdir, r) for r in names}

    # The fold file most runs share is the reference; name the first run that differs.
    shas = [configs[r]["fold_sha256"] for r in names]
    ref_sha = max(dict.fromkeys(shas), key=shas.count)
    ref = names[shas.index(ref_sha)]
    ref_file = configs[ref].get("fold_file", "?")
    for r in names:
        if configs[r]["fold_sha256"] != ref_sha:
            raise UserError(
                f"run {r!r} was made from fold file {configs[r].get('fold_file', '?')} "
                f"(sha256 {configs[r]['fold_sha256'][:12]}) but {ref!r} from {ref_file} (sha256 {ref_sha[:12]}); "
                f"blend only runs made from the same fold file: re-train {r} on {ref_file} or leave it out with --runs"
            )

    base = frames[ref]
    fix = (
        "every run must list the fold file's rows in its order; re-train {} on that fold file or leave it out"
    )
    for r in names:
        df = frames[r]
        if len(df) != len(base):
            raise UserError(
                f"oof/{r}.csv has {len(df)} rows but oof/{ref}.csv has {len(base)}; " + fix.format(r)
            )
        for col in ("file_name", "label", "fold"):
            a, b = df[col].to_numpy(), base[col].to_numpy()
            if not np.array_equal(a, b):
                i = _first_diff(a, b)
                raise UserError(
                    f"oof/{r}.csv differs from oof/{ref}.csv in {col} at line {i + 2} ({a[i]!r} vs {b[i]!r}); "
                    + fix.format(r)
                )

    y = base["label"].to_numpy(dtype=np.int8)
    if y.min() == y.max():
        raise UserError(f"every label in oof/{ref}.csv is {int(y[0])}; tuning a threshold needs both classes")
    folds = base["fold"].to_numpy(dtype=np.int64)
    if len(np.unique(folds)) < 2:
        raise UserError(
            f"oof/{ref}.csv has a single fold; nested CV needs at least two (make folds with --folds K)"
        )
    return OOFSet(
        workdir=workdir,
        runs=tuple(names),
        file_names=base["file_name"].to_numpy(),
        y=y,
        folds=folds,
        P=np.ascontiguousarray(np.stack([frames[r]["prob"].to_numpy() for r in names])),
        fold_file=str(ref_file),
        fold_sha256=ref_sha,
        oof_sha256=tuple(sha256_file(workdir / "oof" / f"{r}.csv") for r in names),
    )


def study_name(oof: OOFSet, metric: str) -> str:
    """``blend:<metric>:<runs>:<digest>``; the digest covers the OOF files and the fold file, so a new set of
    runs, a re-trained run or another metric starts a new study, and the same inputs resume the old one."""
    runs = sorted(oof.runs)
    key = json.dumps(
        {"metric": metric, "fold": oof.fold_sha256, "oof": dict(zip(oof.runs, oof.oof_sha256, strict=True))},
        sort_keys=True,
    )
    return f"blend:{metric}:{'+'.join(runs)}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# ---- the stage ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodResult:
    """A method fitted on all OOF rows plus its nested-CV scores (one per fold)."""

    name: str
    complexity: int
    fit: Fit
    per_fold: tuple[float, ...]

    @property
    def nested_mean(self) -> float:
        return float(np.mean(self.per_fold))

    @property
    def nested_std(self) -> float:
        return float(np.std(self.per_fold))


@dataclass(frozen=True)
class BlendResult:
    """What :func:`run_blend` produced: the blend.json content, every method's result and the choice."""

    blend: dict[str, Any]
    methods: tuple[MethodResult, ...]
    picked: MethodResult
    reason: str
    written: tuple[Path, ...]


def pick_method(
    results: Sequence[MethodResult], metric: str, tie_tol: float = TIE_TOL
) -> tuple[MethodResult, str]:
    """The method to ship: best nested-CV mean, the simplest of those within ``tie_tol`` of it.

    Returns:
        ``(result, reason)`` with a one-sentence reason.
    """
    top = max(results, key=lambda r: r.nested_mean)
    tied = [r for r in results if r.nested_mean >= top.nested_mean - tie_tol]
    picked = min(tied, key=lambda r: (r.complexity, -r.nested_mean))
    reason = (
        f"picked {picked.name}: nested {metric} {picked.nested_mean:.4f} ± {picked.nested_std:.4f} "
        f"(in-sample {picked.fit.score:.4f})"
    )
    if picked is top:
        reason += f", the best nested score of the {len(results)} methods"
    else:
        reason += (
            f"; {top.name} scores {top.nested_mean:.4f} nested, within the {tie_tol:g} tie margin, so the "
            "simpler method ships"
        )
    in_sample = max(results, key=lambda r: r.fit.score)
    if in_sample.name != picked.name:
        reason += (
            f"; {in_sample.name} has the best in-sample score ({in_sample.fit.score:.4f}) but tuning weights and "
            "threshold on the rows it is scored on is optimistic"
        )
    return picked, reason


def format_table(results: Sequence[MethodResult], metric: str, picked: str | None = None) -> str:
    """One row per method: in-sample OOF score, nested-CV mean ± std, space and threshold."""
    width = max(len("method"), *(len(r.name) for r in results)) + 2
    head = f"{'method':<{width}}{'space':<7}{'oof ' + metric:>14}{'nested ' + metric:>24}{'threshold':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        mark = "  <- picked" if r.name == picked else ""
        nested = f"{r.nested_mean:.4f} ± {r.nested_std:.4f}"
        lines.append(
            f"{r.name:<{width}}{r.fit.space:<7}{r.fit.score:>14.4f}{nested:>24}{r.fit.threshold:>11.4f}{mark}"
        )
    return "\n".join(lines)


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def plot_threshold_curves(
    path: Path, y: np.ndarray, curves: Mapping[str, tuple[np.ndarray, float]], metric: str
) -> Path:
    """Metric against threshold for each ``{label: (scores (N,), chosen threshold)}``, as a PNG."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, (s, t) in curves.items():
        thresholds, scores = threshold_sweep(y, s, metric)
        (line,) = ax.plot(thresholds, scores, label=f"{label} (t={t:.3f}, {metric}={scores.max():.4f})")
        ax.axvline(t, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(xlabel="threshold (predict 1 when score >= t)", ylabel=metric, title=f"OOF {metric} by threshold")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", fontsize=8)
    return _save(fig, path)


def plot_weights(path: Path, weights: Mapping[str, float], title: str) -> Path:
    """The blend weights as bars, as a PNG."""
    fig = _figure(max(4.0, 0.6 * len(weights) + 2), 3.5)
    ax = fig.add_subplot()
    ax.bar(list(weights), list(weights.values()), color="tab:blue")
    ax.set(ylabel="weight", title=title, ylim=(0, 1))
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def run_blend(
    workdir: str | Path,
    runs: Sequence[str] | None = None,
    metric: str = "f1",
    trials: int = 300,
    timeout: float | None = None,
    storage: str | None = None,
    seed: int = 42,
    nested_trials: int = 100,
    tie_tol: float = TIE_TOL,
    progress: bool = False,
) -> BlendResult:
    """The blend stage: validate the OOF files, search, score every method in and out of sample, pick, write.

    Args:
        workdir: project folder holding ``oof/`` and ``runs/``.
        runs: run names; default every ``oof/*.csv``.
        metric: a name in :data:`METRICS`.
        trials: Optuna trials to add to the study (it resumes if it exists).
        timeout: stop the search after this many seconds.
        storage: an Optuna storage URL; default SQLite at ``runs/blend/study.db``.
        seed: seeds the TPE samplers.
        nested_trials: Optuna trials per nested-CV fold.
        tie_tol: nested means within this are a tie, broken towards the simpler method.
        progress: show progress bars.
    """
    check_metric(metric)
    if trials < 1 or nested_trials < 1:
        raise UserError(f"--trials and --nested-trials must be >= 1, got {trials} and {nested_trials}")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout}")
    oof = load_oof(workdir, runs)  # every input check happens here, before anything is written
    workdir = oof.workdir
    out_dir = workdir / BLEND_DIR
    y = oof.y.astype(bool)
    S = spaces(oof.P)

    store = default_storage(workdir) if storage is None else storage
    try:
        study = open_study(store, study_name(oof, metric), seed)
        optuna_fit = optimize(study, S, y, metric, oof.runs, trials, timeout, progress)
        n_trials = len(_completed(study))
    finally:
        if storage is None:
            store.engine.dispose()  # closes the file (and folds the WAL back into it)

    candidates = methods(oof.runs, metric, nested_trials)
    in_sample = {m.name: (optuna_fit if m.name == "optuna" else m.fit(S, y, seed)) for m in candidates}
    per_fold = nested_cv(oof.P, y, oof.folds, metric, candidates, seed=seed, progress=progress)
    results = tuple(
        MethodResult(m.name, m.complexity, in_sample[m.name], tuple(per_fold[m.name])) for m in candidates
    )
    picked, reason = pick_method(results, metric, tie_tol)

    fit = picked.fit
    weights = {r: float(w) for r, w in zip(oof.runs, fit.weights, strict=True)}
    doc: dict[str, Any] = {
        "version": BLEND_VERSION,
        "runs": [
            {"name": r, "config": f"runs/{r}/config.json", "oof": f"oof/{r}.csv", "oof_sha256": sha}
            for r, sha in zip(oof.runs, oof.oof_sha256, strict=True)
        ],
        "fold_sha256": oof.fold_sha256,
        "space": fit.space,
        "weights": weights,
        "threshold": fit.threshold,
        "metric": metric,
        "method": picked.name,
        "oof_score": fit.score,
        "nested_score": {
            "mean": picked.nested_mean,
            "std": picked.nested_std,
            "per_fold": list(picked.per_fold),
        },
        "baselines": [
            {
                "method": r.name,
                "oof_score": r.fit.score,
                "nested_mean": r.nested_mean,
                "nested_std": r.nested_std,
                "threshold": r.fit.threshold,
            }
            for r in results
        ],
        "trials": n_trials,
        "seed": seed,
    }
    if fit.space == "rank":
        doc["rank_reference"] = RANK_REFERENCE
    _check_blend_doc(doc)

    singles = [r for r in results if r.name.startswith("single:")]
    best_single = max(singles, key=lambda r: r.fit.score)
    curves = {
        f"blend ({picked.name}, {fit.space})": (combine(S[fit.space], fit.weights, fit.space), fit.threshold)
    }
    curves[best_single.name] = (
        oof.P[oof.runs.index(best_single.name.split(":", 1)[1])],
        best_single.fit.threshold,
    )
    written = (
        plot_threshold_curves(out_dir / "threshold.png", y, curves, metric),
        plot_weights(out_dir / "weights.png", weights, f"{picked.name} weights ({fit.space} space)"),
        write_json(out_dir / "blend.json", doc),  # last: its presence means the stage finished
    )
    return BlendResult(doc, results, picked, reason, written)


# ---- blend.json --------------------------------------------------------------------------------------

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
_OPTIONAL_KEYS = frozenset({"rank_reference"})
_RUN_KEYS = frozenset({"name", "config", "oof", "oof_sha256"})
_NESTED_KEYS = frozenset({"mean", "std", "per_fold"})
_BASELINE_KEYS = frozenset({"method", "oof_score", "nested_mean", "nested_std", "threshold"})


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
    need(isinstance(doc["runs"], list) and len(doc["runs"]) >= 1, "runs must be a non-empty list")
    for i, run in enumerate(doc["runs"]):
        _keys(run, _RUN_KEYS, f"{where} runs[{i}]")
        need(
            all(isinstance(run[k], str) and run[k] for k in ("name", "config", "oof")),
            f"runs[{i}] needs strings",
        )
        need(_is_sha256(run["oof_sha256"]), f"runs[{i}].oof_sha256 must be a hex sha256")
    names = [run["name"] for run in doc["runs"]]
    need(len(set(names)) == len(names), "runs lists a run twice")
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
    _keys(doc["nested_score"], _NESTED_KEYS, f"{where} nested_score")
    nested = doc["nested_score"]
    need(
        _is_number(nested["mean"]) and _is_number(nested["std"]), "nested_score mean and std must be numbers"
    )
    need(
        isinstance(nested["per_fold"], list) and all(map(_is_number, nested["per_fold"])), "per_fold: numbers"
    )
    need(isinstance(doc["baselines"], list), "baselines must be a list")
    for i, b in enumerate(doc["baselines"]):
        _keys(b, _BASELINE_KEYS, f"{where} baselines[{i}]")
        need(isinstance(b["method"], str), f"baselines[{i}].method must be a string")
        need(all(_is_number(b[k]) for k in _BASELINE_KEYS - {"method"}), f"baselines[{i}] needs numbers")
    need(
        isinstance(doc["trials"], int) and not isinstance(doc["trials"], bool) and doc["trials"] >= 0,
        "trials: int",
    )
    need(isinstance(doc["seed"], int) and not isinstance(doc["seed"], bool), "seed must be an integer")
    if "rank_reference" in doc:
        need(doc["rank_reference"] == RANK_REFERENCE, f"rank_reference must be {RANK_REFERENCE!r}")


def _default_workdir(path: Path) -> Path:
    parent = path.resolve().parent
    return (
        parent.parent.parent if parent.name == BLEND_DIR.name and parent.parent.name == "runs" else Path(".")
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
        root = Path(workdir) if workdir is not None else _default_workdir(path)
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


def apply_blend(
    blend_json: Mapping[str, Any], scores: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a fitted blend to new scores, as the submit stage does.

    Args:
        blend_json: a blend document (see :func:`load_blend`).
        scores: ``{run: (N,) P(label 1)}`` for the same N rows; runs with weight 0 may be left out.

    Returns:
        ``(probs, labels)``: the (N,) blended scores in [0, 1] and the (N,) int64 labels
        (``probs >= threshold``). Rank-space blends rank the N rows among themselves (module docstring).
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
    probs = combine(to_space(P, space), weights, space)  # (N,)
    return probs, (probs >= blend_json["threshold"]).astype(np.int64)
