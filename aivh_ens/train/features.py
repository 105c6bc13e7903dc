"""Frozen-backbone features: extraction (one eval-mode forward pass per image) and the feature store.

A probe run (``cv --head linear|mlp``) needs each image's pooled features once, not once per fold or epoch.
They are kept in ``runs/features/``, one file per (backbone, weights digest, transform, image list), keyed
the way the decode-once image cache is (:mod:`aivh_ens.data.cache_format`)::

    <backbone>-<digest>.feats: [features: C-order (N, D) float16][index: UTF-8 JSON][offset: u64][length: u64][magic: 8 B]

The index holds the key, the shape, the image names and the rows that could not be decoded. Guarantees:

- A build writes a temporary file, then renames it over the target: a reader sees a complete file or none.
  A file whose trailer, index or key does not check out is treated as absent (built again).
- The key names everything the numbers depend on: the backbone, a digest of its weights (the file's
  sha256, or the timm pretrained tag), the storage step and eval transform (size, resize, interpolation,
  mean/std, views), the data folder, and the name, size and mtime of every image, in order. Any change makes
  another file; two runs with the same backbone and images (a linear and an MLP probe) share one.
- One builder at a time per file (a lock file naming its PID); another process waits and then reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from aivh_ens.config import RunConfig
from aivh_ens.data.loader import ImageDataset, ImageSource, Normalizer, default_workers, make_loader
from aivh_ens.data.transforms import eval_transform, storage_step
from aivh_ens.errors import UserError
from aivh_ens.io import atomic_path, sha256_file
from aivh_ens.train.loop import eval_batch_size
from aivh_ens.train.models import DataConfig, create_backbone, weights_files
from aivh_ens.train.precision import autocast, inference_channels_last

Log = Callable[[str], None]

SUFFIX = ".feats"
MAGIC = b"AIVHFEA1"
FORMAT = 1
_TRAILER = struct.Struct("<QQ8s")  # index offset, index length, magic


# ---- the backbone ---------------------------------------------------------------------------------------


def weights_id(cfg: RunConfig) -> dict[str, str]:
    """What the backbone's weights are, for the store key: a local file's sha256, or the timm pretrained tag."""
    (file,) = weights_files(cfg)
    if file is not None:
        return {"file_sha256": sha256_file(file)}
    import timm

    pc = timm.models.get_pretrained_cfg(cfg.backbones[0])
    tag = getattr(pc, "hf_hub_id", None) or getattr(pc, "url", None) or cfg.backbones[0]
    return {"pretrained": f"{cfg.backbones[0]}|{tag}"}


class FeatureExtractor(nn.Module):
    """A frozen timm backbone mapping a normalised (B, 3, S, S) batch to pooled features (B, D), as
    ``forward_head(forward_features(x), pre_logits=True)``; with ``hflip`` the mean over the image and its
    mirror."""

    def __init__(self, backbone: nn.Module, hflip: bool = False):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.hflip = hflip
        self.num_features = int(backbone.num_features)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._one(x)  # (B, D)
        return (f + self._one(x.flip(-1))) / 2 if self.hflip else f


def probe_data_config(cfg: RunConfig) -> DataConfig:
    """Input size, mean and std of the run's backbone (``--img-size``/recipe values win), from timm's
    pretrained config without building the model, so a store can be found without loading weights."""
    import timm

    pc = timm.models.get_pretrained_cfg(cfg.backbones[0])
    if pc is None or not (getattr(pc, "input_size", None) and getattr(pc, "mean", None)):
        dc = timm.data.resolve_model_data_config(timm.create_model(cfg.backbones[0], pretrained=False))
        size, mean, std = dc["input_size"], dc["mean"], dc["std"]
    else:
        size, mean, std = pc.input_size, pc.mean, pc.std
    return DataConfig(
        img_size=cfg.img_size or int(size[-1]),
        mean=tuple(float(v) for v in (cfg.mean or mean)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in (cfg.std or std)),  # type: ignore[arg-type]
    )


def build_extractor(cfg: RunConfig) -> FeatureExtractor:
    """The run's frozen backbone: its pretrained or ``--weights`` weights, no classifier, eval mode."""
    (file,) = weights_files(cfg)
    backbone = create_backbone(
        cfg.backbones[0],
        pretrained=cfg.pretrained is not False,
        weights=file,
        num_classes=0,
        img_size=cfg.img_size,
    )
    return FeatureExtractor(backbone, hflip=cfg.probe_views == "hflip")


