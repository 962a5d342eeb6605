"""The plan: the settings a user would otherwise pick by hand, derived from the data when they are ``auto``.

The data check reads every image and mask once; from what it finds (:class:`DataFingerprint`),
:func:`make_plan` decides, for each of these settings left at ``auto`` (the default):

* ``num_classes`` and the mask encoding: 0/1 or 0/255 masks are binary; masks of small whole
  numbers are class indices (``max + 1`` classes); a few evenly spread gray levels (0, 128, 255)
  become classes through thresholds half way between them; colour masks get a palette of the
  colours found, black first;
* ``class_names``: ``background, foreground`` or ``background, class_1, ...``;
* ``in_channels``: 3 when any image is in colour, else 1;
* ``spatial_size``: the median image's aspect ratio kept, each side a multiple of the U-Net's stride,
  within a pixel budget for the device (about 256x256 on a CPU, 512x512 on a GPU; on a CPU with a
  short ``time_budget_minutes``, smaller, so that the budget still buys 50 epochs, down to 128 pixels on
  the longer side) and never
  larger than the median image (beyond rounding to the stride grid);
* ``batch_size``: what fits that size on the device;
* ``patch_training``: whole images resized to ``spatial_size``, or, when resizing the median image into
  the device's pixel budget would shrink each side to less than half (images larger than about 512x512
  on a CPU, 1024x1024 on a GPU), patches of ``spatial_size`` cut at the images' own resolution, half of
  them centred on foreground; validation, evaluation and inference then run sliding windows of that
  size over whole images at their own resolution (inference's ``sliding_window auto``);
* ``normalization``: 8-bit images (photographs, PNG/JPEG masks' images) are divided by 255; 16-bit,
  float, NIfTI and grayscale DICOM images get a per-image z-score after clipping to their 0.5 and
  99.5 percentiles;
* ``class_weights``: square-root inverse pixel frequency when the rarest foreground class covers
  less than 1% of the pixels, else none (the Dice term already balances classes).

Every item stays overridable by its own setting (a value other than ``auto`` wins and is recorded
as ``set``).  Training prints the plan, writes it to ``logs/plan.json`` and, with every saved
model, to ``plan.json`` beside ``model.pt``; evaluation and inference read it from there
(:func:`saved_plan`), so nothing needs repeating on their command lines.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_unet_bundle.atomic import atomic_write_text
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.metrics import default_class_names
from monai_unet_bundle.networks import TOTAL_STRIDE, check_spatial_size
from monai_unet_bundle.settings import flag, is_auto
from monai_unet_bundle.transforms import mode_channels

__all__ = [
    "AUTO", "NORMALIZATIONS", "PLAN_FILE", "DataFingerprint", "image_depth", "make_plan", "mask_histogram", "plan_path_for",
    "saved_plan", "write_plan",
]

logger = logging.getLogger(__name__)

AUTO = "auto"
PLAN_FILE = "plan.json"
PLAN_VERSION = 1

#: ``normalization`` setting -> what it does to each image
NORMALIZATIONS = {
    "unit": "divide by 255 (8-bit images to [0, 1])",
    "percentile": "per image: clip to the 0.5 and 99.5 percentiles, then stretch that range to [0, 1]",
    "zscore": "per image: clip to the 0.5 and 99.5 percentiles, then zero mean and unit standard deviation",
    "minmax": "per image: stretch the darkest pixel to 0 and the brightest to 1",
}

#: pixels per network input the plan aims for, by device type (about 256x256 on a CPU, 512x512 on a GPU)
PIXEL_BUDGET = {"cpu": 256 * 256, "cuda": 512 * 512}
#: training pixels per second per CPU thread of the classic U-Net (base_features 16), measured on the
#: 2-core machine this was built on (about 180k pixels per second with 2 threads, data loading included)
CPU_PIXELS_PER_SECOND_PER_THREAD = 90_000
#: epochs a time budget should buy at the least: shorter budgets get a smaller input on a CPU (measured on 27
#: real MR/CT slices in 1.5 minutes: 256x256 trained 22 epochs to a tumour Dice of 0.10, 128x128 71 epochs to 0.57)
MIN_BUDGET_EPOCHS = 50
#: the time budget never cuts the input's longer side below this (nor an image's own size): finer detail than
#: 128 pixels across is worth more epochs than it costs
BUDGET_FLOOR_SIDE = 128
#: pixels per batch the plan fills, by device type: on a CPU a time budget buys more from many small steps
#: than from few large ones (measured: batch 12 at 144x144 trailed batch 8 at 128x128 by 0.03 Dice in a minute)
BATCH_PIXELS = {"cpu": 8 * 128 * 128, "cuda": 8 * 512 * 512}
#: the smallest batch the plan gives, by device type (batch norm needs a few images per batch)
MIN_BATCH = {"cpu": 4, "cuda": 2}
#: patch training (``patch_training auto``) when fitting the median image into the device's pixel budget would
#: scale each side by less than this: resizing would then throw away more than half of the resolution
PATCH_BELOW_SCALE = 0.5
#: patch training cuts (area of the median image / area of a patch) / this many patches per image and epoch
PATCH_AREA_SHARE_DIVISOR = 4
#: the plan's ``training`` text, by ``patch_training``
TRAINING_TEXT = {
    False: "whole images resized to spatial_size",
    True: "patches of spatial_size at the images' own resolution, half centred on foreground; sliding windows to validate and infer",
}
#: most classes the plan reads from gray levels or colours before asking for explicit settings
MAX_PLANNED_CLASSES = 32
#: the rarest foreground class's pixel share below which the plan weights the classes
RARE_CLASS_SHARE = 0.01
#: the sizes the plan never goes below (the U-Net's stride times two)
MIN_SIDE = 2 * TOTAL_STRIDE


def mask_histogram(raw: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a channel-first mask and their pixel counts.

    Returns:
        ``(values, counts)``: ``values`` is itself a tiny channel-first mask ``(1, 1, N)`` of the
        distinct gray values, or ``(3, 1, N)`` of the distinct colours when the channels differ,
        so the pipeline's own mask conversion can be run on it instead of on every pixel.
    """
    arr = np.asarray(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw)
    if arr.shape[0] > 1 and not (arr == arr[:1]).all():
        rgb = arr[:3].reshape(3, -1).astype(np.int64)
        codes, counts = np.unique((rgb[0] << 16) | (rgb[1] << 8) | rgb[2], return_counts=True)
        colours = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255])
        return colours[:, None, :].astype(np.float64), counts
    values, counts = np.unique(arr[0], return_counts=True)
    return values[None, None, :].astype(np.float64), counts


