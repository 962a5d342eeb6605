"""Dictionary transforms that make users' images and masks uniform before the network sees them.

* :class:`EnsureChannelsd` converts grayscale, grayscale+alpha, RGB and RGBA images to the bundle's
  ``in_channels`` (1 or 3), so a folder that mixes them trains.
* :class:`ReloadLabeld` reads a mask again from its file at the original size, so evaluation scores
  predictions mapped back to the original size against the untouched ground truth.
* :class:`NormalizeImaged` maps intensities to the network's range by the plan's ``normalization``
  (8-bit images divided by 255, wide ones by a clipped per-image z-score, or per-image min-max).
* :class:`MaskToIndex` turns a mask into a one-channel class-index map (0..num_classes-1), accepting
  binary masks saved 0/1 or 0/255 and refusing values that map to no class, naming the file;
  :class:`MaskToIndexd` is its dictionary wrapper, as MONAI pairs array and dictionary transforms.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from monai_unet_bundle.dicom import channel_count
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.readers import Auto2DReader
from monai_unet_bundle.settings import flag

__all__ = [
    "EnsureChannelsd",
    "MaskToIndex",
    "MaskToIndexd",
    "NormalizeImaged",
    "ReloadLabeld",
    "channel_conversion_note",
    "item_source",
    "mask_loader",
    "mode_channels",
    "source_name",
]

# ITU-R BT.601 luma weights, as PIL uses for RGB -> L
_LUMA = (0.299, 0.587, 0.114)


def source_name(img: object) -> str:
    """Return the file an image was loaded from, for error messages (``"<unknown file>"`` if none)."""
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "<unknown file>"


def item_source(item: Mapping, keys: Sequence[str] = ("image", "label", "pred")) -> str:
    """The file a decollated item came from: the first of ``keys`` whose metadata names one."""
    for key in keys:
        name = source_name(item.get(key))
        if name != "<unknown file>":
            return name
    return "<unknown file>"


def mask_loader(palette_to_rgb: bool = False) -> LoadImage:
    """A channel-first ``LoadImage`` for masks, with the bundle's readers."""
    return LoadImage(reader=Auto2DReader(kind="mask", palette_to_rgb=palette_to_rgb), image_only=True, ensure_channel_first=True)


def _to_luma(rgb: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, *([1] * (rgb.ndim - 1)))
    return (rgb[:3] * weights).sum(0, keepdim=True)


#: Pillow modes whose pixels the readers hand over as RGB(A); every other mode is one gray channel
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA_MODES = {"LA", "RGBA", "PA"}


def mode_channels(mode: str) -> int:
    """The channel count (alpha not counted) of an image of Pillow ``mode`` as the readers load it.

    Palette images count as RGB (the image reader expands them); NIfTI slices (``"NIfTI ..."``)
    and 1-bit, 8-bit, 16-bit and float grayscale modes count as one channel; DICOM modes
    (``"DICOM RGB"``, ``"DICOM MONOCHROME1"``) by their photometric interpretation.
    """
    if mode.startswith("DICOM"):
        return channel_count(mode)
    return 3 if mode.split(" ")[0] in _COLOUR_MODES else 1


def channel_conversion_note(modes: Mapping[str, int], in_channels: int) -> str | None:
    """One sentence saying which images :class:`EnsureChannelsd` converts, or ``None`` when none is.

    Args:
        modes: image mode (Pillow's, or ``"NIfTI ..."``) -> number of images of that mode.
        in_channels: the network's input channels (1 or 3).

    Example:
        ``channel_conversion_note({"RGB": 3, "L": 2}, 1)`` says that the 3 colour images become
        grayscale by luma.
    """
    total = sum(modes.values())
    other = {m: n for m, n in modes.items() if mode_channels(m) != in_channels}
    alpha = sum(n for m, n in modes.items() if m in _ALPHA_MODES)
    if not other and not alpha:
        return None
    listing = ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
    parts = []
    if other:
        count = sum(other.values())
        if in_channels == 1:
            parts.append(f"{count} colour image(s) become grayscale by luma weights (pass --in_channels 3 to keep colour)")
        else:
            parts.append(f"{count} grayscale image(s) are repeated into 3 identical channels (pass --in_channels 1 if all are grayscale)")
    if alpha:
        parts.append(f"the alpha channel of {alpha} image(s) is dropped")
    return f"images by mode: {listing} (of {total}); with in_channels {in_channels}, " + " and ".join(parts) + "."


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


#: ``normalization`` modes :class:`NormalizeImaged` applies (the plan's ``NORMALIZATIONS`` says what each does)
NORMALIZATION_MODES = ("unit", "percentile", "zscore", "minmax")


