"""What inference writes besides the masks: overlays, colour masks, probabilities, RLE CSV, summary.

:class:`InferenceOutputs` is an Ignite handler on the inference evaluator (MONAI Label does not run
it, so it never writes files inside a MONAI Label server).  Every image's class map arrives at its
original size; MONAI's PIL reader holds 2D images as (width, height), which is turned back to
(height, width) here so every picture lies over its input.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from monai_unet_bundle.atomic import atomic_write_text
from monai_unet_bundle.curves import PALETTE, overlay
from monai_unet_bundle.data import InputScan, file_stem
from monai_unet_bundle.dicom import is_dicom, pixel_spacing, read_header, split_frame
from monai_unet_bundle.dicom_seg import require_highdicom
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.optional import available
from monai_unet_bundle.settings import flag
from monai_unet_bundle.readers import NIFTI_SUFFIXES, Auto2DReader
from monai_unet_bundle.rle import _order, rle_encode
from monai_unet_bundle.transforms import item_source
from monai_unet_bundle.writers import mask_suffixes

__all__ = ["SUMMARY_NAME", "InferenceOutputs"]

logger = logging.getLogger(__name__)

#: the summary every inference run writes into ``output_dir``; it also records which files are ours
SUMMARY_NAME = "inference_summary.json"
#: the mark by which a summary is known to be ours (a user's own JSON of that name is not)
WRITTEN_BY = "monai_unet_bundle inference"


def _previous_outputs(summary_path: Path) -> set[Path]:
    """The files an earlier inference run wrote, as its summary lists them (resolved paths)."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(summary, dict) or summary.get("written_by") != WRITTEN_BY:
        return set()
    files: set[str] = {str(summary_path)}
    files.update(p for p in summary.get("files") or [] if isinstance(p, str))
    files.update(p for p in summary.get("planned") or [] if isinstance(p, str))
    if isinstance(summary.get("rle_csv"), str):
        files.add(summary["rle_csv"])
    for record in summary.get("written") or []:
        if not isinstance(record, dict):
            continue
        for key in ("mask", "dicom_seg", "colour", "overlay"):
            if isinstance(record.get(key), str):
                files.add(record[key])
        files.update(p for p in record.get("probabilities") or [] if isinstance(p, str))
    return {Path(f).resolve() for f in files}


def _hw(array: np.ndarray, path: str) -> np.ndarray:
    """MONAI array of a 2D file -> (H, W, ...) as PIL shows it (NIfTI arrays are left as stored)."""
    return array if path.lower().endswith(NIFTI_SUFFIXES) else np.swapaxes(array, 0, 1)


