"""DICOM test files made in code: every kind the bundle reads, with made-up patient identifiers.

Nothing here is real: the identifiers are invented and distinctive, so a test can scan every file a
run writes for them (``IDENTIFIERS``).  Pixels come from the demo generator, so a network can learn them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from monai_unet_bundle.demo import make_demo_pair

#: SOP classes of the kinds of 2D images hospitals send
SOP_CLASS = {
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "US_MULTI": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "ES": "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}


def patient(index: int) -> dict[str, str]:
    """Invented, distinctive identifiers for patient ``index`` (each string occurs nowhere else)."""
    return {
        "PatientName": f"Quixotewright^Zelda{index}",
        "PatientID": f"ZQPID{7300 + index}",
        "PatientBirthDate": f"1931{index % 12 + 1:02d}17",
        "AccessionNumber": f"ZQACC{91800 + index}",
        "InstitutionName": f"Xylofordshire Infirmary {index}",
        "ReferringPhysicianName": f"Plumtreeworth^Oswin{index}",
        "StudyDate": f"1987{index % 12 + 1:02d}23",
    }


def identifiers(index: int) -> list[str]:
    """The strings of :func:`patient` that must never appear in a run's outputs."""
    values = list(patient(index).values())
    return values + [v.split("^")[0] for v in values if "^" in v]


def demo_pixels(seed: int, size: tuple[int, int] = (40, 52), frames: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``frames`` demo RGB images (F, H, W, 3) uint8 and their 0/1 masks (F, H, W)."""
    rng = np.random.default_rng(seed)
    pairs = [make_demo_pair(rng, *size) for _ in range(frames)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.uint8)


def to_gray16(rgb: np.ndarray, scale: int = 12) -> np.ndarray:
    """RGB uint8 -> 16-bit grayscale stored values (luma times ``scale``)."""
    luma = rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.round(luma * scale).astype(np.uint16)


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    kind: str = "DX",
    syntax: str = ExplicitVRLittleEndian,
    patient_index: int = 0,
    spacing: tuple[float, float] | None = (0.2, 0.2),
    rescale: tuple[float, float] | None = None,
    study_uid: str | None = None,
    frame_of_reference: bool = False,
) -> Dataset:
    """Write a 2D DICOM file and return its dataset.

    Args:
        path: where to write (any name; a ``.dcm`` suffix is not needed).
        pixels: stored values: (H, W) or (F, H, W) grayscale, or (H, W, 3) / (F, H, W, 3) RGB uint8.
        photometric: MONOCHROME1, MONOCHROME2, RGB or YBR_FULL (RGB pixels are converted for YBR).
        kind: a key of :data:`SOP_CLASS` (also gives the Modality).
        syntax: transfer syntax UID: uncompressed, RLE, JPEG baseline (RGB or 8-bit gray),
            JPEG 2000 lossless or JPEG-LS lossless.
        patient_index: whose invented identifiers the file carries (see :func:`patient`).
        spacing: PixelSpacing (row, column) in mm, or None to leave it out.
        rescale: (slope, intercept) to write as RescaleSlope/RescaleIntercept.
        study_uid: the StudyInstanceUID (a new one when None).
        frame_of_reference: whether to give the image a FrameOfReferenceUID.
    """
    colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422")
    pixels = np.asarray(pixels)
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    rows, cols = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    sop_class = SOP_CLASS[kind]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for key, value in patient(patient_index).items():
        setattr(ds, key, value)
    ds.PatientSex = "O"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "US" if kind.startswith("US") else kind
    ds.Manufacturer = "made in code"
    if frame_of_reference:
        ds.FrameOfReferenceUID = generate_uid()
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 40.0
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    if spacing is not None:
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
        ds.RescaleType = "US"
    stored = pixels
    if photometric.startswith("YBR") and syntax != JPEGBaseline8Bit:
        from pydicom.pixels import convert_color_space

        stored = convert_color_space(pixels, "RGB", "YBR_FULL")
        ds.PhotometricInterpretation = "YBR_FULL"
    if syntax == JPEGBaseline8Bit:
        ds.PhotometricInterpretation = "YBR_FULL_422" if colour else photometric
        frame_list = pixels if frames > 1 else pixels[None]
        encoded = []
        for frame in frame_list:
            buffer = io.BytesIO()
            Image.fromarray(frame, "RGB" if colour else "L").save(buffer, format="JPEG", quality=95)
            encoded.append(buffer.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax, encoding_plugin="pyjpegls" if syntax == JPEGLSLossless else "")
    ds.save_as(str(path), enforce_file_format=True)
    return ds


__all__ = [
    "JPEG2000Lossless",
    "JPEGBaseline8Bit",
    "JPEGLSLossless",
    "RLELossless",
    "SOP_CLASS",
    "demo_pixels",
    "identifiers",
    "patient",
    "to_gray16",
    "write_dicom",
]
