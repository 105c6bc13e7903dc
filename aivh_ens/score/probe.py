"""A probe run's fold models at inference: the shared frozen backbone, then one fold's head.

A head maps features (B, D) to (B, 2) logits ``[0, z]``: softmax gives P(AI) = sigmoid(z), exactly what a
fold model gives, so submit, predict and serve score a probe run like any other (:mod:`aivh_ens.score.runs`).
The heads are fitted by :mod:`aivh_ens.train.probe`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from aivh_ens.config import RunConfig
from aivh_ens.errors import UserError
from aivh_ens.layout import features_dir
from aivh_ens.train.features import FeatureExtractor, build_extractor, ensure_features
from aivh_ens.train.models import DataConfig

Log = Callable[[str], None]

MLP_HIDDEN: tuple[int, ...] = (256,)


class ProbeHead(nn.Module):
    """Standardise features (buffers ``mean``, ``scale`` (D,)), then an MLP (no hidden layer: linear) to one
    logit z; returns (B, 2) logits ``[0, z]`` so that softmax[:, 1] = sigmoid(z)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (), dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)

    def logit(self, f: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B,)
        return self.net((f.float() - self.mean) / self.scale)[:, 0]

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, 2)
        z = self.logit(f)
        return torch.stack([torch.zeros_like(z), z], dim=1)


class ProbeClassifier(nn.Module):
    """A frozen feature extractor shared by the folds, then one fold's head: images (B, 3, S, S) -> (B, 2)."""

    def __init__(self, extractor: FeatureExtractor, head: ProbeHead):
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(x))


def head_hidden(cfg: RunConfig) -> tuple[int, ...]:
    """Hidden layer sizes of the run's head: none for ``linear``, ``--head-hidden`` or MLP_HIDDEN for ``mlp``."""
    return () if cfg.head == "linear" else (cfg.head_hidden or MLP_HIDDEN)


def probe_probs(head: ProbeHead, X: np.ndarray, batch: int = 8192) -> np.ndarray:
    """P(label 1) (N,) float64 of features ``X`` (N, D) under ``head`` (on the CPU, in batches)."""
    head.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(X), batch):
            f = torch.from_numpy(np.asarray(X[i : i + batch], dtype=np.float32))
            out.append(torch.sigmoid(head.logit(f)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def load_heads(cfg: RunConfig, weights: tuple[Path, ...] | list[Path]) -> list[ProbeHead]:
    """The K fold heads of a probe run from their ``best.safetensors`` (strict)."""
    heads = []
    for path in weights:
        sd = load_file(str(path))
        if "mean" not in sd:
            raise UserError(f"{path} holds no probe head; re-train the fold with `aivh-ens cv --force ...`")
        head = ProbeHead(int(sd["mean"].shape[0]), head_hidden(cfg), cfg.head_dropout)
        try:
            head.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(
                f"cannot load {path} as a {cfg.head} head ({str(e).splitlines()[0][:160]}); "
                "re-train the fold with `aivh-ens cv --force ...`"
            ) from None
        heads.append(head.eval())
    return heads


def load_probe_models(
    cfg: RunConfig, weights: tuple[Path, ...], device: torch.device
) -> tuple[list[nn.Module], DataConfig]:
    """One image model per fold (the shared frozen backbone, then that fold's head), for ``predict``."""
    from aivh_ens.train.features import probe_data_config

    extractor = build_extractor(cfg).to(device)
    models: list[nn.Module] = [
        ProbeClassifier(extractor, h.to(device)).eval() for h in load_heads(cfg, weights)
    ]
    return models, probe_data_config(cfg)


def probe_test_scores(
    cfg: RunConfig,
    weights: tuple[Path, ...],
    workdir: str | Path,
    data_dir: str | Path,
    ids: list[str],
    device: torch.device,
    *,
    progress: bool = True,
    log: Log = print,
) -> np.ndarray:
    """Fold scores (K, N) of the test images from the feature store (built from the images only when it is
    missing or stale), through each fold's head."""
    from aivh_ens.data.loader import FileSource
    from aivh_ens.data.transforms import storage_step

    def images(size: int) -> Any:
        return FileSource(Path(data_dir), ids, storage_step(cfg, size))

    store = ensure_features(
        cfg, data_dir, ids, features_dir(workdir), images, device, progress=progress, log=log
    )
    if store.bad:
        first = min(store.bad)
        raise UserError(
            f"cannot decode test image {ids[first]}; replace the file (every test id needs a prediction)"
        )
    heads = load_heads(cfg, weights)
    return np.stack([probe_probs(h, store.features) for h in heads]).astype(np.float32)  # (K, N)
