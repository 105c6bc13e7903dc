"""Tests for aivh_ens.train.loop: schedules, optimizers, the epoch loop, compile fallback, divergence."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from aivh_ens.config import resolve_config
from aivh_ens.data.loader import ImageDataset
from aivh_ens.data.transforms import eval_transform, train_transform
from aivh_ens.errors import UserError
from aivh_ens.train.loop import lr_factor


def _curve(cfg, total=100, spe=10):
    return np.array([lr_factor(cfg, s, total, spe) for s in range(total)])


def test_cosine_with_warmup():
    cfg = resolve_config("tiny", scheduler="cosine", warmup_epochs=1.0, epochs=10)
    c = _curve(cfg)
    assert c[0] == pytest.approx(0.1) and c[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert np.all(np.diff(c[10:]) <= 1e-12) and c[-1] < 0.01  # then monotone down to ~0
    assert c[55] == pytest.approx(0.5, abs=0.02)  # half-way through the cosine


def test_step_decays_once_per_epoch():
    cfg = resolve_config("effnet-b4-adam")  # StepLR gamma 0.7 per epoch
    c = _curve(cfg)
    assert c[0] == 1.0 and c[9] == 1.0 and c[10] == pytest.approx(0.7) and c[95] == pytest.approx(0.7**9)


def test_onecycle_matches_torch():
    cfg = resolve_config("coatnet-2-lamb")
    total = 200
    ours = np.array([lr_factor(cfg, s, total, 20) for s in range(total)])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=1.0,
        total_steps=total,
        pct_start=0.25,
        div_factor=25.0,
        final_div_factor=5.0,
        cycle_momentum=False,
    )
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_training_options_run_and_learn(tmp_path):
    """EMA + accumulation + clipping + label smoothing on a separable toy problem: the loop learns."""
    from aivh_ens.data.loader import Normalizer
    from aivh_ens.train.loop import FoldContext, create_optimizer, evaluate, train_one_epoch
    from aivh_ens.train.models import build_model

    class Src:  # label 1 = bright images, 0 = dark: trivially learnable
        def __init__(self):
            rng = np.random.default_rng(0)
            self.labels = np.tile([0, 1], 48)
            self.imgs = [
                np.clip(rng.normal(60 + 130 * y, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                for y in self.labels
            ]

        def __len__(self):
            return len(self.imgs)

        def get(self, i):
            return self.imgs[i]

        def describe(self, i):
            return str(i)

    src = Src()
    cfg = resolve_config(
        "tiny",
        model="test_vit",
        img_size=32,
        batch_size=16,
        accum_steps=2,
        clip_grad=1.0,
        ema_decay=0.9,
        label_smoothing=0.1,
        epochs=6,
        lr=3e-3,
        warmup_epochs=0.0,
    )
    torch.manual_seed(0)
    model, dc = build_model(cfg)
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.ema_decay)
    opt = create_optimizer(cfg, model)
    ctx = FoldContext(
        cfg, torch.device("cpu"), Normalizer(dc.mean, dc.std, torch.device("cpu")), src.describe, set()
    )
    from aivh_ens.data.loader import make_loader

    ds = ImageDataset(src, np.arange(96), src.labels, train_transform(cfg, 32), 32)
    vds = ImageDataset(src, np.arange(96), src.labels, eval_transform(cfg, 32), 32)
    step, losses = 0, []
    for epoch in range(cfg.epochs):
        loader = make_loader(ds, 16, train=True, device=torch.device("cpu"), workers=0, seed=epoch)
        tr, step = train_one_epoch(
            model,
            loader,
            opt,
            ctx,
            epoch=epoch,
            step=step,
            total_steps=18,
            scaler=None,
            ema=ema,
            progress=False,
        )
        losses.append(tr["train_loss"])
    assert step == cfg.epochs * math.ceil(6 / 2)  # 6 batches per epoch, one optimizer step per 2
    assert losses[-1] < losses[0]
    _, y, p = evaluate(
        ema.module, make_loader(vds, 32, train=False, device=torch.device("cpu"), workers=0), ctx
    )
    assert ((p >= 0.5) == y).mean() > 0.9


def test_normalizer_values_on_both_cpu_paths():
    """(x - mean) / std per channel as a new float tensor: the NumPy cast (contiguous batches) and torch's
    (channels_last) give the same values."""
    from aivh_ens.data.loader import Normalizer

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    before = x.clone()
    m64, s64 = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    ref = (x.double() / 255 - m64) / s64
    fast = Normalizer(mean, std, torch.device("cpu"))(x)
    cl = Normalizer(mean, std, torch.device("cpu"), channels_last=True)(x)
    assert fast.dtype == cl.dtype == torch.float32
    assert torch.allclose(fast.double(), ref, atol=1e-5)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(fast, cl)
    assert torch.equal(x, before)  # the input is never modified


def test_compile_fallback_runs_eager_after_a_compile_failure():
    from aivh_ens.train.loop import CompileFallback, _unwrap

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    logs: list[str] = []

    def broken(m):
        def call(*a, **k):
            raise RuntimeError("Compiler: cc is not found\nlong details")

        return call

    wrapped = CompileFallback(model, logs.append, compile_fn=broken)
    assert torch.equal(wrapped(x), model(x)) and wrapped.fell_back
    assert torch.equal(wrapped(x), model(x)) and len(logs) == 1
    assert "--compile failed (RuntimeError: Compiler: cc is not found)" in logs[0]
    assert _unwrap(wrapped) is model and set(wrapped.state_dict()) == {"_orig_mod.weight", "_orig_mod.bias"}
    wrapped.eval()
    assert not model.training  # modes reach the wrapped model

    # A working compile: no message; a genuine error after the first pass is not swallowed.
    calls = {"n": 0}

    def works_then_fails(m):
        def call(*a, **k):
            calls["n"] += 1
            if calls["n"] > 1:
                raise ValueError("a real bug")
            return m(*a, **k)

        return call

    ok = CompileFallback(model, logs.append, compile_fn=works_then_fails)
    assert torch.equal(ok(x), model(x)) and not ok.fell_back
    with pytest.raises(ValueError, match="a real bug"):
        ok(x)
    assert len(logs) == 1


def test_fused_optimizer_names_take_the_fused_flag():
    """The optimizers marked fusable accept fused=True through timm (checked on the CPU, where torch has
    fused kernels too); CPU training itself keeps the default kernels."""
    from timm.optim import create_optimizer_v2

    from aivh_ens.config import RunConfig
    from aivh_ens.train.loop import FUSED_OPTIMIZERS, create_optimizer

    model = torch.nn.Linear(3, 2)
    for name in FUSED_OPTIMIZERS:
        extra = {"momentum": 0.9} if name == "sgd" else {}
        opt = create_optimizer_v2(model, opt=name, lr=1e-3, weight_decay=0.01, fused=True, **extra)
        assert opt.defaults["fused"] is True
        assert not create_optimizer(RunConfig(optimizer=name), model).defaults.get("fused")


class _Spy:
    """A Normalizer stand-in that records every batch it is handed."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x.float() / 255


