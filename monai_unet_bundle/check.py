"""The pre-flight data check: every problem with the data and settings, found before training.

:func:`run_data_check` pairs the files, reads every image header and every mask once, plans the
settings left at ``auto`` from what it read (:mod:`monai_unet_bundle.plan`), and checks the data
against the plan.  It collects all problems (not just the first), prints a compact report and the
plan, writes both as JSON, and raises one :class:`~monai_unet_bundle.errors.BundleInputError`
listing every problem when there is any.  It runs at the start of training and evaluation (the
configs build their datalists and plan through :class:`DataCheck`) and alone as the ``check_data``
workflow id:

    python -m monai.bundle run check_data --config_file configs/train.json --dataset_dir /data/x

A report (with its plan) is reused while the files and settings are unchanged (same paths, sizes,
modification times), so a large data set is read once, not at every run, and a resumed run trains
with the plan it started with.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from monai.data import MetaTensor

from monai_unet_bundle.atomic import atomic_write_text
from monai_unet_bundle.data import DataSource, discover_datalists, fingerprint
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.folds import assign_folds, check_folds, split_fold
from monai_unet_bundle.networks import check_spatial_size
from monai_unet_bundle.plan import AUTO, DataFingerprint, class_counts, is_auto, log_plan, make_plan, mask_histogram, write_plan
from monai_unet_bundle.readers import NIFTI_SUFFIXES, inspect_image, unreadable_reason
from monai_unet_bundle.transforms import MaskToIndex, MaskToIndexd, channel_conversion_note, mask_loader

__all__ = ["DataCheck", "checked_datalists", "run_data_check"]

logger = logging.getLogger(__name__)
REPORT_VERSION = 1
#: planned settings added since cached reports were first written: while ``auto`` they stay out of the report's key,
#: so an earlier run's cached plan (made without them, i.e. as ``auto`` then meant) is reused on resume
ADDED_SETTINGS = ("patch_training",)


def _settings_key(source: DataSource, lists: dict, settings: Mapping[str, Any], device_type: str, fixed_plan: Mapping | None) -> dict:
    """Everything a cached report depends on besides the files themselves."""
    # a setting added later is left out while auto, so that a run started before it resumes with its cached plan
    kept = {k: settings[k] for k in sorted(settings) if not (k in ADDED_SETTINGS and is_auto(settings[k]))}
    return {
        "version": REPORT_VERSION, "settings": kept, "device": device_type,
        "fixed_plan": fixed_plan, "lists": {k: [sorted(d.items()) for d in v] for k, v in lists.items()},
        "folds": [source.num_folds, source.fold, source.seed] if source.num_folds is not None else None,
    }


def _cached_report(report_file: Path | None, fingerprint_: str) -> dict | None:
    """An earlier clean report with the same fingerprint, if there is one."""
    if report_file is None or not report_file.is_file():
        return None
    try:
        cached = json.loads(report_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint_ and cached.get("ok") and cached.get("plan"):
        return cached
    return None


def _mask_height_width(raw: np.ndarray, path: str) -> tuple[int, int]:
    """(height, width) of a channel-first mask as loaded (PIL arrays are width x height)."""
    spatial = tuple(int(v) for v in raw.shape[1:])
    return spatial if path.lower().endswith(NIFTI_SUFFIXES) else spatial[::-1]


def _scan_pairs(items: Sequence[dict[str, str]], palette_to_rgb: bool, n_training: int) -> tuple[DataFingerprint, list[str]]:
    """Read every image and mask once: sizes, modes and each mask's distinct values, and every problem."""
    fp, problems = DataFingerprint(n_training=n_training), []
    load_mask = mask_loader(palette_to_rgb)
    for item in items:
        try:
            (h, w), mode = inspect_image(item["image"])
        except Exception as exc:  # any decoder failure is reported with the file
            problems.append(f"image {item['image']} cannot be read ({unreadable_reason(item['image'], exc)}): replace the file or remove it from the data.")
            continue
        fp.modes[mode] += 1
        fp.heights.append(h)
        fp.widths.append(w)
        if "label" not in item:
            continue
        try:
            raw = load_mask(item["label"])
        except Exception as exc:
            problems.append(
                f"mask {item['label']} cannot be read ({unreadable_reason(item['label'], exc)}): replace the file or remove its pair from the data."
            )
            continue
        mask_hw = _mask_height_width(raw, item["label"])
        if mask_hw != (h, w):
            problems.append(
                f"mask {item['label']} is {mask_hw[0]}x{mask_hw[1]} (height x width) but its image is {h}x{w}: "
                f"masks must have their image's size: re-export the mask at that size."
            )
            continue
        fp.masks[item["label"]] = mask_histogram(raw)
    return fp, problems


