"""The timed probe of a candidate: a few training and evaluation batches on this device -> images per second.

Synthetic batches of the run's input size go through the model the run would build (its weights, head and
frozen layers included), with its optimiser and precision; the loader's cost is added by the cost model
(:data:`aivh_ens.auto.budget.LOADER_FACTOR`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from aivh_ens.auto.budget import Speed
from aivh_ens.auto.candidates import Candidate
from aivh_ens.config import RunConfig
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
"""Chunks timed; the probe takes their median. One 0.5 s timing of ``aivh_res_s`` read 352 and 500 img/s in two
calls a second apart (a busy neighbour slows a whole chunk, not every batch)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidate(cfg: RunConfig, device: str, threads: int | None = None) -> Speed:
    """Train and evaluation images per second of ``cfg``'s model on ``device`` (``threads``: torch threads,
    as each sweep job gets them), in its precision and memory format (``amp``, ``channels_last``). A probe run
    (``head`` linear or mlp) trains only its head, so its training speed is its feature extraction's (forward
    passes)."""
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
        eval_s = _time(lambda: _forward(model, x, dev, amp, autocast), dev)
        if cfg.head != "finetune":
            return Speed(cfg.batch_size / eval_s, cfg.batch_size / eval_s)
        optimizer = create_optimizer(cfg, model)
        train_s = _time(lambda: _step(model, optimizer, x, y, dev, amp, autocast), dev)
        return Speed(cfg.batch_size / train_s, cfg.batch_size / eval_s)
    finally:
        torch.set_num_threads(before)


def _time(fn, device: torch.device) -> float:  # noqa: ANN001 - a closure
    """Seconds per call of ``fn`` after the warm-up calls: the median of :data:`CHUNKS` chunks, each of at least
    :data:`TIMED_BATCHES` calls, more while they take less than :data:`MIN_TIMED_S` (up to
    :data:`MAX_TIMED_BATCHES`)."""
    for _ in range(WARMUP_BATCHES):
        fn()
    _sync(device)
    return statistics.median(_chunk(fn, device) for _ in range(CHUNKS))


def _chunk(fn, device: torch.device) -> float:  # noqa: ANN001 - a closure
    t0 = time.perf_counter()
    n = 0
    while n < TIMED_BATCHES or (n < MAX_TIMED_BATCHES and time.perf_counter() - t0 < MIN_TIMED_S):
        fn()
        n += 1
        if n >= TIMED_BATCHES:
            _sync(device)
    return max((time.perf_counter() - t0) / n, 1e-6)


def _forward(model, x, device, amp, autocast) -> None:  # noqa: ANN001
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        model(x)


def _step(model, optimizer, x, y, device, amp, autocast) -> None:  # noqa: ANN001
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()


def step_time(
    candidates: Sequence[Candidate], device: str, threads: int | None, workdir: Path, data: str, log: Log
) -> dict[str, Any]:
    """Each candidate's timed probe (cached in ``runs/auto/timings.json`` for the same device and threads).

    A from-scratch candidate on the CPU is timed twice, in fp32 and in bf16 autocast with channels_last; it
    takes the second (recorded as the entry's ``settings``) when that trains :data:`FAST_GAIN` times faster,
    as on CPUs with native bf16 (AMX/AVX512-BF16: 2.4x for ``aivh_cnn_s`` at 32 px, one thread).
    """
    from aivh_ens.config import resolve_config

    path = auto_dir(workdir) / "timings.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    out = {k: v for k, v in cached.items() if v.get("device") == device and v.get("threads") == threads}
    for c in candidates:
        if c.name in out:
            continue
        values = {k: v for k, v in c.settings.items() if k != "recipe"}
        cfg = resolve_config(c.settings.get("recipe", "none"), name=c.name, data=data, **values)
        cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, 32))
        t0 = time.perf_counter()
        s = time_candidate(cfg, device, threads)
        faster: dict[str, Any] = {}
        if c.kind == "scratch" and device.startswith("cpu") and "amp" not in c.settings:
            fast = time_candidate(dataclasses.replace(cfg, **CPU_FAST), device, threads)
            if fast.train_img_s >= FAST_GAIN * s.train_img_s:
                s, faster = fast, dict(CPU_FAST)
        out[c.name] = {"model": cfg.model, "kind": c.kind, "img_size": cfg.img_size, "batch": cfg.batch_size,
                       "device": device, "threads": threads, "train_img_s": s.train_img_s,
                       "eval_img_s": s.eval_img_s, "probe_s": time.perf_counter() - t0,
                       "settings": faster}  # fmt: skip
        how = " (bf16 autocast, channels_last)" if faster else ""
        log(
            f"timing: {c.name}: {s.train_img_s:.0f} img/s training, {s.eval_img_s:.0f} img/s evaluation on "
            f"{device}{how}"
        )
    return out


def timed_settings(candidates: Sequence[Candidate], timings: dict[str, Any]) -> list[Candidate]:
    """The candidates with the settings their timed probe chose (:func:`step_time`)."""
    return [
        dataclasses.replace(c, settings={**c.settings, **timings.get(c.name, {}).get("settings", {})})
        for c in candidates
    ]
