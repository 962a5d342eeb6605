"""Image readers for the 2D formats users bring.

* :class:`Image2DReader` is MONAI's ``PILReader`` (same axis order, same metadata) claiming every
  2D format Pillow decodes that appears in segmentation data sets (PNG, JPEG, BMP, TIFF 8/16 bit,
  GIF), and normalising Pillow's modes: for images, palette and bilevel pictures become RGB(A) or
  grayscale pixels; for masks, palette indices are kept (they are class indices in VOC- or
  Carvana-style masks) unless a colour palette maps colours to classes.
* :class:`Nifti2DReader` is MONAI's ``NibabelReader`` for 2D slices: a 3D volume with exactly one
  singleton axis is squeezed to 2D, with the affine's columns reordered so every pixel keeps its
  world position; anything else 3D is refused with a clear message.

* :class:`~monai_unet_bundle.dicom.DicomReader` (in :mod:`monai_unet_bundle.dicom`) reads 2D DICOM
  images, frames of multi-frame files and DICOM Segmentation masks.

``LoadImaged`` keeps MONAI's default readers behind these, as a fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader, NibabelReader, PILReader
from monai.utils import ensure_tuple

from monai_unet_bundle.dicom import DicomReader, inspect_dicom, is_dicom
from monai_unet_bundle.errors import BundleInputError, short_reason

__all__ = ["NIFTI_SUFFIXES", "PIL_SUFFIXES", "Auto2DReader", "Image2DReader", "Nifti2DReader", "inspect_image", "unreadable_reason"]

PIL_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")

_TO_RGB = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX"}


def _image_mode(img):
    """Pillow image -> pixels a network can take: L, LA, RGB, RGBA or a 16/32-bit grayscale mode."""
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode in _TO_RGB:
        return img.convert("RGB")
    return img


def _mask_mode(img, palette_to_rgb: bool):
    """Pillow mask -> class indices (palette indices kept) or RGB colours when a palette is used."""
    if img.mode in ("P", "PA"):
        return img.convert("RGB") if palette_to_rgb else img.convert("P") if img.mode == "PA" else img
    if img.mode == "1":
        return img.convert("L")
    if img.mode == "LA":
        return img.convert("L")
    if img.mode in _TO_RGB or img.mode == "RGBA":
        return img.convert("RGB")
    return img


class Image2DReader(PILReader):
    """``PILReader`` for PNG, JPEG, BMP, TIFF and GIF with mode normalisation.

    Args:
        kind: ``"image"`` or ``"mask"`` (see the module docstring).
        palette_to_rgb: for masks, turn palette images into RGB colours (used with a colour palette).
    """

    def __init__(self, kind: str = "image", palette_to_rgb: bool = False, **kwargs) -> None:
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
        converter = _image_mode if kind == "image" else (lambda img: _mask_mode(img, palette_to_rgb))
        super().__init__(converter=converter, **kwargs)
        self.kind = kind

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every file name ends with one of :data:`PIL_SUFFIXES` (any case)."""
        return all(str(f).lower().endswith(PIL_SUFFIXES) for f in ensure_tuple(filename))


class Nifti2DReader(NibabelReader):
    """``NibabelReader`` that turns a volume with one singleton axis into a 2D slice."""

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every file name ends with ``.nii`` or ``.nii.gz`` (any case)."""
        return all(str(f).lower().endswith(NIFTI_SUFFIXES) for f in ensure_tuple(filename))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Read the data; squeeze a single singleton axis of a 3D volume and reorder the affine."""
        data, meta = super().get_data(img)
        shape = tuple(int(s) for s in meta["spatial_shape"])
        names = [str(f) for f in ensure_tuple(getattr(self, "filenames", ()))]
        name = names[0] if names else "<NIfTI file>"
        if len(shape) == 2:
            return data, meta
        singles = [i for i, s in enumerate(shape) if s == 1]
        if len(shape) != 3 or len(singles) != 1 or data.ndim != 3:
            raise BundleInputError(
                f"{name} has shape {tuple(data.shape)}; NIfTI inputs must be 2D slices, or 3D volumes with "
                f"exactly one axis of size 1 (export single slices from the scan)."
            )
        axis = singles[0]
        keep = [i for i in range(3) if i != axis]
        columns = [*keep, axis, 3]
        for key in ("affine", "original_affine"):
            if key in meta:
                meta[key] = np.asarray(meta[key])[:, columns]
        meta["spatial_shape"] = np.asarray([shape[i] for i in keep])
        return np.squeeze(data, axis=axis), meta


