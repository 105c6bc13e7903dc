"""The timed probe of ``auto``'s candidates, each capped and isolated, and the decode speed of the user's images.

A candidate's probe: a few training and evaluation batches of synthetic images of its input size through the
model its run would build (weights, head and frozen layers included), with its optimiser and precision ->
images per second (the loader's cost is added by the cost model, :data:`aivh_ens.auto.budget.LOADER_FACTOR`).
The probes run in one spawned process, never in ``auto``'s own: an out-of-memory error, any other error, a
crash or a probe past :data:`TIMING_CAP_S` skips that candidate with one line, the process is replaced when it
died, and ``auto``'s process holds no CUDA context or cached blocks while the sweep trains.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from aivh_ens.auto.budget import Speed
from aivh_ens.auto.candidates import Candidate, candidate_lines, candidates_doc
from aivh_ens.config import RunConfig
from aivh_ens.errors import UserError
from aivh_ens.layout import auto_dir

Log = Callable[[str], None]

CPU_FAST = {"amp": "bf16", "channels_last": True}
"""The settings a CPU candidate is also timed with (:func:`step_time`)."""
FAST_GAIN = 1.2
"""How much faster :data:`CPU_FAST` must train to be chosen (bf16 rounds more; it must pay for that)."""
WARMUP_BATCHES = 2
"""Batches run before the clock starts (kernel selection, oneDNN's weight reorders, cuDNN benchmarking)."""
TIMED_BATCHES = 3
MIN_TIMED_S = 0.1
"""Each chunk of timed batches runs for at least this long (a fast model's three batches are a few
milliseconds, too few to average out a scheduler hiccup)."""
MAX_TIMED_BATCHES = 50
CHUNKS = 5
"""Chunks timed; the probe takes their median (a busy neighbour slows a whole chunk, not every batch)."""
WORK_S = 2.0
"""Seconds of batches one measurement (training or evaluation) takes at most beyond its first warm-up batch and
first timed batch: a ViT-L fine-tune on a CPU, seconds per batch, is timed from two batches, not seventeen."""
TIMING_CAP_S = 180.0
"""Wall seconds a candidate's probe may take in the probe process (building the model and reading its weights
included) before it is stopped and the candidate skipped."""
START_CAP_S = 300.0
"""Wall seconds the probe process may take to start (torch and timm imported)."""
MIN_BATCH = 4
"""The smallest batch a probe steps down to on out-of-memory errors before it skips the candidate."""
CPU_PROBE_PIXELS = 32 * 64 * 64
"""Pixels of one batch of a probe on the CPU (:func:`_job`)."""
DECODE_SAMPLE = 32
"""Images of the user's own a decode measurement reads (:func:`decode_seconds`)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidate(cfg: RunConfig, device: str, threads: int | None = None, work_s: float = WORK_S) -> Speed:
    """Train and evaluation images per second of ``cfg``'s model on ``device`` (``threads``: torch threads,
    as each sweep job gets them), in its precision and memory format (``amp``, ``channels_last``). A probe run
    (``head`` linear or mlp) trains only its head, so its training speed is its feature extraction's (forward
    passes). ``work_s``: the seconds of batches each of the two measurements may take (:data:`WORK_S`)."""
    from aivh_ens.train.loop import create_optimizer, resolve_device
    from aivh_ens.train.models import build_model
    from aivh_ens.train.precision import autocast, resolve_precision, use_channels_last

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = resolve_device(device)
        model, data_cfg = build_model(cfg)
        model.to(dev)
        amp = resolve_precision(cfg.amp, dev).amp
        x = torch.randn(cfg.batch_size, 3, data_cfg.img_size, data_cfg.img_size, device=dev)
        if use_channels_last(cfg.channels_last, dev):
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (cfg.batch_size,), device=dev)
        eval_s = _time(lambda: _forward(model, x, amp, autocast), dev, work_s)
        if cfg.head != "finetune":
            return Speed(cfg.batch_size / eval_s, cfg.batch_size / eval_s)
        optimizer = create_optimizer(cfg, model)
        train_s = _time(lambda: _step(model, optimizer, x, y, amp, autocast), dev, work_s)
        return Speed(cfg.batch_size / train_s, cfg.batch_size / eval_s)
    finally:
        torch.set_num_threads(before)


def _time(fn: Callable[[], None], device: torch.device, work_s: float) -> float:
    """Seconds per call of ``fn`` after the warm-up calls: the median of up to :data:`CHUNKS` chunks (at least
    one) while they take less than ``work_s`` together; the warm-up stops early when it took half that."""
    t0 = time.perf_counter()
    for _ in range(WARMUP_BATCHES):
        fn()
        _sync(device)
        if time.perf_counter() - t0 > work_s / 2:
            break
    chunks: list[float] = []
    t1 = time.perf_counter()
    while len(chunks) < CHUNKS and (not chunks or time.perf_counter() - t1 < work_s):
        chunks.append(_chunk(fn, device, work_s / CHUNKS))
    return statistics.median(chunks)


def _chunk(fn: Callable[[], None], device: torch.device, most_s: float) -> float:
    """Seconds per call over one chunk: :data:`TIMED_BATCHES` calls (fewer past ``most_s``, at least one), more
    while they take less than :data:`MIN_TIMED_S` (up to :data:`MAX_TIMED_BATCHES`)."""
    t0 = time.perf_counter()
    n = 0
    while True:
        fn()
        n += 1
        _sync(device)
        spent = time.perf_counter() - t0
        if not ((n < TIMED_BATCHES and spent < most_s) or (n < MAX_TIMED_BATCHES and spent < MIN_TIMED_S)):
            return max(spent / n, 1e-6)


def _forward(model, x, amp, autocast) -> None:  # noqa: ANN001
    model.eval()
    with torch.no_grad(), autocast(x.device, amp):
        model(x)


def _step(model, optimizer, x, y, amp, autocast) -> None:  # noqa: ANN001
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is running out of memory: CUDA's error, or the CPU allocator's."""
    text = str(e).lower()
    return (
        isinstance(e, torch.OutOfMemoryError | MemoryError)
        or "out of memory" in text
        or ("can't allocate memory" in text)
    )


