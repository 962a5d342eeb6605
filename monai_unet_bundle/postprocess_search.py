"""Post-processing chosen on the out-of-fold predictions of a cross-validation, per class, by nnU-Net's rule.

Each fold's evaluation keeps its held-out predictions and masks at original size
(``eval/fold_k/oof/*.npz``, see :class:`~monai_unet_bundle.metrics.SegmentationReport`).
:func:`choose_postprocessing` tries, class by class and in the order inference applies them,
dropping objects under a size (a few sizes, scaled to the smallest true objects of the class),
filling holes and keeping the largest object.  A step is kept only if it raises the mean
foreground Dice over all out-of-fold images and lowers no class's Dice; later steps are tried on
top of the kept ones.  ``scripts/cross_validate.py`` writes the choice to ``eval/postprocessing.json``
and into every fold's ``plan.json``, from where inference applies it while its
``keep_largest_component``, ``fill_holes`` and ``remove_smaller_than`` settings are ``auto``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
from scipy import ndimage

from monai_unet_bundle.metrics import confusion_matrix, scores
from monai_unet_bundle.postprocess import EIGHT_NEIGHBOURS, apply_choice, describe_choice

__all__ = [
    "choose_for_cross_validation", "choose_postprocessing", "class_dice", "clear_predictions", "read_predictions",
    "size_candidates", "write_predictions",
]

logger = logging.getLogger(__name__)

#: a step must raise the mean foreground Dice by more than this to be kept (ties are noise)
MIN_GAIN = 1e-4
#: and may lower no class's Dice by more than this (float rounding)
TOLERANCE = 1e-9
#: sizes tried for dropping small objects, as fractions of the 5th percentile of the class's true object sizes
SIZE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


#: the files :func:`write_predictions` names: ``r<rank>_<index>.npz``, so that ranks of a distributed evaluation never collide
_PREDICTION_FILE = re.compile(r"r(\d+)_\d{5}\.npz")


def write_predictions(folder: str | Path, index: int, name: str, pred: np.ndarray, label: np.ndarray) -> Path:
    """Keep this rank's ``index``-th held-out prediction and its mask (class-index maps at original size, in the array
    order the reader gives, e.g. width first for PNG, as inference post-processes them) as ``r<rank>_<index>.npz``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if max(int(pred.max(initial=0)), int(label.max(initial=0))) < 256 else np.uint16
    path = folder / f"r{idist.get_rank()}_{index:05d}.npz"
    np.savez_compressed(path, pred=pred.astype(dtype), label=label.astype(dtype), name=np.array(name))
    return path


def clear_predictions(folder: str | Path) -> None:
    """Delete the predictions an earlier evaluation of this rank kept in ``folder`` (rank 0 also those of ranks
    beyond the world size); no other file is touched."""
    if not Path(folder).is_dir():
        return
    rank, world = idist.get_rank(), idist.get_world_size()
    for old in Path(folder).glob("*.npz"):
        found = _PREDICTION_FILE.fullmatch(old.name)
        if found and (int(found.group(1)) == rank or (rank == 0 and int(found.group(1)) >= world)):
            old.unlink()


