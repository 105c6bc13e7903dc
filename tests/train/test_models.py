"""Model creation for every recipe, local weights, and the errors users hit first."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def _save_weights_of(name: str, path, **kw) -> None:
    src = create_backbone(name, pretrained=False, weights=None, num_classes=1000, **kw)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))


@pytest.mark.parametrize(
    "content,matched",
    [
        ("other-model", "0 of "),  # test_convnext's weights for test_efficientnet
        ("one-tensor", "0 of "),  # a file holding one unrelated tensor
        ("half", None),  # the backbone's own file with half its tensors gone
    ],
)
def test_weights_that_do_not_cover_the_backbone_are_refused(tmp_path, content, matched):
    from aivh_ens.train.models import _backbone_params, check_weights_match

    path = tmp_path / "w.safetensors"
    if content == "other-model":
        _save_weights_of("test_convnext", path)
    elif content == "one-tensor":
        save_file({"unrelated": torch.zeros(3)}, str(path))
    else:
        src = create_backbone("test_efficientnet", pretrained=False, weights=None, num_classes=0)
        keys = sorted(src.state_dict())
        save_file({k: src.state_dict()[k].contiguous() for k in keys[: len(keys) // 2]}, str(path))
    n = len(_backbone_params("test_efficientnet")[0])
    with pytest.raises(UserError) as err:
        check_weights_match("test_efficientnet", str(path))
    msg = str(err.value)
    assert "\n" not in msg and "does not fit test_efficientnet" in msg and f"of {n} backbone tensors" in msg
    assert matched is None or matched in msg


def test_weights_of_the_model_itself_pass_the_check(tmp_path, monkeypatch):
    from aivh_ens.train import models

    path = tmp_path / "w.safetensors"
    _save_weights_of("test_efficientnet", path)  # a 1000-class classifier: set aside, not compared
    models.check_weights_match("test_efficientnet", str(path))
    torch.save(load_file(str(path)), tmp_path / "w.pth")
    models.check_weights_match("test_efficientnet", str(tmp_path / "w.pth"))  # read in full
    monkeypatch.setattr(
        models, "_read_weights", lambda w: pytest.fail("a fitting .safetensors is read in full")
    )
    models.check_weights_match("test_efficientnet", str(path))  # from the header alone


def test_pickle_with_code_is_refused_by_the_up_front_check(tmp_path):
    from aivh_ens.train.models import check_weights_match

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv_stem.weight": _Evil()}, f)
    with pytest.raises(UserError, match="refusing to load"):
        check_weights_match("test_efficientnet", str(path))


def test_pretrained_auto_without_local_weights_trains_from_random_init_with_a_note(monkeypatch):
    from aivh_ens.train import models

    cfg = resolve_config("none", model="test_efficientnet")
    assert cfg.pretrained == "auto"
    monkeypatch.setattr(models, "local_pretrained", lambda name: False)
    note = models.random_init_note(cfg)
    assert note and "test_efficientnet" in note and "random initialisation" in note
    assert "--weights" in note and "--no-pretrained" in note
    assert models.use_pretrained(cfg, "test_efficientnet", None) is False
    monkeypatch.setattr(models, "local_pretrained", lambda name: True)  # cached weights: used, no note
    assert models.random_init_note(cfg) is None
    assert models.use_pretrained(cfg, "test_efficientnet", None) is True
    explicit = resolve_config("none", model="test_efficientnet", pretrained=False)
    assert models.random_init_note(explicit) is None and not models.use_pretrained(explicit, "x", None)


def test_local_pretrained_looks_in_the_hf_cache(tmp_path, monkeypatch):
    """A cached model.safetensors under the timm repo id counts as local weights; an empty cache does not."""
    import huggingface_hub.constants as hc
    from timm.models import get_pretrained_cfg

    from aivh_ens.train.models import local_pretrained

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    assert not local_pretrained("test_efficientnet")
    repo = get_pretrained_cfg("test_efficientnet").hf_hub_id
    snap = tmp_path / f"models--{repo.replace('/', '--')}"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc")
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "snapshots" / "abc" / "model.safetensors").write_bytes(b"x")
    assert local_pretrained("test_efficientnet")


def test_frozen_norms_are_found_through_compile_wrappers():
    """--train-last freezes a plain timm model's BatchNorm layers; the wrappers of --compile hide its type."""
    from aivh_ens.train.loop import CompileFallback
    from aivh_ens.train.models import frozen_eval_modules

    model, _ = build_model(resolve_config("tiny", train_last=2, pretrained=False))
    norms = {id(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert norms
    for wrapped in (model, torch.compile(model), CompileFallback(model, compile_fn=lambda m: m)):
        assert norms <= {id(m) for m in frozen_eval_modules(wrapped)}
    trainable, _ = build_model(resolve_config("tiny", pretrained=False))
    assert not frozen_eval_modules(trainable)


@pytest.mark.parametrize(("name", "size", "mean", "family"), [
    ("test_vit.r160_in1k", 160, (0.5, 0.5, 0.5), "vit"),
    ("test_efficientnet.r160_in1k", 160, (0.485, 0.456, 0.406), "convnet"),
    ("vit_base_patch14_reg4_dinov2.lvd142m", 518, (0.485, 0.456, 0.406), "vit"),  # auto caps it at 224
    ("eva02_base_patch14_224.mim_in22k", 224, (0.48145466, 0.4578275, 0.40821073), "vit"),
    ("swin_tiny_patch4_window7_224", 224, (0.485, 0.456, 0.406), "vit"),
    ("convnext_tiny", 224, (0.485, 0.456, 0.406), "convnet"),  # the architecture's default tag
    ("aivh_res_t", 32, (0.485, 0.456, 0.406), "convnet"),  # its registered default cfg
])  # fmt: skip
def test_pretrained_input_is_timm_pretrained_cfg(name, size, mean, family):
    from aivh_ens.train.models import pretrained_input

    got = pretrained_input(name)
    assert (got.img_size, got.mean, got.family) == (size, mean, family)


def test_weights_in_a_hugging_face_snapshot_load_through_its_link(tmp_path):
    """A snapshot file links to an extension-less blob: it still loads as safetensors, with its tensors."""
    from pretrained_weights import fake_hf_cache

    from aivh_ens.train.weights import hf_cache_weights

    hub = fake_hf_cache(tmp_path / "hub", ["test_vit.r160_in1k"])
    (path,) = hf_cache_weights(hub).values()
    assert path.is_symlink() and path.name == "model.safetensors"
    model = create_backbone("test_vit.r160_in1k", pretrained=False, weights=str(path), num_classes=2)
    saved = load_file(str(path))
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], saved["patch_embed.proj.weight"])
    assert hf_cache_weights(tmp_path / "absent") == {}  # no cache: nothing held