def image_depth(mode: str) -> str:
    """``"8-bit"`` for images whose pixels are bytes (Pillow's 1/L/P/RGB/... modes, uint8 NIfTI, colour
    DICOM), else ``"wide"`` (16-bit and float images, NIfTI, grayscale DICOM)."""
    if mode.startswith("NIfTI"):
        return "8-bit" if mode.endswith("uint8") else "wide"
    if mode.startswith("DICOM"):
        return "8-bit" if mode_channels(mode) == 3 else "wide"
    return "wide" if mode.split(" ")[0].startswith(("I", "F")) else "8-bit"


@dataclass
class DataFingerprint:
    """What the data check found: image sizes and modes, and each mask's distinct values."""

    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)
    #: mask file -> (values as a tiny mask, pixel counts), see :func:`mask_histogram`
    masks: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    n_training: int = 0

    def _common(self, per_mask: list[set]) -> set:
        """Values found in at least two masks (in every value when there are fewer than four masks): a value in
        one mask of many is more likely a damaged mask than a class, and the data check reports that mask."""
        seen = Counter(v for values in per_mask for v in values)
        return set(seen) if len(per_mask) < 4 else {v for v, n in seen.items() if n >= 2}

    def gray_values(self) -> set[float]:
        """The gray values the masks share (see :meth:`_common`)."""
        return self._common([{float(v) for v in values.ravel()} for values, _ in self.masks.values() if values.shape[0] == 1])

    def colours(self) -> set[tuple[int, int, int]]:
        """The colours the masks share (gray masks count as gray colours; see :meth:`_common`)."""
        per_mask = []
        for values, _ in self.masks.values():
            rgb = values if values.shape[0] == 3 else np.repeat(values, 3, axis=0)
            per_mask.append({tuple(int(c) for c in col) for col in rgb[:, 0, :].T})
        return self._common(per_mask)


