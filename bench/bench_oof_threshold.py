"""Should the OOF threshold be fitted on fold-averaged-like scores?

Run: ``python bench/bench_oof_threshold.py [--tar ../shared/data/cifake-dev.tar.gz] [--n-train 4000]
[--seeds 0 1 2]``.

Each OOF row is scored by the one fold model that did not train on it; ``submit`` cuts the average of all K
fold models. Averaging narrows the score spread, so the F1-optimal cut could sit elsewhere. On CIFAKE's dev
set (``../shared/data/cifake-dev.tar.gz``; Krizhevsky & Hinton 2009; Bird & Lotfi 2024) one ``tiny`` run
(test_efficientnet, 5 folds, native 32 px, hflip TTA) is trained per seed on ``--n-train`` train images and
``submit`` scores the 4,000 labelled dev test images. On those labels, per seed, it prints the F1 of the
fold-averaged test scores at:

- ``oof``: the blend's threshold (fitted on single-model OOF rows, what ships);
- ``single``: the mean over k of the best threshold for fold model k's own test scores (what a single-model
  fit finds on these images: the OOF fit's expectation);
- ``best``: the best threshold for the fold-averaged scores themselves (in hindsight: an upper bound).

``best - single`` is the most a fold-averaged-like fit could gain; the last line reads
``bench oof threshold: best - single <mean> (spread <sd>), best - oof <mean> (spread <sd>)``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd

from aivh_ens.blend.stage import run_blend
from aivh_ens.config import resolve_config
from aivh_ens.infer.submission import submit
from aivh_ens.metrics import best_threshold, f1
from aivh_ens.train import run_cv


def one_seed(src: Path, out: Path, n_train: int, epochs: int, seed: int) -> dict[str, float]:
    """Train, blend and submit one seed; the F1 of the fold-averaged test scores at each threshold."""
    data = out / f"data-n{n_train}"
    if not (data / "train.csv").is_file():
        data.mkdir(parents=True, exist_ok=True)
        train = pd.read_csv(src / "train.csv").sample(n=n_train, random_state=0)
        train.to_csv(data / "train.csv", index=False)
        pd.read_csv(src / "test.csv").to_csv(data / "test.csv", index=False)
        for d in ("train_data", "test_data_v2"):
            if not (data / d).exists():
                (data / d).symlink_to(src / d)
    work = out / f"work-n{n_train}-e{epochs}-s{seed}"
    cfg = resolve_config("tiny", name="r", data=str(data), model="test_efficientnet", img_size=32,
                         epochs=epochs, folds=5, seed=seed, tta="hflip")  # fmt: skip
    if not (work / "runs" / "blend" / "blend.json").is_file():
        run_cv(cfg, work, resume=True, progress=False, log=lambda _m: None)
        run_blend(work, trials=20, seed=42)
    res = submit(work, out=work / "submission.csv", threshold="oof", progress=False, log=lambda _m: None)
    cache = pd.read_csv(work / "runs" / "r" / "test" / "hflip.csv", dtype={"id": str})
    y = cache["id"].map(pd.read_csv(src / "solution.csv", dtype={"id": str}).set_index("id")["label"])
    y = y.to_numpy().astype(bool)
    P = cache[[c for c in cache.columns if c.startswith("fold")]].to_numpy().T  # (K, N)
    avg = P.mean(axis=0)  # the blend is one run in prob space: its score is the fold average
    single = float(np.mean([best_threshold(y, p, "f1")[0] for p in P]))
    t_best, f_best = best_threshold(y, avg, "f1")
    return {"oof_t": res.threshold, "single_t": single, "best_t": t_best, "oof": f1(y, avg >= res.threshold),
            "single": f1(y, avg >= single), "best": f_best}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve()
    ap.add_argument("--tar", type=Path, default=here.parents[2] / "shared/data/cifake-dev.tar.gz")
    ap.add_argument("--out", type=Path, default=here.parent / "out" / "oof-threshold")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--smoke", action="store_true", help="40 demo images for CIFAKE, 1 epoch, 2 seeds")
    args = ap.parse_args()
    if args.smoke:  # a check that the bench runs, for the test suite; its figures mean nothing
        from aivh_ens.synth import make_demo_dataset

        args.out = Path(tempfile.mkdtemp(prefix="bench-oof-threshold-smoke-"))
        atexit.register(shutil.rmtree, args.out, True)
        make_demo_dataset(args.out / "cifake-dev", n=40, n_test=40)
        args.n_train, args.epochs, args.seeds = 40, 1, [0, 1]
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / "cifake-dev"
    if not (src / "solution.csv").is_file():
        with tarfile.open(args.tar) as t:
            t.extractall(args.out, filter="data")
    rows = []
    for seed in args.seeds:
        r = one_seed(src, args.out, args.n_train, args.epochs, seed)
        rows.append(r)
        print(f"seed {seed}: thresholds oof {r['oof_t']:.4f} single {r['single_t']:.4f} best {r['best_t']:.4f}; "
              f"F1 of the fold average at them {r['oof']:.4f} {r['single']:.4f} {r['best']:.4f}", flush=True)  # fmt: skip
    gain = np.array([r["best"] - r["single"] for r in rows])
    loss = np.array([r["best"] - r["oof"] for r in rows])
    sd = lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
    print(f"bench oof_threshold: best - single {gain.mean():.4f} (spread {sd(gain):.4f}), "
          f"best - oof {loss.mean():.4f} (spread {sd(loss):.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
