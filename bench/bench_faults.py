"""Lock races under a simulated NFS stall: no fold is accepted with files from two lock holders.

Each repetition, on real processes and files: holder A takes a fold's lock (heartbeat 0.05 s, grace 0.4 s)
and writes the fold's two files, then stops (SIGSTOP: every thread, its heartbeat included, as a stalled NFS
mount does) in one of its writes, at a random one of two places: before its write guard (``write:``) or
between the guard and the rename (``land:``, the window no check can close). Holder B, on "another host",
watches the silent lock for the grace period, takes it over, writes both files and a ``done.json`` that
vouches for them (:func:`aivh_ens.fence.vouch`). A goes on (SIGCONT) at a random moment: while B is still
writing, or after B finished.

A repetition is safe when the reader accepts the fold only if every file in it is the one written by the
holder whose done.json it reads. Two readers judge each outcome: this package's, which checks done.json's
sha256 of each file (:func:`aivh_ens.fence.unvouched`), and a reader that trusts any finished done.json, as a
reader relying on the lock's token checks alone would.

    python bench/bench_faults.py            # 50 repetitions
    python bench/bench_faults.py --smoke    # 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path

from aivh_ens import fence
from aivh_ens.io import write_json, write_text
from aivh_ens.locks import FileLock, LockLost, fenced

BEAT, GRACE = 0.05, 0.4  # seconds: short, so a repetition takes about a second
FILES = ("best.bin", "oof.bin")


def holder(folder: str, name: str, stop: str | None, pace: float, host: str | None) -> None:
    """Hold the fold lock and write both files (``pace`` seconds apart), then done.json vouching for them;
    ``stop``: the fault point where this process stops itself."""
    fdir = Path(folder) / "fold0"
    lock = FileLock(Path(folder) / "fold0.lock", "fold 0", heartbeat_s=BEAT, grace_s=GRACE, host=host)
    try:
        with fenced(lock, fdir):
            digests: dict[str, str] = {}
            for f in FILES:
                if stop and stop.endswith(f):
                    os.environ.update(AIVH_ENS_KILL_AT=stop, AIVH_ENS_FAULT="stop")
                write_text(fdir / f, f"{name}/{lock.generation}", digests)  # sha256 as written
                time.sleep(pace)
            write_json(fdir / "done.json", {"holder": name, **fence.vouch(fdir, digests)})
    except LockLost:
        os._exit(3)
    os._exit(0)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def one_race(folder: Path, rng: random.Random) -> dict[str, object]:
    """One repetition; what each reader made of the fold it left."""
    ctx = mp.get_context("fork")
    stop = f"{rng.choice(['write', 'land'])}:{rng.choice(FILES)}"
    a = ctx.Process(target=holder, args=(str(folder), "A", stop, 0.0, None))
    a.start()
    while _state(a.pid) != "T":
        time.sleep(0.005)
    pace = 0.1
    b = ctx.Process(target=holder, args=(str(folder), "B", None, pace, "another-host"))
    b.start()
    t0 = time.monotonic()
    while (
        not (folder / "fold0" / "fence.json").exists() or fence.read_fence(folder / "fold0")["generation"] < 2
    ):
        time.sleep(0.005)  # B holds the fold now
    time.sleep(rng.uniform(0, pace * len(FILES) * 1.5))  # A goes on while B writes, or after it finished
    os.kill(a.pid, signal.SIGCONT)
    a.join(30)
    b.join(30)
    fdir = folder / "fold0"
    done = json.loads((fdir / "done.json").read_text())
    whole = all((fdir / f).read_text() == f"{done['holder']}/{done['generation']}" for f in FILES)
    ours = all(fence.unvouched(fdir, done, f) is None for f in FILES)
    return {"stop": stop, "a_exit": a.exitcode, "whole": whole, "ours_safe": whole or not ours,
            "trusting_safe": whole, "seconds": time.monotonic() - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50, help="repetitions (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="4 repetitions")
    args = ap.parse_args()
    reps = 4 if args.smoke else args.reps
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(reps):
            folder = Path(tmp) / f"rep{i}"
            folder.mkdir()
            r = one_race(folder, rng)
            rows.append(r)
            print(f"rep {i:2d}: A stopped at {r['stop']:<14} exit {r['a_exit']}  fold from one holder: "
                  f"{'yes' if r['whole'] else 'NO '}  ours safe: {r['ours_safe']}  trusting reader safe: "
                  f"{r['trusting_safe']}  ({r['seconds']:.2f}s)")  # fmt: skip
    ours = sum(bool(r["ours_safe"]) for r in rows)
    trusting = sum(bool(r["trusting_safe"]) for r in rows)
    secs = [float(r["seconds"]) for r in rows]  # type: ignore[arg-type]
    print(f"{reps} races, {statistics.mean(secs):.2f}s +- {statistics.pstdev(secs):.2f}s each; A stopped its "
          f"writes in every one; folds left with files of two holders: {reps - trusting}")  # fmt: skip
    print(f"bench faults: {ours}/{reps} safe vs {trusting}/{reps} safe = {ours / max(trusting, 1):.2f}x")


if __name__ == "__main__":
    main()
