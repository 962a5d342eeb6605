"""Checkpoint files: finding them with a clear message when they are missing."""

from __future__ import annotations

from pathlib import Path

from monai_unet_bundle.errors import BundleInputError

__all__ = ["require_checkpoint"]


def require_checkpoint(path: str | Path) -> str:
    """Return ``path`` when it is an existing file, else explain how to get one.

    Raises:
        BundleInputError: when no file exists at ``path``.
    """
    if not Path(path).is_file():
        raise BundleInputError(
            f"no trained model at {str(path)!r}: run configs/train.json first, or pass --ckpt_path with a model.pt."
        )
    return str(path)
