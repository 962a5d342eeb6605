"""The pre-flight data check: every problem with the data and settings, found before training.

:func:`checked_datalists` pairs the files, reads every image header and every mask, and checks the
settings against the data.  It collects all problems (not just the first), prints a compact
report, writes it as JSON, and raises one :class:`~monai_unet_bundle.errors.BundleInputError`
listing every problem when there is any.  It runs at the start of training and evaluation (the
configs build their datalists through it) and alone as the ``check_data`` workflow id:

    python -m monai.bundle run check_data --config_file configs/train.json --dataset_dir /data/x

A report is reused while the files and settings are unchanged (same paths, sizes, modification
times), so a large data set is read once, not at every run.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monai_unet_bundle.atomic import atomic_write_text
from monai_unet_bundle.data import DataSource, discover_datalists, fingerprint
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.networks import check_spatial_size
from monai_unet_bundle.readers import NIFTI_SUFFIXES, inspect_image, unreadable_reason
from monai_unet_bundle.transforms import MaskToIndex, MaskToIndexd, channel_conversion_note, mask_loader

__all__ = ["checked_datalists"]

logger = logging.getLogger(__name__)
REPORT_VERSION = 1


@dataclass
class _Scan:
    """What reading every image and mask found."""

    modes: Counter = field(default_factory=Counter)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    raw_values: set[float] = field(default_factory=set)
    counts: np.ndarray | None = None
    problems: list[str] = field(default_factory=list)


def _settings_key(source: DataSource, lists: dict, to_index: MaskToIndex, spatial_size: Sequence[int], in_channels: int | None) -> dict:
    """Everything a cached report depends on besides the files themselves."""
    return {
        "version": REPORT_VERSION, "num_classes": to_index.num_classes, "spatial_size": list(spatial_size),
        "palette": None if to_index.palette is None else to_index.palette.tolist(),
        "thresholds": None if to_index.thresholds is None else to_index.thresholds.tolist(),
        "allow_lossy": to_index.allow_lossy, "in_channels": in_channels,
        "lists": {k: [sorted(d.items()) for d in v] for k, v in lists.items()},
    }


def _cached_summary(report_file: Path | None, fingerprint_: str) -> str | None:
    """The summary of an earlier clean report with the same fingerprint, if there is one."""
    if report_file is None or not report_file.is_file():
        return None
    try:
        cached = json.loads(report_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint_ and cached.get("ok"):
        return str(cached.get("summary", ""))
    return None


def _mask_height_width(raw: np.ndarray, path: str) -> tuple[int, int]:
    """(height, width) of a channel-first mask as loaded (PIL arrays are width x height)."""
    spatial = tuple(int(v) for v in raw.shape[1:])
    return spatial if path.lower().endswith(NIFTI_SUFFIXES) else spatial[::-1]


def _scan_pairs(items: Sequence[dict[str, str]], to_index: MaskToIndex) -> _Scan:
    """Read every image and mask: sizes, modes, mask values and class pixel counts, and every problem."""
    scan = _Scan(counts=np.zeros(to_index.num_classes, dtype=np.int64))
    load_mask = mask_loader(to_index.palette is not None)
    for item in items:
        try:
            (h, w), mode = inspect_image(item["image"])
        except Exception as exc:  # any decoder failure is reported with the file
            scan.problems.append(f"image {item['image']} cannot be read ({unreadable_reason(item['image'], exc)}): replace the file or remove it from the data.")
            continue
        scan.modes[mode] += 1
        scan.heights.append(h)
        scan.widths.append(w)
        if "label" not in item:
            continue
        try:
            raw = load_mask(item["label"])
            index = to_index(raw)
        except BundleInputError as exc:
            scan.problems.append(str(exc))
            continue
        except Exception as exc:
            scan.problems.append(
                f"mask {item['label']} cannot be read ({unreadable_reason(item['label'], exc)}): replace the file or remove its pair from the data."
            )
            continue
        mask_hw = _mask_height_width(raw, item["label"])
        if mask_hw != (h, w):
            scan.problems.append(
                f"mask {item['label']} is {mask_hw[0]}x{mask_hw[1]} (height x width) but its image is {h}x{w}: "
                f"masks must have their image's size: re-export the mask at that size."
            )
            continue
        if len(scan.raw_values) <= 64:
            scan.raw_values.update(float(v) for v in np.unique(np.asarray(raw[:1]))[:65])
        scan.counts += np.bincount(np.asarray(index, dtype=np.int64).ravel(), minlength=to_index.num_classes)[: to_index.num_classes]
    return scan


def _class_frequency(counts: np.ndarray, names: Sequence[str], warnings: list[str]) -> dict[str, float]:
    """Pixel share of each class; warns about foreground classes that never occur."""
    total = int(counts.sum())
    for name, count in zip(names[1:], counts[1:]):
        if total and count == 0:
            warnings.append(f"class {name!r} never occurs in the masks: check num_classes and the mask encoding.")
    return {n: round(float(c) / total, 6) if total else 0.0 for n, c in zip(names, counts)}


def _log_report(report: dict, warnings: Sequence[str]) -> None:
    size = report["image_size"]
    logger.info("data check: %s; image sizes %s to %s (height x width); channels %s", report["summary"],
                size["min_height_width"], size["max_height_width"], report["channel_mix"])
    logger.info("data check: mask values %s; class pixel frequency %s", report["mask_values"][:16], report["class_pixel_frequency"])
    for warning in warnings:
        logger.warning("data check: %s", warning)


def checked_datalists(
    *,
    source: DataSource,
    num_classes: int,
    spatial_size: Sequence[int],
    mask_to_index: MaskToIndex | MaskToIndexd | None = None,
    report_path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    in_channels: int | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Check the data and settings, report, and return the ``training``/``validation``/``test`` lists.

    Every problem is one sentence naming the file or setting and what to do; they are raised
    together, one per line, so the command line shows one ``error:`` line per problem.

    Args:
        source: where the pairs come from (see :class:`~monai_unet_bundle.data.DataSource`).
        num_classes: classes including background.
        spatial_size: the network input size, checked against the U-Net's stride.
        mask_to_index: the mask conversion the pipeline uses (palette, thresholds, lossy policy).
        report_path: where the JSON report goes (also the cache of the last check).
        class_names: names for the class frequencies in the report.
        in_channels: the network's input channels; images of another channel count are
            converted, and the report says which and how (once, as a warning).

    Raises:
        BundleInputError: holding every problem found, one sentence per line.
    """
    lists, problems, warnings = discover_datalists(source)
    try:
        check_spatial_size(spatial_size)
    except BundleInputError as exc:
        problems.insert(0, str(exc))
    to_index = getattr(mask_to_index, "converter", mask_to_index) or MaskToIndex(num_classes)
    items = [d for section in lists.values() for d in section]
    files = [d[k] for d in items for k in ("image", "label") if d.get(k)]
    fingerprint_ = fingerprint(files, _settings_key(source, lists, to_index, spatial_size, in_channels))
    report_file = Path(report_path) if report_path else None
    if not problems:
        cached = _cached_summary(report_file, fingerprint_)
        if cached is not None:
            logger.info("data check: unchanged since the last check (%s); %s", report_file, cached)
            return lists

    scan = _scan_pairs(items, to_index)
    problems += scan.problems
    note = channel_conversion_note(scan.modes, in_channels) if in_channels in (1, 3) and scan.modes else None
    if note:
        warnings.append(note)
    names = list(class_names) if class_names and len(class_names) == num_classes else [f"class_{i}" for i in range(num_classes)]
    frequency = _class_frequency(scan.counts, names, warnings)
    summary = (
        f"{len(lists.get('training', []))} training, {len(lists.get('validation', []))} validation"
        + (f", {len(lists['test'])} test" if lists.get("test") else "")
        + " pairs"
    )
    report = {
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "summary": summary,
        "dataset_dir": str(source.dataset_dir),
        "datalist": str(source.datalist) if source.datalist else None,
        "counts": {k: len(v) for k, v in lists.items()},
        # groups (patients) keep their images on one side of the split; DICOM groups are hashes, never the identifier
        "groups": len({d.get("group") or d["image"] for d in items}),
        "image_size": {
            "min_height_width": [min(scan.heights), min(scan.widths)] if scan.heights else None,
            "max_height_width": [max(scan.heights), max(scan.widths)] if scan.heights else None,
        },
        "channel_mix": dict(scan.modes),
        "channel_conversion": note,
        "mask_values": sorted(scan.raw_values)[:64],
        "class_pixel_frequency": frequency,
        "spatial_size": list(spatial_size),
        "fingerprint": fingerprint_,
    }
    if report_file is not None:
        atomic_write_text(report_file, json.dumps(report, indent=2) + "\n")
    _log_report(report, warnings)
    if problems:
        where = f"; the report is in {report_file}" if report_file else ""
        logger.error("data check: %d problem(s) found%s", len(problems), where)
        raise BundleInputError("\n".join(problems))
    return lists
