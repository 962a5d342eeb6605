"""Kaggle-style run-length encoding of masks.

A mask is flattened to a sequence of pixels and every run of foreground pixels is written as
``start length`` with 1-indexed starts, space separated (Carvana's ``rle_mask`` column).  The pixel
order is a choice: ``row`` (row-major, left to right then top to bottom, as Carvana's
``train_masks.csv`` is written) or ``column`` (column-major, top to bottom then left to right, as
most later Kaggle segmentation competitions define it).
"""

from __future__ import annotations

import numpy as np

from monai_unet_bundle.errors import BundleInputError

__all__ = ["ORDERS", "rle_decode", "rle_encode"]

ORDERS = {"row": "C", "column": "F"}


def _order(order: str) -> str:
    if order not in ORDERS:
        raise BundleInputError(f"rle_order must be 'row' or 'column', got {order!r}.")
    return ORDERS[order]


def rle_encode(mask: np.ndarray, order: str = "row") -> str:
    """Encode the non-zero pixels of a 2D ``(H, W)`` mask.

    Example:
        >>> rle_encode(np.array([[0, 1, 1], [1, 0, 0]]))
        '2 3'
        >>> rle_encode(np.array([[0, 1, 1], [1, 0, 0]]), order="column")
        '2 2 5 1'
    """
    if np.ndim(mask) != 2:
        raise ValueError(f"run-length encoding needs a 2D mask, got shape {np.shape(mask)}")
    pixels = (np.asarray(mask) > 0).ravel(order=_order(order)).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], pixels, [0]])))
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


def rle_decode(rle: str, shape: tuple[int, int], order: str = "row") -> np.ndarray:
    """Decode ``rle`` into a ``uint8`` mask of ``shape`` (height, width) with foreground 1."""
    flat = np.zeros(int(shape[0]) * int(shape[1]), dtype=np.uint8)
    numbers = [int(v) for v in rle.split()]
    if len(numbers) % 2:
        raise ValueError("a run-length string needs pairs of start and length")
    for start, length in zip(numbers[::2], numbers[1::2]):
        if start < 1 or start - 1 + length > flat.size:
            raise ValueError(f"run {start} {length} lies outside a mask of {flat.size} pixels")
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(shape, order=_order(order))