# ------------------------------------------------------------------------------------------------ single items


def plan_classes(fp: DataFingerprint, settings: Mapping[str, Any]) -> tuple[int, Any, Any, str]:
    """``(num_classes, mask_palette, mask_thresholds, why)`` from the masks, unless set.

    Raises:
        BundleInputError: when the masks' values do not say how many classes there are.
    """
    num_classes, palette, thresholds = settings.get("num_classes"), settings.get("mask_palette"), settings.get("mask_thresholds")
    if not is_auto(num_classes):
        return num_classes, palette, thresholds, "set"
    if palette is not None:
        return len(palette), palette, None, f"one class per mask_palette colour ({len(palette)})"
    if thresholds is not None:
        return len(thresholds) + 1, None, thresholds, f"mask_thresholds cut {len(thresholds) + 1} classes"
    if not fp.masks:
        return 2, None, None, "no masks to read: binary"
    if any(values.shape[0] == 3 for values, _ in fp.masks.values()):
        colours = sorted(fp.colours(), key=lambda c: (c != (0, 0, 0), c))
        if len(colours) > MAX_PLANNED_CLASSES:
            raise BundleInputError(
                f"num_classes is auto but the colour masks hold {len(colours)} colours, too many to be class colours: "
                f"pass --num_classes and --mask_palette with one colour per class."
            )
        shown = ", ".join(str(list(c)) for c in colours)
        return len(colours), [list(c) for c in colours], None, f"colour masks: one class per colour found ({shown}), black first"
    values = sorted(fp.gray_values())
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (" ..." if len(values) > 8 else "")
    if any(v < 0 or not float(v).is_integer() for v in values):
        raise BundleInputError(
            f"num_classes is auto but the masks hold values {shown}, which are not class indices: save masks as "
            f"whole numbers 0..K-1, or pass --num_classes with --mask_thresholds."
        )
    if set(values) <= {0.0, 1.0} or set(values) <= {0.0, 255.0}:
        return 2, None, None, f"binary masks (values {shown})"
    top = int(values[-1])
    if top < MAX_PLANNED_CLASSES:
        return top + 1, None, None, f"class-index masks (values {shown}): {top + 1} classes"
    gaps = np.diff(values)
    if 1 < len(values) <= MAX_PLANNED_CLASSES and gaps.max() <= 2 * gaps.min():
        cuts = [(a + b) / 2 for a, b in zip(values, values[1:])]
        return len(values), None, cuts, f"{len(values)} evenly spread gray levels ({shown}) read as classes 0..{len(values) - 1} in that order"
    if {0.0, 255.0} <= set(values):  # 0/255 masks, some holding stray values: the data check names those files
        return 2, None, None, f"binary masks (values 0 and 255; other values {shown} are reported per file)"
    raise BundleInputError(
        f"num_classes is auto but the masks hold {len(values)} distinct values ({shown}), which are neither class indices, "
        f"nor 0/255, nor a few evenly spread gray levels: "
        f"pass --num_classes with --mask_thresholds, or save masks as class indices."
    )


def plan_channels(fp: DataFingerprint, setting: Any) -> tuple[int, str]:
    """``(in_channels, why)``: 3 when any image is in colour."""
    if not is_auto(setting):
        return setting, "set"
    colour = sum(n for m, n in fp.modes.items() if mode_channels(m) == 3)
    if colour:
        return 3, f"{colour} of {sum(fp.modes.values())} images are in colour"
    return 1, "every image is grayscale"


def _input_square(input_size: Any) -> list[int]:
    """``[input_size, input_size]``, checked on the stride grid."""
    try:
        side = int(input_size)
    except (TypeError, ValueError):
        raise BundleInputError(f"input_size must be auto or a whole number such as 256, got {input_size!r}.") from None
    return check_spatial_size([side, side])


def _stride_multiple(value: float) -> int:
    return max(MIN_SIDE, int(round(value / TOTAL_STRIDE)) * TOTAL_STRIDE)