def _loop_ctx(normalize, **over):
    from aivh_ens.train.loop import FoldContext

    cfg = resolve_config("tiny", img_size=8, batch_size=4, **over)
    return FoldContext(cfg, torch.device("cpu"), normalize, str, set())


def _batches(n: int, bad_row: int | None = None):
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n):
        ok = torch.ones(4, dtype=torch.bool)
        if bad_row is not None and b == 0:
            ok[bad_row] = False
        out.append(
            (
                torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g),
                torch.tensor([0, 1, 0, 1]),
                torch.arange(b * 4, b * 4 + 4),
                ok,
            )
        )
    return out


def test_loop_hands_good_batches_on_uncopied_and_drops_bad_rows():
    """A batch without bad images reaches the normalisation as the loader's own tensor (a masked copy would lose
    its pinned memory on CUDA); a bad row (with --on-bad-image skip) is dropped, in training and evaluation."""
    from aivh_ens.train.loop import evaluate, train_one_epoch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = _batches(3, bad_row=2)
    spy = _Spy()
    ctx = _loop_ctx(spy, on_bad_image="skip")
    tr, step = train_one_epoch(
        model, batches, opt, ctx, epoch=0, step=0, total_steps=3, scaler=None, ema=None, progress=False
    )
    assert step == 3 and math.isfinite(tr["train_loss"]) and ctx.skipped == {2}
    assert len(spy.seen[0]) == 3 and torch.equal(spy.seen[0], batches[0][0][[0, 1, 3]])
    assert spy.seen[1] is batches[1][0] and spy.seen[2] is batches[2][0]
    spy.seen.clear()
    rows, y, p = evaluate(model, batches, ctx)
    assert rows.tolist() == [0, 1, 3, *range(4, 12)] and len(y) == len(p) == 11
    assert spy.seen[1] is batches[1][0]


