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
from pathlib import Path

import numpy as np

from monai_unet_bundle.atomic import atomic_write_text
from monai_unet_bundle.data import discover_datalists, fingerprint
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.networks import check_spatial_size
from monai_unet_bundle.readers import NIFTI_SUFFIXES, inspect_image
from monai_unet_bundle.transforms import MaskToIndexd, channel_conversion_note, mask_loader

__all__ = ["checked_datalists"]

logger = logging.getLogger(__name__)
REPORT_VERSION = 1


def checked_datalists(
    dataset_dir: str | Path,
    datalist: str | Path | None,
    val_fraction: float,
    seed: int,
    mask_suffix: str,
    val_dataset_dir: str | Path | None,
    num_classes: int,
    spatial_size: Sequence[int],
    mask_to_index: MaskToIndexd | None = None,
    report_path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    in_channels: int | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Check the data and settings, report, and return the ``training``/``validation``/``test`` lists.

    Every problem is one sentence naming the file or setting and what to do; they are raised
    together, one per line, so the command line shows one ``error:`` line per problem.

    Args:
        dataset_dir, datalist, val_fraction, seed, mask_suffix, val_dataset_dir: as for
            :func:`monai_unet_bundle.data.discover_datalists`.
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
    lists, problems, warnings = discover_datalists(dataset_dir, datalist, val_fraction, seed, mask_suffix, val_dataset_dir)
    try:
        check_spatial_size(spatial_size)
    except BundleInputError as exc:
        problems.insert(0, str(exc))
    to_index = mask_to_index or MaskToIndexd("label", num_classes)
    items = [d for section in lists.values() for d in section]
    settings = {
        "version": REPORT_VERSION, "num_classes": num_classes, "spatial_size": list(spatial_size),
        "palette": None if to_index.palette is None else to_index.palette.tolist(),
        "thresholds": None if to_index.thresholds is None else to_index.thresholds.tolist(),
        "allow_lossy": to_index.allow_lossy, "in_channels": in_channels, "lists": {k: [sorted(d.items()) for d in v] for k, v in lists.items()},
    }
    fingerprint_ = fingerprint([f for d in items for f in d.values()], settings)
    report_file = Path(report_path) if report_path else None
    if not problems and report_file is not None and report_file.is_file():
        try:
            cached = json.loads(report_file.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        if cached.get("fingerprint") == fingerprint_ and cached.get("ok"):
            logger.info("data check: unchanged since the last check (%s); %s", report_file, cached.get("summary", ""))
            return lists

    load_mask = mask_loader(to_index.palette is not None)
    modes: Counter[str] = Counter()
    heights, widths = [], []
    raw_values: set[float] = set()
    counts = np.zeros(num_classes, dtype=np.int64)
    for item in items:
        try:
            (h, w), mode = inspect_image(item["image"])
            modes[mode] += 1
            heights.append(h)
            widths.append(w)
        except Exception as exc:  # any decoder failure is reported with the file
            problems.append(f"image {item['image']} cannot be read ({type(exc).__name__}: {exc}): replace the file or remove it from the data.")
            continue
        if "label" not in item:
            continue
        try:
            raw = load_mask(item["label"])
            index = to_index.convert(raw)
        except BundleInputError as exc:
            problems.append(str(exc))
            continue
        except Exception as exc:
            problems.append(f"mask {item['label']} cannot be read ({type(exc).__name__}: {exc}): replace the file or remove its pair from the data.")
            continue
        mask_hw = tuple(int(s) for s in raw.shape[1:][::-1]) if not item["label"].lower().endswith(NIFTI_SUFFIXES) else tuple(int(s) for s in raw.shape[1:])
        if mask_hw != (h, w):
            problems.append(f"mask {item['label']} is {mask_hw[0]}x{mask_hw[1]} (height x width) but its image is {h}x{w}: masks must have their image's size: re-export the mask at that size.")
            continue
        if len(raw_values) <= 64:
            vals = np.unique(np.asarray(raw[:1]))
            raw_values.update(float(v) for v in vals[:65])
        counts += np.bincount(np.asarray(index, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes]

    note = channel_conversion_note(modes, in_channels) if in_channels in (1, 3) and modes else None
    if note:
        warnings.append(note)
    names = list(class_names) if class_names and len(class_names) == num_classes else [f"class_{i}" for i in range(num_classes)]
    total = int(counts.sum())
    frequency = {n: round(float(c) / total, 6) if total else 0.0 for n, c in zip(names, counts)}
    for n, c in zip(names[1:], counts[1:]):
        if total and c == 0:
            warnings.append(f"class {n!r} never occurs in the masks: check num_classes and the mask encoding.")
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
        "dataset_dir": str(dataset_dir),
        "datalist": str(datalist) if datalist else None,
        "counts": {k: len(v) for k, v in lists.items()},
        "image_size": {
            "min_height_width": [min(heights), min(widths)] if heights else None,
            "max_height_width": [max(heights), max(widths)] if heights else None,
        },
        "channel_mix": dict(modes),
        "channel_conversion": note,
        "mask_values": sorted(raw_values)[:64],
        "class_pixel_frequency": frequency,
        "spatial_size": list(spatial_size),
        "fingerprint": fingerprint_,
    }
    if report_file is not None:
        atomic_write_text(report_file, json.dumps(report, indent=2) + "\n")
    logger.info("data check: %s; image sizes %s to %s (height x width); channels %s", summary,
                report["image_size"]["min_height_width"], report["image_size"]["max_height_width"], dict(modes))
    logger.info("data check: mask values %s; class pixel frequency %s", report["mask_values"][:16], frequency)
    for warning in warnings:
        logger.warning("data check: %s", warning)
    if problems:
        where = f"; the report is in {report_file}" if report_file else ""
        logger.error("data check: %d problem(s) found%s", len(problems), where)
        raise BundleInputError("\n".join(problems))
    return lists