def pixel_budget(device_type: str, minutes: Any = None, n_training: int = 0) -> tuple[int, str]:
    """Pixels per network input: the device's budget, cut on a CPU so that a time budget still buys
    :data:`MIN_BUDGET_EPOCHS` epochs at the expected training speed (threads times
    :data:`CPU_PIXELS_PER_SECOND_PER_THREAD`)."""
    budget = PIXEL_BUDGET.get(device_type, PIXEL_BUDGET["cpu"])
    if device_type != "cpu" or not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0 or not n_training:
        return budget, f"the {device_type} budget of {budget} pixels"
    rate = CPU_PIXELS_PER_SECOND_PER_THREAD * max(1, torch.get_num_threads())
    affordable = int(rate * minutes * 60 / (MIN_BUDGET_EPOCHS * n_training))
    if affordable >= budget:
        return budget, f"the {device_type} budget of {budget} pixels"
    return affordable, f"{affordable} pixels, so that {minutes:g} minutes buy {MIN_BUDGET_EPOCHS} epochs of {n_training} images on this CPU"


def plan_size(
    fp: DataFingerprint, spatial_size: Any, input_size: Any, device_type: str, minutes: Any = None
) -> tuple[list[int], str]:
    """``(spatial_size, why)``: the median image's shape, scaled into the pixel budget (see :func:`pixel_budget`)."""
    if not is_auto(spatial_size):  # a size given on the command line wins over the displayable input_size
        return check_spatial_size(spatial_size), "set"
    if input_size is not None and not is_auto(input_size):
        return _input_square(input_size), "input_size"
    if not fp.heights:
        return [256, 256], "no images to read"
    height, width = float(np.median(fp.heights)), float(np.median(fp.widths))
    budget, budget_why = pixel_budget(device_type, minutes, fp.n_training)
    floor = min(BUDGET_FLOOR_SIDE, max(height, width)) ** 2 * min(height, width) / max(height, width)
    if budget < floor:  # the time budget's cut stops at a longer side of BUDGET_FLOOR_SIDE
        budget, budget_why = int(floor), f"{budget_why}, but no smaller than {BUDGET_FLOOR_SIDE} pixels on the longer side"
    scale = min(1.0, math.sqrt(budget / (height * width)))
    size = [_stride_multiple(height * scale), _stride_multiple(width * scale)]
    while size[0] * size[1] > budget * 1.15 and max(size) > MIN_SIDE:  # rounding up must not blow the budget
        i = int(size[1] > size[0])
        size[i] -= TOTAL_STRIDE
    why = f"median image {height:g}x{width:g} (height x width)"
    why += f", scaled by {scale:.2f} into {budget_why}" if scale < 1 else ", within the pixel budget"
    return size, why


def plan_patch(fp: DataFingerprint, setting: Any, size_setting: Any, device_type: str) -> tuple[bool, str]:
    """``(patch_training, why)``: patches at the images' own resolution when the median image is too large to
    resize into the device's pixel budget without losing more than half of each side (:data:`PATCH_BELOW_SCALE`).

    With ``spatial_size`` or ``input_size`` set and ``patch_training`` auto, whole images are resized to it,
    as that setting always meant.
    """
    if not is_auto(setting):
        return flag(setting, "patch_training"), "set"
    if size_setting is not None:
        return False, "spatial_size set: whole images resized to it"
    if not fp.heights:
        return False, "no images to read"
    height, width = float(np.median(fp.heights)), float(np.median(fp.widths))
    budget = PIXEL_BUDGET.get(device_type, PIXEL_BUDGET["cpu"])
    scale = math.sqrt(budget / (height * width))
    if scale < PATCH_BELOW_SCALE:
        return True, (f"resizing the median image {height:g}x{width:g} into the {device_type} budget of {budget} pixels would "
                      f"scale it by {scale:.2f}: patches at its own resolution instead")
    return False, f"the median image {height:g}x{width:g} resizes into the {device_type} budget at a scale of {min(1.0, scale):.2f}"


