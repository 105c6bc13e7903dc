"""Benchmark a frozen-feature probe run against a fine-tuned run: same backbone, same images, same folds.

Run: ``python bench/bench_probe.py [--n 2000] [--folds 5] [--model test_efficientnet] [--threads 1] [--smoke]``
(``--smoke``: 40 images, 2 folds, 1 epoch, for the test suite).

Both runs go through :func:`aivh_ens.train.run_cv` from nothing (each in its own work dir, so each builds
its own image cache), on ``--n`` demo images (``aivh-ens demo-data``, AI/human pairs, ``--group pairs``) with
the ``tiny`` recipe (64 px, batch 64, its 4 epochs for the fine-tuned run):

- fine-tune: every fold trains the whole model for the recipe's epochs;
- probe (``--head linear``): one eval-mode forward pass per image into the feature store, then a logistic
  regression per fold (C by inner CV).

Both start from the same backbone weights, a seeded random initialisation written to a local safetensors
file (no pretrained weights can be fetched offline; with ``--weights`` any file for ``--model`` is used
instead), so the probe's F1 here says little about a probe on a pretrained backbone: the figure this
bench is for is the time. The last line reads ``bench probe: <probe s> vs <fine-tune s> = <ratio>x`` with
ratio = fine-tune / probe, and each run's OOF F1 at threshold 0.5.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
from safetensors.torch import save_file

from aivh_ens.config import resolve_config
from aivh_ens.synth import make_demo_dataset
from aivh_ens.train import run_cv


def _weights(model: str, path: Path) -> Path:
    torch.manual_seed(0)
    sd = timm.create_model(model).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _run(name: str, work: Path, lines: list[str], **overrides: object) -> tuple[float, float]:
    """(wall seconds, OOF F1 at 0.5) of one run from nothing."""
    cfg = resolve_config("tiny", name=name, group="pairs", **overrides)
    t0 = time.perf_counter()
    result = run_cv(cfg, work, progress=False, log=lines.append)
    seconds = time.perf_counter() - t0
    assert result.oof_metrics is not None
    return seconds, float(result.oof_metrics["f1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="demo train images")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--model", default="test_efficientnet")
    ap.add_argument("--weights", default=None, help="local weights for --model (default: seeded random init)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes: a check that the bench runs")
    a = ap.parse_args()
    if a.smoke:
        a.n, a.folds = 40, 2
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        make_demo_dataset(data, n=a.n, n_test=20, seed=0)
        weights = a.weights or str(_weights(a.model, root / "backbone.safetensors"))
        common = dict(model=a.model, data=str(data), folds=a.folds, weights=weights, workers=0)
        if a.smoke:
            common["epochs"] = 1
        probe_log: list[str] = []
        probe_s, probe_f1 = _run("probe", root / "probe", probe_log, head="linear", **common)
        ft_s, ft_f1 = _run("finetune", root / "finetune", [], **common)
    for line in probe_log:
        if line.startswith(("features:", "  fold")):
            print(line)
    cfg = resolve_config("tiny")
    print(
        f"{a.n} demo images, {a.folds} folds, {a.model} at {cfg.img_size} px, {a.threads} thread(s): "
        f"probe (linear head) {probe_s:.1f}s, OOF F1 {probe_f1:.4f}; fine-tune ({cfg.epochs} epochs) "
        f"{ft_s:.1f}s, OOF F1 {ft_f1:.4f}"
    )
    print(f"bench probe: {probe_s:.1f}s vs {ft_s:.1f}s = {ft_s / probe_s:.1f}x")


if __name__ == "__main__":
    main()
