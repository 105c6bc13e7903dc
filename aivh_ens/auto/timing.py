"""The timed probe of a candidate: a few training and evaluation batches on this device -> images per second.

Synthetic batches of the run's input size go through the model the run would build (its weights, head and
frozen layers included), with its optimiser and precision; the loader's cost is added by the cost model
(:data:`aivh_ens.auto.budget.LOADER_FACTOR`).
"""

from __future__ import annotations

import statistics
import time

import torch

from aivh_ens.auto.budget import Speed
from aivh_ens.config import RunConfig

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
