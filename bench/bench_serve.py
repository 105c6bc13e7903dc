"""Benchmark `aivh-ens serve`: requests/s and latency with batching against batch size 1.

Run: ``python bench/bench_serve.py [--images 200] [--clients 8] [--rounds 2] [--threads 1] [--max-batch 32]
[--smoke]`` (``--smoke``: 16 images, 2 clients, 1 round, for the test suite).

Set-up (in this process, 30-80 s on 2 CPU cores): a demo data set with ``--images`` test images, two
``tiny`` runs (test_efficientnet and test_convnext at 64 px, 2 folds, 1 epoch: 4 fold models, hflip TTA) and
their blend. Then two ``aivh-ens serve`` processes on 127.0.0.1, one batching (``--max-batch``, the default
5 ms window), one with ``--max-batch 1``, take turns under the same load for ``--rounds`` rounds (so a
change in the machine's load hits both alike): ``--clients`` asyncio clients send every test image once, one
image per request, each starting its next request when its last one is answered. Each setting reports its
fastest round. Every request has a timeout and every loop is bounded by the image count.

The last line reads ``bench serve: <batched req/s> vs <batch-1 req/s> = <ratio>x``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REQUEST_TIMEOUT = 60.0  # seconds per request
START_TIMEOUT = 120.0  # seconds for a server to load its models and warm up


def cli(*args: object) -> None:
    """``aivh-ens ARGS`` in this process, quietly; its output is shown if it fails."""
    from aivh_ens.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main.main([str(a) for a in args], standalone_mode=False)
    except (Exception, SystemExit) as e:
        if not isinstance(e, SystemExit) or e.code:
            raise SystemExit(f"aivh-ens {' '.join(map(str, args))} failed:\n{out.getvalue()}{e}") from e


def make_project(root: Path, n_images: int, threads: int) -> tuple[Path, list[Path]]:
    """Demo data, two tiny 2-fold runs and their blend under ``root``; returns (workdir, test images)."""
    data, work = root / "data", root / "work"
    cli("demo-data", data, "--n", 80, "--n-test", n_images, "--seed", 1)
    tiny = ["--recipe", "tiny", "--folds", 2, "--epochs", 1, "--group", "pairs", "--quiet", "--data", data]
    tiny += ["--workdir", work, "--threads", threads]
    cli("cv", *tiny, "--name", "effnet")
    cli("cv", *tiny, "--model", "test_convnext", "--name", "convnext")
    cli("blend", "--workdir", work, "--runs", "effnet,convnext", "--trials", 20, "--quiet")
    ids = pd.read_csv(data / "test.csv")["id"].tolist()
    return work, [data / i for i in ids]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, max_batch: int, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``aivh-ens serve`` on a free port; returns once its warm-up pass is done (bounded by START_TIMEOUT)."""
    port = free_port()
    args = ["serve", "--workdir", work, "--port", port, "--device", "cpu", "--threads", threads]
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        cmd = [sys.executable, "-m", "aivh_ens", *map(str, args), "--max-batch", str(max_batch)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("warm"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server was not ready within {START_TIMEOUT:g} s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def load(url: str, images: list[Path], clients: int) -> tuple[float, np.ndarray, dict]:
    """Send every image once from ``clients`` concurrent clients; returns (seconds, latencies in ms, /health).

    The clients are asyncio tasks on one connection pool each (a thread per client would spend the
    machine's cores on the GIL rather than on the server).
    """
    bodies = [(p.name, p.read_bytes()) for p in images]
    latencies: list[float] = []
    failures: list[str] = []

    async def client(todo: list[tuple[str, bytes]]) -> None:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as http:
            for name, body in todo:
                t0 = time.perf_counter()
                try:
                    r = await http.post(f"{url}/predict", files={"files": (name, body, "image/jpeg")})
                    if r.status_code != 200:
                        failures.append(r.text[:200])
                        continue
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)

    async def run_all() -> None:
        await asyncio.gather(*(client(bodies[i::clients]) for i in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(asyncio.wait_for(run_all(), timeout=REQUEST_TIMEOUT * len(images)))
    seconds = time.perf_counter() - t0
    if failures or len(latencies) != len(images):
        raise SystemExit(f"{len(failures)} of {len(images)} requests failed; first: {failures[:1]}")
    return seconds, np.array(latencies), httpx.get(f"{url}/health", timeout=5).json()


def report(label: str, max_batch: int, rounds: list[tuple[float, np.ndarray, float]], health: dict) -> float:
    """Print one setting's fastest round (the one least slowed by other work on the machine); returns req/s."""
    n = len(rounds[0][1])
    rates = [n / seconds for seconds, _, _ in rounds]
    seconds, lat, cpu = rounds[int(np.argmax(rates))]
    b = health["batching"]
    print(
        f"{label:>8} (max batch {max_batch:>2}): {n / seconds:6.1f} req/s (rounds: "
        f"{', '.join(f'{r:.1f}' for r in rates)}), latency p50 {statistics.median(lat):6.1f} ms, "
        f"p99 {np.percentile(lat, 99):6.1f} ms; server CPU {1000 * cpu / n:.1f} ms per request; "
        f"{b['images'] / max(1, b['batches']):.1f} images per forward pass"
    )
    return n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the servers (and of training)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    a = ap.parse_args()
    if a.smoke:
        a.images, a.clients, a.rounds, a.max_batch = 16, 2, 1, 4
    settings = {"batched": a.max_batch, "batch-1": 1}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        t0 = time.perf_counter()
        work, images = make_project(Path(tmp), a.images, a.threads)
        print(
            f"set-up: {len(images)} demo test images, 2 tiny runs x 2 folds, blend ({time.perf_counter() - t0:.0f}s)"
        )
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        rounds: dict[str, list[tuple[float, np.ndarray, float]]] = {k: [] for k in settings}
        health: dict[str, dict] = {}
        try:
            for label, max_batch in settings.items():
                servers[label] = start_server(work, max_batch, a.threads, Path(tmp) / f"serve-{label}.log")
                load(servers[label][1], images[: a.clients * 2], a.clients)  # warm connections and allocator
            for _ in range(a.rounds):
                for label in settings:
                    cpu0 = cpu_seconds(servers[label][0].pid)
                    seconds, lat, health[label] = load(servers[label][1], images, a.clients)
                    rounds[label].append((seconds, lat, cpu_seconds(servers[label][0].pid) - cpu0))
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
        print(
            f"{len(images)} requests from {a.clients} clients per round, {a.rounds} rounds, turns alternating"
        )
        rate = {k: report(k, settings[k], rounds[k], health[k]) for k in settings}
    print(
        f"bench serve: {rate['batched']:.1f} req/s vs {rate['batch-1']:.1f} req/s = {rate['batched'] / rate['batch-1']:.2f}x"
    )


if __name__ == "__main__":
    main()