def _free(device: str) -> None:
    """Memory a failed probe held, given back (CUDA's cached blocks too)."""
    import gc

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def fit_speed(cfg: RunConfig, device: str, threads: int | None, work_s: float = WORK_S) -> tuple[Speed, int]:
    """``cfg``'s speed at the largest batch that fits: its own, halved on each out-of-memory error down to
    :data:`MIN_BATCH`. Returns the speed and that batch.

    Raises:
        torch.OutOfMemoryError: not even :data:`MIN_BATCH` fits (or another error of the probe).
    """
    from aivh_ens import faults

    batch = cfg.batch_size
    while True:
        try:
            faults.point(f"timing:{cfg.name}")
            return time_candidate(dataclasses.replace(cfg, batch_size=batch), device, threads, work_s), batch
        except Exception as e:
            if not is_oom(e) or batch <= MIN_BATCH:
                raise
        _free(device)  # outside the except block: the traceback no longer holds the failed step's tensors
        batch = max(MIN_BATCH, batch // 2)


@dataclasses.dataclass(frozen=True)
class Job:
    """One candidate's probe as the probe process receives it."""

    name: str
    kind: str
    cfg: RunConfig
    try_fast: bool  # also time it in bf16 autocast with channels_last (a from-scratch candidate on the CPU)


def measure(job: Job, device: str, threads: int | None, work_s: float = WORK_S) -> dict[str, Any]:
    """A candidate's timings entry (``runs/auto/timings.json``): its speeds, the batch it was timed at, and the
    settings its probe chose (a smaller batch that fits; bf16 and channels_last when they pay)."""
    t0 = time.perf_counter()
    try:
        s, batch = fit_speed(job.cfg, device, threads, work_s)
        chosen: dict[str, Any] = {"batch_size": batch} if batch < job.cfg.batch_size else {}
        if job.try_fast:
            fast, _ = fit_speed(
                dataclasses.replace(job.cfg, batch_size=batch, **CPU_FAST), device, threads, work_s
            )
            if fast.train_img_s >= FAST_GAIN * s.train_img_s:
                s, chosen = fast, {**chosen, **CPU_FAST}
    finally:
        _free(device)
    return {"model": job.cfg.model, "kind": job.kind, "img_size": job.cfg.img_size, "batch": batch,
            "device": device, "threads": threads, "train_img_s": s.train_img_s, "eval_img_s": s.eval_img_s,
            "probe_s": time.perf_counter() - t0, "settings": chosen}  # fmt: skip


def _reason(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0][:200]
    return ("out of memory: " if is_oom(e) else f"{type(e).__name__}: ") + first


def _serve(conn: Any, device: str, threads: int | None, work_s: float) -> None:
    """The probe process: one job at a time from ``conn``, each answered ``("ok", entry)`` or ``("error",
    reason)``; None ends it."""
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        try:
            conn.send(("ok", measure(job, device, threads, work_s)))
        except Exception as e:  # any failure of one candidate's probe skips it, never the call
            conn.send(("error", _reason(e)))


class Prober:
    """The probe process seen from ``auto``: :meth:`run` sends it a job and waits at most ``cap_s`` for the
    answer; a probe that overruns is stopped, a process that died is replaced for the next job."""

    def __init__(self, device: str, threads: int | None, cap_s: float = TIMING_CAP_S, work_s: float = WORK_S):
        self.device, self.threads, self.cap_s, self.work_s = device, threads, cap_s, work_s
        self.proc: Any = None
        self.conn: Any = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(child, self.device, self.threads, self.work_s), daemon=True
        )
        self.proc.start()
        child.close()
        try:
            if not self.conn.poll(START_CAP_S):
                raise EOFError
            self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode
            self.close()
            raise UserError(
                f"auto: the timing process did not start (exit code {code}); a script that calls run_auto must "
                'do so under `if __name__ == "__main__":` (its processes are spawned, which imports the script)'
            ) from None

    def run(self, job: Job) -> tuple[dict[str, Any] | None, str | None]:
        """(the timings entry, None), or (None, why the candidate is skipped)."""
        if self.proc is None:
            self._start()
        self.conn.send(job)
        if not self.conn.poll(self.cap_s):
            self.close()
            return None, f"no result within {self.cap_s:.0f} s (the timing process was stopped)"
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.close()
            oom = " (killed: out of memory?)" if code == -9 else ""
            return None, f"the timing process died with exit code {code}{oom}"
        return (value, None) if status == "ok" else (None, value)

    def close(self) -> None:
        """The process ended (asked to, then killed after 5 s)."""
        if self.proc is None:
            return
        try:
            if self.proc.is_alive():
                self.conn.send(None)
                self.proc.join(5)
        except (OSError, ValueError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc = self.conn = None


class Timings(dict):
    """The timings entries by candidate name (``runs/auto/timings.json``), and the candidate list they were made
    for, with why each is a candidate and why one was skipped (``runs/auto/candidates.json``,
    :func:`write_candidates`)."""

    def __init__(self, entries: dict[str, Any], listed: list[dict[str, Any]]):
        super().__init__(entries)
        self.listed = listed


def write_candidates(workdir: Path, timings: dict[str, Any]) -> tuple[Path, ...]:
    """``runs/auto/candidates.json`` when ``timings`` came from :func:`step_time` in this call (nothing for a
    resumed plan's): written with the plan, so a call that plans nothing writes nothing."""
    from aivh_ens.io import write_json

    if not isinstance(timings, Timings):
        return ()
    return (write_json(auto_dir(workdir) / "candidates.json", {"candidates": timings.listed}),)


def _job(c: Candidate, device: str, data: str) -> Job:
    """The probe of candidate ``c``: its resolved config at the batch the probe times: on a GPU its own, which
    must fit; on the CPU, where the probe measures speed only, at most :data:`CPU_PROBE_PIXELS` pixels (32 images
    up to 64 px; 4 of a ViT-L's 224 px images, one of which takes seconds there)."""
    from aivh_ens.config import resolve_config

    values = {k: v for k, v in c.settings.items() if k != "recipe"}
    cfg = resolve_config(c.settings.get("recipe", "none"), name=c.name, data=data, **values)
    if not device.startswith("cuda"):
        side = cfg.img_size or 224
        fits = max(MIN_BATCH, min(32, CPU_PROBE_PIXELS // (side * side)))
        cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, fits))
    fast = c.kind == "scratch" and device.startswith("cpu") and "amp" not in c.settings
    return Job(c.name, c.kind, cfg, fast)


def step_time(
    candidates: Sequence[Candidate],
    device: str,
    threads: int | None,
    workdir: Path,
    data: str,
    log: Log,
    cap_s: float = TIMING_CAP_S,
) -> Timings:
    """The candidates (printed, with why each is one) and each one's timed probe, cached in ``runs/auto/timings.json`` for the same device and threads. A candidate whose
    probe fails (out of memory even at :data:`MIN_BATCH`, an error, a crash, past ``cap_s``) is skipped with
    one line and has no entry.

    A from-scratch candidate on the CPU is timed twice, in fp32 and in bf16 autocast with channels_last; it
    takes the second (recorded in the entry's ``settings``) when that trains :data:`FAST_GAIN` times faster,
    as on CPUs with native bf16 (AMX/AVX512-BF16).

    Raises:
        UserError: every candidate's probe failed (the first reason named).
    """
    for line in candidate_lines(candidates):
        log(line)
    path = auto_dir(workdir) / "timings.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    out = {k: v for k, v in cached.items() if v.get("device") == device and v.get("threads") == threads}
    todo = [c for c in candidates if c.name not in out]
    if todo:
        log(f"timing: {len(todo)} candidates on {device}, at most {cap_s:.0f} s each")
    skipped: dict[str, str] = {}
    prober = Prober(device, threads, cap_s)
    try:
        for c in todo:
            entry, why = prober.run(_job(c, device, data))
            if entry is None:
                skipped[c.name] = str(why)
                log(f"timing: {c.name}: skipped, {why}")
                continue
            out[c.name] = entry
            how = " (bf16 autocast, channels_last)" if entry["settings"].get("amp") else ""
            batch = (
                f", batch {entry['batch']} (stepped down: out of memory)"
                if "batch_size" in entry["settings"]
                else ""
            )
            log(f"timing: {c.name}: {entry['train_img_s']:.0f} img/s training, {entry['eval_img_s']:.0f} img/s "
                f"evaluation on {device}{how}{batch}")  # fmt: skip
    finally:
        prober.close()
    if not any(c.name in out for c in candidates):
        first = next(iter(skipped.items()), ("", "no candidate"))
        raise UserError(f"auto: every candidate's timing failed (first: {first[0]}: {first[1]}); give the "
                        "device more memory or choose smaller models with --models")  # fmt: skip
    return Timings(out, candidates_doc(candidates, skipped))


def timed_settings(candidates: Sequence[Candidate], timings: dict[str, Any]) -> list[Candidate]:
    """The candidates that have a timing, with the settings their probe chose (:func:`step_time`)."""
    return [
        dataclasses.replace(c, settings={**c.settings, **timings[c.name].get("settings", {})})
        for c in candidates
        if c.name in timings
    ]


def decode_seconds(
    data: Path, files: Sequence[str], sample: int = DECODE_SAMPLE, seed: int = 0
) -> float | None:
    """Seconds one image of ``files`` (paths relative to ``data``) takes to read and decode here: the mean over
    a random sample of ``sample`` of them; None when none decodes. What a sweep's first look at every image
    (its decode check and image cache) costs per image and per cached size, measured on the user's own files
    (a 1024 px JPEG takes 5-20x a 32 px PNG)."""
    from aivh_ens.data.images import load_image
    from aivh_ens.data.tables import resolve_image_path

    picked = random.Random(seed).sample(list(files), min(sample, len(files)))
    spent, n = 0.0, 0
    for rel in picked:
        t0 = time.perf_counter()
        try:
            load_image(resolve_image_path(data, rel))
        except Exception:  # a bad image is the decode check's to report, not the timing's
            continue
        spent += time.perf_counter() - t0
        n += 1
    return spent / n if n else None