def test_epoch_loss_does_not_depend_on_the_read_interval(monkeypatch):
    """The loss summed on the device gives the same epoch mean, read every batch or once at the end."""
    from aivh_ens.train import loop as T

    losses = []
    for every in (1, 50):
        monkeypatch.setattr(T, "_sync_every", lambda device, every=every: every)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr, _ = T.train_one_epoch(
            model,
            _batches(5),
            opt,
            _loop_ctx(_Spy()),
            epoch=0,
            step=0,
            total_steps=5,
            scaler=None,
            ema=None,
            progress=False,
        )
        losses.append(tr["train_loss"])
    assert math.isfinite(losses[0]) and losses[0] == losses[1]


@pytest.mark.parametrize("every", [1, 2, 50])
def test_non_finite_loss_stops_the_epoch_naming_the_batches(monkeypatch, every):
    """The host reads the loss every ``_sync_every`` batches (1 on the CPU, more on CUDA, where each read waits
    for the GPU): a non-finite loss stops the epoch at the next read, naming the batches since the last one."""
    from aivh_ens.train import loop as T

    monkeypatch.setattr(T, "_sync_every", lambda device: every)

    class NanAt(torch.nn.Module):
        def __init__(self, at: int):
            super().__init__()
            self.lin, self.calls, self.at = torch.nn.Linear(3 * 8 * 8, 2), 0, at

        def forward(self, x):
            self.calls += 1
            out = self.lin(x.flatten(1))
            return out * float("nan") if self.calls == self.at + 1 else out

    model = NanAt(at=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(FloatingPointError) as e:
        T.train_one_epoch(
            model,
            _batches(6),
            opt,
            _loop_ctx(_Spy()),
            epoch=0,
            step=0,
            total_steps=6,
            scaler=None,
            ema=None,
            progress=False,
        )
    assert isinstance(e.value, UserError)  # a setting to change: one line and exit 2 at the CLI, no traceback
    where = {1: "batch 2;", 2: "batches 2-3;", 50: "batches 0-5;"}[every]
    assert where in str(e.value) and "--lr" in str(e.value) and "--force" in str(e.value)
    assert model.calls == {1: 3, 2: 4, 50: 6}[every]  # how far the epoch ran before the read


def _epochs(n, train_s, val_s=None):
    """``n`` epochs of history rows: ``train_s`` seconds of training each, validated (``val_s`` more) or not."""
    return [
        {
            "train_seconds": train_s,
            "seconds": train_s + (val_s or 0.0),
            "val_f1": math.nan if val_s is None else 0.9,
        }
        for _ in range(n)
    ]


def test_fold_time_sets_the_epochs_from_the_measured_ones():
    from aivh_ens.train.fold import planned_epochs

    cfg = resolve_config("tiny", epochs=20, fold_time=60.0, validate_last=2)
    assert planned_epochs(cfg, [], 0.1) == 20  # nothing measured yet: the most
    # 2 epochs of 10 s spent 20 of 60 s; a validation pass is timed at 0.1 x 10 s until one is measured:
    # 3 more epochs (30 s) with their last 2 validated (2 s) end 8 s before the 40 s left are spent, 4 more
    # (42 s) 2 s after: the nearest end; 5 more (52 s) would end 12 s after
    assert planned_epochs(cfg, _epochs(2, 10.0), 0.1) == 6
    shorter = dataclasses.replace(cfg, fold_time=55.0)  # 3 more epochs end 3 s short, 4 more 7 s past
    assert planned_epochs(shorter, _epochs(2, 10.0), 0.1) == 5
    # once measured, a validation pass costs what it took (5 s each): 2 more epochs (20 + 10 s) end on time
    assert planned_epochs(cfg, _epochs(2, 10.0) + _epochs(1, 5.0, 5.0), 0.1) == 5
    # the last epochs time the next ones: a machine that sped up trains more, up to --epochs
    # (33 s spent: 14 more 1-s epochs fit the 27 s left, capped at 20; 2 more 10-s epochs, and a slow spell)
    assert planned_epochs(cfg, _epochs(3, 10.0) + _epochs(3, 1.0), 0.1) == 20
    # (and on a tie, 2 more ending 5 s short against 3 more ending 5 s past, the fewer)
    assert planned_epochs(cfg, _epochs(3, 1.0) + _epochs(3, 10.0), 0.1) == 8
    # past its time a fold still trains one more epoch, its schedule's last (validated): it ends on time
    assert planned_epochs(cfg, _epochs(8, 10.0), 0.1) == 9
    assert planned_epochs(resolve_config("tiny", epochs=20), _epochs(8, 10.0), 0.1) == 20  # no fold_time
