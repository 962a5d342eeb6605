"""The 2D segmentation networks (MONAI's ``BasicUNet``, ``UNet`` and ``DynUNet``) and checks of their settings.

``BasicUNet`` is the original design and the default: five resolution levels, two (3x3 conv + norm +
activation) blocks per level, max-pool down, transposed-conv up and skip concatenation.  ``DynUNet`` is
nnU-Net's network in MONAI (strided convolutions down, instance norm) trained with deep supervision.
The configs build them through :func:`build_network`; the helpers here turn the bundle's flat knobs
(``base_features``, ``activation``) into their arguments and check ``spatial_size`` before any
training starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet

from monai_unet_bundle.errors import BundleInputError

__all__ = [
    "ACTIVATIONS", "DEEP_SUPERVISION_HEADS", "NETWORKS", "DeepSupervisedUNet", "TOTAL_STRIDE", "activation", "build_network", "check_dropout", "check_spatial_size", "unet_features",
]

#: ``architecture`` setting -> what it builds
NETWORKS = {
    "basic_unet": "the classic U-Net: max-pool down, two 3x3 conv + batch norm + activation per level, transposed-conv up",
    "unet": "MONAI's strided UNet: strided-conv down, two residual units per level; about 3x less CPU per epoch",
    "dynunet": "nnU-Net's network (MONAI's DynUNet): strided-conv down, instance norm, deep supervision while training",
}

#: extra outputs of ``dynunet`` while training, at 1/2 and 1/4 of the input size (upsampled to it)
DEEP_SUPERVISION_HEADS = 2

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


class DeepSupervisedUNet(DynUNet):
    """MONAI's ``DynUNet`` with deep supervision only where it is trained.

    ``DynUNet`` returns its deep supervision outputs, stacked on dimension 1 as ``(B, 1 + heads, C, H, W)``,
    whenever it is in training mode.  This one does so only when gradients are on as well, so a network
    put in training mode for Monte Carlo dropout (MONAI Label's epistemic scoring, under ``no_grad``)
    still returns plain logits; :class:`~monai_unet_bundle.losses.SegmentationLoss` takes the stack.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision and torch.is_grad_enabled():
            outputs = [out]
            for head in self.heads:
                outputs.append(F.interpolate(head, out.shape[2:]))
            return torch.stack(outputs, dim=1)
        return out


def build_network(
    name: str = "basic_unet",
    in_channels: int = 3,
    out_channels: int = 2,
    base_features: int = 16,
    act: str = "elu",
    dropout: float = 0.0,
) -> torch.nn.Module:
    """Build the 2D segmentation network called ``name`` (see :data:`NETWORKS`).

    All have five resolution levels with ``base_features`` doubling per level (f .. 16f), the chosen
    activation and skip connections; ``basic_unet`` is the classic design with batch norm, ``unet``
    trades max-pooling for strided convolutions and adds residual units, ``dynunet`` is nnU-Net's
    network (strided convolutions, instance norm) with :data:`DEEP_SUPERVISION_HEADS` extra outputs
    while training (see :class:`DeepSupervisedUNet`).

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
    if name == "dynunet":
        return DeepSupervisedUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
            upsample_kernel_size=[2] * 4, filters=list(features[:5]), dropout=dropout or None, norm_name=("instance", {"affine": True}),
            act_name=act_spec, deep_supervision=True, deep_supr_num=DEEP_SUPERVISION_HEADS, trans_bias=True,
        )
    raise BundleInputError(f"architecture {name!r} is not supported: use one of {', '.join(NETWORKS)}.")
