"""Reading 2D DICOM: X-rays, mammograms, ultrasound and endoscopy stills, clips, secondary captures.

A DICOM file is found by its ``.dcm``/``.dicom`` suffix or, without one, by the ``DICM`` marker at
byte 128 (PACS exports often name files by number or UID).  A multi-frame file (an ultrasound or
fluoroscopy clip) is one image per frame, addressed as ``file#frame`` (frames counted from 1, as
DICOM counts them).  :class:`DicomReader` plugs into MONAI's ``LoadImage`` beside the other readers:

* grayscale: the modality LUT (rescale slope and intercept) is applied, and MONOCHROME1 is inverted
  so that bone is bright as in MONOCHROME2;
* colour: RGB, YBR (full, 4:2:2, and the JPEG flavours) and palette colour all arrive as RGB;
* compressed pixel data decodes through pydicom's plugins (RLE natively; JPEG baseline, lossless and
  2000 through pylibjpeg or Pillow; JPEG-LS through pyjpegls); a transfer syntax none of them can
  decode is reported with its name and UID;
* a DICOM Segmentation read as a mask becomes a class-index map (segment number = class index),
  taking only the frames that reference the image's frame.

Arrays are returned width x height like MONAI's ``PILReader``, so a DICOM image pairs with a PNG
mask.  The metadata carries pixel spacing and the acquisition kind and never a patient attribute.
pydicom 2.4 (which MONAI Label 0.8.5 pins) and 3.x both work.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.utils import ensure_tuple

from monai_unet_bundle.errors import BundleInputError, short_reason

__all__ = [
    "DICOM_GROUP_NAMES",
    "DICOM_SUFFIXES",
    "SEG_SOP_CLASS",
    "DicomReader",
    "channel_count",
    "dicom_group",
    "expand_frames",
    "frame_name",
    "quiet",
    "frame_count",
    "inspect_dicom",
    "is_dicom",
    "pixel_spacing",
    "read_dataset",
    "read_header",
    "seg_references",
    "sop_instance_uid",
    "split_frame",
]

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
#: Segmentation Storage
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
def _is_seg(ds) -> bool:
    """Whether a dataset is a DICOM Segmentation."""
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def _transfer_syntax(ds):
    """The dataset's transfer syntax UID, or None when it has no file meta."""
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
_NOT_IMAGES = {"dicomdir"}
#: modalities of DICOM objects that hold no image (reports, annotations, plans, waveforms)
_NOT_IMAGE_MODALITIES = {"SR", "PR", "KO", "DOC", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTRECORD", "ECG", "AU", "HD", "PLAN"}

# MONAI registers its own pydicom reader in every LoadImage once pydicom is installed, and that reader
# warns (a warning and a log line) at construction when NVIDIA's GPU codec is absent; the bundle reads
# DICOM itself, so the message (repeated per transform, on every CPU machine) says nothing to its users.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin", category=UserWarning)
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
# highdicom logs every source instance UID it references at INFO level (hundreds of lines per run), and
# pydicom logs the warnings it raises, which quote attribute values (a malformed birth date, a name)
logging.getLogger("highdicom").setLevel(logging.WARNING)
logging.getLogger("pydicom").setLevel(logging.ERROR)


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency of the project
        raise BundleInputError("reading DICOM files needs pydicom: pip install pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg.") from None
    return pydicom


def split_frame(path: PathLike) -> tuple[str, int | None]:
    """``"clip.dcm#3"`` -> ``("clip.dcm", 3)``; a path without a frame (or an existing file named so) -> ``(path, None)``.

    ``clip.dcm::3`` is read the same way: ``python -m monai.bundle`` turns every ``#`` of a
    command-line value into ``::`` (its id separator), so that is how a frame named there arrives.
    """
    text = str(path)
    for separator in ("#", "::"):
        head, sep, tail = text.rpartition(separator)
        if sep and tail.isdigit() and int(tail) > 0 and not os.path.exists(text):
            return head, int(tail)
    return text, None


def frame_name(path: PathLike) -> str:
    """The name of an image as reports show it: ``clip.dcm#3`` for a frame (also when given as ``clip.dcm::3``)."""
    file, frame = split_frame(path)
    return f"{file}#{frame}" if frame is not None else str(path)


def is_dicom(path: PathLike) -> bool:
    """Whether ``path`` (optionally ``file#frame``) names a DICOM file: by suffix, else by its ``DICM`` marker.

    A ``DICOMDIR`` index is not an image and is never taken.
    """
    file, _ = split_frame(path)
    name = os.path.basename(file).lower()
    if name in _NOT_IMAGES:
        return False
    if name.endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(file, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


_CACHE = threading.local()


@contextlib.contextmanager
def quiet():
    """Silence pydicom's and highdicom's warnings: they quote attribute values (a patient's name, a birth date)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _cached(path: PathLike, header_only: bool):
    """The dataset of a DICOM file, whole or without pixel data; each thread keeps the last one of each kind
    it read, so the frames of a clip (read one after another) read their file once."""
    file, _ = split_frame(path)
    stat = os.stat(file)
    key = f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}"
    kind = "header" if header_only else "whole"
    cached_key, dataset = getattr(_CACHE, kind, (None, None))
    if cached_key != key:
        with quiet():
            dataset = _pydicom().dcmread(file, stop_before_pixels=header_only, force=True)
        setattr(_CACHE, kind, (key, dataset))
    return dataset


def read_dataset(path: PathLike):
    """The whole dataset of a DICOM file (see :func:`_cached`)."""
    return _cached(path, header_only=False)


def read_header(path: PathLike):
    """The dataset of a DICOM file without its pixel data (fast; for grouping, frame counts and spacing)."""
    return _cached(path, header_only=True)


def frame_count(ds) -> int:
    """Number of frames of a dataset (1 when it has no NumberOfFrames)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def pixel_spacing(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing, else the functional groups' value; None if absent."""
    for holder in (ds, *_shared_measures(ds)):
        for key in ("PixelSpacing", "ImagerPixelSpacing"):
            value = holder.get(key)
            if value is not None and len(value) == 2:
                try:
                    return float(value[0]), float(value[1])
                except (TypeError, ValueError):
                    continue
    return None


def _shared_measures(ds) -> list:
    try:
        return list(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence)
    except (AttributeError, IndexError, KeyError):
        return []


#: how the group keys :func:`dicom_group` makes begin, and how messages name such a group (never by its key)
DICOM_GROUP_NAMES = {"patient-": "one patient (same PatientID)", "study-": "one study (same StudyInstanceUID)"}


def dicom_group(path: PathLike) -> str | None:
    """A stable, non-identifying group key for a DICOM file: a hash of PatientID, else of StudyInstanceUID.

    Images of one patient share it, so a split keeps them on one side.  A hash of a short id can be
    reversed by trying every id, so the key is never shown: messages say "one patient" and list files.
    """
    ds = read_header(path)
    for key, prefix in zip(("PatientID", "StudyInstanceUID"), DICOM_GROUP_NAMES):
        value = str(ds.get(key, "") or "").strip()
        if value:
            return prefix + hashlib.sha256(value.encode()).hexdigest()[:16]
    return None


def _syntax_name(ds) -> str:
    uid = _transfer_syntax(ds)
    if uid is None:
        return "an unknown transfer syntax"
    return f"{getattr(uid, 'name', uid)} ({uid})"


#: pip-installable decoders by transfer syntax UID prefix (pydicom decodes RLE and uncompressed data itself)
_DECODERS = {
    "1.2.840.10008.1.2.4.5": "pylibjpeg and pylibjpeg-libjpeg",  # JPEG baseline and extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg and pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg and pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.8": "pyjpegls",  # JPEG-LS
    "1.2.840.10008.1.2.4.9": "pylibjpeg and pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.20": "pylibjpeg and pylibjpeg-openjpeg",  # HTJ2K
}


def _remedy(ds) -> str:
    """What to do about pixel data that cannot be decoded: the package to install, or a conversion."""
    uid = str(_transfer_syntax(ds) or "")
    package = next((name for prefix, name in _DECODERS.items() if uid.startswith(prefix)), None)
    if package:
        return f"whose decoder is missing or failed: pip install {package}, or convert the file to an uncompressed syntax (e.g. with dcmdjpeg or gdcmconv)"
    return "which no installed decoder reads: convert the file to an uncompressed syntax (e.g. with gdcmconv --raw) or export still images"


def _decode(ds, frame: int | None, file: str, every_frame: bool = False) -> np.ndarray:
    """Pixel array of one frame (or the only one, or ``every_frame``), colour as RGB; a clear error when undecodable.

    Call it inside :func:`quiet`: decoders warn about odd attribute values by quoting them.
    """
    frames = frame_count(ds)
    if frame is not None and frame > frames:
        raise BundleInputError(f"{file} has {frames} frame(s), so frame {frame} does not exist.")
    index = None if frames == 1 or every_frame else (frame or 1) - 1
    try:
        try:
            from pydicom.pixels import pixel_array  # pydicom >= 3: decodes only the frame asked for

            arr = pixel_array(ds, index=index)
        except ImportError:  # pydicom 2.x: whole array; YBR_FULL(_422) comes back as upsampled YBR_FULL, also from JPEG
            arr = ds.pixel_array
            arr = arr[index] if index is not None else arr
            if str(ds.get("PhotometricInterpretation", "")) in ("YBR_FULL", "YBR_FULL_422"):
                from pydicom.pixel_data_handlers.util import convert_color_space

                arr = convert_color_space(arr, "YBR_FULL", "RGB")
    except BundleInputError:
        raise
    except Exception as exc:
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            kind = str(ds.get("Modality", "") or "")
            why = f"it is a DICOM {kind} object, not an image" if kind in _NOT_IMAGE_MODALITIES else "it is damaged, truncated or not an image: export it again"
            raise BundleInputError(f"{file} holds no pixel data: {why}.") from None
        syntax = _transfer_syntax(ds)
        if syntax is not None and getattr(syntax, "is_compressed", True) is False:
            raise BundleInputError(f"{file} has damaged or truncated pixel data ({short_reason(exc)}): export the file again.") from None
        raise BundleInputError(f"{file} cannot be decoded: its transfer syntax is {_syntax_name(ds)}, {_remedy(ds)}.") from None
    return np.asarray(arr)


def _grayscale(ds, arr: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (rescale slope/intercept); MONOCHROME1 inverted so high means bright."""
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def _colour(ds, arr: np.ndarray) -> np.ndarray:
    """Palette colour indices -> RGB through the file's lookup tables; anything else unchanged."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom 2.x
            from pydicom.pixel_data_handlers.util import apply_color_lut
        arr = apply_color_lut(arr, ds)
    return arr


def _seg_label_map(ds, frame: int | None, file: str) -> np.ndarray:
    """A Segmentation -> (rows, columns) class indices: each frame's segment number where its pixels are set.

    With ``frame`` (the source image's frame), only SEG frames whose source reference names that
    frame are used; SEG frames without a frame reference apply to every source frame.
    """
    arr = _decode(ds, None, file, every_frame=True)
    arr = arr.reshape(-1, int(ds.Rows), int(ds.Columns))
    fractional = str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL"
    cut = float(ds.get("MaximumFractionalValue", 255)) / 2 if fractional else 0
    out = np.zeros(arr.shape[1:], dtype=np.uint8)
    groups = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    used = 0
    for i, plane in enumerate(arr):
        # a macro is in the frame's own functional group, or (when all frames share it) in the shared one
        item = [g for g in (groups[i] if i < len(groups) else None, shared) if g is not None]
        try:
            segment = int(next(g for g in item if "SegmentIdentificationSequence" in g).SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        except (StopIteration, AttributeError, IndexError, TypeError):
            raise BundleInputError(f"mask {file} is a DICOM Segmentation whose frame {i + 1} names no segment; export it again.") from None
        referenced = {
            int(src.ReferencedFrameNumber)
            for g in item
            for der in g.get("DerivationImageSequence", []) or []
            for src in der.get("SourceImageSequence", []) or []
            if "ReferencedFrameNumber" in src
        }
        if frame is not None and referenced and frame not in referenced:
            continue
        out[plane > cut] = segment
        used += 1
    if frame is not None and used == 0:
        raise BundleInputError(f"mask {file} is a DICOM Segmentation with no frame for source frame {frame}: segment that frame, or remove the image.")
    return out


def inspect_dicom(path: PathLike) -> tuple[tuple[int, int], str]:
    """``((rows, columns), mode)`` of one DICOM image (or frame), decoding its pixels so a broken file shows up now.

    ``mode`` is ``"DICOM <photometric interpretation>"``, e.g. ``"DICOM MONOCHROME1"``.
    """
    file, frame = split_frame(path)
    ds = read_dataset(file)
    if _is_seg(ds):
        raise BundleInputError(f"{file} is a DICOM Segmentation (a mask), not an image: keep it with the masks.")
    with quiet():
        arr = _decode(ds, frame, file)
    return tuple(int(v) for v in arr.shape[:2]), f"DICOM {str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).upper()}"


def channel_count(mode: str) -> int:
    """Channels of an image of ``mode`` as :func:`inspect_dicom` names it (3 for colour interpretations)."""
    return 3 if mode.upper().removeprefix("DICOM ").strip() in _COLOUR else 1


class DicomReader(ImageReader):
    """MONAI ``ImageReader`` for 2D DICOM images, frames of multi-frame files, and (as masks) Segmentations.

    Args:
        kind: ``"image"`` (grayscale to modality values, colour to RGB) or ``"mask"`` (stored
            values unchanged; a DICOM Segmentation becomes class indices).
    """

    def __init__(self, kind: str = "image") -> None:
        super().__init__()
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
        self.kind = kind

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every name is a DICOM file (by suffix or marker), optionally with ``#frame``."""
        return all(is_dicom(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> list[tuple[object, int | None, str]]:
        """Read each file's dataset (pixels decoded later, one frame only): ``[(dataset, frame, file)]``."""
        out = []
        for name in ensure_tuple(data):
            file, frame = split_frame(name)
            out.append((read_dataset(file), frame, file))
        return out

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Pixels (width x height [x 3]) and non-identifying metadata of each dataset read."""
        with quiet():
            return self._get_data(img)

    def _get_data(self, img) -> tuple[np.ndarray, dict]:
        arrays: list[np.ndarray] = []
        compatible: dict = {}
        for ds, frame, file in img:
            if _is_seg(ds):
                if self.kind != "mask":
                    raise BundleInputError(f"{file} is a DICOM Segmentation (a mask), not an image: keep it with the masks.")
                arr = _seg_label_map(ds, frame, file)
            else:
                arr = _decode(ds, frame, file)
                if self.kind == "image":
                    arr = _colour(ds, arr)
                    arr = arr if arr.ndim == 3 else _grayscale(ds, arr)
            data = np.moveaxis(arr, 0, 1)  # rows x columns -> width x height, as PILReader returns
            spacing = pixel_spacing(ds)
            meta = {
                "format": "DICOM",
                "modality": str(ds.get("Modality", "")),
                "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
                "transfer_syntax": str(_transfer_syntax(ds) or ""),
                "frame": int(frame or 1),
                "number_of_frames": frame_count(ds),
                # (row, column) spacing in mm; NaN where the file gives none
                "pixel_spacing": list(spacing) if spacing else [float("nan"), float("nan")],
                "spatial_shape": np.asarray(data.shape[:2]),
                "original_channel_dim": -1 if data.ndim == 3 else float("nan"),
            }
            arrays.append(data)
            _copy_compatible_dict(meta, compatible)
        return _stack_images(arrays, compatible), compatible


def expand_frames(path: Path) -> list[str]:
    """``[str(path)]`` for a single-frame file or one frame; ``["path#1", ..., "path#F"]`` for an F-frame DICOM file."""
    if split_frame(path)[1] is not None or not is_dicom(path):
        return [str(path)]
    try:
        ds = read_header(path)
    except Exception:  # unreadable: listed as it is, so the data check reports it
        return [str(path)]
    if _is_seg(ds):
        return [str(path)]
    frames = frame_count(ds)
    return [str(path)] if frames == 1 else [f"{path}#{i}" for i in range(1, frames + 1)]


def seg_references(path: PathLike) -> set[tuple[str, int | None]] | None:
    """``(SOP instance UID, frame or None)`` of each image a DICOM Segmentation references; None when ``path`` is not one."""
    if not is_dicom(path):
        return None
    try:
        ds = read_header(path)
    except Exception:  # unreadable: not usable as a mask (the data check reports it if it is paired)
        return None
    if not _is_seg(ds):
        return None
    found: set[tuple[str, int | None]] = set()
    for series in ds.get("ReferencedSeriesSequence", []) or []:
        for instance in series.get("ReferencedInstanceSequence", []) or []:
            if "ReferencedSOPInstanceUID" not in instance:
                continue
            value = instance.get("ReferencedFrameNumber")
            if value is None or value == "":
                frames: list[int | None] = [None]
            elif isinstance(value, (int, float, str)):  # one number (pydicom's IS)
                frames = [int(value)]
            else:  # several (a MultiValue)
                frames = [int(v) for v in value]
            found.update((str(instance.ReferencedSOPInstanceUID), f) for f in frames)
    return found


def sop_instance_uid(path: PathLike) -> str | None:
    """The SOPInstanceUID of a DICOM file (None when it has none or cannot be read)."""
    try:
        return str(read_header(path).get("SOPInstanceUID", "")) or None
    except Exception:  # unreadable: reported by the data check
        return None