def _convert_masks(fp: DataFingerprint, to_index: MaskToIndex) -> tuple[list[str], set[float]]:
    """Run the pipeline's mask conversion on every mask's distinct values: the problems, and the raw values seen."""
    problems, raw_values = [], set()
    for name, (values, _) in list(fp.masks.items()):
        try:
            to_index(MetaTensor(torch.as_tensor(values), meta={"filename_or_obj": name}))
        except BundleInputError as exc:
            problems.append(str(exc))
            del fp.masks[name]
            continue
        if len(raw_values) <= 64:
            raw_values.update(float(v) for v in values[0].ravel()[:65])
    return problems, raw_values


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


def run_data_check(
    *,
    source: DataSource,
    settings: Mapping[str, Any],
    device: str | torch.device = "cpu",
    report_path: str | Path | None = None,
    plan_path: str | Path | None = None,
    fixed_plan: Mapping[str, Any] | None = None,
) -> tuple[dict[str, list[dict[str, str]]], dict[str, Any]]:
    """Check the data and settings, plan the ``auto`` settings, report; return the lists and the plan.

    Every problem is one sentence naming the file or setting and what to do; they are raised
    together, one per line, so the command line shows one ``error:`` line per problem.

    Args:
        source: where the pairs come from (see :class:`~monai_unet_bundle.data.DataSource`).
        settings: the settings the plan decides or checks (see :func:`~monai_unet_bundle.plan.make_plan`;
            ``allow_lossy_masks`` too); ``auto`` ones are planned from the data.
        device: the training device (the plan's pixel budgets depend on its type).
        report_path: where the JSON report goes (also the cache of the last check).
        plan_path: where the plan is written as JSON (e.g. ``logs/plan.json``).
        fixed_plan: a plan to check the data against instead of planning (evaluation uses the
            trained model's plan).

    Raises:
        BundleInputError: holding every problem found, one sentence per line.
    """
    settings = dict(settings)
    lists, problems, warnings = discover_datalists(source)
    folds: tuple[int, int] | None = None
    try:
        folds = check_folds(source.num_folds, source.fold)
    except BundleInputError as exc:
        problems.insert(0, str(exc))
    if not is_auto(settings.get("spatial_size")) and settings.get("spatial_size") is not None:
        try:
            check_spatial_size(settings["spatial_size"])
        except BundleInputError as exc:
            problems.insert(0, str(exc))
            settings["spatial_size"] = [64, 64]  # planning goes on, so that every other problem is found too
    items = [d for section in lists.values() for d in section]
    files = [d[k] for d in items for k in ("image", "label") if d.get(k)]
    device_type = torch.device(device).type
    fingerprint_ = fingerprint(files, _settings_key(source, lists, settings, device_type, fixed_plan))
    report_file = Path(report_path) if report_path else None
    if not problems:
        cached = _cached_report(report_file, fingerprint_)
        if cached is not None:
            logger.info("data check: unchanged since the last check (%s); %s", report_file, cached.get("summary", ""))
            if folds is not None:
                lists["training"], lists["validation"] = split_fold(lists["training"], cached["folds"]["assignment"], folds[1])
            _publish_plan(cached["plan"], plan_path, fixed_plan is None)
            return lists, cached["plan"]

    palette = (fixed_plan or {}).get("mask_palette", settings.get("mask_palette"))
    n_training = len(lists.get("training", []))
    if folds is not None:  # the pool: each fold trains on (K - 1) / K of it
        n_training = round(n_training * (folds[0] - 1) / folds[0])
    fp, scan_problems = _scan_pairs(items, palette is not None, n_training)
    problems += scan_problems
    plan: dict[str, Any] | None = None
    try:
        plan = dict(fixed_plan) if fixed_plan is not None else make_plan(fp, settings, device, _converter(settings))
    except BundleInputError as exc:
        problems.append(str(exc))
    frequency: dict[str, float] = {}
    raw_values: set[float] = set()
    note: str | None = None
    if plan is not None:
        to_index = _converter(settings)(plan["num_classes"], plan.get("mask_palette"), plan.get("mask_thresholds"))
        mask_problems, raw_values = _convert_masks(fp, to_index)
        problems += mask_problems
        in_channels = plan["in_channels"]
        note = channel_conversion_note(fp.modes, in_channels) if in_channels in (1, 3) and fp.modes else None
        if note:
            warnings.append(note)
        frequency = _class_frequency(class_counts(fp, to_index), plan["class_names"], warnings)
    fold_report: dict[str, Any] | None = None
    if folds is not None and not problems:
        try:
            fold_report = _deal_folds(lists, folds, source.seed, fp, to_index)
        except BundleInputError as exc:
            problems.append(str(exc))
    if fold_report is not None and plan is not None:
        deal = {k: fold_report[k] for k in ("num_folds", "fold", "seed", "deal")}
        if fixed_plan is None:
            plan["folds"] = deal  # kept beside the model, so its evaluation can tell it scores the pairs it held out
        elif fixed_plan.get("folds") != deal:
            trained = fixed_plan.get("folds")
            was = f"fold {trained['fold']} of {trained['num_folds']} (seed {trained['seed']})" if trained else "without folds"
            problems.append(
                f"the model was trained {was}, not on fold {folds[1]} of {folds[0]} as these pairs, groups and seed deal them, "
                f"so it would be scored on pairs it trained on: pass the --num_folds, --fold, --seed and --group_pattern "
                f"it was trained with, on the same data."
            )
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
            "min_height_width": [min(fp.heights), min(fp.widths)] if fp.heights else None,
            "max_height_width": [max(fp.heights), max(fp.widths)] if fp.heights else None,
        },
        "channel_mix": dict(fp.modes),
        "channel_conversion": note,
        "mask_values": sorted(raw_values)[:64],
        "class_pixel_frequency": frequency,
        "spatial_size": plan["spatial_size"] if plan else settings.get("spatial_size"),
        "plan": plan,
        "folds": fold_report,
        "fingerprint": fingerprint_,
    }
    if report_file is not None:
        atomic_write_text(report_file, json.dumps(report, indent=2) + "\n")
    _log_report(report, warnings)
    if problems:
        where = f"; the report is in {report_file}" if report_file else ""
        logger.error("data check: %d problem(s) found%s", len(problems), where)
        raise BundleInputError("\n".join(problems))
    assert plan is not None
    _publish_plan(plan, plan_path, fixed_plan is None)
    return lists, plan


