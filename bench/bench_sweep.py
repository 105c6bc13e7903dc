"""Benchmark the sweep: two tiny runs x 5 folds, one sequential ``cv`` after the other against one ``sweep``.

Run: ``python bench/bench_sweep.py [--n 600] [--epochs 4] [--img-size 64] [--no-ray] [--smoke]`` (``--smoke``:
40 images, 1 epoch at 32 px, the ``aivh-ens`` commands in this process, for the test suite).

- sequential: ``aivh-ens cv`` for test_efficientnet, then for test_convnext, each a process with 2 torch
  threads (what a user types today);
- sweep: ``aivh-ens sweep plan.toml --devices cpu,cpu``: the same 10 jobs in two worker processes pinned to
  one torch thread each, longest first;
- Ray: ``ray.init`` on this machine (2 CPUs and its CUDA devices), then two sweeps of 2 one-epoch jobs, each
  asking for one GPU where the machine has one and none on a CPU machine: the start-up cost and the overhead
  per job (handed to Ray -> the job starting), on new worker processes and on reused ones.

Both timed commands run from a fresh work dir on the same demo data (decoded into the image cache first, so
neither pays for it). The last line reads ``bench sweep: <sweep s> vs <sequential s> = <ratio>x`` (ratio =
sequential / sweep; > 1: the sweep is faster).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("test_efficientnet", "test_convnext")


def aivh(*args: str, threads: int | None = None, in_process: bool = False) -> float:
    """Seconds taken by ``aivh-ens ARGS`` in a child process (which fails the bench if it fails); with
    ``in_process`` (``--smoke``), in this one, without the child's start-up and imports."""
    if in_process:
        from aivh_ens.cli import main

        t0 = time.perf_counter()
        main.main([*args, *(["--threads", str(threads)] if threads else [])], standalone_mode=False)
        return time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    if threads:
        env["AIVH_ENS_THREADS"] = str(threads)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aivh_ens", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def write_plan(path: Path, data: Path, epochs: int, img_size: int) -> Path:
    runs = "".join(f'\n[[runs]]\nname = "{m}"\nmodel = "{m}"\n' for m in MODELS)
    path.write_text(
        f'[shared]\ndata = "{data}"\nrecipe = "tiny"\nfolds = 5\ngroup = "pairs"\nepochs = {epochs}\n'
        f"img_size = {img_size}\n{runs}"
    )
    return path


def ray_overhead(data: Path, work: Path, cache: Path) -> tuple[float, list[float], list[float]]:
    """(ray.init seconds, per-job seconds from submission to the job starting on new workers, on reused ones).

    Two sweeps of 2 jobs each on 2 CPUs, so no job waits for a free slot: the first pays for starting the
    worker processes (and their imports), the second reuses them. Ray is told the machine's CUDA devices and
    each job asks for one of them, or for none on a CPU machine (Ray checks a job's request against its nodes).
    """
    import ray
    import torch

    from aivh_ens.scale.plan import plan_from_configs
    from aivh_ens.scale.sweep import RayOptions, run_sweep

    os.environ["PYTHONPATH"] = str(ROOT)
    gpus = torch.cuda.device_count()
    t0 = time.perf_counter()
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter() - t0
    waits = []
    try:
        for name in ("cold", "warm"):
            run = {
                "recipe": "tiny",
                "model": MODELS[0],
                "name": name,
                "data": str(data),
                "folds": 2,
                "epochs": 1,
            }
            run |= {"img_size": 32, "cache_dir": str(cache)}
            plan = plan_from_configs("bench", [run])
            result = run_sweep(plan, work, backend="ray", ray=RayOptions(min(gpus, 1)), log=lambda m: None)
            waits.append([r["queued_s"] for r in result.rows if r.get("queued_s") is not None])
    finally:
        ray.shutdown()
    return start, waits[0], waits[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="demo train images")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.epochs, args.img_size = 40, 1, 32
    from aivh_ens.synth import make_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        make_demo_dataset(data, n=args.n, n_test=10, seed=0)
        plan = write_plan(tmp / "plan.toml", data, args.epochs, args.img_size)
        common = ["--recipe", "tiny", "--folds", "5", "--group", "pairs", "--data", str(data), "--quiet"]
        common += ["--epochs", str(args.epochs), "--img-size", str(args.img_size)]
        cache = tmp / "cache"
        for w in ("seq", "sweep"):  # the image cache, shared, so neither timing includes it
            (tmp / w).mkdir()
        run = functools.partial(aivh, in_process=args.smoke)
        run(
            "cache",
            "--data",
            str(data),
            "--recipe",
            "tiny",
            "--img-size",
            str(args.img_size),
            "--cache-dir",
            str(cache),
        )
        seq = sum(
            run(
                "cv",
                *common,
                "--model",
                m,
                "--name",
                m,
                "--workdir",
                str(tmp / "seq"),
                "--cache-dir",
                str(cache),
                threads=2,
            )
            for m in MODELS
        )
        print(f"sequential cv, 2 runs x 5 folds, 2 threads: {seq:.1f} s")
        plan_text = plan.read_text().replace("[shared]\n", f'[shared]\ncache_dir = "{cache}"\n')
        plan.write_text(plan_text)
        sweep = run("sweep", str(plan), "--devices", "cpu,cpu", "--workdir", str(tmp / "sweep"))
        print(f"sweep --devices cpu,cpu, the same 10 jobs: {sweep:.1f} s")
        if not args.no_ray:
            start, cold, warm = ray_overhead(data, tmp / "ray", cache)
            print(
                f"ray: ray.init {start:.1f} s; per job, handed to Ray -> job started: {statistics.mean(cold):.1f} s "
                f"on new workers (process start, imports), {statistics.mean(warm):.2f} s on reused ones"
            )
        print(f"bench sweep: {sweep:.1f} vs {seq:.1f} = {seq / sweep:.2f}x")


if __name__ == "__main__":
    main()