class NormalizeImaged(MapTransform):
    """Map image intensities to the range the network trains on, per the ``normalization`` setting.

    * ``unit``: divide by 255, so 8-bit images (photographs, screenshots) land in [0, 1] and keep
      their brightness relative to each other;
    * ``percentile``: per image, clip to the 0.5 and 99.5 percentiles (a few hot or dead pixels do
      not set the scale) and stretch that range to [0, 1]: for 16-bit X-rays, float and NIfTI
      images whose ranges differ from scanner to scanner; a dark background stays 0, like the
      network's zero padding;
    * ``zscore``: per image, clip to the same percentiles, then subtract the mean and divide by the
      standard deviation;
    * ``minmax``: per image, the darkest pixel to 0 and the brightest to 1 (the bundle's behaviour
      before it planned the normalisation).

    Every channel of an image shares one scale, so colours keep their balance.
    """

    def __init__(self, keys: KeysCollection, mode: str = "minmax", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in NORMALIZATION_MODES:
            raise BundleInputError(f"normalization must be auto or one of {', '.join(NORMALIZATION_MODES)}, got {mode!r}.")
        self.mode = mode

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """One channel-first image, normalised (a ``MetaTensor`` keeps its metadata)."""
        x = img.float() if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img), dtype=torch.float32)
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "minmax":
            lo, hi = x.min(), x.max()
            return (x - lo) / (hi - lo) if hi > lo else x * 0
        flat = x.detach().reshape(-1)
        if flat.numel() > 1_000_000:  # percentiles of a large image from a fixed subsample
            flat = flat[torch.linspace(0, flat.numel() - 1, 1_000_000, dtype=torch.long, device=flat.device)]
        lo, hi = torch.quantile(flat.double(), torch.tensor([0.005, 0.995], dtype=torch.double, device=flat.device)).tolist()
        x = x.clamp(lo, hi)
        if self.mode == "percentile":
            return (x - lo) / (hi - lo) if hi > lo else x * 0
        sd = float(x.std())
        return (x - x.mean()) / sd if sd > 0 else x * 0

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d


_LOSSY_SUFFIXES = (".jpg", ".jpeg")


