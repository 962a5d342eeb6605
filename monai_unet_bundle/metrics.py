"""Segmentation metrics from confusion matrices, and the evaluation report handler.

Conventions (also in the README):

* A confusion matrix has the ground truth in rows and the prediction in columns.
* Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), precision = TP / (TP + FP),
  recall = TP / (TP + FN), F1 = harmonic mean of precision and recall, support = ground-truth pixels.
* Empty ground truth: when a class is absent from both the ground truth and the prediction of an
  image, its Dice and IoU for that image are undefined (NaN) and left out of every mean, as MONAI's
  ``MeanDice`` does by default; when it is predicted but absent from the ground truth they are 0.
  A ratio whose denominator is 0 (e.g. precision of a class never predicted) is NaN, shown "n/a".
* "mean" Dice and IoU average the foreground classes (1..K-1) only; pixel accuracy counts all pixels.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.transforms import item_source

__all__ = ["SegmentationReport", "confusion_matrix", "default_class_names", "scores"]

logger = logging.getLogger(__name__)

#: the files an evaluation writes into its ``output_dir``
REPORT_FILES = ("metrics_per_image.csv", "metrics_summary.json", "metrics_report.md", "report.html", "worst.json")
#: the mark by which ``metrics_summary.json`` is known to be an evaluation's own
WRITTEN_BY = "monai_unet_bundle evaluation"


def default_class_names(num_classes: int) -> list[str]:
    """``["background", "foreground"]`` for binary, else ``["background", "class_1", ...]``.

    A ``num_classes`` that is not a whole number gives ``[]`` (the settings check reports it).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        return []
    if num_classes == 2:
        return ["background", "foreground"]
    return ["background"] + [f"class_{i}" for i in range(1, num_classes)]


