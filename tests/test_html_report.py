"""The evaluation and cross-validation pages: self-contained HTML, checked as rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from monai_unet_bundle.crossval import summarise_folds, write_cross_validation_html
from monai_unet_bundle.html_report import confusion_picture, curves_svg
from monai_unet_bundle.metrics import SegmentationReport

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _evaluate(folder: Path, n: int = 5, curves: Path | None = None, worst: int = 3) -> SegmentationReport:
    """An evaluation of ``n`` 24x32 images whose predictions get worse with the index (image k misses k rows)."""
    report = SegmentationReport(folder, num_classes=2, class_names=["background", "lesion"], curves=curves, num_worst=worst)
    report.reset()
    for k in range(n):
        truth = torch.zeros(24, 32, dtype=torch.long)
        truth[4:20, 6:26] = 1
        pred = truth.clone()
        pred[4:4 + 3 * k] = 0
        image = MetaTensor(torch.rand(1, 16, 16), meta={"filename_or_obj": f"/data/img{k}.png"})  # the network's input size
        item = {"image": image, "pred": torch.stack([pred == 0, pred == 1]).float(), "label": truth[None].float()}
        engine = type("E", (), {"state": type("S", (), {"output": [item]})()})()
        report.collect(engine)
    report.write()
    return report


def _curves(path: Path, epochs: int = 6) -> Path:
    rows = ["epoch,train_loss,val_mean_dice"] + [f"{e},{1 / e:.4f},{0.5 + e / 20:.4f}" for e in range(1, epochs + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_page_is_self_contained_with_the_worst_images_worst_first(tmp_path):
    _evaluate(tmp_path / "eval", curves=_curves(tmp_path / "logs" / "curves.csv"))
    page = (tmp_path / "eval" / "report.html").read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing fetched: every picture is a data URI
    captions = re.findall(r"<figcaption>(.*?): mean foreground Dice ([0-9.]+)</figcaption>", page)
    assert [Path(name).name for name, _ in captions] == ["img4.png", "img3.png", "img2.png"]  # the 3 worst, worst first
    assert [float(d) for _, d in captions] == sorted(float(d) for _, d in captions)
    assert page.count("<polyline") == 2 and "<td>lesion</td>" in page  # loss and Dice curves, the class table
    assert sorted(p.name for p in (tmp_path / "eval" / "worst").iterdir()) == ["00.png", "01.png", "02.png"]
    assert Image.open(tmp_path / "eval" / "worst" / "00.png").size == (3 * 24 + 8, 32)  # three panels at the mask's size


def test_confusion_picture_shades_each_cell_by_its_rows_share():
    picture = confusion_picture([[90, 10], [0, 0]], ["background", "lesion"])
    assert picture.shape == (128, 128, 3)
    dark, light, empty = picture[5, 5], picture[5, 70], picture[70, 70]
    assert dark[2] > dark[0] and dark.sum() < light.sum() < empty.sum() and (empty == 255).all()
    assert curves_svg({"none": "/nonexistent/curves.csv"}) is None


def test_cross_validation_page_gathers_every_folds_worst_images_and_curves(tmp_path):
    for k in (0, 1):
        _evaluate(tmp_path / "eval" / f"fold_{k}", n=3 + k, curves=_curves(tmp_path / "logs" / f"fold_{k}" / "curves.csv", 4 + k))
    result = summarise_folds({k: tmp_path / "eval" / f"fold_{k}" for k in (0, 1)}, 2)
    page = write_cross_validation_html(result, tmp_path, num_worst=4).read_text()
    captions = re.findall(r"<figcaption>fold (\d): .*?img(\d)\.png: mean foreground Dice", page)
    assert captions == [("1", "3"), ("0", "2"), ("1", "2"), ("0", "1")]  # across folds, worst first
    assert page.count("<polyline") == 4 and "Cross-validation, 2 folds" in page
    assert result["out_of_fold"]["confusion_matrix"][1][0] > 0


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_chromium_renders_the_pictures_of_the_page(tmp_path):
    _evaluate(tmp_path / "eval", curves=_curves(tmp_path / "logs" / "curves.csv"), worst=2)
    shot = tmp_path / "page.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1000,1800", (tmp_path / "eval" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    # the confusion matrix's dark blue cell (a decoded data-URI PNG) and the red prediction overlay of a worst image
    blue = ((abs(pixels[:, 0] - 30) < 12) & (abs(pixels[:, 1] - 80) < 12) & (abs(pixels[:, 2] - 200) < 12)).sum()
    overlay_red = ((pixels[:, 0] > 150) & (pixels[:, 1] < 110) & (pixels[:, 2] < 110)).sum()
    curve_red = ((abs(pixels[:, 0] - 214) < 10) & (abs(pixels[:, 1] - 39) < 10) & (abs(pixels[:, 2] - 40) < 10)).sum()
    assert blue > 500, "the confusion matrix picture is not on the rendered page"
    assert overlay_red > 200, "no image with its prediction drawn over it is on the rendered page"
    assert curve_red > 50, "the training curve (inline SVG) is not on the rendered page"
