"""Benchmark `aivh-ens serve`: requests/s and latency with batching against batch size 1.

Run: ``python bench/bench_serve.py [--images 200] [--clients 8] [--rounds 2] [--threads 1] [--max-batch 32]
[--tricklers 300] [--body-timeout 5] [--smoke]`` (``--smoke``: 16 images, 2 clients, 2 rounds, 10 tricklers, for
the test suite).

Set-up (in this process, 30-80 s on 2 CPU cores): a demo data set with ``--images`` test images, two
``tiny`` runs (test_efficientnet and test_convnext at 64 px, 2 folds, 1 epoch: 4 fold models, hflip TTA) and
their blend. Then two ``aivh-ens serve`` processes on 127.0.0.1, one batching (``--max-batch``, the default
5 ms window), one with ``--max-batch 1``, take turns under the same load for ``--rounds`` rounds (so a
change in the machine's load hits both alike): ``--clients`` asyncio clients send every test image once, one
image per request, each starting its next request when its last one is answered. Each setting reports the mean
and spread of its rounds. Every request has a timeout and every loop is bounded by the image count.

Then a third server (``--body-timeout``, default 5 s) faces ``--tricklers`` (default 300) clients at once that
each open a 10 MB upload and send one byte every 2 s, while a normal client sends 20 images one by one
(retrying a 503 after its Retry-After): one line says how many tricklers got their 408 and when, how many a
503 at once, how many were still held 30 s past the timeout, and how the normal requests fared.

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


def start_server(
    work: Path, max_batch: int, threads: int, log: Path, *extra: object
) -> tuple[subprocess.Popen, str]:
    """``aivh-ens serve`` on a free port; returns once its warm-up pass is done (bounded by START_TIMEOUT)."""
    port = free_port()
    args = ["serve", "--workdir", work, "--port", port, "--device", "cpu", "--threads", threads, *extra]
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
    """Print one setting's mean over its rounds, with their spread; returns the mean req/s."""
    n = len(rounds[0][1])
    rates = [n / seconds for seconds, _, _ in rounds]
    lat = np.concatenate([r[1] for r in rounds])
    cpu = sum(r[2] for r in rounds) / len(rounds)
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    b = health["batching"]
    print(
        f"{label:>8} (max batch {max_batch:>2}): {statistics.mean(rates):6.1f} +- {sd:.1f} req/s (rounds: "
        f"{', '.join(f'{r:.1f}' for r in rates)}), latency p50 {statistics.median(lat):6.1f} ms, "
        f"p99 {np.percentile(lat, 99):6.1f} ms; server CPU {1000 * cpu / n:.1f} ms per request; "
        f"{b['images'] / max(1, b['batches']):.1f} images per forward pass"
    )
    return statistics.mean(rates)


TRICKLE_HEAD = (
    b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
    b"Content-Length: 10000000\r\n\r\n--XyZ\r\n"
)


async def _trickle(host: str, port: int, every_s: float, give_up_s: float) -> tuple[bytes, float]:
    """Open a 10 MB upload and send one byte every ``every_s``; (the server's answer, seconds until it closed
    the connection, or ``give_up_s`` when it never did)."""
    t0 = time.monotonic()
    got = b""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(TRICKLE_HEAD)
        await writer.drain()
        while time.monotonic() - t0 < give_up_s:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=every_s)
            except asyncio.TimeoutError:
                writer.write(b"x")
                await writer.drain()
                continue
            if not chunk:
                break  # closed by the server
            got += chunk
        writer.close()
    except OSError:  # refused or reset: the connection is over
        pass
    return got, time.monotonic() - t0


def tricklers(url: str, images: list[Path], n: int, body_timeout: float) -> str:
    """``n`` slow-body clients (one byte every 2 s) at once, and one normal client sending ``images`` one by
    one meanwhile (retrying a 503 after its Retry-After); one line: how the tricklers ended, how the normal
    requests fared."""
    host, port = url.removeprefix("http://").split(":")
    give_up = body_timeout + 30

    async def normal(http: httpx.AsyncClient) -> tuple[list[float], int, int]:
        lat, retries, failed = [], 0, 0
        for p in images:
            t0 = time.perf_counter()
            while True:
                r = await http.post(f"{url}/predict", files={"files": (p.name, p.read_bytes(), "image/jpeg")})
                if r.status_code != 503 or time.perf_counter() - t0 > give_up:
                    break
                retries += 1
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
            else:
                failed += 1
        return lat, retries, failed

    async def run() -> tuple[list[tuple[bytes, float]], tuple[list[float], int, int]]:
        slow = [asyncio.create_task(_trickle(host, int(port), 2.0, give_up)) for _ in range(n)]
        await asyncio.sleep(0.5)  # the tricklers hold their connections first
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as http:
            fast = await normal(http)
        return list(await asyncio.gather(*slow)), fast

    ended, (lat, retries, failed) = asyncio.run(run())
    cut = [t for got, t in ended if got.startswith(b"HTTP/1.1 408")]
    busy = sum(got.startswith(b"HTTP/1.1 503") for got, _ in ended)
    held = sum(t >= give_up for _, t in ended)
    cut_s = f"408 after {statistics.median(cut):.1f} s (max {max(cut):.1f} s)" if cut else "none got a 408"
    return (
        f"tricklers: {n} at once, --body-timeout {body_timeout:g}: {len(cut)} {cut_s}, {busy} a 503 at once, "
        f"{n - len(cut) - busy - held} otherwise closed, {held} still held after {give_up:g} s; normal requests "
        f"meanwhile: {len(lat)}/{len(images)} answered 200 ({retries} retries after a 503), median "
        f"{statistics.median(lat) if lat else float('nan'):.2f} s, {failed} failed"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--tricklers", type=int, default=300, help="slow-body clients at once (0: skip that part)"
    )
    ap.add_argument("--body-timeout", type=float, default=5.0, help="the trickler server's --body-timeout")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the servers (and of training)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    a = ap.parse_args()
    if a.smoke:
        a.images, a.clients, a.rounds, a.max_batch, a.tricklers, a.body_timeout = 16, 2, 2, 4, 10, 1.0
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
            stop_server(servers.pop("batch-1")[0])
            if a.tricklers:
                log = Path(tmp) / "serve-tricklers.log"
                servers["tricklers"] = start_server(
                    work, a.max_batch, a.threads, log, "--body-timeout", a.body_timeout
                )
                trickled = tricklers(servers["tricklers"][1], images[:20], a.tricklers, a.body_timeout)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
        print(
            f"{len(images)} requests from {a.clients} clients per round, {a.rounds} rounds, turns alternating"
        )
        rate = {k: report(k, settings[k], rounds[k], health[k]) for k in settings}
        if a.tricklers:
            print(trickled)
    print(
        f"bench serve: {rate['batched']:.1f} req/s vs {rate['batch-1']:.1f} req/s = {rate['batched'] / rate['batch-1']:.2f}x"
    )


if __name__ == "__main__":
    main()
