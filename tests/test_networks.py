from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.networks import activation, check_spatial_size, unet_features


def test_features_double_per_level():
    assert unet_features(16) == (16, 32, 64, 128, 256, 16)
    for bad in (0, -1, 1.5, True, "16"):
        with pytest.raises(BundleInputError, match="base_features must be a positive integer"):
            unet_features(bad)


def test_activation_names():
    assert activation("ELU")[0] == "elu"
    assert activation("relu")[0] == "relu"
    with pytest.raises(BundleInputError, match="activation 'gelu' is not supported: use one of elu, relu"):
        activation("gelu")


def test_spatial_size_check_names_the_nearest_valid_size():
    assert check_spatial_size((512, 256)) == [512, 256]
    with pytest.raises(BundleInputError, match=r"spatial_size \[500, 100\] is not divisible .* use \[496, 96\] instead"):
        check_spatial_size([500, 100])
    with pytest.raises(BundleInputError, match="two integers"):
        check_spatial_size([64])
    with pytest.raises(BundleInputError, match="two integers"):
        check_spatial_size("big")


@pytest.mark.parametrize("act", ["elu", "relu"])
def test_unet_shapes_and_layers(act):
    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=4, features=unet_features(4), act=activation(act), norm="batch")
    out = net(torch.rand(2, 3, 32, 48))
    assert out.shape == (2, 4, 32, 48)
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"MaxPool2d", "ConvTranspose2d", "BatchNorm2d", {"elu": "ELU", "relu": "ReLU"}[act]} <= kinds
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 18  # two 3x3 convs per level: 5 levels down + 4 up


def test_build_network_by_name():
    from monai.networks.nets import BasicUNet, UNet

    from monai_unet_bundle.networks import build_network

    classic = build_network("basic_unet", 3, 2, 8, "relu")
    strided = build_network("unet", 1, 4, 8, "elu")
    assert isinstance(classic, BasicUNet) and isinstance(strided, UNet)
    assert strided(torch.rand(1, 1, 32, 32)).shape == (1, 4, 32, 32)
    assert any(isinstance(m, torch.nn.ELU) for m in strided.modules())
    with pytest.raises(BundleInputError, match="architecture 'segformer' is not supported: use one of basic_unet, unet, dynunet"):
        build_network("segformer")


def test_dynunet_gives_deep_supervision_only_while_it_learns():
    """Training with gradients: the full-size logits and the 1/2 and 1/4 heads, stacked; otherwise plain logits."""
    from monai.networks.nets import DynUNet

    from monai_unet_bundle.checkpoints import network_settings
    from monai_unet_bundle.losses import SegmentationLoss
    from monai_unet_bundle.networks import DEEP_SUPERVISION_HEADS, build_network

    torch.manual_seed(0)
    net = build_network("dynunet", 1, 3, 4, "leakyrelu")
    assert isinstance(net, DynUNet) and any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())
    x = torch.rand(2, 1, 32, 48)
    stack = net(x)
    assert stack.shape == (2, 1 + DEEP_SUPERVISION_HEADS, 3, 32, 48)
    with torch.no_grad():  # training mode without gradients (Monte Carlo dropout): logits only
        assert net(x).shape == (2, 3, 32, 48)
    net.eval()
    assert net(x).shape == (2, 3, 32, 48)
    # the stack's first entry is the network's output (instance norm keeps no running statistics)
    torch.testing.assert_close(net(x), stack[:, 0].detach(), rtol=1e-4, atol=1e-4)
    # the loss weights output s by 2**-s, the weights summing to one
    labels = torch.randint(0, 3, (2, 1, 32, 48))
    loss = SegmentationLoss("dice_ce", num_classes=3)
    expected = sum(0.5**s * loss(stack[:, s], labels) for s in range(3)) / 1.75
    torch.testing.assert_close(loss(stack, labels), expected)
    assert not torch.allclose(loss(stack, labels), loss(stack[:, 0], labels))
    # a saved model tells its architecture and sizes
    assert network_settings(net.state_dict()) == {"architecture": "dynunet", "in_channels": 1, "num_classes": 3, "base_features": 4}


@pytest.mark.parametrize("name", ["basic_unet", "unet", "dynunet"])
def test_dropout_is_monte_carlo_in_training_mode_and_off_in_evaluation(name):
    """``dropout`` (MONAI Label's epistemic scoring writes it into ``network_def``) adds no weights, acts only in training mode."""
    from monai_unet_bundle.networks import build_network

    torch.manual_seed(0)
    plain = build_network(name, 3, 2, 4, "elu")
    dropped = build_network(name, 3, 2, 4, "elu", dropout=0.3)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in dropped.modules()) >= 9
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in plain.modules())
    dropped.load_state_dict(plain.state_dict(), strict=True)  # same weights: a model.pt fits either
    x = torch.rand(1, 3, 32, 32)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x))
        dropped.train()
        a, b = dropped(x), dropped(x)
    assert not torch.equal(a, b), "two training-mode passes with dropout gave the same output"


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.2", True, None])
def test_dropout_outside_0_to_1_is_refused_by_the_builder_and_the_settings_check(bad):
    from monai_unet_bundle.networks import build_network
    from monai_unet_bundle.settings import check_settings

    with pytest.raises(BundleInputError, match="dropout must be a number from 0 up to"):
        build_network("basic_unet", dropout=bad)
    with pytest.raises(BundleInputError, match=r"^dropout is .*, but it must be a number from 0 up to \(not including\) 1"):
        check_settings(dropout=bad)
    assert check_settings(dropout=0)["dropout"] == 0 and check_settings(dropout=0.5)["dropout"] == 0.5