def _check_palette(palette: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray | None:
    if palette is None:
        return None
    arr = np.asarray(palette, dtype=np.float64)
    if arr.shape != (num_classes, 3):
        raise BundleInputError(
            f"mask_palette must list {num_classes} RGB colours, one per class in class order "
            f"(e.g. [[0,0,0],[255,0,0],...]); got {np.asarray(palette).tolist()}."
        )
    if len({tuple(c) for c in arr.tolist()}) != num_classes:
        raise BundleInputError("mask_palette gives the same colour to two classes: every class needs its own colour.")
    return arr


def _check_thresholds(thresholds: Sequence[float] | None, num_classes: int) -> np.ndarray | None:
    if thresholds is None:
        return None
    arr = np.asarray(thresholds, dtype=np.float64).ravel()
    if arr.size != num_classes - 1 or np.any(np.diff(arr) <= 0):
        raise BundleInputError(
            f"mask_thresholds must be {num_classes - 1} increasing numbers (class c covers values from the "
            f"c-th threshold up to the next); got {np.asarray(thresholds).tolist()}."
        )
    return arr


class MaskToIndex(Transform):
    """Turn masks into one-channel class-index maps with values ``0..num_classes-1``.

    Encodings, chosen by the arguments:

    * default: class indices; with ``num_classes == 2`` a mask of values {0, 255} is read as {0, 1}.
      Multi-channel masks whose channels are identical (a grayscale mask saved as RGB) are reduced
      to one channel.
    * ``palette``: RGB colour of each class (class order); every pixel's colour picks its class.
    * ``thresholds``: ``num_classes - 1`` increasing cut points on grayscale values; a value below
      the first is class 0, from the c-th up to the next is class c.

    JPEG masks are refused, since compression changes their values, unless ``allow_lossy``; then
    every value is snapped to the nearest valid one (nearest palette colour, nearest index).

    Args:
        num_classes: classes including background.
        palette: optional ``num_classes`` RGB colours.
        thresholds: optional ``num_classes - 1`` grayscale cut points.
        allow_lossy: accept JPEG masks and snap their values.

    Raises:
        BundleInputError: for bad settings, and naming the file and the offending values when a
            mask holds values that map to no class.
    """

    def __init__(
        self,
        num_classes: int,
        palette: Sequence[Sequence[int]] | None = None,
        thresholds: Sequence[float] | None = None,
        allow_lossy: bool = False,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise BundleInputError(f"num_classes must be an integer of at least 2 (2 = binary), got {num_classes!r}.")
        if palette is not None and thresholds is not None:
            raise BundleInputError("set mask_palette or mask_thresholds, not both.")
        self.num_classes = num_classes
        self.palette = _check_palette(palette, num_classes)
        self.thresholds = _check_thresholds(thresholds, num_classes)
        self.allow_lossy = flag(allow_lossy, "allow_lossy_masks")

    def _refuse(self, name: str, bad: Sequence, expected: str) -> None:
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise BundleInputError(
            f"mask {name} holds values {shown} that map to no class (expected {expected} for "
            f"num_classes={self.num_classes}); fix the mask or the setting."
        )

    def _from_palette(self, mask: np.ndarray, name: str) -> np.ndarray:
        rgb = np.repeat(mask[:1], 3, axis=0) if mask.shape[0] == 1 else mask[:3]
        pixels = rgb.reshape(3, -1).T
        colours, inverse = np.unique(pixels, axis=0, return_inverse=True)
        distance = ((colours[:, None, :] - self.palette[None, :, :]) ** 2).sum(-1)
        nearest = distance.argmin(1)
        exact = distance[np.arange(len(colours)), nearest] == 0
        if not exact.all() and not self.allow_lossy:
            bad = [tuple(int(v) for v in c) for c in colours[~exact]]
            self._refuse(name, bad, "the mask_palette colours")
        return nearest[inverse.ravel()].reshape((1, *rgb.shape[1:]))

    def _single_channel(self, mask: np.ndarray, name: str) -> np.ndarray:
        if mask.shape[0] > 1:
            if not (mask == mask[:1]).all():
                raise BundleInputError(
                    f"mask {name} has {mask.shape[0]} differing channels (a colour mask); save it as a single-channel "
                    f"image of class indices, or map colours to classes with --mask_palette."
                )
            mask = mask[:1]
        return mask

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        """Convert one channel-first mask (a ``MetaTensor`` keeps its metadata)."""
        name = source_name(mask)
        lossy = name.lower().endswith(_LOSSY_SUFFIXES)
        if lossy and not self.allow_lossy:
            raise BundleInputError(
                f"mask {name} is a JPEG, whose compression changes mask values: save masks as PNG, or pass "
                f"--allow_lossy_masks true to snap every value to the nearest class."
            )
        arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64)
        if self.palette is not None:
            index = self._from_palette(arr, name)
        elif self.thresholds is not None:
            index = np.digitize(self._single_channel(arr, name), self.thresholds)
        else:
            index = self._indices(self._single_channel(arr, name), name)
        out = torch.as_tensor(index, dtype=torch.float32)
        return MetaTensor(out, meta=dict(mask.meta), applied_operations=list(mask.applied_operations)) if isinstance(mask, MetaTensor) else out

    def _indices(self, mask: np.ndarray, name: str) -> np.ndarray:
        values = np.unique(mask)
        binary_255 = self.num_classes == 2 and values.max(initial=0) > 1
        if self.allow_lossy:
            if binary_255:
                return (mask >= 128).astype(np.float64)
            return np.clip(np.rint(mask), 0, self.num_classes - 1)
        allowed = {0.0, 255.0} if binary_255 else set(map(float, range(self.num_classes)))
        bad = [f"{v:g}" for v in values if float(v) not in allowed]
        if bad:
            self._refuse(name, bad, "0/1 or 0/255" if self.num_classes == 2 else f"0..{self.num_classes - 1}")
        return mask / 255 if binary_255 else mask


class MaskToIndexd(MapTransform):
    """Dictionary wrapper of :class:`MaskToIndex`: convert the masks under ``keys``.

    Args:
        keys: keys of the masks.
        num_classes, palette, thresholds, allow_lossy: as for :class:`MaskToIndex`.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        palette: Sequence[Sequence[int]] | None = None,
        thresholds: Sequence[float] | None = None,
        allow_lossy: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = MaskToIndex(num_classes, palette, thresholds, allow_lossy)

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return self.converter.num_classes

    @property
    def palette(self) -> np.ndarray | None:
        """The checked ``(num_classes, 3)`` colours, if masks are colour-coded."""
        return self.converter.palette

    @property
    def thresholds(self) -> np.ndarray | None:
        """The checked grayscale cut points, if masks are binned."""
        return self.converter.thresholds

    @property
    def allow_lossy(self) -> bool:
        """Whether JPEG masks are accepted and snapped."""
        return self.converter.allow_lossy

    def convert(self, mask: torch.Tensor) -> torch.Tensor:
        """Convert one channel-first mask (see :class:`MaskToIndex`)."""
        return self.converter(mask)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class ReloadLabeld(MapTransform):
    """Replace each mask by the same file read again at its original size, as a class-index map.

    The file is the one the mask was loaded from (``meta["filename_or_obj"]``); it goes through
    the same readers and the same :class:`MaskToIndexd` as in training, so values mean the same.

    Args:
        keys: keys of the masks.
        to_index: the pipeline's mask conversion (``num_classes``, palette, thresholds, lossy policy).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, to_index: MaskToIndexd, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.load = mask_loader(to_index.palette is not None)
        self.to_index = to_index

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = source_name(d[key])
            if name == "<unknown file>":
                raise ValueError(f"cannot reload {key!r}: it carries no file name in its metadata")
            d[key] = self.to_index.convert(self.load(name))
        return d
