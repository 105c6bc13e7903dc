"""Model creation for every recipe, local weights, and the errors users hit first."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from aivh_ens.config import resolve_config
from aivh_ens.errors import UserError
from aivh_ens.recipes import RECIPES
from aivh_ens.train.loop import create_optimizer
from aivh_ens.train.models import PooledClassifier, build_model, count_params, create_backbone


@pytest.mark.parametrize(
    "name", sorted(n for n in RECIPES if RECIPES[n].get("head", "finetune") == "finetune")
)
def test_every_recipe_builds_model_and_optimizer(name):  # probe recipes: tests/train/test_probe.py
    # Real backbones (random init: no downloads) for one forward pass on a small input; no training.
    cfg = resolve_config(
        name, model=None if RECIPES[name].get("model") else "test_convnext", pretrained=False
    )
    torch.manual_seed(0)
    model, dc = build_model(cfg)
    opt = create_optimizer(cfg, model)
    total, trainable = count_params(model)
    assert 0 < trainable <= total
    assert dc.img_size == (cfg.img_size or dc.img_size) and len(dc.mean) == 3
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, dc.img_size, dc.img_size))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    assert type(opt).__name__.lower().startswith(cfg.optimizer.replace("adamw", "adam"))
    if cfg.train_last == 0:  # frozen backbone: only the head trains
        assert all(not p.requires_grad for p in model.backbones[0].parameters())
        assert all(p.requires_grad for p in model.head.parameters())
    if cfg.train_last and cfg.train_last > 0:
        for b in model.backbones:
            flags = [p.requires_grad for p in b.parameters()]
            assert sum(flags) == cfg.train_last and all(flags[-cfg.train_last :])
        del model


def test_fused_model_concatenates_both_backbones():
    cfg = resolve_config(
        "none", model="test_efficientnet+test_convnext", head_hidden=(16,), head_bn=True, img_size=64
    )
    model, _ = build_model(cfg)
    assert isinstance(model, PooledClassifier) and len(model.backbones) == 2
    in_features = model.head.net[0].num_features
    assert in_features == sum(b.num_features for b in model.backbones)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="did you mean.*efficientnet_b4"):
        create_backbone("efficientnet_b44", pretrained=False, weights=None, num_classes=2)


def test_pretrained_offline_names_weights_flag():
    os.environ["HF_HUB_OFFLINE"] = "1"
    with pytest.raises(UserError, match="--weights"):
        create_backbone("test_efficientnet", pretrained=True, weights=None, num_classes=2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_and_head_reinitialised(tmp_path, suffix):
    torch.manual_seed(1)
    src = create_backbone("test_efficientnet", pretrained=False, weights=None, num_classes=1000)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    torch.manual_seed(2)  # a different init: loaded tensors must come from the file
    cfg = resolve_config("tiny", weights=str(path))
    model, _ = build_model(cfg)
    got = model.state_dict()
    body = [k for k in sd if not k.startswith("classifier")]
    assert all(torch.equal(got[k], sd[k]) for k in body)
    assert got["classifier.weight"].shape == (2, sd["classifier.weight"].shape[1])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv_stem.weight": _Evil()}, f)
    cfg = resolve_config("tiny", weights=str(path))
    with pytest.raises(UserError, match="refusing to load"):
        build_model(cfg)


def test_weights_count_must_match_backbones(tmp_path):
    cfg = resolve_config("none", model="test_efficientnet+test_convnext", head_hidden=(8,), weights="a.pth")
    with pytest.raises(UserError, match="one file per backbone"):
        build_model(dataclasses.replace(cfg))