# ---- the store ------------------------------------------------------------------------------------------


def images_digest(root: str | Path, names: Sequence[str]) -> str:
    """sha256 over each image's name, size and mtime (ns), in order; a missing file counts as (-1, -1)."""
    h = hashlib.sha256()
    for n in names:
        try:
            st = os.stat(Path(root) / n)
            stat = (st.st_size, st.st_mtime_ns)
        except OSError:
            stat = (-1, -1)
        h.update(f"{n}\t{stat[0]}\t{stat[1]}\n".encode())
    return h.hexdigest()


def store_key(
    cfg: RunConfig,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    root: str | Path,
    names: Sequence[str],
) -> dict[str, Any]:
    """Everything a store's numbers depend on (compared as a whole; any difference means another file)."""
    import timm

    return {
        "format": FORMAT,
        "backbone": cfg.backbones[0],
        "weights": weights_id(cfg),
        "transform": {
            "storage": storage_step(cfg, img_size).describe(),
            "img_size": img_size,
            "mode": cfg.mode,
            "eval_resize": cfg.eval_resize,
            "interpolation": cfg.interpolation,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "views": cfg.probe_views,
        },
        "data": os.path.realpath(root),
        "n": len(names),
        "images": images_digest(root, names),
        "timm": timm.__version__,
    }


def store_path(features_dir: str | Path, key: dict[str, Any]) -> Path:
    """``<features_dir>/<backbone>-<digest of the key>.feats``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in key["backbone"])
    return Path(features_dir) / f"{stem}-{digest}{SUFFIX}"


@dataclass(frozen=True)
class FeatureStore:
    """A complete store: features (N, D) float16 (read-only memmap), names, bad rows and build figures."""

    path: Path
    features: np.ndarray
    names: tuple[str, ...]
    bad: dict[int, str]
    info: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size


def read_store(path: str | Path, key: dict[str, Any]) -> FeatureStore | None:
    """The store at ``path`` if it is complete and was built for ``key``, else None (never a partial one)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _TRAILER.size:
                return None
            f.seek(size - _TRAILER.size)
            offset, length, magic = _TRAILER.unpack(f.read(_TRAILER.size))
            if magic != MAGIC or offset + length + _TRAILER.size != size:
                return None
            f.seek(offset)
            doc = json.loads(f.read(length))
            n, d = (int(v) for v in doc["shape"])
            if doc.get("key") != key or n * d * 2 != offset or len(doc["names"]) != n:
                return None
            # Mapped through the descriptor the index was read from: a rebuild renamed over the path
            # meanwhile cannot pair this index with another file's numbers.
            feats = (
                np.memmap(f, dtype=np.float16, mode="r", shape=(n, d))
                if n * d
                else np.zeros((n, d), np.float16)
            )
        bad = {int(k): str(v) for k, v in doc["bad"].items()}
        return FeatureStore(path, feats, tuple(doc["names"]), bad, dict(doc.get("info", {})))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error):
        return None


def write_store(
    path: Path,
    key: dict[str, Any],
    names: Sequence[str],
    feats: np.ndarray,
    bad: dict[int, str],
    info: dict[str, Any],
) -> None:
    """Write features (N, D) and their index to a temporary file and rename it into place."""
    feats = np.ascontiguousarray(feats, dtype=np.float16)
    doc = {
        "key": key,
        "shape": list(feats.shape),
        "names": list(names),
        "bad": {str(k): v for k, v in bad.items()},
        "info": info,
    }
    index = json.dumps(doc, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(feats).cast("B"))
        f.write(index)
        f.write(_TRAILER.pack(feats.nbytes, len(index), MAGIC))
        f.flush()
        os.fsync(f.fileno())


# ---- extraction -----------------------------------------------------------------------------------------


