"""Writing predicted masks next to nothing else: same stem, original size, viewer-friendly values.

:class:`SaveMaskd` is MONAI's ``SaveImaged`` (so MONAI Label, which drops ``SaveImaged`` from an
inference pipeline, drops it too) that picks the format from the input file and ``output_format``
(see :func:`mask_suffixes`): NIfTI inputs give NIfTI masks of the input's own shape (a 3D slice
stays 3D) and affine, DICOM inputs a DICOM Segmentation (and/or a PNG), every other 2D format a
lossless PNG.  Binary PNG masks are written 0/255 so they are visible in any viewer; multiclass
masks keep class indices.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection, PathLike
from monai.transforms import SaveImaged

from monai_unet_bundle.data import file_stem
from monai_unet_bundle.dicom import is_dicom
from monai_unet_bundle.transforms import source_name

logger = logging.getLogger(__name__)

__all__ = ["OUTPUT_FORMATS", "SaveMaskd", "is_nifti", "mask_suffixes", "save_nifti_like"]

#: the values of ``output_format``
OUTPUT_FORMATS: tuple[str, ...] = ("auto", "png", "dicom_seg", "png+dicom_seg")


def is_nifti(path: str | PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return str(path).lower().endswith((".nii", ".nii.gz"))


def _check_format(output_format: str) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")


def mask_suffixes(source: str | PathLike, output_format: str = "auto") -> tuple[str, ...]:
    """The mask files written for ``source``, by suffix: ``(".nii.gz",)``, ``(".png",)``, ``(".dcm",)`` or both of the last.

    NIfTI inputs always give NIfTI masks and non-DICOM 2D images PNG masks; for DICOM inputs,
    ``auto`` and ``dicom_seg`` write a DICOM Segmentation, ``png`` a PNG, ``png+dicom_seg`` both.
    """
    _check_format(output_format)
    if is_nifti(source):
        return (".nii.gz",)
    if not is_dicom(source):
        return (".png",)
    return {"auto": (".dcm",), "dicom_seg": (".dcm",), "png": (".png",), "png+dicom_seg": (".png", ".dcm")}[output_format]


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
        output_format: what DICOM inputs get (see :func:`mask_suffixes`).
        class_names: segment names of the DICOM Segmentations, background first.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: PathLike,
        num_classes: int = 2,
        data_root_dir: PathLike = "",
        print_log: bool = False,
        name_key: str = "output_name",
        output_format: str = "png",
        class_names: Sequence[str] | None = None,
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
        self.num_classes = num_classes
        self.output_dir = Path(output_dir)
        self.name_key = name_key
        _check_format(output_format)  # an unknown format is refused now, not at the first DICOM input
        self.output_format = output_format
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self._seg_writer = None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        name = d.get(self.name_key)
        for key in self.key_iterator(d):
            mask = d[key]
            source = source_name(mask)
            target = None
            if isinstance(name, str) and name:
                target = self.output_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
            suffixes = mask_suffixes(source, self.output_format)
            if ".nii.gz" in suffixes and Path(source).is_file():
                save_nifti_like(mask, source, target if target is not None else self.output_dir / _nifti_stem(source))
                continue
            if target is None and is_dicom(source):
                target = self.output_dir / file_stem(source)
            if ".dcm" in suffixes and not self._write_seg(mask, source, target) and ".png" not in suffixes:
                if Path(f"{target}.png").exists():  # never over a file this run did not plan to write
                    logger.warning("%s: its mask is not written, since %s.png already exists", source, target)
                    continue
                suffixes = (*suffixes, ".png")  # the mask is not lost: it is written as PNG instead
            if ".png" in suffixes:
                self.saver(mask.to(torch.uint8) if self.num_classes != 2 else mask, filename=None if target is None else str(target))
        return d

    def _write_seg(self, mask: torch.Tensor, source: str, target: Path) -> bool:
        """Write the DICOM Segmentation of a (1, width, height) mask; its path goes to ``dicom_seg`` in the metadata.

        Returns:
            Whether it was written: a source highdicom cannot build on is logged (by exception type only,
            since the message may quote patient data) and its mask written as PNG instead.
        """
        from monai_unet_bundle.dicom_seg import DicomSegWriter

        if self._seg_writer is None:
            self._seg_writer = DicomSegWriter(self.class_names)
        array = np.asarray(torch.as_tensor(mask).detach().cpu())
        array = (array[0] if array.ndim == 3 else array).T  # width x height -> rows x columns
        try:
            path = self._seg_writer.write(np.rint(array).astype(np.uint8), source, target)
        except Exception as exc:  # any highdicom refusal: the run goes on and this mask is kept as PNG
            logger.warning("%s: no DICOM SEG could be built on this file (%s); its mask is written as %s.png instead",
                           source, type(exc).__name__, target)
            return False
        meta = getattr(mask, "meta", None)
        if isinstance(meta, dict):
            meta["dicom_seg"] = path
        return True


def _nifti_stem(path: str) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def save_nifti_like(mask: torch.Tensor, source: str | PathLike, target: str | PathLike) -> str:
    """Write a class-index mask as ``<target>.nii.gz`` with the shape, affine and units of the NIfTI ``source``.

    The mask arrives as the 2D slice the reader made (a size-1 axis of a 3D file squeezed out);
    that axis is put back where it was, so the mask has exactly the input's shape and world
    position, whichever axis was the single one, and lies over it in any viewer.

    Returns:
        The path written (also recorded as ``saved_to`` in the mask's metadata).
    """
    import nibabel

    reference = nibabel.load(str(source))
    array = np.asarray(torch.as_tensor(mask).detach().cpu()).astype(np.uint8)
    array = array[0] if array.ndim == 3 else array
    shape = tuple(int(v) for v in reference.shape)
    if len(shape) == 3:
        array = np.expand_dims(array, [i for i, v in enumerate(shape) if v == 1][0])
    if array.shape != shape:
        raise ValueError(f"mask of shape {array.shape} does not fit {source} of shape {shape}")
    out = nibabel.Nifti1Image(array, reference.affine)
    out.set_qform(reference.affine, int(reference.header["qform_code"]) or 1)
    out.set_sform(reference.affine, int(reference.header["sform_code"]) or 1)
    out.header.set_xyzt_units(*reference.header.get_xyzt_units())
    path = f"{target}.nii.gz"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(out, path)
    meta = getattr(mask, "meta", None)
    if isinstance(meta, dict):
        meta["saved_to"] = path
    return path
