"""Writing predicted masks next to nothing else: same stem, original size, viewer-friendly values.

:class:`SaveMaskd` is MONAI's ``SaveImaged`` (so MONAI Label, which drops ``SaveImaged`` from an
inference pipeline, drops it too) that picks the format from the input file: NIfTI inputs give
NIfTI masks carrying the input's affine, every 2D image format gives a lossless PNG.  Binary PNG
masks are written 0/255 so they are visible in any viewer; multiclass masks keep class indices.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection, PathLike
from monai.transforms import SaveImage, SaveImaged

from monai_unet_bundle.transforms import source_name

__all__ = ["SaveMaskd", "is_nifti"]


def is_nifti(path: str | PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return str(path).lower().endswith((".nii", ".nii.gz"))


class SaveMaskd(SaveImaged):
    """Save class-index masks as ``output_dir/<input stem>.png`` (or ``.nii.gz`` for NIfTI inputs).

    Sub-folders of ``data_root_dir`` are kept, so equal stems in different folders don't collide.

    Args:
        keys: keys of the masks to save (channel-first class-index maps at the original size).
        output_dir: folder to write into (created when missing).
        num_classes: classes including background; 2 writes PNG masks as 0/255.
        data_root_dir: the input folder, whose relative sub-folders are kept under ``output_dir``.
        print_log: log every written file.
        name_key: the item key holding the output name chosen by
            :func:`monai_unet_bundle.data.scan_inputs` (sub-folder and stem, no extension, distinct for
            every input); when an item has none, the name comes from ``data_root_dir`` and the stem.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: PathLike,
        num_classes: int = 2,
        data_root_dir: PathLike = "",
        print_log: bool = False,
        name_key: str = "output_name",
    ) -> None:
        common = {
            "output_dir": output_dir,
            "output_postfix": "",
            "resample": False,
            "separate_folder": False,
            "data_root_dir": data_root_dir,
            "print_log": print_log,
            "output_dtype": np.uint8,
            "savepath_in_metadict": True,
        }
        super().__init__(
            keys, output_ext=".png", writer="PILWriter", scale=255 if num_classes == 2 else None, **common
        )
        self.nifti_saver = SaveImage(output_ext=".nii.gz", writer="NibabelWriter", **common)
        self.num_classes = num_classes
        self.output_dir = Path(output_dir)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        name = d.get(self.name_key)
        for key in self.key_iterator(d):
            mask = d[key]
            saver = self.nifti_saver if is_nifti(source_name(mask)) else self.saver
            target = None
            if isinstance(name, str) and name:
                target = self.output_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
            saver(mask.to(torch.uint8) if self.num_classes != 2 else mask, filename=None if target is None else str(target))
        return d
