"""`--devices cuda:N` and `--gpus N` count the caller's visible GPUs: CUDA_VISIBLE_DEVICES entries (indices,
UUIDs, MIG instances) are handed on as they are, never replaced by N."""

from __future__ import annotations

import pytest

from aivh_ens.errors import UserError
from aivh_ens.scale.jobs import physical_device as recorded_device
from aivh_ens.scale.local import make_slots, parse_devices, physical_device
from aivh_ens.system import physical_gpu, visible_gpus

MIG = "MIG-4b1c6f4c-53a8-5d46-8b4e-0a6a4a1e3e2f"


@pytest.mark.parametrize(
    "visible,index,entry",
    [
        (None, 0, "0"),  # unset: every GPU is visible, logical = physical
        (None, 3, "3"),
        ("4,5", 0, "4"),
        ("4,5", 1, "5"),
        (" 6 , 2 ", 1, "2"),
        ("GPU-8f3a1c2e-aaaa-bbbb-cccc-0123456789ab,GPU-11112222-3333-4444-5555-666677778888", 1,
         "GPU-11112222-3333-4444-5555-666677778888"),
        (f"{MIG},MIG-GPU-8f3a1c2e/1/0", 0, MIG),
        (f"{MIG},MIG-GPU-8f3a1c2e/1/0", 1, "MIG-GPU-8f3a1c2e/1/0"),
        ("4,5", 2, None),  # past the list
        ("", 0, None),  # no GPU visible
        ("3,-1,5", 1, None),  # CUDA stops reading at the first invalid entry
        ("3,,5", 1, None),
    ],
)  # fmt: skip
def test_a_logical_gpu_maps_to_the_callers_visible_entry(visible, index, entry):
    assert physical_gpu(index, visible) == entry


def test_the_visible_list_is_read_as_cuda_reads_it():
    assert visible_gpus(None) is None and visible_gpus("") == [] and visible_gpus("1,0") == ["1", "0"]


def test_devices_past_the_visible_gpus_are_refused_naming_the_valid_ones():
    assert parse_devices("cuda:0,cuda:1", None, visible="4,5") == ["cuda:0", "cuda:1"]
    with pytest.raises(
        UserError, match=r"cuda:2: CUDA_VISIBLE_DEVICES='4,5' shows 2 GPU\(s\).*cuda:0..cuda:1"
    ):
        parse_devices("cuda:0,cuda:2", None, visible="4,5")
    with pytest.raises(UserError, match="shows 0 GPU"):
        physical_device(0, "")


def test_each_slot_is_pinned_to_the_physical_gpu_and_its_own_cores():
    slots = make_slots(["cuda:0", "cuda:1"], "4,5", range(8))
    assert [(s.visible, s.cpus) for s in slots] == [("4", (0, 1, 2, 3)), ("5", (4, 5, 6, 7))]
    assert [s.at_once for s in slots] == [2, 2]  # each job process sizes its /dev/shm ring to half
    slots = make_slots(["cuda:1"], f"GPU-a,{MIG}", [2, 3])
    assert slots[0].visible == MIG and slots[0].cpus == (2, 3)
    assert make_slots(["cuda:0", "cuda:1"], None, [0, 1, 2])[1].visible == "1"


def test_cpu_slots_share_scarce_cores():
    slots = make_slots(["cpu", "cpu", "cpu"], None, [5])
    assert [(s.visible, s.cpus) for s in slots] == [(None, (5,))] * 3
    assert [s.cpus for s in make_slots(["cpu", "cpu"], "0", [0, 1, 2, 3, 4])] == [(0, 1), (2, 3)]


@pytest.mark.parametrize(
    "visible,device,recorded",
    [("GPU-abc", "cuda:0", "cuda:GPU-abc"), ("4,5", "cuda:1", "cuda:5"), (None, "cuda:2", "cuda:2"),
     ("4", "cpu", "cpu")],
)  # fmt: skip
def test_started_json_records_the_physical_device(monkeypatch, visible, device, recorded):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert recorded_device(device) == recorded


def test_a_task_given_gpus_it_cannot_see_refuses_to_train_on_the_cpu(monkeypatch):
    import torch

    from aivh_ens.scale.jobs import task_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0f3a")
    with pytest.raises(
        RuntimeError, match=r"given 1 GPU\(s\) but sees none \(CUDA_VISIBLE_DEVICES='GPU-0f3a'"
    ):
        task_device(1)
    assert task_device(0) == "cpu"
    monkeypatch.setenv("AIVH_ENS_GPU_FALLBACK", "cpu")  # a cluster's wiring tried out without GPUs
    assert task_device(1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task_device(1) == "cuda"
