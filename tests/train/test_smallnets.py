"""The full-resolution CNNs registered with timm (``aivh_cnn_s``, ``aivh_cnn_m``, ``aivh_res_s``, ``aivh_res_t``):
reachable by name like any timm model, timm's model interface, and they learn what only full resolution shows."""

from __future__ import annotations

import pytest
import torch

from aivh_ens.errors import UserError
from aivh_ens.train.models import check_model_name, create_backbone, local_pretrained


@pytest.mark.parametrize(
    ("name", "width"), [("aivh_cnn_s", 128), ("aivh_cnn_m", 192), ("aivh_res_s", 128), ("aivh_res_t", 64)]
)
def test_registered_and_built_through_timm(name, width):
    import timm

    check_model_name(name)  # no UserError: the name is a timm model
    assert not local_pretrained(name)  # no weights exist for them: --pretrained auto trains from scratch
    model = create_backbone(name, pretrained=False, weights=None, num_classes=2, img_size=32, drop_rate=0.1)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 2)
    assert model.get_classifier().out_features == 2
    feats = create_backbone(name, pretrained=False, weights=None, num_classes=0)
    assert feats.num_features == width and feats(torch.randn(2, 3, 48, 40)).shape == (2, width)
    assert feats.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (8, 8)  # 2 pools, not a 4x stem
    assert timm.data.resolve_model_data_config(feats)["input_size"] == (3, 32, 32)


def test_drop_path_is_refused_in_one_line():
    with pytest.raises(UserError, match="drop_path_rate=0.1.*no stochastic depth"):
        create_backbone("aivh_cnn_s", pretrained=False, weights=None, num_classes=2, drop_path_rate=0.1)


def test_residual_variant_adds_its_input_back():
    """With every convolution's output zeroed (the BatchNorm scales at 0) a residual block passes its input on
    (through ReLU): the stem's output reaches the head unchanged in stage 1."""
    model = create_backbone("aivh_res_s", pretrained=False, weights=None, num_classes=0).eval()
    stem, block = model.stages[0][0], model.stages[0][1]
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.zeros_(m.weight)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = stem(x)
        assert torch.allclose(block(h), h)  # h >= 0 after the stem's ReLU
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 9  # stem, 3 x 2, 2 shortcuts


@pytest.mark.parametrize("name", ["aivh_cnn_s", "aivh_res_s", "aivh_res_t"])
def test_it_learns_a_one_pixel_checkerboard_that_a_4x_stem_averages_away(name):
    """Label 1: a +-0.5 checkerboard of period 2 px added to noise; the mean colour is the same for both."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=g) * 0.3
    y = torch.arange(64) % 2
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float() - 0.5
    x[y == 1] += board
    torch.manual_seed(0)
    model = create_backbone(name, pretrained=False, weights=None, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() == 1.0