def read_predictions(folders: Iterable[str | Path]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, prediction, mask)`` for every ``*.npz`` in ``folders`` (each fold's ``oof`` folder), each image once
    (a distributed evaluation repeats a few images to even out the ranks)."""
    items: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.npz")):
            with np.load(path) as data:
                name = str(data["name"])
                items.setdefault(name, (name, data["pred"].astype(np.int64), data["label"].astype(np.int64)))
    return list(items.values())


def class_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """Per-class Dice, mean over images, as the evaluation report computes it (a class absent from both is left out)."""
    per_image = np.array([scores(confusion_matrix(p, t, num_classes))["dice"] for p, t in pairs], dtype=float)
    with np.errstate(invalid="ignore"):
        return np.nanmean(per_image, axis=0) if len(per_image) else np.full(num_classes, np.nan)


def _mean_foreground(dice: np.ndarray) -> float:
    values = dice[1:][np.isfinite(dice[1:])]
    return float(values.mean()) if values.size else float("nan")


def size_candidates(labels: Iterable[np.ndarray], c: int) -> list[int]:
    """Object sizes worth trying for class ``c``: fractions of the 5th percentile of its true objects' sizes."""
    sizes: list[int] = []
    for label in labels:
        components, n = ndimage.label(label == c, structure=EIGHT_NEIGHBOURS)
        if n:
            sizes += np.bincount(components.ravel())[1:].tolist()
    if not sizes:
        return []
    small = float(np.percentile(sizes, 5))
    return sorted({max(2, int(round(small * f))) for f in SIZE_FRACTIONS})


def choose_postprocessing(
    items: Sequence[tuple[str, np.ndarray, np.ndarray]], num_classes: int
) -> dict[str, Any]:
    """Choose per-class post-processing on out-of-fold predictions (see the module docstring).

    Args:
        items: ``(name, prediction, mask)`` class-index maps, from :func:`read_predictions`.
        num_classes: classes including background.

    Returns:
        ``choice`` (for :func:`~monai_unet_bundle.postprocess.apply_choice`), ``dice_before`` and
        ``dice_after`` per class, ``mean_dice_before``/``after``, ``images`` and every ``trial``.
    """
    labels = [t for _, _, t in items]
    choice: dict[str, Any] = {"remove_smaller_than": [0] * num_classes, "fill_holes": [], "keep_largest_component": []}
    preds = [p for _, p, _ in items]

    def evaluate(trial: dict[str, Any]) -> np.ndarray:
        return class_dice([(apply_choice(p, num_classes, trial), t) for p, t in zip(preds, labels)], num_classes)

    before = best = class_dice(list(zip(preds, labels)), num_classes)
    trials: list[dict[str, Any]] = []
    for c in range(1, num_classes):
        options: list[tuple[str, Any]] = [("remove_smaller_than", s) for s in size_candidates(labels, c)]
        options += [("fill_holes", True), ("keep_largest_component", True)]
        for step in ("remove_smaller_than", "fill_holes", "keep_largest_component"):
            winner: tuple[dict[str, Any], np.ndarray] | None = None
            for name, value in (o for o in options if o[0] == step):
                trial = copy.deepcopy(choice)
                if name == "remove_smaller_than":
                    trial[name][c] = value
                else:
                    trial[name] = sorted({*trial[name], c})
                dice = evaluate(trial)
                gain = _mean_foreground(dice) - _mean_foreground(best)
                lowered = [k for k in range(1, num_classes) if np.isfinite(best[k]) and dice[k] < best[k] - TOLERANCE]
                kept = gain > MIN_GAIN and not lowered
                trials.append({"class": c, "step": name, "value": value, "mean_dice": _mean_foreground(dice),
                               "gain": gain, "lowers_classes": lowered, "better": kept})
                if kept and (winner is None or _mean_foreground(dice) > _mean_foreground(winner[1])):
                    winner = (trial, dice)
            if winner is not None:
                choice, best = winner
    result = {
        "choice": choice,
        "description": describe_choice(choice),
        "images": len(items),
        "dice_before": [None if not np.isfinite(d) else float(d) for d in before],
        "dice_after": [None if not np.isfinite(d) else float(d) for d in best],
        "mean_dice_before": _mean_foreground(before),
        "mean_dice_after": _mean_foreground(best),
        "trials": trials,
    }
    logger.info("post-processing chosen on %d out-of-fold images: %s (mean foreground Dice %.4f -> %.4f)",
                len(items), result["description"], result["mean_dice_before"], result["mean_dice_after"])
    return result


def choose_for_cross_validation(root: str | Path, num_folds: int) -> dict[str, Any] | None:
    """Choose post-processing on the out-of-fold predictions of every fold under ``root`` and store it.

    The result goes to ``eval/postprocessing.json``; the choice goes into every fold's
    ``models/fold_k/plan.json``, where inference finds it.

    Returns:
        The result of :func:`choose_postprocessing`, or ``None`` while a fold has no out-of-fold
        predictions yet (not evaluated, or evaluated before they were kept).
    """
    from monai_unet_bundle.atomic import atomic_write_text
    from monai_unet_bundle.plan import PLAN_FILE, write_plan

    root = Path(root)
    folders = [root / "eval" / f"fold_{k}" / "oof" for k in range(num_folds)]
    plans = [root / "models" / f"fold_{k}" / PLAN_FILE for k in range(num_folds)]
    missing = [k for k in range(num_folds) if not any(folders[k].glob("*.npz")) or not plans[k].is_file()]
    if missing:
        logger.warning("post-processing is chosen once every fold has been evaluated; folds %s have not", missing)
        return None
    fold_plans = [json.loads(p.read_text()) for p in plans]
    result = choose_postprocessing(read_predictions(folders), int(fold_plans[0]["num_classes"]))
    atomic_write_text(root / "eval" / "postprocessing.json", json.dumps(result, indent=2) + "\n")
    for path, plan in zip(plans, fold_plans):
        write_plan({**plan, "postprocessing": result["choice"]}, path)
    return result
