"""``auto``'s candidates: pretrained weights from --weights-dir, from-scratch models at native resolution for
small images, and the plan settings inspect's findings turn into."""

from __future__ import annotations

from pathlib import Path

import pytest

from aivh_ens.auto.candidates import (
    FULL_RES_EPOCHS,
    FULL_RES_TTA,
    SCRATCH_CPU,
    SCRATCH_CPU_NATIVE,
    choose_candidates,
    findings_to_settings,
    img_size_for,
    weights_dir_candidates,
)
from aivh_ens.auto.planning import tta_views
from aivh_ens.errors import UserError
from aivh_ens.inspect.stage import Finding


@pytest.mark.parametrize(("side", "device", "size"), [(32, "cpu", 32), (50, "cpu", 48), (12, "cpu", 16),
                                                      (90, "cpu", 64), (90, "cuda:0", 128), (500, "cpu", 64)])  # fmt: skip
def test_small_images_train_at_native_size(side, device, size):
    assert img_size_for(side, device) == size


def test_without_weights_the_cpu_trains_small_models_from_scratch():
    cands = choose_candidates(findings_to_settings([], 32), "cpu", None)
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


def test_weights_dir_gives_a_probe_and_a_fine_tuned_run_per_model_file(tmp_path: Path):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_efficientnet").state_dict(), tmp_path / "test_efficientnet.safetensors")
    (tmp_path / "notes.safetensors").write_bytes(b"")  # not named after a model: ignored
    cands = weights_dir_candidates(tmp_path)
    assert [(c.kind, c.settings["model"]) for c in cands] == [("probe", "test_efficientnet"),
                                                              ("finetune", "test_efficientnet")]  # fmt: skip
    assert {c.settings["weights"] for c in cands} == {
        str((tmp_path / "test_efficientnet.safetensors").resolve())
    }
    kinds = [c.kind for c in choose_candidates(findings_to_settings([], 32), "cpu", tmp_path)]
    assert kinds == ["probe", "finetune", *["scratch"] * len(SCRATCH_CPU_NATIVE)]
    with pytest.raises(UserError, match="--weights-dir"):
        weights_dir_candidates(tmp_path / "missing")
    (tmp_path / "test_efficientnet.safetensors").unlink()
    with pytest.raises(UserError, match="named after a timm model"):
        weights_dir_candidates(tmp_path)


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


def test_timing_keeps_bf16_channels_last_on_the_cpu_only_when_it_pays(tmp_path: Path, monkeypatch):
    import dataclasses

    from aivh_ens.auto import timing
    from aivh_ens.auto.budget import Speed
    from aivh_ens.auto.plan import AutoRun

    real = timing.time_candidate(
        dataclasses.replace(_cfg("aivh_cnn_s"), amp="bf16", channels_last=True, batch_size=8), "cpu", 1
    )
    assert real.train_img_s > 0 and real.eval_img_s > 0  # the fast settings run for real
    gain = {"aivh_res_t": 2.4, "test_resnet": 1.1}  # what each model gains from bf16 + channels_last
    monkeypatch.setattr(timing, "time_candidate", lambda cfg, device, threads: Speed(
        100 * (gain[cfg.model] if cfg.amp == "bf16" and cfg.channels_last else 1), 300))  # fmt: skip
    cands = [c for c in choose_candidates(findings_to_settings([], 32), "cpu", None)
             if c.settings["model"] in gain]  # fmt: skip
    timings = timing.step_time(cands, "cpu", 1, tmp_path, str(tmp_path), lambda _m: None)
    fast, slow = (timings[c.name] for c in cands)
    assert fast["settings"] == {"amp": "bf16", "channels_last": True} and fast["train_img_s"] == 240
    assert slow["settings"] == {} and slow["train_img_s"] == 100  # 1.1x does not pay for bf16's rounding
    chosen = timing.timed_settings(cands, timings)
    assert chosen[0].settings["amp"] == "bf16" and "amp" not in chosen[1].settings
    table = AutoRun(chosen[0].name, "scratch", chosen[0].settings, 8).table()
    assert table["amp"] == "bf16" and table["channels_last"] is True  # what the plan's sweep will train with


def _cfg(model: str):
    from aivh_ens.config import resolve_config

    return resolve_config("tiny", name="t", data=".", model=model, img_size=32, pretrained=False)