def _deal_folds(lists: dict[str, list[dict[str, str]]], folds: tuple[int, int], seed: int, fp: DataFingerprint, to_index: MaskToIndex) -> dict[str, Any]:
    """Deal the pooled training pairs into folds (balanced by the classes present in each mask); keep fold ``folds[1]``
    as the validation list; return the report's ``folds`` entry (the deal, and each fold's pairs and groups)."""
    num_folds, fold = folds
    pool = lists["training"]
    presence = {
        d["label"]: frozenset(int(c) for c in np.flatnonzero(class_counts(fp, to_index, [d["label"]])[1:]) + 1)
        for d in pool if d.get("label")
    }
    assignment = assign_folds(pool, num_folds, seed, presence)
    digest = hashlib.sha256(json.dumps(sorted((Path(i).name, f) for i, f in assignment.items())).encode()).hexdigest()[:16]
    lists["training"], lists["validation"] = split_fold(pool, assignment, fold)
    sizes = Counter(assignment.values())
    groups = {f: len({d.get("group") or d["image"] for d in pool if assignment[d["image"]] == f}) for f in range(num_folds)}
    logger.info("data check: fold %d of %d validates on %d pairs; pairs per fold %s", fold, num_folds, len(lists["validation"]),
                [sizes[f] for f in range(num_folds)])
    return {"num_folds": num_folds, "fold": fold, "seed": seed, "deal": digest, "pairs_per_fold": [sizes[f] for f in range(num_folds)],
            "groups_per_fold": [groups[f] for f in range(num_folds)], "assignment": assignment}


def _converter(settings: Mapping[str, Any]):
    """``(num_classes, palette, thresholds) -> MaskToIndex`` with the settings' lossy-mask policy."""
    allow_lossy = settings.get("allow_lossy_masks", False)
    return lambda k, palette, thresholds: MaskToIndex(k, palette, thresholds, allow_lossy)


def _publish_plan(plan: Mapping[str, Any], plan_path: str | Path | None, planned: bool) -> None:
    """Print the plan and write it to ``plan_path`` (rank 0 writes)."""
    if not planned:
        return
    log_plan(plan)
    if plan_path and idist.get_rank() == 0:
        write_plan(plan, plan_path)


class DataCheck:
    """The data check as a config component: :func:`run_data_check` once, its ``lists`` and ``plan`` kept.

    The configs read ``@data_check.lists`` as the datalists and ``@data_check.plan`` for every
    planned setting.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.lists, self.plan = run_data_check(**kwargs)


def checked_datalists(
    *,
    source: DataSource,
    num_classes: int | str,
    spatial_size: Sequence[int] | str,
    mask_to_index: MaskToIndex | MaskToIndexd | None = None,
    report_path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    in_channels: int | str | None = None,
) -> dict[str, list[dict[str, str]]]:
    """The data check with the mask conversion given explicitly; returns the ``training``/``validation``/``test`` lists.

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
    to_index = getattr(mask_to_index, "converter", mask_to_index)
    settings = {
        "num_classes": num_classes, "spatial_size": spatial_size, "in_channels": in_channels if in_channels is not None else AUTO,
        "class_names": list(class_names) if class_names and not is_auto(num_classes) and len(class_names) == num_classes else None,
        "mask_palette": None if to_index is None or to_index.palette is None else to_index.palette.tolist(),
        "mask_thresholds": None if to_index is None or to_index.thresholds is None else to_index.thresholds.tolist(),
        "allow_lossy_masks": False if to_index is None else to_index.allow_lossy,
        "batch_size": AUTO, "normalization": AUTO, "class_weights": None, "loss_name": "dice_ce",
    }
    return run_data_check(source=source, settings=settings, report_path=report_path)[0]
