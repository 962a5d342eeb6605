"""Out-of-fold evaluation: the folds' evaluations summarised per class, per fold and as mean ± sd.

Each fold's evaluation (``configs/evaluate.json`` with ``--num_folds K --fold k``) scores the fold's
held-out pairs with the model that did not see them, at original size, into ``eval/fold_k``.  Together
they predict every training pair once: :func:`summarise_folds` reads them and gives, per class,

* each fold's Dice and IoU (averaged over its images, as the evaluation report does) and precision
  and recall (over all of its pixels);
* the mean and sample standard deviation of each over the folds (what papers report);
* the pooled out-of-fold scores: all folds' pixels in one confusion matrix (the CSV's
  ``out_of_fold`` rows: Dice and IoU over pixels, unlike the per-fold rows' means over images), and
  the mean foreground Dice over all held-out images.

:func:`write_cross_validation` writes them as ``cross_validation.json`` and ``cross_validation.csv``, and
:func:`write_cross_validation_html` as ``cross_validation.html``, a page with every fold's training curves,
the pooled confusion matrix and the worst out-of-fold images (:mod:`monai_unet_bundle.html_report`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_unet_bundle.atomic import atomic_write_text
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.metrics import scores

__all__ = ["METRICS", "summarise_folds", "write_cross_validation", "write_cross_validation_html"]

#: per-class metrics of the summary, in column order
METRICS = ("dice", "iou", "precision", "recall")


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the defined values (``None`` where too few are defined)."""
    finite = _finite(values)
    mean = float(np.mean(finite)) if finite else None
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return mean, sd


def _read_fold(eval_dir: Path) -> tuple[dict[str, Any], list[float]]:
    summary_file = eval_dir / "metrics_summary.json"
    if not summary_file.is_file():
        raise BundleInputError(f"{summary_file} does not exist: evaluate that fold first (configs/evaluate.json with its --fold).")
    summary = json.loads(summary_file.read_text())
    with open(eval_dir / "metrics_per_image.csv", newline="") as f:
        per_image = [_number(row["mean_dice"]) for row in csv.DictReader(f)]
    return summary, per_image