def test_the_hf_cache_is_found_as_the_environment_names_it_now(tmp_path, monkeypatch):
    from aivh_ens.train.weights import _timm_name, hf_cache_dir

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_cache_dir() == tmp_path / "hub"
    # OpenAI's CLIP weights load into the QuickGELU variant, which timm maps the same repository to
    assert (
        _timm_name("timm/vit_large_patch14_clip_224.openai") == "vit_large_patch14_clip_quickgelu_224.openai"
    )
    assert _timm_name("timm/convnext_tiny.fb_in22k_ft_in1k") == "convnext_tiny.fb_in22k_ft_in1k"


def test_layer_decay_gives_blocks_nearer_the_input_smaller_rates():
    cfg = resolve_config("none", model="test_vit", pretrained=False, lr=2e-5, layer_decay=0.5)
    model, _ = build_model(cfg)
    scales = sorted({g["lr_scale"] for g in create_optimizer(cfg, model).param_groups})
    assert (
        scales[-1] == 1.0
        and scales[0] < 0.1
        and all(b == 2 * a for a, b in zip(scales, scales[1:], strict=False))
    )
    plain = dataclasses.replace(cfg, layer_decay=None)
    assert all("lr_scale" not in g for g in create_optimizer(plain, model).param_groups)
    with pytest.raises(UserError, match=r"layer_decay=1.5 \(--layer-decay\)"):
        resolve_config("none", model="test_vit", layer_decay=1.5)
