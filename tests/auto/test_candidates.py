"""``auto``'s candidates: every timm model with weights in the Hugging Face cache or --weights-dir at its
pretrained input size, normalisation and family recipe; from-scratch models at native resolution for small
images; what inspect's findings change; the list written with why each candidate is in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pretrained_weights import fake_hf_cache, save_weights

from aivh_ens.auto.candidates import (
    FULL_RES_EPOCHS,
    FULL_RES_TTA,
    NO_WEIGHTS,
    SCRATCH_CPU,
    SCRATCH_CPU_NATIVE,
    VIT_MAX_SIZE,
    candidate_lines,
    candidates_doc,
    choose_candidates,
    findings_to_settings,
    finetune_batch,
    img_size_for,
    pretrained_candidates,
)
from aivh_ens.auto.planning import tta_views
from aivh_ens.errors import UserError
from aivh_ens.inspect.stage import Finding
from aivh_ens.recipes import FINETUNE, IMAGENET_MEAN

FACTS = findings_to_settings([], 32)


@pytest.mark.parametrize(("side", "device", "size"), [(32, "cpu", 32), (50, "cpu", 48), (12, "cpu", 16),
                                                      (90, "cpu", 64), (90, "cuda:0", 128), (500, "cpu", 64)])  # fmt: skip
def test_small_images_train_at_native_size(side, device, size):
    assert img_size_for(side, device) == size


def test_without_weights_the_cpu_trains_small_models_from_scratch():
    cands = choose_candidates(FACTS, "cpu", None)
    assert [c.settings["model"] for c in cands] == list(SCRATCH_CPU_NATIVE)  # full resolution first
    assert cands[0].settings["model"] == "aivh_res_t"
    assert [c.epochs for c in cands[:2]] == [FULL_RES_EPOCHS] * 2  # the full-resolution CNNs train longer
    assert all(c.kind == "scratch" and c.settings["img_size"] == 32 and c.settings["pretrained"] is False
               for c in cands)  # fmt: skip
    large = choose_candidates(findings_to_settings([], 300), "cpu", None)
    assert [c.settings["model"] for c in large] == list(SCRATCH_CPU)
    assert {c.settings["img_size"] for c in large} == {64}
    # the full-resolution CNNs score their OOF rows and the test images through 10 views, the others the
    # tiny recipe's hflip; the cost model counts them
    assert [c.settings.get("tta") for c in cands] == [FULL_RES_TTA] * 2 + [None] * 2
    assert [tta_views(c, ".") for c in cands] == [10, 10, 2, 2]
    assert all("tta" not in c.settings for c in large)
    lines = candidate_lines(cands)  # one line says so, and how to attach weights offline
    assert lines[-1].startswith("candidates: no pretrained weights found") and "--weights-dir" in lines[-1]
    assert "HF_HOME" in NO_WEIGHTS and "much weaker" in NO_WEIGHTS
    assert all(c.name in "\n".join(lines) and c.why for c in cands)


def test_every_timm_model_in_the_hf_cache_is_a_candidate_at_its_pretrained_size(tmp_path, monkeypatch):
    hub = fake_hf_cache(tmp_path / "hub", ["test_vit.r160_in1k", "test_efficientnet.r160_in1k"])
    (hub / "models--someone--not-timm").mkdir()  # another library's repository: not a candidate
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    cands = choose_candidates(FACTS, "cpu", None)
    pre = {(c.settings["model"], c.kind): c for c in cands if c.kind != "scratch"}
    assert set(pre) == {(m, k) for m in ("test_efficientnet.r160_in1k", "test_vit.r160_in1k")
                        for k in ("probe", "finetune")}  # fmt: skip
    assert [c.kind for c in cands[:4]] == ["probe", "probe", "finetune", "finetune"]  # the cheap probes first
    vit, cnn = pre["test_vit.r160_in1k", "finetune"], pre["test_efficientnet.r160_in1k", "finetune"]
    assert vit.settings["img_size"] == cnn.settings["img_size"] == 160  # timm's pretrained_cfg, not 224
    assert vit.settings["mean"] == [0.5] * 3 and cnn.settings["mean"] == list(IMAGENET_MEAN)
    assert vit.settings["lr"] == FINETUNE["vit"]["lr"] == 2e-5 and vit.settings["layer_decay"] == 0.75
    assert cnn.settings["lr"] == 1e-4 and "layer_decay" not in cnn.settings
    assert (
        Path(vit.settings["weights"]).name == "model.safetensors" and "snapshots" in vit.settings["weights"]
    )
    assert "vit recipe, lr 2e-05" in vit.why and "160 px" in vit.why
    assert not any(line.startswith("candidates: no pretrained") for line in candidate_lines(cands))


def test_weights_dir_files_folders_and_a_copied_cache(tmp_path):
    wdir = tmp_path / "weights"
    save_weights(wdir / "test_resnet.safetensors", "test_resnet")  # the architecture's default tag
    save_weights(wdir / "test_convnext.r160_in1k.safetensors", "test_convnext")  # with its tag
    save_weights(wdir / "test_byobnet.r160_in1k" / "model.safetensors", "test_byobnet")  # a copied repository
    fake_hf_cache(wdir / "hub", ["test_vit.r160_in1k"])  # a copied Hugging Face cache
    save_weights(wdir / "notes.safetensors", "test_resnet")  # not named after a model: ignored
    cands = choose_candidates(FACTS, "cpu", wdir)
    models = {c.settings["model"] for c in cands if c.kind == "finetune"}
    assert models == {
        "test_resnet",
        "test_convnext.r160_in1k",
        "test_byobnet.r160_in1k",
        "test_vit.r160_in1k",
    }
    assert all(Path(c.settings["weights"]).is_file() for c in cands if c.kind != "scratch")
    with pytest.raises(UserError, match="--weights-dir"):
        choose_candidates(FACTS, "cpu", tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="name each file after its model"):
        choose_candidates(FACTS, "cpu", empty)


@pytest.mark.parametrize("wanted", ["test_vit", "test_vit.r160_in1k"])
def test_models_match_the_architecture_with_or_without_its_tag(tmp_path, wanted):
    save_weights(tmp_path / "test_vit.r160_in1k.safetensors", "test_vit")
    cands = choose_candidates(FACTS, "cpu", tmp_path, [wanted, "test_resnet"])
    assert [(c.settings["model"], c.kind) for c in cands] == [
        ("test_vit.r160_in1k", "probe"), ("test_vit.r160_in1k", "finetune"), ("test_resnet", "scratch")]  # fmt: skip


def test_a_vit_is_capped_at_224_px_and_large_inputs_take_smaller_batches():
    held = {"vit_base_patch14_reg4_dinov2.lvd142m": Path("w.safetensors"), "convnext_tiny.fb_in22k_ft_in1k":
            Path("c.safetensors"), "vit_large_patch14_clip_quickgelu_224.openai": Path("l.safetensors")}  # fmt: skip
    tuned = {c.settings["model"]: c for c in pretrained_candidates(held) if c.kind == "finetune"}
    dino = tuned["vit_base_patch14_reg4_dinov2.lvd142m"]
    assert dino.settings["img_size"] == VIT_MAX_SIZE == 224 and "capped from 518 px" in dino.why  # not 518
    assert tuned["convnext_tiny.fb_in22k_ft_in1k"].settings["lr"] == 1e-4
    clip = tuned["vit_large_patch14_clip_quickgelu_224.openai"].settings
    assert clip["lr"] == 2e-5 and clip["layer_decay"] == 0.85  # 24 blocks: a gentler decay
    assert clip["batch_size"] == 8 and dino.settings["batch_size"] == 32
    assert finetune_batch("x", 448) == 8 and finetune_batch("x", 1024) == 4 and finetune_batch("x", 112) == 64


def test_candidates_json_says_why_each_is_there_and_why_one_was_skipped(tmp_path):
    from aivh_ens.auto.timing import Timings, write_candidates

    cands = choose_candidates(FACTS, "cpu", None)
    listed = candidates_doc(cands, {cands[1].name: "out of memory: injected"})
    assert write_candidates(tmp_path, {}) == ()  # a resumed plan's timings: nothing new to record
    (path,) = write_candidates(tmp_path, Timings({}, listed))
    doc = json.loads(path.read_text())["candidates"]
    assert path == tmp_path / "runs/auto/candidates.json"
    assert [d["name"] for d in doc] == [c.name for c in cands] and all(d["why"] for d in doc)
    assert doc[1]["skipped"] == "out of memory: injected" and "skipped" not in doc[0]


def test_findings_become_plan_settings():
    findings = [
        Finding("pairs", "warn", 0.9, "pairs", "--group pairs"),
        Finding("shift", "warn", 0.8, "sizes", "--mode crop"),
        Finding("shortcut", "warn", 0.7, "compression", "--jpeg-p 0.5"),
        Finding("train_duplicates", "ok", 0, "none"),
    ]
    facts = findings_to_settings(findings, 90)
    assert facts.shared == {"group": "pairs", "mode": "crop", "jpeg_p": 0.5} and len(facts.used) == 3
    assert "mode" not in findings_to_settings(findings, 32).shared  # native-size images: crop changes nothing
