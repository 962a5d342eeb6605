from __future__ import annotations

import pytest
import torch

from monai_unet_bundle.fusion import FusedCache, fuse_batch_norm
from monai_unet_bundle.inferers import SegmentationInferer
from monai_unet_bundle.networks import build_network
from monai_unet_bundle.runtime import place_network


def _trained(name: str) -> torch.nn.Module:
    """A small network whose batch norm statistics are no longer the identity."""
    torch.manual_seed(0)
    net = build_network(name, 3, 3, 4).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 32, 32) * 3 + 1)
    return net.eval()


@pytest.mark.parametrize("name", ["basic_unet", "unet"])
def test_folding_keeps_the_outputs_and_removes_every_batch_norm(name):
    net = _trained(name)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused, count = fuse_batch_norm(net)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    remaining = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert count > 0 and remaining == norms - count
    if name == "basic_unet":
        assert remaining == 0  # every conv of the classic U-Net is conv + norm + act
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    assert not any(p.requires_grad for p in fused.parameters())


def test_cache_rebuilds_after_new_weights_and_passes_training_networks_through():
    net = place_network(_trained("basic_unet"), "cpu", "true")
    cache = FusedCache()
    first = cache(net)
    assert first is not net and cache(net) is first  # built once while nothing changes
    conv = next(m for m in first.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # layout kept
    other = _trained("basic_unet")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    net.load_state_dict(other.state_dict())  # what CheckpointLoader does at each run
    second = cache(net)
    assert second is not first
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(second(x), net(x), atol=1e-5, rtol=1e-5)
    net.train()
    assert cache(net) is net


@pytest.mark.parametrize("tta", [False, True])
def test_inferer_gives_the_same_prediction_with_and_without_folding(tta):
    net = _trained("basic_unet")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        folded = SegmentationInferer(tta=tta)(x, net)
        plain = SegmentationInferer(tta=tta, fuse_batch_norm=False)(x, net)
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)
