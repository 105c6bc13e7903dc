"""``aivh-ens auto`` against its own deadline: does every call end within its limit, and when does the first
``submission.csv`` appear, while a busy process takes one core?

Run: ``python bench/bench_deadline.py [--limits 3m,6m,12m] [--n-train 4000] [--n-test 1000] [--tar PATH]``
(``make bench``). On CIFAKE (``../shared/data/cifake-dev.tar.gz``, extracted under ``--out``, by default in
``/tmp``), each limit gets a fresh work dir and one ``auto --time-limit LIMIT --quiet`` call; ``--busy-after``
seconds in (default 60), a process that spins on one core starts and runs until the call ends. For each call
the table gives its wall time against its limit, when the first ``submission.csv`` appeared (polled every
0.2 s) and the test F1. The last line reads ``bench deadline: <calls within limit + 5%>/<calls>, worst <wall /
limit>x; first submission by 50% of the limit in <n>/<calls>, latest at <share>``. Goal: every call within its
limit + 5%, and a submission by 50% of the limit.

``--smoke`` runs one call on 32 generated demo images (``aivh_ens.synth``) at 1.3x the least limit the planner
asks for, the busy process over its last tenth only (it would take a core from whatever runs beside it): a
check that the bench works, in well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
TOLERANCE = 1.05
"""A call ends within its limit when its wall time is at most this times the limit."""


def aivh(*args: str) -> list[str]:
    return [sys.executable, "-m", "aivh_ens", *args]


@contextlib.contextmanager
def busy_core(after_s: float) -> Iterator[subprocess.Popen]:
    """A process spinning on one core (the last this process may use) from ``after_s`` seconds on, until the
    block ends."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    code = (
        f"import os, time; time.sleep({after_s}); os.sched_setaffinity(0, {{{cores[-1]}}})\nwhile True: pass"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def first_seen(path: Path, t0: float, stop: threading.Event, found: list[float]) -> None:
    """Poll for ``path``; record the seconds since ``t0`` when it first exists."""
    while not stop.is_set():
        if path.is_file():
            found.append(time.monotonic() - t0)
            return
        time.sleep(0.2)


def one_call(data: Path, work: Path, limit_s: float, busy_after: float, extra: list[str]) -> dict:
    """One ``auto`` call under a busy core: wall seconds, when the submission appeared, the exit code, F1."""
    sub = work / "submission.csv"
    stop, found = threading.Event(), []
    t0 = time.monotonic()
    watcher = threading.Thread(target=first_seen, args=(sub, t0, stop, found), daemon=True)
    watcher.start()
    with busy_core(busy_after):
        p = subprocess.run(
            aivh("auto", "--data", str(data), "--time-limit", f"{limit_s:g}s", "--workdir", str(work), "--quiet",
                 *extra),
            capture_output=True, text=True, env=ENV,
        )  # fmt: skip
    wall = time.monotonic() - t0
    stop.set()
    watcher.join()
    if p.returncode != 0:
        print((p.stdout + p.stderr)[-2000:], flush=True)
    return {"limit": limit_s, "wall": wall, "first": found[0] if found else None, "rc": p.returncode,
            "f1": score(data, sub) if sub.is_file() else None}  # fmt: skip


def score(data: Path, submission: Path) -> float | None:
    import pandas as pd

    from aivh_ens.metrics import f1

    if not (data / "solution.csv").is_file():
        return None
    s = pd.read_csv(data / "solution.csv").merge(pd.read_csv(submission), on="id", suffixes=("", "_pred"))
    return f1(s["label"].to_numpy(), s["label_pred"].to_numpy())


def least_limit(data: Path, work: Path, extra: list[str]) -> float:
    """The least --time-limit the planner asks for here (its "too small" error; nothing is written)."""
    from aivh_ens.auto.budget import parse_time_limit

    p = subprocess.run(aivh("auto", "--data", str(data), "--time-limit", "1s", "--workdir", str(work), *extra),
                       capture_output=True, text=True, env=ENV)  # fmt: skip
    asked = re.search(r"give --time-limit (\S+) or more", p.stdout + p.stderr)
    if not asked:
        sys.exit(f"bench deadline: the planner named no least limit:\n{(p.stdout + p.stderr)[-2000:]}")
    return parse_time_limit(asked.group(1))


def report(rows: list[dict]) -> None:
    print("\n| limit | wall | of the limit | first submission | of the limit | exit | test F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        first = "-" if r["first"] is None else f"{r['first']:.0f}s"
        share = "-" if r["first"] is None else f"{r['first'] / r['limit']:.0%}"
        f1 = "-" if r["f1"] is None else f"{r['f1']:.4f}"
        print(f"| {r['limit']:.0f}s | {r['wall']:.0f}s | {r['wall'] / r['limit']:.0%} | {first} | {share} | "
              f"{r['rc']} | {f1} |")  # fmt: skip
    within = sum(r["wall"] <= TOLERANCE * r["limit"] for r in rows)
    worst = max(r["wall"] / r["limit"] for r in rows)
    shares = [math.inf if r["first"] is None else r["first"] / r["limit"] for r in rows]
    early = sum(s <= 0.5 for s in shares)
    latest = "never" if math.isinf(max(shares)) else f"{max(shares):.0%}"
    print(f"bench deadline: {within}/{len(rows)} calls within limit + 5%, worst {worst:.2f}x; first submission "
          f"by 50% of the limit in {early}/{len(rows)}, latest at {latest}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limits", default="3m,6m,12m", help="auto's --time-limit for each call")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--busy-after", type=float, default=60.0, help="seconds before the busy process starts")
    ap.add_argument("--tar", type=Path, default=ROOT.parent / "shared/data/cifake-dev.tar.gz")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "aivh-bench-deadline")
    ap.add_argument(
        "--smoke", action="store_true", help="one call on generated demo data, in well under a minute"
    )
    args = ap.parse_args()
    from aivh_ens.auto.budget import parse_time_limit

    if args.smoke:
        from aivh_ens.synth import make_demo_dataset

        data = args.out / "smoke-data"
        make_demo_dataset(data, n=32, n_test=8, seed=1, force=True)
        extra = ["--models", "test_resnet", "--devices", "cpu", "--threads", "1"]
        limits = [math.ceil(1.3 * least_limit(data, args.out / "smoke-ask", extra))]
        busy = 0.9 * limits[0]
    else:
        from bench_auto import cifake, subset

        args.data = None
        data = subset(cifake(args), args.out, args.n_train, args.n_test)
        extra, limits, busy = [], [parse_time_limit(x) for x in args.limits.split(",")], args.busy_after
    rows = []
    for limit_s in limits:
        work = args.out / f"work-{limit_s:g}s"
        shutil.rmtree(work, ignore_errors=True)  # each call starts from nothing (auto would resume)
        print(f"== auto --time-limit {limit_s:g}s, a busy core from {busy:g}s", flush=True)
        rows.append(one_call(data, work, limit_s, busy, extra))
    report(rows)


if __name__ == "__main__":
    main()
