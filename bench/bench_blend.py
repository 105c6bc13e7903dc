"""Benchmark the blend search: 1,000 Optuna trials over 80,000 OOF rows x 10 runs.

Run: ``python bench/bench_blend.py [--rows 80000] [--runs 10] [--trials 1000] [--smoke]`` (``--smoke``: 2,000
rows x 3 runs, 20 trials, for the test suite).

Measures, on synthetic correlated OOF predictions:

- the search: ``--trials`` TPE trials in an in-memory study (target: <= 20 s for 1,000 on 2 cores), plus
  what the default SQLite study file adds per trial;
- the per-trial evaluation (blend + threshold): ours (one argsort, exact best threshold over every distinct
  score) against a naive one (scikit-learn ``f1_score`` on a 100-point threshold grid), on the same trials,
  and that ours never scores below the grid.

The last line reads ``bench blend: <ours> vs <baseline> = <ratio>x`` (seconds per trial evaluation).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from sklearn.metrics import f1_score

from aivh_ens.blend import core as bcore
from aivh_ens.blend import methods as bmethods
from aivh_ens.blend import search as bsearch


def synthetic_oof(n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and probabilities (M, N) of M correlated, differently calibrated runs.

    Each row has a shared difficulty (all runs err on the same hard images) and a source group where some
    runs are stronger than others; each run adds its own noise, temperature and bias, and probabilities are
    rounded to 6 decimals as a CSV would hold them (so there are ties).
    """
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2 == 0).astype(np.int8)  # pairs: row 2k AI, 2k+1 human
    sign = 2.0 * y - 1.0
    hard = rng.normal(0, 1, n)  # (N,) shared across runs
    group = rng.integers(0, 3, n)  # (N,) e.g. generator family
    P = np.empty((m, n))
    for i in range(m):
        skill = rng.uniform(1.2, 2.6) + 1.0 * (group == i % 3)  # stronger on one family
        logit = skill * sign - 0.9 * hard * sign + rng.normal(0, 1.0, n)
        temperature, bias = rng.uniform(0.5, 2.0), rng.normal(0, 0.5)
        P[i] = np.round(1.0 / (1.0 + np.exp(-(logit * temperature + bias))), 6)
    return y, P


def naive_evaluate(S: dict[str, np.ndarray], y: np.ndarray, w: np.ndarray, space: str) -> float:
    """Blend, then scikit-learn F1 at 100 thresholds: the loop many notebooks run per trial."""
    s = bcore.combine(S[space], w, space)
    return max(f1_score(y, s >= t) for t in np.linspace(0.0, 1.0, 100))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=80_000)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument(
        "--naive-trials", type=int, default=5, help="trials the slow naive evaluation is timed on"
    )
    ap.add_argument("--sqlite-trials", type=int, default=30, help="trials timed on the SQLite study file")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.runs, args.trials, args.naive_trials, args.sqlite_trials = 2000, 3, 20, 2, 3

    y, P = synthetic_oof(args.rows, args.runs)
    runs = [f"run{i}" for i in range(args.runs)]
    t0 = time.perf_counter()
    S = bcore.spaces(P)
    print(
        f"data: {args.rows} rows x {args.runs} runs; spaces precomputed in {time.perf_counter() - t0:.2f} s"
    )

    study = bsearch.open_study(None, None, seed=0)
    t0 = time.perf_counter()
    fit = bsearch.optimize(study, S, y, "f1", runs, args.trials)
    search_s = time.perf_counter() - t0
    target = "ok" if args.trials != 1000 or search_s <= 20 else "MISSED"
    print(
        f"search: {args.trials} trials in {search_s:.1f} s ({1e3 * search_s / args.trials:.1f} ms/trial, in-memory "
        f"study, TPE) -> best f1 {fit.score:.5f} ({fit.space} space); target <= 20 s for 1000: {target}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        storage = bsearch.default_storage(tmp)
        sql_study = bsearch.open_study(storage, "bench", seed=0)
        t0 = time.perf_counter()
        bsearch.optimize(sql_study, S, y, "f1", runs, args.sqlite_trials)
        sqlite_ms = 1e3 * (time.perf_counter() - t0) / args.sqlite_trials
        storage.engine.dispose()
    print(
        f"sqlite study file (WAL): {sqlite_ms:.1f} ms/trial over {args.sqlite_trials} trials of a fresh study"
    )

    # The same trial parameters for both evaluations.
    trials = [
        (bsearch.fit_from_params(t.params, runs, S, y, "f1").weights, t.params["space"]) for t in study.trials
    ]
    t0 = time.perf_counter()
    ours_scores = [bmethods.score_weights(S, y, w, space, "f1")[1] for w, space in trials]
    ours_s = (time.perf_counter() - t0) / len(trials)

    rng = np.random.default_rng(1)
    picked = [trials[int(np.argmax(ours_scores))]] + [
        trials[i] for i in rng.choice(len(trials), args.naive_trials - 1)
    ]
    t0 = time.perf_counter()
    naive_scores = [naive_evaluate(S, y, w, space) for w, space in picked]
    naive_s = (time.perf_counter() - t0) / len(picked)
    exact = [bmethods.score_weights(S, y, w, space, "f1")[1] for w, space in picked]
    gains = np.array(exact) - np.array(naive_scores)
    print(
        f"per-trial evaluation: ours {1e3 * ours_s:.2f} ms (exact, every distinct score; mean of {len(trials)} trials) "
        f"vs naive {1e3 * naive_s:.0f} ms (sklearn f1_score, 100-point grid; mean of {len(picked)} trials)"
    )
    print(
        f"ours >= naive on all {len(picked)} compared trials: {bool(np.all(gains >= 0))} "
        f"(best trial: ours {exact[0]:.5f} vs grid {naive_scores[0]:.5f}; mean gain {gains.mean():.5f})"
    )
    print(f"bench blend: {ours_s:.5f} vs {naive_s:.4f} = {naive_s / ours_s:.0f}x")


if __name__ == "__main__":
    main()