def extract_features(
    extractor: FeatureExtractor,
    dc: DataConfig,
    cfg: RunConfig,
    source: ImageSource,
    device: torch.device,
    *,
    progress: bool = False,
    desc: str = "features",
) -> tuple[np.ndarray, dict[int, str]]:
    """Features (N, D) float16 of every image of ``source`` through the run's eval transform, and
    ``{row: reason}`` for images that could not be decoded (their rows stay zero)."""
    rows = np.arange(len(source))
    ds = ImageDataset(
        source, rows, np.zeros(len(rows), np.int64), eval_transform(cfg, dc.img_size), dc.img_size
    )
    workers = default_workers(device, cfg.workers)
    loader = make_loader(ds, eval_batch_size(cfg), train=False, device=device, workers=workers)
    channels_last = inference_channels_last(cfg, device)
    normalize = Normalizer(dc.mean, dc.std, device, channels_last)
    extractor.to(device)
    if channels_last:
        extractor.to(memory_format=torch.channels_last)
    out = np.zeros((len(rows), extractor.num_features), dtype=np.float16)  # (N, D)
    bad: dict[int, str] = {}
    for x, _y, r, ok in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        if not bool(ok.all()):
            bad.update({int(i): source.describe(int(i)) for i in r[~ok]})
            x, r = x[ok], r[ok]
        if len(r) == 0:
            continue
        with autocast(device, "auto"):  # by the device extracting
            f = extractor(normalize(x))
        out[r.numpy()] = f.float().cpu().numpy().astype(np.float16)
    return out, bad


def ensure_features(
    cfg: RunConfig,
    root: str | Path,
    names: Sequence[str],
    features_dir: str | Path,
    open_images: Callable[[int], ImageSource],
    device: torch.device,
    *,
    progress: bool = True,
    log: Log = print,
) -> FeatureStore:
    """The store of ``names`` for this run's backbone and transform: read when it exists, else built.

    Args:
        cfg: the probe run's config.
        root: data folder the names are relative to.
        names: image paths, in the order of the store's rows.
        features_dir: ``runs/features/``.
        open_images: ``img_size -> image source`` over ``names`` (called only for a build).
        device: where the backbone runs.
    """
    from aivh_ens.data.cache import _take_lock  # the image cache's waiting build lock

    dc = probe_data_config(cfg)
    key = store_key(cfg, dc.img_size, dc.mean, dc.std, root, names)
    path = store_path(features_dir, key)
    store = read_store(path, key)
    if store is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(path, log)
        try:
            store = read_store(path, key)  # another process may have built it while we waited
            if store is None:
                store = _build(cfg, dc, key, path, names, open_images(dc.img_size), device, progress, log)
        finally:
            lock.release()
    else:
        log(
            f"features: {path} ({len(names)} images x {store.features.shape[1]}, {store.nbytes / 1e6:.3g} MB, reused)"
        )
    return store


def _build(
    cfg: RunConfig,
    dc: DataConfig,
    key: dict[str, Any],
    path: Path,
    names: Sequence[str],
    source: ImageSource,
    device: torch.device,
    progress: bool,
    log: Log,
) -> FeatureStore:
    """Extract, write atomically, read back; logs img/s and the store's size."""
    extractor = build_extractor(cfg)
    t0 = time.perf_counter()
    feats, bad = extract_features(extractor, dc, cfg, source, device, progress=progress)
    seconds = time.perf_counter() - t0
    if not np.isfinite(feats).all():
        raise UserError(
            f"features of {cfg.backbones[0]} overflow float16 (|x| > 65504) for some images; the feature "
            "store cannot hold them: use a fine-tuned run (--head finetune) for this backbone"
        )
    info = {"seconds": seconds, "img_s": len(names) / max(seconds, 1e-9), "device": str(device)}
    write_store(path, key, names, feats, bad, info)
    store = read_store(path, key)
    assert store is not None  # just written whole
    log(
        f"features: {len(names)} images x {feats.shape[1]} ({cfg.backbones[0]}, views {cfg.probe_views}) in "
        f"{seconds:.1f}s, {info['img_s']:.0f} img/s on {device}; store {path} ({store.nbytes / 1e6:.3g} MB)"
    )
    return store