def plan_patches_per_image(patches: bool, fp: DataFingerprint, size: Sequence[int], batch: int) -> tuple[int, str]:
    """``(patches_per_image, why)``: patches cut from each image per epoch (1 without patch training).

    One patch per image would make an epoch a sliver of a large image's pixels while validation still covers whole
    images; so a quarter of the median image's area in patches, at most half the batch (each batch then holds
    patches of at least two images, which batch norm needs), and the batch takes ``batch_size // patches`` images.
    """
    if not patches or not fp.heights:
        return 1, "whole images" if not patches else "no images to read"
    area = float(np.median(fp.heights)) * float(np.median(fp.widths)) / (size[0] * size[1])
    count = int(min(max(1, batch // 2), max(1, round(area / PATCH_AREA_SHARE_DIVISOR))))
    return count, (f"the median image holds {area:.1f} patches' area: {count} per image and epoch, "
                   f"{batch // count} image(s) per batch of {batch}")


def plan_batch(size: Sequence[int], setting: Any, device_type: str, n_training: int) -> tuple[int, str]:
    """``(batch_size, why)``: as many images of ``size`` as the device's batch pixels hold (4 on a CPU or 2 on a GPU, to 32)."""
    if not is_auto(setting):
        return setting, "set"
    pixels = BATCH_PIXELS.get(device_type, BATCH_PIXELS["cpu"])
    batch = int(min(32, max(MIN_BATCH.get(device_type, 2), pixels // (size[0] * size[1]))))
    if n_training:
        batch = max(1, min(batch, n_training))
    return batch, f"{pixels} pixels per batch on {device_type}"


def plan_normalization(fp: DataFingerprint, setting: Any) -> tuple[str, str]:
    """``(normalization, why)``: ``unit`` when every image is 8-bit, else ``percentile``.

    ``percentile`` rather than ``zscore`` for wide data, as measured: on the MNI152 slices (float
    NIfTI) the planned bundle reached 0.777 test Dice with a [0, 1] stretch against 0.714 with the
    z-score in the same minute (``scripts/benchmark_accuracy.py``; README, Accuracy at equal wall time).
    """
    if not is_auto(setting):
        return str(setting), "set"
    depths = Counter(image_depth(m) for m in fp.modes.elements())
    if depths.get("wide"):
        return "percentile", f"{depths['wide']} image(s) are 16-bit, float, NIfTI or grayscale DICOM"
    return "unit", "every image is 8-bit"


def class_counts(fp: DataFingerprint, to_index: Any, files: Sequence[str] | None = None) -> np.ndarray:
    """Pixels per class over the masks (all, or ``files``), converted by the pipeline's ``to_index``.

    Masks the conversion refuses are left out (the data check reports them).
    """
    from monai.data import MetaTensor

    counts = np.zeros(to_index.num_classes, dtype=np.int64)
    for name in files if files is not None else fp.masks:
        if name not in fp.masks:
            continue
        values, n = fp.masks[name]
        try:
            index = np.asarray(to_index(MetaTensor(torch.as_tensor(values), meta={"filename_or_obj": name})), dtype=np.int64).ravel()
        except BundleInputError:
            continue
        counts += np.bincount(index, weights=n, minlength=to_index.num_classes)[: to_index.num_classes].astype(np.int64)
    return counts


def plan_class_weights(counts: np.ndarray, setting: Any, loss_name: str) -> tuple[Any, str]:
    """``(class_weights, why)``: ``None``, or square-root inverse frequency when a foreground class is rare."""
    if not is_auto(setting):
        return setting, "set"
    if loss_name == "weighted_ce":
        return "inverse_frequency", "loss_name weighted_ce weights by inverse pixel frequency"
    if loss_name == "mse":
        return None, "loss_name mse takes no weights"
    total = counts.sum()
    share = counts[1:] / total if total else np.zeros(len(counts) - 1)
    present = share[share > 0]
    if not present.size or present.min() >= RARE_CLASS_SHARE:
        return None, "no foreground class below 1% of the pixels"
    w = np.zeros(len(counts))
    w[counts > 0] = np.sqrt(total / counts[counts > 0])
    w = w * (len(w) / w.sum())
    return [round(float(v), 4) for v in w], f"the rarest foreground class covers {present.min():.2%} of the pixels"


# ------------------------------------------------------------------------------------------------ the plan


def mirrored(settings: Mapping[str, Any]) -> bool:
    """Whether training flips the images (:func:`~monai_unet_bundle.augment.flips` of the settings' ``augmentation``
    and ``mirror``): inference's ``tta auto`` averages over flips only for such a model."""
    from monai_unet_bundle.augment import flips

    return flips(settings.get("augmentation", "light"), settings.get("mirror", True))


def make_plan(fp: DataFingerprint, settings: Mapping[str, Any], device: str | torch.device, to_index_factory: Any) -> dict[str, Any]:
    """Decide every ``auto`` setting from the fingerprint; the explicit ones are kept as given.

    Args:
        fp: what the data check read.
        settings: the user's settings (``num_classes``, ``in_channels``, ``spatial_size``,
            ``input_size``, ``batch_size``, ``normalization``, ``class_weights``, ``class_names``,
            ``loss_name``, ``mask_palette``, ``mask_thresholds``).
        device: the training device (its type picks the pixel budgets).
        to_index_factory: ``(num_classes, palette, thresholds) -> converter``, the pipeline's mask
            conversion, used to count class pixels.

    Returns:
        the plan: each setting's value, plus ``why`` (item -> reason, ``"set"`` when given) and a
        summary of the data it was made from.

    Raises:
        BundleInputError: when an ``auto`` setting cannot be derived, or the class names do not fit.
    """
    device_type = torch.device(device).type
    why: dict[str, str] = {}
    num_classes, palette, thresholds, why["num_classes"] = plan_classes(fp, settings)
    names = settings.get("class_names")
    if names is None or is_auto(names):
        names, why["class_names"] = default_class_names(num_classes), "default names"
    else:
        names, why["class_names"] = list(names), "set"
        if len(names) != num_classes:
            raise BundleInputError(
                f"class_names lists {len(names)} names but there are {num_classes} classes ({_why_text(why['num_classes'])}): "
                f"pass --class_names with {num_classes} names, background first."
            )
    in_channels, why["in_channels"] = plan_channels(fp, settings.get("in_channels"))
    size, why["spatial_size"] = plan_size(
        fp, settings.get("spatial_size"), settings.get("input_size"), device_type, settings.get("time_budget_minutes")
    )
    batch, why["batch_size"] = plan_batch(size, settings.get("batch_size"), device_type, fp.n_training)
    given = [settings.get(k) for k in ("spatial_size", "input_size")]
    size_given = next((v for v in given if v is not None and not is_auto(v)), None)
    patches, why["patch_training"] = plan_patch(fp, settings.get("patch_training", AUTO), size_given, device_type)
    per_image, why["patches_per_image"] = plan_patches_per_image(patches, fp, size, batch)
    normalization, why["normalization"] = plan_normalization(fp, settings.get("normalization"))
    counts = class_counts(fp, to_index_factory(num_classes, palette, thresholds))
    weights, why["class_weights"] = plan_class_weights(counts, settings.get("class_weights"), str(settings.get("loss_name")))
    network, network_why = plan_network(settings)
    why.update(network_why)
    total = int(counts.sum())
    return {
        **network,
        "version": PLAN_VERSION,
        "num_classes": int(num_classes),
        "class_names": names,
        "mask_palette": palette,
        "mask_thresholds": thresholds,
        "in_channels": int(in_channels),
        "spatial_size": [int(s) for s in size],
        "batch_size": int(batch),
        "normalization": normalization,
        "class_weights": weights,
        "patch_training": patches,
        "patches_per_image": per_image,
        "training": TRAINING_TEXT[patches],
        "mirrored": mirrored(settings),
        "why": why,
        "data": {
            "images": int(sum(fp.modes.values())),
            "median_height_width": [float(np.median(fp.heights)), float(np.median(fp.widths))] if fp.heights else None,
            "modes": dict(fp.modes),
            "class_pixel_share": [round(c / total, 6) if total else 0.0 for c in counts.tolist()],
            "device": device_type,
        },
    }


def _why_text(reason: str) -> str:
    return "as set" if reason == "set" else reason


def log_plan(plan: Mapping[str, Any]) -> None:
    """Print the plan, one line per item, with the reason for each."""
    why = plan.get("why", {})
    for key in ("num_classes", "class_names", "in_channels", "spatial_size", "batch_size", "patch_training", "patches_per_image", "normalization",
                "class_weights", *NETWORK):
        if key not in plan:
            continue
        value = plan[key]
        extra = ""
        if key == "num_classes" and plan.get("mask_palette"):
            extra = f" (mask_palette {plan['mask_palette']})"
        elif key == "num_classes" and plan.get("mask_thresholds"):
            extra = f" (mask_thresholds {plan['mask_thresholds']})"
        logger.info("plan: %-13s %s%s  [%s]", key, value, extra, _why_text(why.get(key, "set")))


def write_plan(plan: Mapping[str, Any], path: str | Path) -> None:
    """Write the plan as JSON (atomically)."""
    atomic_write_text(Path(path), json.dumps(plan, indent=2) + "\n")


#: what a model trained before plans existed was trained with (the settings' old defaults)
LEGACY = {"num_classes": 2, "in_channels": 3, "spatial_size": [512, 512], "batch_size": 4, "normalization": "minmax"}

#: the network's settings, kept in the plan so that evaluation and inference build the network training built;
#: ``auto`` at training means these defaults, at inference "as the model was trained"
NETWORK = {"architecture": "basic_unet", "base_features": 16, "activation": "elu"}


def plan_network(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The network settings for training: each as set, or its default (:data:`NETWORK`) when ``auto`` or absent."""
    chosen, why = {}, {}
    for key, default in NETWORK.items():
        value = settings.get(key)
        if value is None or is_auto(value):
            chosen[key], why[key] = default, "default"
        else:
            chosen[key], why[key] = value, "set"
    return chosen, why


def fill_network(plan: Mapping[str, Any], trained: Mapping[str, Any] | None) -> dict[str, Any]:
    """The network settings of a model: the plan's, else what its weights tell (``trained``: architecture and
    width, from :func:`checkpoint_settings`), else the defaults (:data:`NETWORK`; the weights cannot tell the
    activation)."""
    return {key: plan.get(key, (trained or {}).get(key, default)) for key, default in NETWORK.items()}


#: what every model of a fold ensemble must share: one input pipeline and one output
ENSEMBLE_KEYS = ("num_classes", "class_names", "in_channels", "spatial_size", "normalization", "patch_training", *NETWORK)


def saved_plan(ckpt_path: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The plan the model(s) of ``ckpt_path`` were trained with (see :func:`model_plan`).

    For a fold ensemble (several model files, see :mod:`monai_unet_bundle.ensemble`) every model's
    plan must agree on :data:`ENSEMBLE_KEYS`; the first model's plan is returned.

    Raises:
        BundleInputError: as :func:`model_plan`, and for models trained with different plans.
    """
    from monai_unet_bundle.ensemble import model_files

    files = model_files(ckpt_path)
    plans = [model_plan(f, settings) for f in files]
    for path, other in zip(files[1:], plans[1:]):
        differ = [k for k in ENSEMBLE_KEYS if other.get(k) != plans[0].get(k)]
        if differ:
            detail = "; ".join(f"{k} {plans[0].get(k)} against {other.get(k)}" for k in differ)
            raise BundleInputError(
                f"{path} was not trained with the plan of {files[0]} ({detail}): ensemble only models of one plan, "
                f"such as the folds of one cross-validation."
            )
    return plans[0]


def model_plan(ckpt_path: str | Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The plan a model was trained with (``plan.json`` beside ``ckpt_path``), explicit settings applied on top.

    Settings other than ``auto`` win.  Without a ``plan.json`` (a model from before plans, or from
    elsewhere), ``num_classes`` and ``in_channels`` are read from the checkpoint's weights when it
    is one of this bundle's networks, and the rest take the old defaults (512x512, min-max
    normalisation), with a warning.  The network (``architecture``, ``base_features``,
    ``activation``) is the plan's; a plan from before it was kept there gives the architecture and
    width the weights tell, and ELU.

    Raises:
        BundleInputError: for an unreadable ``plan.json``, or class names that do not fit.
    """
    path = plan_path_for(ckpt_path)
    plan: dict[str, Any]
    trained: dict[str, Any] | None = None
    from_file = path.is_file()
    if from_file:
        try:
            plan = json.loads(path.read_text())
            missing = [k for k in (*LEGACY, "class_names") if k not in plan]
        except (OSError, ValueError, TypeError):
            missing = ["a JSON object"]
        if missing:
            raise BundleInputError(
                f"{path} is not a plan written by training (no {', '.join(missing)}): delete it and pass --num_classes, "
                f"--in_channels, --spatial_size and --normalization as the model was trained."
            )
        source = str(path)
    else:
        plan = {**LEGACY, "mask_palette": None, "mask_thresholds": None, "class_weights": None}
        source = "defaults"
        trained = checkpoint_settings(ckpt_path)
        if trained:
            plan.update({k: trained[k] for k in ("num_classes", "in_channels")})
            source = f"the weights of {ckpt_path}"
        # only for a model of this bundle: any other file is refused with its own sentence by the model check
        if trained and any(is_auto(settings.get(k)) for k in LEGACY):
            logger.warning("no %s beside %s: auto settings are taken from %s (spatial_size %s, normalization %s); pass "
                           "them explicitly if the model was trained otherwise", PLAN_FILE, ckpt_path, source,
                           plan["spatial_size"], plan["normalization"])
    plan = dict(plan)
    if any(key not in plan for key in NETWORK):  # a plan (or model) from before the network was part of the plan
        if from_file:  # the weights were not read above
            trained = checkpoint_settings(ckpt_path)
        plan.update(fill_network(plan, trained))
    for key in ("num_classes", "in_channels", "batch_size", "normalization", *NETWORK):
        if settings.get(key) is not None and not is_auto(settings.get(key)):
            plan[key] = settings[key]
    size = settings.get("spatial_size")
    if size is not None and not is_auto(size):
        plan["spatial_size"] = check_spatial_size(size)
    elif settings.get("input_size") is not None and not is_auto(settings.get("input_size")):
        plan["spatial_size"] = _input_square(settings["input_size"])
    for key in ("mask_palette", "mask_thresholds"):  # the masks' encoding, when given, wins too
        if settings.get(key) is not None:
            plan[key] = settings[key]
    plan.setdefault("patch_training", False)  # plans from before patch training trained on whole images
    plan["sliding_window"] = sliding_window(plan, settings.get("sliding_window"), str(ckpt_path))
    names = settings.get("class_names")
    if names is not None and not is_auto(names):
        plan["class_names"] = list(names)
    elif len(plan.get("class_names") or []) != plan["num_classes"]:
        plan["class_names"] = default_class_names(plan["num_classes"])
    if len(plan["class_names"]) != plan["num_classes"]:
        raise BundleInputError(
            f"class_names lists {len(plan['class_names'])} names but the model has {plan['num_classes']} classes: "
            f"pass --class_names with {plan['num_classes']} names, background first."
        )
    return plan


def sliding_window(plan: Mapping[str, Any], setting: Any, model: str) -> bool:
    """Whether inference runs sliding windows at the images' own resolution: ``auto`` (or absent) does so for a
    model trained on patches (the plan's ``patch_training``), and resizes whole images to ``spatial_size`` for
    one trained on resized images."""
    if setting is None or is_auto(setting):
        return bool(plan.get("patch_training"))
    chosen = flag(setting, "sliding_window")
    if plan.get("patch_training") and not chosen:
        logger.warning("%s was trained on patches at the images' own resolution: sliding_window false resizes whole images "
                       "to spatial_size %s, a scale it never saw; leave sliding_window auto", model, plan.get("spatial_size"))
    return chosen


def plan_path_for(model_path: str | Path) -> Path:
    """The plan of a model file: ``<stem>.plan.json`` beside it (kept with an earlier run's model), else ``plan.json``."""
    own = Path(model_path).with_name(f"{Path(model_path).stem}.{PLAN_FILE}")
    return own if own.is_file() else Path(model_path).parent / PLAN_FILE


def checkpoint_settings(ckpt_path: str | Path) -> dict[str, Any] | None:
    """What a model file of this bundle was built with (architecture, channels, classes, width), or ``None``."""
    from monai_unet_bundle.checkpoints import network_settings

    if not Path(ckpt_path).is_file():
        return None
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:  # the model loader reports unreadable files with its own sentence later
        return None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None  # a resume checkpoint or another file: the model check says what it is
    return network_settings(state)
