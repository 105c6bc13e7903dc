"""``auto``'s timed probes: capped to a few seconds of batches, run in their own process, and a candidate whose
probe runs out of memory, fails, crashes or overruns is skipped with one line while the call goes on (fault
injection: ``AIVH_ENS_KILL_AT=timing:<candidate>``); the decode speed of the user's own images."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from aivh_ens.auto import timing
from aivh_ens.auto.budget import Speed
from aivh_ens.auto.candidates import choose_candidates, findings_to_settings
from aivh_ens.auto.plan import AutoRun
from aivh_ens.errors import UserError


def _scratch(*models: str):
    return choose_candidates(findings_to_settings([], 32), "cpu", None, models)


def _step_time(cands, work, cap_s=timing.TIMING_CAP_S):
    lines: list[str] = []
    timings = timing.step_time(cands, "cpu", 1, work, str(work), lines.append, cap_s=cap_s)
    return timings, lines


def test_a_probe_takes_at_most_its_work_budget_of_slow_batches():
    calls = []

    def slow_batch():  # a batch far slower than the budget: one warm-up and one timed batch, no more
        calls.append(1)
        time.sleep(0.2)

    per_call = timing._time(slow_batch, torch.device("cpu"), work_s=0.1)
    assert len(calls) == 2 and per_call >= 0.2


def test_bf16_channels_last_is_kept_on_the_cpu_only_when_it_pays(monkeypatch):
    real = timing.time_candidate(
        dataclasses.replace(_cfg("aivh_cnn_s"), amp="bf16", channels_last=True, batch_size=8), "cpu", 1
    )
    assert real.train_img_s > 0 and real.eval_img_s > 0  # the fast settings run for real
    gain = {"aivh_res_t": 2.4, "test_resnet": 1.1}  # what each model gains from bf16 + channels_last
    monkeypatch.setattr(timing, "time_candidate", lambda cfg, device, threads, work_s: Speed(
        100 * (gain[cfg.model] if cfg.amp == "bf16" and cfg.channels_last else 1), 300))  # fmt: skip
    cands = _scratch("aivh_res_t", "test_resnet")
    timings = {c.name: timing.measure(timing._job(c, "cpu", "."), "cpu", 1) for c in cands}
    fast, slow = (timings[c.name] for c in cands)
    assert fast["settings"] == {"amp": "bf16", "channels_last": True} and fast["train_img_s"] == 240
    assert slow["settings"] == {} and slow["train_img_s"] == 100  # 1.1x does not pay for bf16's rounding
    chosen = timing.timed_settings(cands, timings)
    assert chosen[0].settings["amp"] == "bf16" and "amp" not in chosen[1].settings
    table = AutoRun(chosen[0].name, "scratch", chosen[0].settings, 8).table()
    assert table["amp"] == "bf16" and table["channels_last"] is True  # what the plan's sweep will train with


def test_an_out_of_memory_probe_steps_its_batch_down(tmp_path, monkeypatch):
    (c,) = _scratch("test_resnet")
    monkeypatch.setenv("AIVH_ENS_KILL_AT", f"timing:{c.name}")
    monkeypatch.setenv("AIVH_ENS_FAULT", "oom")
    monkeypatch.setenv("AIVH_ENS_FAULT_ONCE", str(tmp_path / "once"))  # the first batch size only
    entry = timing.measure(dataclasses.replace(timing._job(c, "cpu", "."), try_fast=False), "cpu", 1)
    assert entry["batch"] == 16 and entry["settings"] == {"batch_size": 16}  # 32 did not fit, 16 did
    assert timing.timed_settings([c], {c.name: entry})[0].settings["batch_size"] == 16  # the run trains at 16


def test_an_out_of_memory_candidate_is_skipped_with_one_line_and_the_call_goes_on(tmp_path, monkeypatch):
    cands = _scratch("test_resnet", "test_efficientnet")
    monkeypatch.setenv("AIVH_ENS_KILL_AT", f"timing:{cands[0].name}")
    monkeypatch.setenv("AIVH_ENS_FAULT", "oom")  # at every batch size down to the least
    timings, lines = _step_time(cands, tmp_path)
    assert set(timings) == {cands[1].name}
    skipped = [line for line in lines if "skipped" in line]
    assert skipped == [f"timing: {cands[0].name}: skipped, out of memory: CUDA out of memory (injected at "
                       f"timing:{cands[0].name})"]  # fmt: skip
    assert [c.name for c in timing.timed_settings(cands, timings)] == [cands[1].name]  # not planned
    doc = timings.listed  # what runs/auto/candidates.json records once the plan is written
    assert doc[0]["skipped"].startswith("out of memory") and "skipped" not in doc[1]
    assert any(line.startswith("candidates: 2") for line in lines)  # the list was printed


def test_a_crashed_probe_process_is_replaced_for_the_next_candidate(tmp_path, monkeypatch):
    cands = _scratch("test_resnet", "test_efficientnet")
    monkeypatch.setenv("AIVH_ENS_KILL_AT", f"timing:{cands[0].name}")  # SIGKILL, as the kernel's OOM killer
    timings, lines = _step_time(cands, tmp_path)
    assert set(timings) == {cands[1].name}
    assert f"timing: {cands[0].name}: skipped, the timing process died with exit code -9 (killed: out of " \
        "memory?)" in lines  # fmt: skip


def test_a_probe_past_its_cap_is_stopped_and_no_candidate_left_is_a_failure(tmp_path, monkeypatch):
    cands = _scratch("test_resnet")
    monkeypatch.setenv("AIVH_ENS_KILL_AT", f"timing:{cands[0].name}")
    monkeypatch.setenv("AIVH_ENS_FAULT", "hang")
    lines: list[str] = []
    with pytest.raises(UserError, match="every candidate's timing failed .*no result within 1 s.*--models"):
        timing.step_time(cands, "cpu", 1, tmp_path, str(tmp_path), lines.append, cap_s=1)
    assert f"timing: {cands[0].name}: skipped, no result within 1 s (the timing process was stopped)" in lines
    assert not (tmp_path / "runs/auto/timings.json").exists()


@pytest.mark.parametrize(("error", "oom"), [(torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), True),
    (MemoryError(), True), (RuntimeError("shape mismatch"), False), (ValueError("x"), False)])  # fmt: skip
def test_out_of_memory_errors_are_told_from_others(error, oom):
    assert timing.is_oom(error) is oom


def test_decode_speed_is_measured_on_the_users_images(demo_data, tmp_path):
    data = demo_data(n=64, n_test=16, seed=5)
    files = (data / "train.csv").read_text().splitlines()[1:9]
    files = [line.split(",")[0] for line in files]
    per_image = timing.decode_seconds(data, files, sample=4)
    assert per_image is not None and per_image > 0
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert timing.decode_seconds(tmp_path, ["bad.png"]) is None  # nothing decoded: no figure


def _cfg(model: str):
    from aivh_ens.config import resolve_config

    return resolve_config("tiny", name="t", data=".", model=model, img_size=32, pretrained=False)