class InferenceOutputs:
    """Write the optional extra outputs and the inference summary.

    Args:
        output_dir: the inference output folder.
        num_classes: classes including background.
        scan: the :class:`~monai_unet_bundle.data.InputScan` of the run (for skipped files and paths).
        overlays: write ``overlays/<stem>.png`` (image with the mask drawn over it).
        colour_masks: write ``colour/<stem>.png`` (each class in its colour).
        probabilities: write ``probabilities/<stem>_<class>.png`` (probability x 255) from the ``prob`` key;
            characters other than letters, digits, ``.``, ``+`` and ``-`` in class names become ``_``.
        rle_csv: path of a Kaggle ``img,rle_mask`` CSV of the foreground, or ``None``; an absolute
            path is used as given, a relative one is taken relative to ``output_dir``.
        rle_order: ``row`` or ``column`` pixel order of the RLE.
        class_names: names used in probability file names.
        output_format: what DICOM inputs get (see :func:`~monai_unet_bundle.writers.mask_suffixes`).

    Raises:
        BundleInputError: when ``rle_csv`` does not end in ``.csv`` or names a folder, or when a file
            this run would write already exists and no earlier inference run into ``output_dir`` wrote
            it (so none of the user's own files is ever overwritten).
    """

    def __init__(
        self,
        output_dir: str | Path,
        num_classes: int,
        scan: InputScan | None = None,
        overlays: bool = False,
        colour_masks: bool = False,
        probabilities: bool = False,
        rle_csv: str | None = None,
        rle_order: str = "row",
        class_names: list[str] | None = None,
        output_format: str = "auto",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_format = output_format
        self.num_classes = int(num_classes)
        self.scan = scan or InputScan()
        self.overlays = flag(overlays, "save_overlays")
        self.colour_masks = flag(colour_masks, "save_colour_masks")
        self.probabilities = flag(probabilities, "save_probabilities")
        self.rle_csv = self._rle_path(rle_csv)
        self.rle_order = rle_order
        _order(rle_order)  # validate early
        self.class_names = class_names or [f"class_{i}" for i in range(num_classes)]
        # class names as they appear in file names: no path separators or other characters file systems refuse
        self.file_class_names = [re.sub(r"[^\w.+-]+", "_", str(n)).strip("._") or f"class_{i}" for i, n in enumerate(self.class_names)]
        self.rows: list[tuple[str, str]] = []
        self.written: list[dict[str, Any]] = []
        self._start = 0.0
        self._bar = None
        self._names = self.scan.output_names  # the scan is fixed: looked up per file, built once
        self._rle_ids: dict[str, str] = {}
        self._earlier: list[str] = []
        self._ours = _previous_outputs(self.output_dir / SUMMARY_NAME)
        self._protect_existing_files()
        if any(p.suffix == ".dcm" for p in self.planned_files()):
            require_highdicom()

    def _rle_path(self, rle_csv: str | Path | None) -> Path | None:
        if rle_csv is None or str(rle_csv).strip() == "":
            return None
        path = Path(str(rle_csv)).expanduser()
        path = path if path.is_absolute() else self.output_dir / path
        if path.suffix.lower() != ".csv" or path.is_dir():
            raise BundleInputError(
                f"rle_csv {str(rle_csv)!r} must name a .csv file (absolute, or relative to output_dir), e.g. --rle_csv submission.csv."
            )
        return path

    def _name(self, path: str) -> str:
        """The output name of an input (sub-folder and stem, no extension)."""
        return self._names.get(path) or str(self._fallback_relative(path))

    def planned_files(self) -> list[Path]:
        """Every file this run will write, from the scan and the options."""
        files = [self.output_dir / SUMMARY_NAME]
        if self.rle_csv is not None:
            files.append(self.rle_csv)
        for item in self.scan.items:
            name = self._name(item["image"])
            files += [self.output_dir / (name + suffix) for suffix in mask_suffixes(item["image"], self.output_format)]
            if self.colour_masks:
                files.append(self.output_dir / "colour" / (name + ".png"))
            if self.overlays:
                files.append(self.output_dir / "overlays" / (name + ".png"))
            if self.probabilities:
                files += [self.output_dir / "probabilities" / f"{name}_{c}.png" for c in self.file_class_names[1:]]
        return files

    def _protect_existing_files(self) -> None:
        """Refuse to overwrite any file that an earlier inference run into ``output_dir`` did not write."""
        inputs = {Path(split_frame(item["image"])[0]).resolve() for item in self.scan.items}
        clashes = []
        for path in self.planned_files():
            resolved = path.resolve()
            if resolved in inputs or (path.exists() and resolved not in self._ours):
                clashes.append(path)
        if clashes:
            more = f" (and {len(clashes) - 1} more of the files it would write)" if len(clashes) > 1 else ""
            raise BundleInputError(
                f"inference would overwrite {str(clashes[0])!r}{more}, which no earlier inference run into output_dir "
                f"{str(self.output_dir)!r} wrote: choose a new or empty --output_dir (or another --rle_csv) so none of your files is lost."
            )

    def attach(self, engine: Engine) -> None:
        """Write per iteration, summarise at the end."""
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_batch)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        self.rows, self.written = [], []
        self._rle_ids = {}
        # recorded before the first write, so a run that is interrupted can be repeated into the same folder;
        # files earlier runs wrote stay recorded as ours while they exist, whatever this run writes
        self._earlier = sorted(str(p) for p in self._ours if p.is_file())
        planned = sorted({*self._earlier, *(str(p) for p in self.planned_files())})
        running = {"written_by": WRITTEN_BY, "status": "running", "planned": planned}
        atomic_write_text(self.output_dir / SUMMARY_NAME, json.dumps(running, indent=2) + "\n")
        if sys.stdout.isatty() and available("tqdm"):
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.scan.items) or None, desc="inference", unit="image")

    def _under_input_dir(self, src: Path) -> Path | None:
        """``src`` relative to the scanned ``input_dir``, or ``None`` when it lies elsewhere."""
        root = Path(self.scan.input_dir) if self.scan.input_dir else None
        return src.relative_to(root) if root is not None and root in src.parents else None

    def _fallback_relative(self, path: str) -> Path:
        src = Path(path)
        under = self._under_input_dir(src)
        return (under.parent if under is not None else Path()) / file_stem(src)

    def _rle_id(self, path: str) -> str:
        """The ``img`` of an image in the RLE CSV: its file name (Kaggle's convention), with its sub-folder
        under ``input_dir`` when it has one; an image whose id another already took gets its output name."""
        src = Path(path)
        under = self._under_input_dir(src)
        ident = under.as_posix() if under is not None else src.name
        if self._rle_ids.setdefault(ident, path) != path:
            ident = self._name(path) + src.suffix
        return ident

    def _relative(self, path: str, suffix: str) -> Path:
        return Path(self._name(path) + suffix)

    def _load_rgb(self, path: str) -> np.ndarray:
        if not path.lower().endswith(NIFTI_SUFFIXES) and not is_dicom(path):
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        from monai.transforms import LoadImage

        from monai_unet_bundle.transforms import EnsureChannelsd

        img = LoadImage(reader=Auto2DReader(kind="image"), image_only=True, ensure_channel_first=True)(path)
        img = EnsureChannelsd("image", 3).convert(img).float()
        lo, hi = float(img.min()), float(img.max())
        arr = np.asarray((img - lo) / (hi - lo) if hi > lo else img * 0)
        return (_hw(np.moveaxis(arr, 0, -1), path) * 255).astype(np.uint8)

    def _save_png(self, array: np.ndarray, rel: Path) -> str:
        target = self.output_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target)
        return str(target)

    def write_batch(self, engine: Engine) -> None:
        """Write the extra outputs of every image in the batch."""
        for item in engine.state.output:
            path = item_source(item, ("image", "pred"))
            pred = torch.as_tensor(item["pred"]).detach().cpu()
            index = np.asarray(pred[0] if pred.ndim == 3 else pred).astype(np.int64)
            index = _hw(index, path)
            record: dict[str, Any] = {"image": path}
            meta = getattr(item["pred"], "meta", None) or {}
            if meta.get("saved_to"):
                record["mask"] = str(meta["saved_to"])
            if meta.get("dicom_seg"):
                record["dicom_seg"] = str(meta["dicom_seg"])
            if is_dicom(path):
                spacing = pixel_spacing(read_header(path))
                record["pixel_spacing_mm"] = list(spacing) if spacing else None
            if self.colour_masks:
                record["colour"] = self._save_png(PALETTE[np.clip(index, 0, len(PALETTE) - 1)], Path("colour") / self._relative(path, ".png"))
            if self.overlays:
                record["overlay"] = self._save_png(overlay(self._load_rgb(path), index), Path("overlays") / self._relative(path, ".png"))
            if self.probabilities and "prob" in item:
                prob = np.asarray(torch.as_tensor(item["prob"]).detach().cpu().float())
                record["probabilities"] = [
                    self._save_png(
                        (np.clip(_hw(prob[c], path), 0, 1) * 255).round().astype(np.uint8),
                        Path("probabilities") / self._relative(path, f"_{self.file_class_names[c]}.png"),
                    )
                    for c in range(1, prob.shape[0])
                ]
            if self.rle_csv is not None:
                self.rows.append((self._rle_id(path), rle_encode(index > 0, self.rle_order)))
            self.written.append(record)
            if self._bar is not None:
                self._bar.update(1)
            elif len(self.written) % max(1, len(self.scan.items) // 5 or 1) == 0:
                logger.info("inference: %d of %d images written", len(self.written), len(self.scan.items))

    def finish(self, engine: Engine) -> dict[str, Any]:
        """Write the RLE CSV and ``inference_summary.json``; returns the summary."""
        if self._bar is not None:
            self._bar.close()
        seconds = time.perf_counter() - self._start
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.rle_csv is not None:
            buffer = io.StringIO(newline="")
            writer = csv.writer(buffer)
            writer.writerow(["img", "rle_mask"])
            writer.writerows(sorted(self.rows))
            atomic_write_text(self.rle_csv, buffer.getvalue())
        ours = {*self._earlier, *(str(p) for p in self.planned_files() if p.is_file())}
        summary = {
            "written_by": WRITTEN_BY,
            "status": "finished",
            "written": self.written,
            "skipped": self.scan.skipped,
            "images_written": len(self.written),
            "images_skipped": len(self.scan.skipped),
            "seconds_total": round(seconds, 3),
            "seconds_per_image": round(seconds / len(self.written), 4) if self.written else None,
            "rle_csv": str(self.rle_csv) if self.rle_csv else None,
            "rle_order": self.rle_order if self.rle_csv else None,
            "files": sorted(ours),
        }
        atomic_write_text(self.output_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        logger.info(
            "inference: %d written, %d skipped, %.3f s per image; summary in %s",
            len(self.written), len(self.scan.skipped), summary["seconds_per_image"] or 0.0, self.output_dir / "inference_summary.json",
        )
        return summary
