"""``aivh-ens auto`` against the best single run and a plain torch script, each with the same time budget.

Run: ``python bench/bench_auto.py [--budget 20m] [--n-train 20000] [--n-test 4000] [--data DIR | --tar PATH]``
(``make bench-auto``; at full size it takes three budgets, an hour on 2 cores, so ``make bench`` leaves it out).
A smoke check: ``python bench/bench_auto.py --budget 2m --n-train 2000 --n-test 1000``.

On CIFAKE (Krizhevsky & Hinton 2009; Bird & Lotfi 2024; ``../shared/data/cifake-dev.tar.gz``: 32x32 JPEGs,
label 1 = Stable Diffusion, 0 = CIFAR-10), with ``--n-train`` train rows (balanced) and ``--n-test`` test rows:

1. ``aivh-ens auto --time-limit BUDGET`` (every decision its own);
2. the best single run the same budget buys: ``aivh-ens auto --models aivh_res_s`` (auto's first from-scratch
   candidate alone: the same clock and planner give one model all the folds and epochs the budget buys);
3. ``bench/plain_torch.py --seconds BUDGET``: one small CNN on all the train rows, no folds, threshold 0.5.

Each is timed from its first command to its submission and scored on the test rows (F1 of label 1). The last
line reads ``bench auto: <auto F1> vs <best of the other two> = <ratio>x``. ``--setups auto,single`` reruns only
those setups and takes the others' results from their last run (kept in ``<out>/<setup>-<size>/result.json``;
the table says which results were kept).

``--smoke`` (for the test suite) runs only the plain setup, on 40 demo images (``aivh-ens demo-data``) for a few
seconds: the subset, the plain script, the scoring and the table. ``auto`` itself cannot run in seconds (its
planner refuses a limit below its least plan, about 45 s on 2 cores); ``tests/auto`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from aivh_ens.auto.budget import parse_time_limit
from aivh_ens.metrics import f1

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def cifake(args: argparse.Namespace) -> Path:
    """The cifake-dev folder: ``--data``, else extracted from ``--tar`` under ``--out`` (once)."""
    if args.data:
        return args.data
    folder = args.out / "cifake-dev"
    if not (folder / "solution.csv").is_file():
        if not args.tar.is_file():
            sys.exit(f"bench auto needs CIFAKE's dev set: no {args.tar}; pass --tar PATH or --data DIR")
        args.out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.tar) as t:
            t.extractall(args.out, filter="data")
    return folder


def subset(src: Path, out: Path, n_train: int, n_test: int) -> Path:
    """A data folder of ``n_train`` balanced train rows and ``n_test`` test rows; the image folders are links."""
    dst = out / f"data-{n_train}-{n_test}"
    dst.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(src / "train.csv")
    train = (
        train.groupby("label", group_keys=False)
        .sample(n=n_train // 2, random_state=0)
        .sample(frac=1, random_state=0)
    )
    sol = pd.read_csv(src / "solution.csv").sample(frac=1, random_state=0).head(n_test)
    train.to_csv(dst / "train.csv", index=False)
    sol[["id"]].to_csv(dst / "test.csv", index=False)
    sol.to_csv(dst / "solution.csv", index=False)
    for folder in ("train_data", "test_data_v2"):
        if not (dst / folder).exists():
            (dst / folder).symlink_to((src / folder).resolve())
    return dst


def run(cmd: list[str]) -> str:
    """Run a command (niced like the caller), echo its last lines, return its output; stop the bench on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    out = p.stdout + p.stderr
    print("\n".join(out.strip().splitlines()[-3:]), flush=True)
    if p.returncode != 0:
        sys.exit(f"bench auto: {' '.join(cmd[:4])} ... failed (exit {p.returncode}):\n{out[-3000:]}")
    return out


def score(data: Path, submission: Path) -> float:
    s = pd.read_csv(data / "solution.csv").merge(pd.read_csv(submission), on="id", suffixes=("", "_pred"))
    return f1(s["label"].to_numpy(), s["label_pred"].to_numpy())


def aivh(*args: str) -> list[str]:
    return [sys.executable, "-m", "aivh_ens", *args]


def bench_auto(data: Path, work: Path, budget: str) -> Path:
    run(aivh("auto", "--data", str(data), "--time-limit", budget, "--workdir", str(work), "--quiet"))
    return work / "submission.csv"


