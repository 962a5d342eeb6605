"""Writing predicted masks as DICOM Segmentation objects that PACS, OHIF and 3D Slicer file with their image.

:class:`DicomSegWriter` builds one Segmentation per predicted image with highdicom: it references the
source study, series and SOP instance (and frame, for a frame of a multi-frame file), holds one
segment per foreground class named from ``class_names`` with a coded category, and has the source's
size and pixel spacing.  Each run writes the Segmentations of one source series into one new series.

The Segmentation carries the patient and study of its source (the Patient and General Study modules),
as the standard requires for it to be filed with that study; the source's institution, station and
operators, which highdicom would copy as contributing equipment, are left out, and nothing else the
bundle writes carries any patient attribute.

highdicom (0.28) builds a Segmentation of a multi-frame source only when the source has a Frame of
Reference, which ultrasound and fluoroscopy clips lack; for those, each frame's Segmentation is built
from a single-frame copy of the source header and its references are pointed back at the original
instance and frame number.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_unet_bundle.dicom import frame_count, quiet, read_header, split_frame
from monai_unet_bundle.errors import BundleInputError

__all__ = ["DicomSegWriter", "require_highdicom"]

logger = logging.getLogger(__name__)

#: the single-frame SOP class a one-frame copy of a multi-frame source takes (Secondary Capture otherwise)
_SINGLE_FRAME_CLASS = {
    "1.2.840.10008.5.1.4.1.1.3.1": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Multi-frame -> Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "1.2.840.10008.5.1.4.1.1.77.1.1",  # Video Endoscopic -> VL Endoscopic Image
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: what highdicom copies of the source's equipment that names a place or person; only the maker and model are kept
_EQUIPMENT_IDENTIFIERS = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "OperatorsName",
)
#: attributes of a multi-frame source that do not describe one frame
_MULTI_FRAME_ONLY = ("NumberOfFrames", "FrameIncrementPointer", "FrameTime", "FrameTimeVector", "FrameDelay", "ActualFrameDuration")
#: what a DA, TM or DT value must look like (the standard's forms); highdicom refuses a source with any other
_VALID_TIME = {
    "DA": re.compile(r"\d{8}"),
    "TM": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"),
    "DT": re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"),
}


def _with_valid_dates(ds):
    """A copy of ``ds`` in which a malformed date or time (e.g. ``1931-07-17``) is left empty, as a Type 2
    attribute may be, instead of stopping the Segmentation; the value is never quoted."""
    out = copy.deepcopy(ds)
    with quiet():
        for element in out:
            pattern = _VALID_TIME.get(element.VR)
            if pattern is None or element.VM != 1:
                continue
            value = str(element.value or "").strip()
            if value and not pattern.fullmatch(value):
                element.value = ""
    return out


def require_highdicom() -> None:
    """Raise a one-sentence error when highdicom (which writes DICOM Segmentations) is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise BundleInputError(
            "writing DICOM SEG needs highdicom, which is not installed: pip install highdicom, or pass --output_format png."
        ) from None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("monai-unet-bundle")
    except Exception:  # running from a packaged bundle without the project installed
        return "bundle"