def confusion_matrix(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """``(K, K)`` pixel counts: row = true class, column = predicted class.

    Args:
        pred: class-index map.
        truth: class-index map of the same shape.
        num_classes: K.
    """
    p = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64).ravel()
    t = np.asarray(truth.detach().cpu() if isinstance(truth, torch.Tensor) else truth).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.size} pixels but ground truth has {t.size}")
    if p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes):
        raise ValueError(f"class indices must lie in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def scores(cm: np.ndarray) -> dict[str, Any]:
    """Per-class and mean scores from a confusion matrix (see the module docstring for conventions).

    Returns:
        dict with per-class lists ``dice``, ``iou``, ``precision``, ``recall``, ``f1``, ``support``,
        and ``mean_dice``, ``mean_iou`` (foreground classes), ``accuracy``.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    iou = _ratio(tp, tp + fp + fn)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    f1 = np.where(np.isnan(precision) | np.isnan(recall), np.nan, np.nan_to_num(f1, nan=0.0))
    total = cm.sum()
    return {
        "dice": dice.tolist(),
        "iou": iou.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": cm.sum(axis=1).astype(np.int64).tolist(),
        "mean_dice": _nanmean(dice[1:]),
        "mean_iou": _nanmean(iou[1:]),
        "accuracy": float(tp.sum() / total) if total else math.nan,
    }


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt6(value: float) -> str:
    return _fmt(value, 6)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _to_index(x: torch.Tensor) -> torch.Tensor:
    """One-hot ``(C, H, W)`` -> ``(H, W)`` indices; a one-channel index map is squeezed."""
    return x.argmax(0) if x.shape[0] > 1 else x[0]


class SegmentationReport:
    """Ignite handler writing per-image metrics, a summary and a readable report after an evaluation.

    It reads ``pred`` and ``label`` (one-hot or index maps, per decollated item) from
    ``engine.state.output`` each iteration and, when the run completes, writes into ``output_dir``:
    ``metrics_per_image.csv`` (one row per image: per-class Dice and IoU, mean foreground Dice and
    IoU, pixel accuracy), ``metrics_summary.json`` (means over images, and data-set-level scores and
    the confusion matrix from all pixels) and ``metrics_report.md`` (the same as tables).

    Args:
        output_dir: folder for the three files (created when missing).
        num_classes: classes including background.
        class_names: one name per class; defaults to :func:`default_class_names`.
        output_transform: maps ``engine.state.output`` to a list of dicts with ``pred`` and ``label``.
        predictions_dir: also keep each image's prediction and mask there (class-index maps at original
            size, ``<n>.npz``), as a cross-validation fold's evaluation does for choosing post-processing
            (:mod:`monai_unet_bundle.postprocess_search`); ``None`` keeps none.
        curves: the ``curves.csv`` of the model's training, drawn in ``report.html`` (``None``: no curves).
        num_worst: how many of the worst-scoring images ``report.html`` shows (and ``worst/`` keeps as PNG).
        postprocessing: the clean-ups applied to ``pred`` before scoring
            (:attr:`~monai_unet_bundle.postprocess.PostProcessd.choice`), named in the summary and the reports;
            ``None`` when none was.  Where the items also carry ``pred_raw`` (the prediction before it), the
            kept predictions are those, so that post-processing is chosen on what the network predicted.
    """

    def __init__(
        self,
        output_dir: str | Path,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        output_transform: Callable[[Any], list[dict]] = lambda output: output,
        predictions_dir: str | Path | None = None,
        curves: str | Path | None = None,
        num_worst: int = 8,
        postprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.postprocessing = dict(postprocessing) if postprocessing else None
        self.predictions_dir = Path(predictions_dir) if predictions_dir else None
        self.curves = Path(curves) if curves else None
        self.num_worst = int(num_worst)
        self.worst: list[dict[str, Any]] = []
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else default_class_names(self.num_classes)
        if len(self.class_names) != self.num_classes:
            raise BundleInputError(
                f"class_names has {len(self.class_names)} names but num_classes={self.num_classes}: pass "
                f"--class_names with {self.num_classes} names, background first."
            )
        self.output_transform = output_transform
        self.rows: list[tuple[str, np.ndarray]] = []
        self._protect_existing_files()

    def _protect_existing_files(self) -> None:
        """Refuse an ``output_dir`` whose report files an evaluation run did not write (the user's own)."""
        if self.output_dir.is_file():
            raise BundleInputError(f"output_dir {str(self.output_dir)!r} is a file: pass --output_dir with a folder.")
        existing = [self.output_dir / name for name in REPORT_FILES if (self.output_dir / name).exists()]
        if not existing:
            return
        try:
            summary = json.loads((self.output_dir / "metrics_summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        earlier = isinstance(summary, dict) and (
            summary.get("written_by") == WRITTEN_BY or {"images", "mean_over_images", "confusion_matrix"} <= set(summary)
        )
        if not earlier:
            raise BundleInputError(
                f"evaluation would overwrite {str(existing[0])!r}, which no earlier evaluation wrote: choose a new or empty "
                f"--output_dir so none of your files is lost."
            )

    def attach(self, engine: Engine) -> None:
        """Collect on every iteration, write on completion."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget what earlier runs collected (and the predictions an earlier evaluation kept)."""
        self.rows, self.worst = [], []
        if self.predictions_dir is not None:
            from monai_unet_bundle.postprocess_search import clear_predictions

            clear_predictions(self.predictions_dir)

    def collect(self, engine: Engine) -> None:
        """Add one confusion matrix per image of the current batch (and keep the maps when asked)."""
        for item in self.output_transform(engine.state.output):
            pred, label = _to_index(item["pred"]), _to_index(item["label"])
            cm = confusion_matrix(pred, label, self.num_classes)
            name = item_source(item, ("image", "label"))
            if self.predictions_dir is not None:
                from monai_unet_bundle.postprocess_search import write_predictions

                kept = _to_index(item["pred_raw"]) if "pred_raw" in item else pred
                write_predictions(self.predictions_dir, len(self.rows), name, np.asarray(kept.cpu()), np.asarray(label.cpu()))
            self.rows.append((name, cm))
            self._keep_if_worst(name, scores(cm)["mean_dice"], item, pred, label)

    def _keep_if_worst(self, name: str, dice: float, item: dict, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Keep a picture of the image while it is among the ``num_worst`` lowest mean Dice (an undefined Dice counts as 1)."""
        rank = 1.0 if math.isnan(dice) else dice
        if self.num_worst <= 0 or "image" not in item or (len(self.worst) >= self.num_worst and rank >= self.worst[-1]["rank"]):
            return
        from monai_unet_bundle.curves import preview_strip
        from monai_unet_bundle.html_report import thumbnail

        image = torch.as_tensor(item["image"]).detach().cpu().float()
        if image.ndim != pred.ndim + 1:  # not a channel-first image of the mask's dimensions: nothing to draw
            return
        if image.shape[1:] != pred.shape:  # the network's input size: drawn at the prediction's (original) size
            image = torch.nn.functional.interpolate(image[None], size=tuple(pred.shape), mode="bilinear", align_corners=False)[0]
        low, high = float(image.min()), float(image.max())
        image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
        strip = thumbnail(preview_strip(image, label[None].cpu(), pred[None].cpu()))
        self.worst.append({"name": name, "dice": dice, "rank": rank, "strip": strip})
        self.worst = sorted(self.worst, key=lambda w: w["rank"])[: self.num_worst]

    def summary(self) -> dict[str, Any]:
        """Means over images and data-set-level scores of everything collected."""
        per_image = [scores(cm) for _, cm in self.rows]
        total = sum((cm for _, cm in self.rows), np.zeros((self.num_classes,) * 2, dtype=np.int64))
        overall = scores(total)
        return {
            "written_by": WRITTEN_BY,
            "images": len(self.rows),
            "class_names": self.class_names,
            "mean_over_images": {
                "mean_dice": _nanmean(np.array([s["mean_dice"] for s in per_image], dtype=float)),
                "mean_iou": _nanmean(np.array([s["mean_iou"] for s in per_image], dtype=float)),
                "accuracy": _nanmean(np.array([s["accuracy"] for s in per_image], dtype=float)),
                "dice": [_nanmean(np.array([s["dice"][c] for s in per_image], dtype=float)) for c in range(self.num_classes)],
                "iou": [_nanmean(np.array([s["iou"][c] for s in per_image], dtype=float)) for c in range(self.num_classes)],
            },
            "all_pixels": overall,
            "confusion_matrix": total.tolist(),
            "postprocessing": self.postprocessing,
        }

    def postprocessing_note(self) -> str:
        """One sentence naming the post-processing the scores include."""
        from monai_unet_bundle.postprocess import describe_choice

        if not self.postprocessing:
            return "Scored without post-processing."
        return f"Scored after post-processing, as inference applies it: {describe_choice(self.postprocessing)}."

    def write(self, engine: Engine | None = None) -> dict[str, Any]:
        """Write the CSV, JSON and Markdown files; returns the summary."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = self.class_names
        with open(self.output_dir / "metrics_per_image.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["filename", *(f"dice_{n}" for n in names), *(f"iou_{n}" for n in names), "mean_dice", "mean_iou", "accuracy"]
            )
            for name, cm in self.rows:
                s = scores(cm)
                values = [*s["dice"], *s["iou"], s["mean_dice"], s["mean_iou"], s["accuracy"]]
                writer.writerow([name, *map(_fmt6, values)])
        summary = self.summary()
        (self.output_dir / "metrics_summary.json").write_text(json.dumps(_nan_to_none(summary), indent=2) + "\n")
        (self.output_dir / "metrics_report.md").write_text(self.markdown(summary))
        self.write_html(summary)
        logger.info(
            "evaluation of %d images: mean foreground Dice %s (mean over images), written to %s",
            summary["images"], _fmt(summary["mean_over_images"]["mean_dice"]), self.output_dir,
        )
        return summary

    def write_html(self, summary: dict[str, Any]) -> Path:
        """Write ``report.html`` (see :mod:`monai_unet_bundle.html_report`) and the worst images as ``worst/NN.png``."""
        from PIL import Image

        from monai_unet_bundle.html_report import render_page

        folder = self.output_dir / "worst"
        if folder.is_dir():
            for old in folder.glob("[0-9][0-9].png"):
                old.unlink()
        kept = []
        for i, w in enumerate(self.worst):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(w["strip"]).save(folder / f"{i:02d}.png")
            kept.append({"name": w["name"], "dice": None if math.isnan(w["dice"]) else w["dice"], "file": f"worst/{i:02d}.png"})
        (self.output_dir / "worst.json").write_text(json.dumps(kept, indent=2) + "\n")
        s, m = summary["all_pixels"], summary["mean_over_images"]
        rows = [[name, m["dice"][c], m["iou"][c], s["precision"][c], s["recall"][c], s["support"][c]]
                for c, name in enumerate(self.class_names)]
        return render_page(
            self.output_dir / "report.html",
            "Segmentation report",
            [("Per class", ["class", "Dice (mean over images)", "IoU (mean over images)", "precision (all pixels)",
                            "recall (all pixels)", "support (pixels)"], rows)],
            (np.asarray(summary["confusion_matrix"]), self.class_names),
            {"training": self.curves} if self.curves else {},
            self.worst,
            notes=[f"{summary['images']} images; mean foreground Dice over images {_fmt(m['mean_dice'])}, "
                   f"mean foreground IoU {_fmt(m['mean_iou'])}.", self.postprocessing_note()],
        )

    def markdown(self, summary: dict[str, Any]) -> str:
        """The report as Markdown tables."""
        names, s, m = self.class_names, summary["all_pixels"], summary["mean_over_images"]
        lines = [
            "# Segmentation report",
            "",
            f"Images: {summary['images']}. Mean foreground Dice over images: {_fmt(m['mean_dice'])}; "
            f"mean foreground IoU over images: {_fmt(m['mean_iou'])}; pixel accuracy: {_fmt(s['accuracy'])}.",
            "",
            self.postprocessing_note(),
            "",
            "## Per class (all pixels of all images)",
            "",
            "| class | Dice | IoU | precision | recall | F1 | support |",
            "|---|---|---|---|---|---|---|",
        ]
        for c, name in enumerate(names):
            lines.append(
                f"| {name} | {_fmt(s['dice'][c])} | {_fmt(s['iou'][c])} | {_fmt(s['precision'][c])} | "
                f"{_fmt(s['recall'][c])} | {_fmt(s['f1'][c])} | {s['support'][c]} |"
            )
        lines += ["", "## Confusion matrix (rows: ground truth, columns: prediction; pixels)", ""]
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for name, row in zip(names, summary["confusion_matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
        lines += [
            "",
            "Dice and IoU of a class absent from both the ground truth and the prediction of an image are "
            "left out of that image's means; n/a marks a ratio with a zero denominator.",
            "",
        ]
        return "\n".join(lines)
