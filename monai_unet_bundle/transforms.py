"""Dictionary transforms that make users' images and masks uniform before the network sees them.

* :class:`EnsureChannelsd` converts grayscale, grayscale+alpha, RGB and RGBA images to the bundle's
  ``in_channels`` (1 or 3), so a folder that mixes them trains.
* :class:`ReloadLabeld` reads a mask again from its file at the original size, so evaluation scores
  predictions mapped back to the original size against the untouched ground truth.
* :class:`MaskToIndexd` turns a mask into a one-channel class-index map (0..num_classes-1), accepting
  binary masks saved 0/1 or 0/255 and refusing values that map to no class, naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.readers import Image2DReader

__all__ = ["EnsureChannelsd", "MaskToIndexd", "ReloadLabeld", "source_name"]

# ITU-R BT.601 luma weights, as PIL uses for RGB -> L
_LUMA = (0.299, 0.587, 0.114)


def source_name(img: object) -> str:
    """Return the file an image was loaded from, for error messages (``"<unknown file>"`` if none)."""
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "<unknown file>"


def _to_luma(rgb: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, *([1] * (rgb.ndim - 1)))
    return (rgb[:3] * weights).sum(0, keepdim=True)


class EnsureChannelsd(MapTransform):
    """Convert channel-first images to ``channels`` channels (1 = grayscale, 3 = RGB).

    Alpha is dropped; grayscale is repeated to RGB; RGB becomes grayscale by luma weights.

    Args:
        keys: keys of the images to convert.
        channels: target channel count, 1 or 3.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        BundleInputError: for a target other than 1 or 3, or an image with another channel count.
    """

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise BundleInputError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
        self.channels = int(channels)

    def convert(self, img: torch.Tensor) -> torch.Tensor:
        """Convert one channel-first image."""
        c = img.shape[0]
        if c in (2, 4):  # drop alpha
            img, c = img[: c - 1], c - 1
        if c == self.channels:
            return img
        if c == 1 and self.channels == 3:
            return img.repeat(3, *([1] * (img.ndim - 1)))
        if c == 3 and self.channels == 1:
            return _to_luma(img)
        raise BundleInputError(
            f"{source_name(img)} has {img.shape[0]} channels; images must be grayscale, RGB or RGBA "
            f"(1, 2, 3 or 4 channels)."
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d


class MaskToIndexd(MapTransform):
    """Turn masks into one-channel class-index maps with values ``0..num_classes-1``.

    Multi-channel masks whose channels are identical (a grayscale mask saved as RGB) are reduced to
    one channel.  With ``num_classes == 2`` a mask of values {0, 255} is read as {0, 1}.

    Args:
        keys: keys of the masks.
        num_classes: classes including background.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        BundleInputError: naming the file and the offending values when a mask holds values that
            map to no class, or channels that differ (a colour mask).
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise BundleInputError(f"num_classes must be an integer of at least 2 (2 = binary), got {num_classes!r}.")
        self.num_classes = num_classes

    def convert(self, mask: torch.Tensor) -> torch.Tensor:
        """Convert one channel-first mask."""
        name = source_name(mask)
        if mask.shape[0] > 1:
            if not bool((mask == mask[:1]).all()):
                raise BundleInputError(
                    f"mask {name} has {mask.shape[0]} differing channels (a colour mask); save it as a "
                    f"single-channel image of class indices."
                )
            mask = mask[:1]
        values = torch.unique(mask).tolist()
        if self.num_classes == 2 and 255 in values:
            allowed = {0.0, 255.0}  # a binary mask saved 0/255
        else:
            allowed = set(map(float, range(self.num_classes)))
        bad = sorted(v for v in values if float(v) not in allowed)
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
            expected = "0/1 or 0/255" if self.num_classes == 2 else f"0..{self.num_classes - 1}"
            raise BundleInputError(
                f"mask {name} holds values {shown} that map to no class (expected {expected} for "
                f"num_classes={self.num_classes}); fix the mask or set --num_classes."
            )
        if 255 in allowed:
            mask = mask / 255
        if isinstance(mask, MetaTensor):
            return mask.float()
        return torch.as_tensor(np.asarray(mask), dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d


class ReloadLabeld(MapTransform):
    """Replace each mask by the same file read again at its original size, as a class-index map.

    The file is the one the mask was loaded from (``meta["filename_or_obj"]``); it goes through
    the same reader and :class:`MaskToIndexd` as in training, so values mean the same.

    Args:
        keys: keys of the masks.
        num_classes: classes including background.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.load = LoadImage(reader=Image2DReader, image_only=True, ensure_channel_first=True)
        self.to_index = MaskToIndexd(keys, num_classes)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = source_name(d[key])
            if name == "<unknown file>":
                raise ValueError(f"cannot reload {key!r}: it carries no file name in its metadata")
            d[key] = self.to_index.convert(self.load(name))
        return d