def inspect_image(path: str) -> tuple[tuple[int, int], str]:
    """Return ``((height, width), mode)`` of a 2D image file, or raise why it cannot be read as one.

    PIL images are decoded fully, so a truncated file shows up here and not in the middle of a
    run; NIfTI files are checked from their header (a 2D slice, or 3D with one axis of size 1);
    DICOM files (and ``file#frame`` frames) are decoded, and their mode is ``"DICOM <photometric>"``.
    """
    if is_dicom(path):
        return inspect_dicom(path)
    if path.lower().endswith(NIFTI_SUFFIXES):
        import nibabel

        shape = tuple(int(s) for s in nibabel.load(path).shape)
        spatial = [s for s in shape if s != 1] if len(shape) == 3 else list(shape)
        if len(spatial) != 2:
            raise ValueError(f"shape {shape} is not a 2D slice")
        return (spatial[0], spatial[1]), f"NIfTI {nibabel.load(path).get_data_dtype()}"
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode fully: a truncated file must show up here, not in the middle of training
        return (img.height, img.width), img.mode


def unreadable_reason(path: str | Path, exc: BaseException) -> str:
    """Why ``path`` could not be read, in a few words: ``empty file``, or the error's first line."""
    file = Path(path)
    if file.is_file() and file.stat().st_size == 0:
        return "empty file"
    if isinstance(exc, BundleInputError):  # the bundle's own reasons are one sentence, naming the file first
        text = str(exc)
        return (text[len(str(path)):].strip(" :") if text.startswith(str(path)) else text).rstrip(".")
    return short_reason(exc)


class Auto2DReader(ImageReader):
    """One reader for every format the bundle takes: DICOM, NIfTI, or anything Pillow opens, chosen per file.

    MONAI's ``LoadImage`` tries a list of user readers one after another and logs each failure;
    choosing by file name (and, for DICOM without a suffix, by its marker) reads every file with
    the right reader at the first try and keeps the logs quiet.

    Args:
        kind: ``"image"`` or ``"mask"`` (see :class:`Image2DReader` and
            :class:`~monai_unet_bundle.dicom.DicomReader`).
        palette_to_rgb: for masks, turn palette images into RGB colours (used with a colour palette).
    """

    def __init__(self, kind: str = "image", palette_to_rgb: bool = False) -> None:
        super().__init__()
        self.readers: list[ImageReader] = [
            DicomReader(kind=kind), Nifti2DReader(), Image2DReader(kind=kind, palette_to_rgb=palette_to_rgb)
        ]

    def _reader_for(self, filename: Sequence[PathLike] | PathLike) -> ImageReader:
        # Pillow also opens image files whose suffix it does not list, so it is the last resort
        return next((r for r in self.readers[:2] if r.verify_suffix(filename)), self.readers[2])

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether one of the bundle's readers claims every file (DICOM, NIfTI or a Pillow format)."""
        return any(r.verify_suffix(filename) for r in self.readers)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        """Read with the reader the file names call for; returns ``(reader, what it read)``."""
        reader = self._reader_for(data)
        if isinstance(reader, Nifti2DReader):
            reader.filenames = ensure_tuple(data)
        return reader, reader.read(data, **kwargs)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """The array and metadata, from the reader that read ``img``."""
        reader, raw = img
        return reader.get_data(raw)
