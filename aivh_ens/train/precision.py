"""Numeric precision by device: which autocast dtype a run trains or infers in, and the autocast itself.

``choose_amp`` is a pure function of the request and the device (type and CUDA compute capability), so a
table test covers every GPU generation without one. GPUs below compute capability 8.0 (T4, P100, V100) have
no native bf16 convolutions: bf16 there fails or runs emulated, slower than fp32, so ``auto`` picks fp16 with
a GradScaler. CPUs train in fp32 unless a mode is forced (tests force bf16 and fp16 to exercise the CUDA path).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from aivh_ens.config import RunConfig

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: native bf16 tensor cores


def choose_amp(requested: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """The autocast mode (``bf16`` | ``fp16`` | ``none``) for ``requested`` on a device.

    Args:
        requested: ``auto`` or an explicit mode (``--amp``); an explicit mode is kept on CUDA and the CPU.
        device_type: ``cuda``, ``cpu`` or ``mps``.
        capability: the CUDA device's compute capability (major, minor); None when unknown.
    """
    if device_type not in ("cuda", "cpu"):
        return "none"  # MPS and others: no autocast here
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "none"  # the CPU trains in fp32 unless a mode is forced
    if capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY:
        return "bf16"
    return "fp16"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the autocast mode, whether a GradScaler is needed, and why it was chosen."""

    amp: str  # bf16 | fp16 | none
    device: torch.device
    reason: str

    @property
    def scaled(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.amp == "fp16"

    def scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for this device when training in fp16, else None."""
        return torch.amp.GradScaler(self.device.type) if self.scaled else None

    def line(self) -> str:
        """The one log line a run prints about its precision."""
        what = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler", "none": "fp32"}[self.amp]
        return f"precision: {what} on {self.device} ({self.reason})"


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, or None for other devices."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """:func:`choose_amp` for a real device, with the reason the log line gives."""
    cap = cuda_capability(device)
    amp = choose_amp(requested, device.type, cap)
    if requested != "auto":
        reason = f"--amp {requested}"
    elif cap is not None:
        native = "has" if tuple(cap) >= BF16_MIN_CAPABILITY else "lacks"
        reason = f"--amp auto: compute capability {cap[0]}.{cap[1]} {native} native bf16"
    else:
        reason = f"--amp auto: {device.type} trains in fp32"
    return Precision(amp, device, reason)


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """channels_last memory format: ``--channels-last/--no-channels-last``, else on CUDA only (tensor cores
    read NHWC; on the CPU it is forced only to exercise the CUDA path)."""
    return device.type == "cuda" if requested is None else requested


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN on AVX512-BF16/AMX); elsewhere bf16 is emulated, slower than
    fp32."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def inference_amp(cfg: RunConfig, device: torch.device) -> str:
    """The autocast mode a run scores in on ``device``: on CUDA chosen by the device, as ``--amp auto`` trains
    (a T4 scores in fp16 what an A100 trained in bf16); on the CPU, bf16 when the run trained there in a forced
    ``--amp bf16`` (its OOF scores were computed so: ``auto`` forces it where it trains faster) and the CPU
    has native bf16, else fp32."""
    if device.type == "cpu":
        return "bf16" if cfg.amp == "bf16" and cpu_has_bf16() else "none"
    return choose_amp("auto", device.type, cuda_capability(device))


def inference_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    """channels_last for scoring on ``device``: on CUDA unless the run turned it off (``--no-channels-last``); on
    the CPU when the run forced it on (``--channels-last``: oneDNN's bf16 convolutions are fastest in it)."""
    return cfg.channels_last is not False if device.type == "cuda" else cfg.channels_last is True


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA or the CPU for a resolved mode; a no-op for ``none`` and other devices.

    ``auto`` is resolved here by the device (inference runs by the device it is on, not the one a run
    trained on).
    """
    if amp == "auto":
        amp = choose_amp(amp, device.type, cuda_capability(device))
    if amp == "none" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