def bench_single(data: Path, work: Path, budget: str) -> Path:
    """The best single run the budget buys: ``auto --models M`` for auto's first from-scratch candidate M, so
    the same clock, planner and stages size one model's folds and epochs to the budget."""
    from aivh_ens.auto.candidates import SCRATCH_CPU_NATIVE

    run(aivh("auto", "--data", str(data), "--time-limit", budget, "--models", SCRATCH_CPU_NATIVE[0], "--workdir",
             str(work), "--quiet"))  # fmt: skip
    return work / "submission.csv"


def bench_plain(data: Path, work: Path, budget_s: float) -> Path:
    run([sys.executable, str(HERE / "plain_torch.py"), str(data), str(work / "submission.csv"), "--seconds",
         str(budget_s)])  # fmt: skip
    return work / "submission.csv"


def smoke(args: argparse.Namespace) -> None:
    """``--smoke``: 40 demo train images and 20 test images in a temporary folder, the plain setup only."""
    from aivh_ens.synth import make_demo_dataset

    args.out = Path(tempfile.mkdtemp(prefix="bench-auto-smoke-"))
    args.data = make_demo_dataset(args.out / "demo", n=40, n_test=20)["root"]
    args.n_train, args.n_test, args.budget, args.setups = 40, 20, "8s", "plain"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="20m", help="each setup's time limit (auto's --time-limit syntax)")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=4000)
    ap.add_argument("--data", type=Path, default=None, help="an extracted cifake-dev folder")
    ap.add_argument("--tar", type=Path, default=ROOT.parent / "shared/data/cifake-dev.tar.gz")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "auto")
    ap.add_argument(
        "--setups", default="auto,single,plain", help="the setups to run; the others' last results"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny demo data, the plain setup only (see above)")
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
    wanted = {w.strip() for w in args.setups.split(",")}
    budget_s = parse_time_limit(args.budget)
    data = subset(cifake(args), args.out, args.n_train, args.n_test)
    tag = f"{args.n_train}-{args.n_test}-{args.budget}"
    setups = {  # --setups key: (the table's name, the setup)
        "auto": ("auto", lambda w: bench_auto(data, w, args.budget)),
        "single": ("best single run", lambda w: bench_single(data, w, args.budget)),
        "plain": ("plain torch script", lambda w: bench_plain(data, w, budget_s)),
    }  # fmt: skip
    if not wanted <= setups.keys():
        sys.exit(f"--setups {args.setups}: choose from {', '.join(setups)}")
    rows, kept = {}, []
    for key, (name, fn) in setups.items():
        work = args.out / f"{name.split()[0]}-{tag}"
        if key not in wanted and args.smoke:
            continue
        if key not in wanted:
            try:
                rows[name] = tuple(
                    json.loads((work / "result.json").read_text())[k] for k in ("f1", "seconds")
                )
            except (OSError, ValueError, KeyError):
                sys.exit(f"bench auto: no earlier result for {key} in {work}; run it (--setups {key})")
            kept.append(name)
            continue
        shutil.rmtree(work, ignore_errors=True)  # each setup starts from nothing (auto would resume)
        work.mkdir(parents=True)
        print(
            f"== {name}: budget {args.budget}, {args.n_train} train / {args.n_test} test images", flush=True
        )
        t0 = time.monotonic()
        sub = fn(work)
        rows[name] = (score(data, sub), time.monotonic() - t0)
        (work / "result.json").write_text(json.dumps({"f1": rows[name][0], "seconds": rows[name][1]}))
    print(f"\n| setup | test F1 | minutes | of the {args.budget} budget |\n| --- | --- | --- | --- |")
    for name, (score_, secs) in rows.items():
        note = " (kept from an earlier run)" if name in kept else ""
        print(f"| {name}{note} | {score_:.4f} | {secs / 60:.1f} | {secs / budget_s:.0%} |")
    if args.smoke:
        shutil.rmtree(args.out)
        print(f"bench auto: smoke: plain torch script F1 {rows['plain torch script'][0]:.4f} (auto not run)")
        return
    best_other = max(rows["best single run"][0], rows["plain torch script"][0])
    print(f"bench auto: {rows['auto'][0]:.4f} vs {best_other:.4f} = {rows['auto'][0] / best_other:.3f}x")


if __name__ == "__main__":
    main()
