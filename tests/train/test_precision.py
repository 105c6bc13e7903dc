"""Precision by device (the amp decision table), and the CUDA code paths run on the CPU: forced bf16 and
fp16 autocast with a GradScaler, channels_last, torch.compile, EMA with accumulation, frozen norms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import assert_user_error, tiny_cv
from click.testing import CliRunner
from safetensors.torch import load_file

from aivh_ens.cli import main
from aivh_ens.config import resolve_config
from aivh_ens.train import fold as fold_mod
from aivh_ens.train.precision import choose_amp, resolve_precision

# (requested, device type, compute capability) -> mode
AMP_TABLE = [
    ("auto", "cuda", (6, 0), "fp16"),  # P100
    ("auto", "cuda", (7, 0), "fp16"),  # V100
    ("auto", "cuda", (7, 5), "fp16"),  # T4
    ("auto", "cuda", (8, 0), "bf16"),  # A100
    ("auto", "cuda", (8, 6), "bf16"),  # RTX 30xx, A10
    ("auto", "cuda", (8, 9), "bf16"),  # L4, RTX 40xx
    ("auto", "cuda", (9, 0), "bf16"),  # H100
    ("auto", "cuda", (10, 0), "bf16"),  # B200
    ("auto", "cuda", None, "fp16"),  # capability unknown: the mode every CUDA GPU runs
    ("auto", "cpu", None, "none"),
    ("auto", "mps", None, "none"),
    ("bf16", "cuda", (7, 5), "bf16"),  # an explicit mode is kept
    ("fp16", "cuda", (9, 0), "fp16"),
    ("none", "cuda", (9, 0), "none"),
    ("bf16", "cpu", None, "bf16"),  # forced on the CPU (how the tests below exercise the CUDA path)
    ("fp16", "cpu", None, "fp16"),
    ("bf16", "mps", None, "none"),  # no autocast on other devices
]


@pytest.mark.parametrize("requested,device,capability,expected", AMP_TABLE)
def test_amp_decision_table(requested, device, capability, expected):
    assert choose_amp(requested, device, capability) == expected


def test_auto_is_the_default_and_the_cpu_line_says_fp32():
    assert resolve_config("tiny").amp == "auto"
    p = resolve_precision("auto", torch.device("cpu"))
    assert p.amp == "none" and p.scaler() is None
    assert p.line() == "precision: fp32 on cpu (--amp auto: cpu trains in fp32)"
    forced = resolve_precision("fp16", torch.device("cpu"))
    assert isinstance(forced.scaler(), torch.amp.GradScaler) and "GradScaler" in forced.line()


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=48, n_test=8, seed=5)


def _cv(workdir: Path, data: Path, *extra: str):
    args = ["cv", *tiny_cv(folds=2, epochs=1), "--fold", "0", "--data", str(data), "--workdir", str(workdir)]
    return CliRunner().invoke(main, [*args, *extra])


def test_unknown_amp_is_one_line_exit_2(tmp_path, data):
    res = _cv(tmp_path, data, "--amp", "fp8")
    assert_user_error(res, "--amp", "fp8", "auto, bf16, fp16, none")
    assert not (tmp_path / "folds").exists() and not (tmp_path / "runs").exists()


def _spy_forward(monkeypatch) -> list[tuple[torch.dtype | None, bool]]:
    """Record, per training forward pass, the CPU autocast dtype (None when off) and whether the input
    arrived in channels_last."""
    seen: list[tuple[torch.dtype | None, bool]] = []
    build = fold_mod.build_model

    def hook(module, args):
        if module.training:
            on = torch.is_autocast_enabled("cpu")
            x = args[0]
            seen.append(
                (
                    torch.get_autocast_dtype("cpu") if on else None,
                    x.is_contiguous(memory_format=torch.channels_last),
                )
            )

    def spied(cfg):
        model, dc = build(cfg)
        model.register_forward_pre_hook(hook)
        return model, dc

    monkeypatch.setattr(fold_mod, "build_model", spied)
    return seen


def test_cpu_fold_under_forced_bf16_channels_last_with_ema_and_accumulation(tmp_path, data, monkeypatch):
    seen = _spy_forward(monkeypatch)
    res = _cv(tmp_path, data, "--amp", "bf16", "--channels-last", "--ema", "0.9", "--accum-steps", "2")
    assert res.exit_code == 0, res.output
    assert "precision: bf16 autocast on cpu (--amp bf16)" in res.output
    assert seen and all(s == (torch.bfloat16, True) for s in seen)
    done = json.loads((tmp_path / "runs" / "test_efficientnet-tiny" / "fold0" / "done.json").read_text())
    assert 0 <= done["val_loss"] < 5


def test_cpu_fold_under_forced_fp16_steps_through_the_grad_scaler(tmp_path, data, monkeypatch):
    seen = _spy_forward(monkeypatch)
    steps: list[float] = []
    real_step = torch.amp.GradScaler.step

    def step(self, optimizer, *a, **k):
        steps.append(self.get_scale())
        return real_step(self, optimizer, *a, **k)

    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    res = _cv(tmp_path, data, "--amp", "fp16", "--no-channels-last")
    assert res.exit_code == 0, res.output
    assert "precision: fp16 autocast + GradScaler on cpu" in res.output
    assert seen and all(s == (torch.float16, False) for s in seen)
    assert steps and steps[0] == 65536.0  # the scaler's initial scale: the loss really was scaled


def test_cpu_default_is_fp32_contiguous_and_cudnn_flags_are_restored(tmp_path, data, monkeypatch):
    seen = _spy_forward(monkeypatch)
    during: list[tuple[bool, bool]] = []
    build = fold_mod.build_model

    def spied(cfg):
        during.append((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return build(cfg)

    monkeypatch.setattr(fold_mod, "build_model", spied)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    res = _cv(tmp_path, data, "--deterministic")
    assert res.exit_code == 0, res.output
    assert "precision: fp32 on cpu (--amp auto" in res.output
    assert seen and all(s == (None, False) for s in seen)
    assert during == [(True, False)]  # the job's flags while it ran
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)  # restored


def test_compiled_fold_keeps_frozen_norms_in_eval(tmp_path, data, monkeypatch):
    """--compile (inductor on the CPU) with --train-last: the fold trains through the compiled model, the
    frozen BatchNorm layers keep their initial statistics, and evaluation runs the uncompiled module."""
    wrappers: list[fold_mod.CompileFallback] = []
    modes: list[bool] = []  # the model's training flag at each call of the compiled model

    class Recording(fold_mod.CompileFallback):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            wrappers.append(self)

        def forward(self, *a, **k):
            modes.append(self._orig_mod.training)
            return super().forward(*a, **k)

    monkeypatch.setattr(fold_mod, "CompileFallback", Recording)
    resets: list[int] = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset())[1])
    # batches of 8 (24 training rows): one shape, one compile; test_resnet: few kernels to build cold
    res = _cv(
        tmp_path,
        data,
        "--compile",
        "--train-last",
        "2",
        "--name",
        "c",
        "--batch-size",
        "8",
        "--model",
        "test_resnet",
    )
    assert res.exit_code == 0, res.output
    assert len(wrappers) == 1 and wrappers[0]._ran and not wrappers[0].fell_back, res.output
    assert resets == [1]  # a fresh compile cache for the fold
    assert modes and all(modes)  # validation and OOF scoring ran the uncompiled model
    sd = load_file(str(tmp_path / "runs" / "c" / "fold0" / "best.safetensors"))
    means = [v for k, v in sd.items() if k.endswith("running_mean")]
    variances = [v for k, v in sd.items() if k.endswith("running_var")]
    assert means and all(bool((m == 0).all()) for m in means)  # a fresh BatchNorm's statistics, untouched
    assert all(bool((v == 1).all()) for v in variances)
    assert float(sd["fc.weight"].abs().sum()) > 0  # the head (the last 2 tensors) trained


# (the run's --amp, --channels-last, whether the CPU has native bf16) -> (CPU scoring mode, channels_last)
CPU_INFERENCE = [
    ("bf16", True, True, "bf16", True),  # what auto trains with on such a CPU: scored as its OOF was
    ("bf16", None, True, "bf16", False),
    ("bf16", True, False, "none", True),  # no native bf16 here (the run trained elsewhere): fp32
    ("fp16", None, True, "none", False),  # fp16 autocast on the CPU is never faster: fp32
    ("auto", None, True, "none", False),  # a CPU trains in fp32 by default, and scores so
    ("none", False, True, "none", False),
]


@pytest.mark.parametrize("amp,channels_last,native,expected,nhwc", CPU_INFERENCE)
def test_cpu_inference_scores_a_forced_bf16_run_as_it_was_validated(
    amp, channels_last, native, expected, nhwc, monkeypatch
):
    from aivh_ens.train import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
    cfg = resolve_config("tiny", amp=amp, channels_last=channels_last)
    assert precision.inference_amp(cfg, torch.device("cpu")) == expected
    assert precision.inference_channels_last(cfg, torch.device("cpu")) is nhwc


@pytest.mark.parametrize("capability,expected", [((7, 5), "fp16"), ((9, 0), "bf16")])
def test_cuda_inference_chooses_by_its_own_device_not_the_training_one(capability, expected, monkeypatch):
    """A run trained on an A100 in bf16 scores on a T4 in fp16, and the other way round."""
    from aivh_ens.train import precision

    monkeypatch.setattr(precision, "cuda_capability", lambda _device: capability)
    for trained in ("bf16", "fp16", "auto", "none"):
        cfg = resolve_config("tiny", amp=trained)
        assert precision.inference_amp(cfg, torch.device("cuda")) == expected
        assert precision.inference_channels_last(cfg, torch.device("cuda"))
    assert not precision.inference_channels_last(
        resolve_config("tiny", channels_last=False), torch.device("cuda")
    )


def test_predict_folds_scores_in_the_runs_cpu_precision(data, monkeypatch):
    """predict_folds (submit, predict and serve) enters bf16 autocast for a forced-bf16 run on a CPU with native
    bf16, and none for an fp16 one; its scores are then those of a bf16 forward pass."""
    import pandas as pd

    from aivh_ens.data.loader import FileSource
    from aivh_ens.data.transforms import storage_step
    from aivh_ens.score import tta
    from aivh_ens.score.runs import predict_folds
    from aivh_ens.train import precision
    from aivh_ens.train.models import build_model

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    seen: list[str] = []
    real = tta.autocast
    monkeypatch.setattr(tta, "autocast", lambda device, amp: seen.append(amp) or real(device, amp))
    names = pd.read_csv(data / "train.csv")["file_name"].tolist()[:8]
    scores = {}
    for trained in ("bf16", "fp16", "none"):
        torch.manual_seed(0)
        cfg = resolve_config("tiny", img_size=32, amp=trained)
        model, dc = build_model(cfg)
        source = FileSource(data, names, storage_step(cfg, dc.img_size))
        P, bad = predict_folds(
            [model.eval()], dc, cfg, source, range(len(names)), tta.parse_tta("hflip"), torch.device("cpu")
        )
        assert P.shape == (1, 8) and not bad and P.dtype == "float32"
        scores[trained] = P
    assert set(seen[: len(seen) // 3]) == {"bf16"} and set(seen[len(seen) // 3 :]) == {"none"}
    assert np.array_equal(scores["fp16"], scores["none"])  # the same weights in fp32 both times
    assert not np.array_equal(scores["bf16"], scores["none"])  # bf16 rounds: not the fp32 pass
    assert np.allclose(scores["bf16"], scores["none"], atol=0.05)
