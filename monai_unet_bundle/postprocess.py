"""From probabilities to clean class maps: a fast arg-max, then largest component, hole filling, small-object removal.

All three work per foreground class on a channel-first class-index map, with 8-connectivity
(pixels touching at a corner belong to the same object), and leave the background class to absorb
what they remove.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.settings import flag

__all__ = ["ClassIndexd", "PostProcessd", "class_index", "fill_holes", "keep_largest_component", "remove_small_objects"]

_EIGHT = np.ones((3, 3), dtype=bool)


def class_index(prob: torch.Tensor) -> torch.Tensor:
    """The arg-max over the channels of a channel-first ``(C, H, W)`` tensor, as ``(1, H, W)``.

    It equals ``torch.argmax(prob, dim=0, keepdim=True)`` (ties go to the lower class), cast to
    ``prob``'s dtype as MONAI's ``AsDiscrete(argmax=True)`` does.  It compares the channels one
    by one instead: PyTorch's arg-max over the outer dimension of a contiguous ``(C, H, W)`` map,
    the layout that inverting a prediction to its original size gives, runs about 10x slower on
    the CPU (5 ms against 0.5 ms for two 256x256 channels), which made it the costliest step of
    the inference post-processing.
    """
    best, index = prob[0:1], torch.zeros_like(prob[0:1])
    for c in range(1, prob.shape[0]):
        channel = prob[c : c + 1]
        higher = channel > best
        index = torch.where(higher, torch.full_like(index, c), index)
        best = torch.where(higher, channel, best)
    return index


class ClassIndexd(MapTransform):
    """Replace channel-first probabilities ``(C, H, W)`` with their class-index map ``(1, H, W)``.

    The same result as ``AsDiscreted(argmax=True)``, faster (see :func:`class_index`); the
    metadata of a ``MetaTensor`` is kept.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = class_index(d[key])
        return d


def keep_largest_component(index: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep, for each foreground class, only its largest connected component."""
    out = index.copy()
    for c in range(1, num_classes):
        labels, n = ndimage.label(index == c, structure=_EIGHT)
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            out[(labels > 0) & (labels != 1 + int(sizes.argmax()))] = 0
    return out


def fill_holes(index: np.ndarray, num_classes: int) -> np.ndarray:
    """Fill background holes enclosed by a single foreground class with that class."""
    out = index.copy()
    for c in range(1, num_classes):
        region = index == c
        filled = ndimage.binary_fill_holes(region)
        out[filled & ~region & (index == 0)] = c
    return out


def remove_small_objects(index: np.ndarray, num_classes: int, min_size: int) -> np.ndarray:
    """Set connected components smaller than ``min_size`` pixels to background, per class."""
    out = index.copy()
    for c in range(1, num_classes):
        labels, n = ndimage.label(index == c, structure=_EIGHT)
        if n:
            sizes = np.bincount(labels.ravel())
            small = np.flatnonzero(sizes < min_size)
            out[np.isin(labels, small[small > 0])] = 0
    return out


class PostProcessd(MapTransform):
    """Apply the chosen clean-ups, in the order: remove small objects, fill holes, keep largest.

    Args:
        keys: keys of channel-first class-index maps ``(1, H, W)``.
        num_classes: classes including background.
        keep_largest: keep only the largest component of each class.
        fill_holes: fill holes inside each class.
        min_size: remove components smaller than this many pixels (0 = off).

    Raises:
        BundleInputError: for a negative ``min_size``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        keep_largest: bool = False,
        fill_holes: bool = False,
        min_size: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise BundleInputError(f"remove_smaller_than must be a whole number of pixels >= 0, got {min_size!r}.")
        self.num_classes, self.min_size = num_classes, min_size
        self.keep_largest, self.fill = flag(keep_largest, "keep_largest_component"), flag(fill_holes, "fill_holes")

    def process(self, index: np.ndarray) -> np.ndarray:
        """Clean one 2D class-index map."""
        if self.min_size:
            index = remove_small_objects(index, self.num_classes, self.min_size)
        if self.fill:
            index = fill_holes(index, self.num_classes)
        if self.keep_largest:
            index = keep_largest_component(index, self.num_classes)
        return index

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if not (self.keep_largest or self.fill or self.min_size):
            return d
        for key in self.key_iterator(d):
            pred = d[key]
            arr = np.asarray(pred.detach().cpu()).astype(np.int64)
            cleaned = np.stack([self.process(channel) for channel in arr])
            out = torch.as_tensor(cleaned, dtype=pred.dtype, device=pred.device)
            d[key] = MetaTensor(out, meta=dict(pred.meta), applied_operations=list(pred.applied_operations)) if isinstance(pred, MetaTensor) else out
        return d
