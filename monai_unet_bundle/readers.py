"""Image readers for the 2D formats users bring.

MONAI's ``PILReader`` only claims ``.png``, ``.jpg``, ``.jpeg`` and ``.bmp``; :class:`Image2DReader`
is the same reader (same axis order, same metadata) claiming every 2D format Pillow decodes that
appears in segmentation data sets: TIFF (8 and 16 bit) and GIF as well.  ``LoadImaged`` keeps
MONAI's default readers behind it, so NIfTI still goes to ``NibabelReader``.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.config import PathLike
from monai.data import PILReader
from monai.utils import ensure_tuple

__all__ = ["PIL_SUFFIXES", "Image2DReader"]

PIL_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


class Image2DReader(PILReader):
    """``PILReader`` that also reads TIFF and GIF files (extensions matched case-insensitively)."""

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every file name ends with one of :data:`PIL_SUFFIXES`."""
        return all(str(f).lower().endswith(PIL_SUFFIXES) for f in ensure_tuple(filename))
