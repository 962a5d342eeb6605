"""The classic 2D U-Net, built from MONAI's ``BasicUNet``, and checks of its settings.

``BasicUNet`` is the original design: five resolution levels, two (3x3 conv + norm + activation)
blocks per level, max-pool down, transposed-conv up and skip concatenation.  The configs build it
directly; the helpers here turn the bundle's flat knobs (``base_features``, ``activation``) into
its arguments and check ``spatial_size`` before any training starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_unet_bundle.errors import BundleInputError

__all__ = [
    "ACTIVATIONS", "NETWORKS", "TOTAL_STRIDE", "activation", "build_network", "check_dropout", "check_spatial_size", "unet_features",
]

#: ``architecture`` setting -> what it builds
NETWORKS = {
    "basic_unet": "the classic U-Net: max-pool down, two 3x3 conv + batch norm + activation per level, transposed-conv up",
    "unet": "MONAI's strided UNet: strided-conv down, two residual units per level; about 3x less CPU per epoch",
}

#: four 2x max-pools between the five levels
TOTAL_STRIDE = 16

#: activation name -> MONAI layer spec; ELU is the default because it has no dead units
ACTIVATIONS: dict[str, tuple[str, dict]] = {
    "elu": ("elu", {"alpha": 1.0, "inplace": True}),
    "relu": ("relu", {"inplace": True}),
    "leakyrelu": ("leakyrelu", {"negative_slope": 0.1, "inplace": True}),
}


def unet_features(base_features: int) -> tuple[int, int, int, int, int, int]:
    """Feature counts for ``BasicUNet`` with the classic doubling per level.

    The five encoder levels get ``f, 2f, 4f, 8f, 16f`` features, as in the original U-Net
    (64..1024 for ``f = 64``), and the last decoder block ``f``.

    Args:
        base_features: ``f``, the feature count of the first level.

    Raises:
        BundleInputError: when ``base_features`` is not a positive integer.
    """
    if isinstance(base_features, bool) or not isinstance(base_features, int) or base_features < 1:
        raise BundleInputError(f"base_features must be a positive integer (e.g. 16), got {base_features!r}.")
    f = base_features
    return (f, 2 * f, 4 * f, 8 * f, 16 * f, f)


def activation(name: str) -> tuple[str, dict]:
    """Return MONAI's layer spec for the activation called ``name`` (case-insensitive).

    Raises:
        BundleInputError: for a name not in :data:`ACTIVATIONS`.
    """
    key = str(name).lower()
    if key not in ACTIVATIONS:
        raise BundleInputError(f"activation {name!r} is not supported: use one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[key]


def check_spatial_size(spatial_size: Sequence[int], stride: int = TOTAL_STRIDE) -> list[int]:
    """Check that ``spatial_size`` has two positive sides divisible by the U-Net's total stride.

    Returns:
        ``spatial_size`` as a list of ints.

    Raises:
        BundleInputError: naming the nearest valid size when a side is not a multiple of ``stride``.
    """
    try:
        size = [int(s) for s in spatial_size]
    except (TypeError, ValueError):
        raise BundleInputError(f"spatial_size must be two integers such as [512, 512], got {spatial_size!r}.") from None
    if len(size) != 2 or min(size) < stride:
        raise BundleInputError(f"spatial_size must be two integers of at least {stride}, such as [512, 512]; got {spatial_size!r}.")
    if any(s % stride for s in size):
        nearest = [max(stride, (s + stride // 2) // stride * stride) for s in size]  # ties round up
        raise BundleInputError(
            f"spatial_size {size} is not divisible by the U-Net's total stride {stride}: use {nearest} instead."
        )
    return size


def check_dropout(dropout: float) -> float:
    """Check that ``dropout`` is a probability in [0, 1) and return it as a float.

    Raises:
        BundleInputError: for anything else (a string, a boolean, 1 or more, a negative number).
    """
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise BundleInputError(f"dropout must be a number from 0 up to (not including) 1, such as 0.2; got {dropout!r}.")
    return float(dropout)


def build_network(
    name: str = "basic_unet",
    in_channels: int = 3,
    out_channels: int = 2,
    base_features: int = 16,
    act: str = "elu",
    dropout: float = 0.0,
) -> torch.nn.Module:
    """Build the 2D segmentation network called ``name`` (see :data:`NETWORKS`).

    Both have five resolution levels with ``base_features`` doubling per level (f .. 16f), batch
    norm, the chosen activation and skip connections; ``basic_unet`` is the classic design, ``unet``
    trades max-pooling for strided convolutions and adds residual units.

    ``dropout`` (0 <= p < 1, default 0) puts a dropout layer after every convolution block's norm;
    it has no weights, so a state dict fits the network whatever its ``dropout``.  Training uses it
    as a regulariser; MONAI Label's epistemic scoring writes it into ``network_def`` and runs the
    network in training mode several times per image (Monte Carlo dropout), scoring how much the
    predictions disagree.

    Raises:
        BundleInputError: for an unknown ``name``, a ``dropout`` outside [0, 1) (and as
            :func:`unet_features`, :func:`activation`).
    """
    from monai.networks.nets import BasicUNet, UNet

    features, act_spec = unet_features(base_features), activation(act)
    dropout = check_dropout(dropout)
    if name == "basic_unet":
        return BasicUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels, features=features,
            act=act_spec, norm="batch", upsample="deconv", dropout=dropout,
        )
    if name == "unet":
        return UNet(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=features[:5],
            strides=(2, 2, 2, 2), num_res_units=2, act=act_spec, norm="batch", dropout=dropout,
        )
    raise BundleInputError(f"architecture {name!r} is not supported: use one of {', '.join(NETWORKS)}.")
