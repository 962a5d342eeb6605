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
    with pytest.raises(BundleInputError, match="architecture 'segformer' is not supported: use one of basic_unet, unet"):
        build_network("segformer")