class DicomSegWriter:
    """Write class-index masks as DICOM Segmentations of their DICOM source images.

    Args:
        class_names: names of the classes, background first; segment ``c`` is class ``c``.
        series_description: the new series' description.
        series_number: the new series' number.
    """

    def __init__(self, class_names: Sequence[str], series_description: str = "U-Net segmentation", series_number: int = 901) -> None:
        require_highdicom()
        if len(class_names) < 2:
            raise ValueError("class_names needs background and at least one foreground class")
        self.class_names = [str(n) for n in class_names]
        self.series_description = series_description
        self.series_number = int(series_number)
        self._series: dict[str, str] = {}
        self._count = 0

    def _descriptions(self) -> list:
        import highdicom as hd
        from pydicom.sr.codedict import codes

        algorithm = hd.AlgorithmIdentificationSequence(
            name="monai-unet-bundle 2D U-Net", version=_version(), family=codes.cid7162.ArtificialIntelligence
        )
        return [
            hd.seg.SegmentDescription(
                segment_number=c,
                segment_label=name[:64],
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
            for c, name in enumerate(self.class_names[1:], start=1)
        ]

    def write(self, mask: np.ndarray, source: str, target: str | Path) -> str:
        """Write ``<target>.dcm``: the Segmentation of ``mask`` over ``source`` (``file`` or ``file#frame``).

        Args:
            mask: (rows, columns) class indices at the source's size.
            source: the DICOM image (or frame) the mask was predicted from.
            target: the output path without extension.

        Returns:
            The path written.
        """
        import highdicom as hd

        file, frame = split_frame(source)
        ds = read_header(file)
        rows, columns = int(ds.Rows), int(ds.Columns)
        mask = np.asarray(mask)
        if mask.shape != (rows, columns):
            raise ValueError(f"mask of shape {mask.shape} does not fit {file} ({rows}x{columns})")
        frames = frame_count(ds)
        reference = _with_valid_dates(ds)  # a copy: the source's own header is never changed
        if frames > 1:  # a single-frame copy of the header; references are set back to the frame below
            for key in _MULTI_FRAME_ONLY:
                if key in reference:
                    delattr(reference, key)
            reference.SOPClassUID = _SINGLE_FRAME_CLASS.get(str(ds.SOPClassUID), _SECONDARY_CAPTURE)
        series_uid = self._series.setdefault(str(ds.get("SeriesInstanceUID", file)), hd.UID())
        self._count += 1
        labels = np.clip(mask, 0, len(self.class_names) - 1).astype(np.uint8)
        with quiet():  # highdicom and pydicom warn about odd values by quoting them (a patient's name)
            seg = self._build(hd, reference, labels, series_uid)
        if frames > 1:
            self._point_at_frame(seg, frame or 1, str(ds.SOPClassUID))
        self._complete_pixel_measures(seg)
        for equipment in seg.get("ContributingEquipmentSequence", []):
            for key in _EQUIPMENT_IDENTIFIERS:
                if key in equipment:
                    delattr(equipment, key)
        path = Path(f"{target}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        with quiet():
            seg.save_as(str(path))
        return str(path)

    def _build(self, hd, reference, labels: np.ndarray, series_uid: str):
        return hd.seg.Segmentation(
            source_images=[reference],
            pixel_array=labels[None],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=self._descriptions(),
            series_instance_uid=series_uid,
            series_number=self.series_number,
            sop_instance_uid=hd.UID(),
            instance_number=self._count,
            manufacturer="monai-unet-bundle",
            manufacturer_model_name="2D U-Net",
            software_versions=_version(),
            device_serial_number="none",
            series_description=self.series_description,
            omit_empty_frames=False,
        )

    @staticmethod
    def _point_at_frame(seg, frame: int, sop_class: str) -> None:
        """Point every reference back at the original instance's class and frame (the SEG was built from a one-frame copy)."""
        references = [i for s in seg.get("ReferencedSeriesSequence", []) for i in s.get("ReferencedInstanceSequence", [])]
        references += [
            src
            for item in seg.get("PerFrameFunctionalGroupsSequence", [])
            for derivation in item.get("DerivationImageSequence", [])
            for src in derivation.get("SourceImageSequence", [])
        ]
        for reference in references:
            reference.ReferencedSOPClassUID = sop_class
            reference.ReferencedFrameNumber = frame

    @staticmethod
    def _complete_pixel_measures(seg) -> None:
        """A projection image has pixel spacing but no slice thickness; highdicom reads a SEG back only with
        both, so a nominal 1 mm is recorded (a 2D image has no thickness to contradict it)."""
        try:
            measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        except (AttributeError, IndexError):
            return
        if "PixelSpacing" in measures and "SliceThickness" not in measures:
            measures.SliceThickness = 1.0
