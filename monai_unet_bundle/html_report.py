"""One self-contained HTML page per evaluation and per cross-validation: a report people look at.

The page needs no network and no other file: pictures are embedded as PNG data URIs and the
training curves as inline SVG.  It holds the per-class table, the confusion matrix as a picture
(rows: ground truth, columns: prediction, each cell shaded by the share of its row), the training
curves (loss and validation Dice by epoch, from ``curves.csv``), and the worst-scoring images, worst
first, each as image | ground truth over it | prediction over it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from monai_unet_bundle.atomic import atomic_write_text

__all__ = ["confusion_picture", "curves_svg", "data_uri", "render_page", "thumbnail"]

#: the longest side of an image strip in the page, in pixels
THUMBNAIL_SIDE = 256
_CELL = 64

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0 16px 16px 0; vertical-align: top; }
figcaption { font-size: 13px; }
img.cm { image-rendering: pixelated; }
"""


def data_uri(rgb: np.ndarray) -> str:
    """A ``(H, W, 3)`` uint8 array as a PNG data URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail(rgb: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """Shrink ``rgb`` so that its height is at most ``side`` (a strip of three panels stays readable)."""
    height = rgb.shape[0]
    if height <= side:
        return rgb
    width = max(1, round(rgb.shape[1] * side / height))
    return np.asarray(Image.fromarray(rgb).resize((width, side), Image.BILINEAR))


def confusion_picture(cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str]) -> np.ndarray:
    """The confusion matrix as a picture: one square per cell, blue by the share of its ground-truth row, with the share written in it."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    image = Image.new("RGB", (n * _CELL, n * _CELL), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            level = share[i, j]
            colour = tuple(int(round(255 - level * (255 - c))) for c in (30, 80, 200))
            box = (j * _CELL, i * _CELL, (j + 1) * _CELL - 1, (i + 1) * _CELL - 1)
            draw.rectangle(box, fill=colour, outline=(160, 160, 160))
            text = f"{100 * level:.1f}%"
            draw.text((j * _CELL + 6, i * _CELL + _CELL // 2 - 6), text, fill="white" if level > 0.5 else "black")
    return np.asarray(image)


def _read_curves(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def _polyline(points: list[tuple[float, float]], x_range: tuple[float, float], y_range: tuple[float, float],
              box: tuple[int, int, int, int], colour: str) -> str:
    x0, y0, width, height = box
    (xa, xb), (ya, yb) = x_range, y_range
    sx = width / (xb - xa) if xb > xa else 0.0
    sy = height / (yb - ya) if yb > ya else 0.0
    coords = " ".join(f"{x0 + (x - xa) * sx:.1f},{y0 + height - (y - ya) * sy:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'


def curves_svg(curves: Mapping[str, str | Path]) -> str | None:
    """Training loss and validation mean Dice by epoch as inline SVG, one line per run (``label -> curves.csv``).

    Returns ``None`` when no ``curves.csv`` can be read.
    """
    runs = {}
    for label, path in curves.items():
        if Path(path).is_file():
            rows = [r for r in _read_curves(Path(path)) if "epoch" in r]
            if rows:
                runs[label] = rows
    if not runs:
        return None
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    panels = [("train_loss", "training loss"), ("val_mean_dice", "validation mean Dice")]
    width, height, pad = 380, 220, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 40}" height="{height + 80}" font-size="12">']
    epochs = [r["epoch"] for rows in runs.values() for r in rows]
    x_range = (min(epochs), max(max(epochs), min(epochs) + 1))
    for p, (key, title) in enumerate(panels):
        values = [r[key] for rows in runs.values() for r in rows if key in r and math.isfinite(r[key])]
        left = p * (width + 40)
        box = (left + pad, 20, width - pad - 10, height - 20)
        parts.append(f'<text x="{left + pad}" y="14">{html.escape(title)}</text>')
        parts.append(f'<rect x="{box[0]}" y="{box[1]}" width="{box[2]}" height="{box[3]}" fill="none" stroke="#999"/>')
        if not values:
            continue
        y_range = (min(values), max(values) if max(values) > min(values) else min(values) + 1)
        parts.append(f'<text x="{left + 2}" y="{box[1] + 10}">{y_range[1]:.3g}</text>')
        parts.append(f'<text x="{left + 2}" y="{box[1] + box[3]}">{y_range[0]:.3g}</text>')
        parts.append(f'<text x="{box[0]}" y="{box[1] + box[3] + 16}">epoch {x_range[0]:g}</text>')
        parts.append(f'<text x="{box[0] + box[2] - 60}" y="{box[1] + box[3] + 16}">epoch {x_range[1]:g}</text>')
        for i, (label, rows) in enumerate(runs.items()):
            points = [(r["epoch"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if points:
                parts.append(_polyline(points, x_range, y_range, box, colours[i % len(colours)]))
    for i, label in enumerate(runs):
        parts.append(f'<text x="{pad + 110 * i}" y="{height + 60}" fill="{colours[i % len(colours)]}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def render_page(
    path: str | Path,
    title: str,
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
    confusion: tuple[np.ndarray, Sequence[str]] | None,
    curves: Mapping[str, str | Path],
    worst: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
) -> Path:
    """Write the page.

    Args:
        path: the HTML file.
        title: the page's heading.
        tables: ``(heading, column names, rows)`` each.
        confusion: the confusion matrix (ground truth in rows) and the class names, or ``None``.
        curves: ``label -> curves.csv`` of each training run shown.
        worst: the worst images, worst first: ``name``, ``dice`` (mean foreground Dice) and ``strip``
            (an ``(H, W, 3)`` uint8 array: image | ground truth | prediction).
        notes: sentences shown under the heading.
    """
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    out += [f"<p>{html.escape(n)}</p>" for n in notes]
    for heading, columns, rows in tables:
        out.append(f"<h2>{html.escape(heading)}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows]
        out.append("</table>")
    if confusion is not None:
        cm, names = confusion
        out.append("<h2>Confusion matrix</h2><p>Rows: ground truth; columns: prediction; each cell is the share of its row "
                   f"(classes in order: {html.escape(', '.join(names))}).</p>")
        out.append(f'<img class="cm" id="confusion" alt="confusion matrix" src="{data_uri(confusion_picture(cm, names))}">')
    svg = curves_svg(curves)
    out.append("<h2>Training curves</h2>")
    out.append(svg if svg else "<p>No training curves found (curves.csv).</p>")
    out.append("<h2>Worst images, worst first</h2><p>Each: the image, the ground truth over it, the prediction over it.</p>")
    for item in worst:
        caption = f"{item['name']}: mean foreground Dice {_cell(item['dice'])}"
        out.append(f'<figure><img class="worst" alt="{html.escape(caption)}" src="{data_uri(item["strip"])}">'
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if not worst:
        out.append("<p>No images were kept.</p>")
    out.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