def _number(text: str | None) -> float:
    """A number of the evaluation's CSV; its "n/a" (undefined, e.g. no foreground anywhere in the image) is NaN."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _defined(values: Any) -> Any:
    """``values`` with every NaN as ``None`` (JSON has no NaN)."""
    if isinstance(values, (list, tuple)):
        return [_defined(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values


def summarise_folds(eval_dirs: Mapping[int, str | Path], num_folds: int | None = None) -> dict[str, Any]:
    """Read each fold's evaluation folder (fold -> folder) and summarise; see the module docstring.

    ``num_folds`` (K) is recorded with the summary, and the folds not summarised are listed as ``missing``.

    Raises:
        BundleInputError: when a folder has no evaluation, or the folds disagree on the classes.
    """
    folds, matrices, per_image = [], [], []
    names: list[str] | None = None
    for k, eval_dir in sorted((int(k), Path(d)) for k, d in eval_dirs.items()):
        summary, images = _read_fold(eval_dir)
        if names is not None and summary["class_names"] != names:
            raise BundleInputError(f"{eval_dir} scores classes {summary['class_names']} but fold 0 scores {names}: evaluate every fold with the same classes.")
        names = summary["class_names"]
        over_images, all_pixels = summary["mean_over_images"], summary["all_pixels"]
        folds.append({
            "fold": k, "images": summary["images"], "mean_dice": over_images["mean_dice"],
            "dice": over_images["dice"], "iou": over_images["iou"],
            "precision": _defined(all_pixels["precision"]), "recall": _defined(all_pixels["recall"]),
        })
        matrices.append(np.asarray(summary["confusion_matrix"], dtype=np.int64))
        per_image += images
    if not folds:
        raise BundleInputError("no fold evaluations to summarise: pass the eval/fold_k folders.")
    assert names is not None
    mean: dict[str, Any] = {}
    sd: dict[str, Any] = {}
    for metric in METRICS:
        pairs = [_mean_sd([f[metric][c] for f in folds]) for c in range(len(names))]
        mean[metric], sd[metric] = [p[0] for p in pairs], [p[1] for p in pairs]
    mean["mean_dice"], sd["mean_dice"] = _mean_sd([f["mean_dice"] for f in folds])
    pooled = scores(sum(matrices[1:], matrices[0]))
    finite = _finite(per_image)
    num_folds = num_folds or len(folds)
    return {
        "class_names": names,
        "num_folds": num_folds,
        "missing": sorted(set(range(num_folds)) - {f["fold"] for f in folds}),
        "folds": folds,
        "mean": mean,
        "sd": sd,
        "out_of_fold": {
            "images": len(per_image),
            "mean_dice_over_images": float(np.mean(finite)) if finite else None,
            "all_pixels": {k: _defined(pooled[k]) for k in (*METRICS, "mean_dice")},
            "confusion_matrix": sum(matrices[1:], matrices[0]).tolist(),
        },
    }


def _cell(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def write_cross_validation(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``cross_validation.json`` and ``cross_validation.csv`` (one row per fold and class, then the mean, sd and
    pooled out-of-fold rows) into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "cross_validation.json", out / "cross_validation.csv"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("fold", "class", *METRICS))
    rows = [(str(f["fold"]), f) for f in result["folds"]] + [("mean", result["mean"]), ("sd", result["sd"])]
    rows.append(("out_of_fold", result["out_of_fold"]["all_pixels"]))
    for label, values in rows:
        for c, name in enumerate(result["class_names"]):
            writer.writerow((label, name, *(_cell(values[m][c]) for m in METRICS)))
    atomic_write_text(csv_path, buffer.getvalue())
    return [json_path, csv_path]


def _number_or(value: Any, default: float) -> float:
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def write_cross_validation_html(result: dict[str, Any], bundle_root: str | Path, num_worst: int = 8) -> Path:
    """Write ``eval/cross_validation.html`` under ``bundle_root``: the summary's tables, the pooled confusion matrix,
    every fold's training curves (``logs/fold_k/curves.csv``) and the worst out-of-fold images of all folds (from
    each fold evaluation's ``worst.json``), worst first."""
    from PIL import Image

    from monai_unet_bundle.html_report import render_page

    root = Path(bundle_root)
    names = result["class_names"]
    columns = ["fold", "class", "images", *METRICS]
    rows: list[list[Any]] = []
    for f in result["folds"]:
        rows += [[str(f["fold"]), name, f["images"], *(f[m][c] for m in METRICS)] for c, name in enumerate(names)]
    for label in ("mean", "sd"):
        rows += [[label, name, "", *(result[label][m][c] for m in METRICS)] for c, name in enumerate(names)]
    pooled = result["out_of_fold"]
    rows += [["out of fold (pixels)", name, pooled["images"], *(pooled["all_pixels"][m][c] for m in METRICS)]
             for c, name in enumerate(names)]
    worst: list[dict[str, Any]] = []
    for f in result["folds"]:
        folder = root / "eval" / f"fold_{f['fold']}"
        listed = json.loads((folder / "worst.json").read_text()) if (folder / "worst.json").is_file() else []
        for w in listed:
            if (folder / w["file"]).is_file():
                strip = np.asarray(Image.open(folder / w["file"]).convert("RGB"))
                worst.append({"name": f"fold {f['fold']}: {w['name']}", "dice": w["dice"], "strip": strip})
    worst = sorted(worst, key=lambda w: _number_or(w["dice"], 1.0))[:num_worst]
    matrix = pooled.get("confusion_matrix")
    mean = result["mean"]["mean_dice"]
    return render_page(
        root / "eval" / "cross_validation.html",
        f"Cross-validation, {result['num_folds']} folds",
        [("Per fold and class (Dice and IoU: mean over images; precision and recall: all pixels)", columns, rows)],
        (np.asarray(matrix), names) if matrix is not None else None,
        {f"fold {f['fold']}": root / "logs" / f"fold_{f['fold']}" / "curves.csv" for f in result["folds"]},
        worst,
        notes=[f"{pooled['images']} out-of-fold images; mean foreground Dice over folds "
               + ("n/a" if mean is None else f"{mean:.4f}")
               + ("" if result["sd"]["mean_dice"] is None else f" ± {result['sd']['mean_dice']:.4f}")
               + (f"; folds {result['missing']} not evaluated yet." if result["missing"] else ".")],
    )
