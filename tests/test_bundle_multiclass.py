"""Multiclass end to end through ``monai.bundle``: train, evaluate, infer, and check the numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_unet_bundle.demo import make_multiclass_demo_pair
from tests.conftest import TINY, config, run_bundle

pytestmark = pytest.mark.slow


def _write_multiclass(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        image, mask = make_multiclass_demo_pair(rng, 44 + i, 50, num_classes=3)
        Image.fromarray(image).save(root / "images" / f"m_{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"m_{i}.png")
    return root


def test_multiclass_train_evaluate_infer_agree(tmp_path: Path):
    data = _write_multiclass(tmp_path / "data")
    common = ["--bundle_root", str(tmp_path), "--dataset_dir", str(data), "--num_classes", "3", *TINY]
    proc = run_bundle("--config_file", config("train.json"), "--max_epochs", "2", "--loss_name", "weighted_ce", *common)
    assert "class weights (auto, inverse pixel frequency" in proc.stdout + proc.stderr
    assert list((tmp_path / "cache").glob("class_weights_*.json"))

    run_bundle("--config_file", config("train.json", "evaluate.json"), "--output_dir", str(tmp_path / "eval"), *common)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics_per_image.csv")))
    assert len(rows) == 2 and {"dice_class_1", "dice_class_2", "iou_class_2", "accuracy"} <= set(rows[0])
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["class_names"] == ["background", "class_1", "class_2"]
    assert len(summary["confusion_matrix"]) == 3
    assert "## Confusion matrix" in (tmp_path / "eval" / "metrics_report.md").read_text()

    # the same images through inference; the written masks must give the evaluation's numbers
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    for row in rows:
        Image.open(row["filename"]).save(val_dir / Path(row["filename"]).name)
    run_bundle(
        "--config_file", config("inference.json"), "--input_dir", str(val_dir), "--output_dir", str(tmp_path / "pred"),
        "--bundle_root", str(tmp_path), "--num_classes", "3", *TINY,
    )
    for row in rows:
        name = Path(row["filename"]).name
        pred = np.array(Image.open(tmp_path / "pred" / name))
        truth = np.array(Image.open(data / "masks" / name))
        assert pred.shape == truth.shape and set(np.unique(pred)) <= {0, 1, 2}
        accuracy = float((pred == truth).mean())
        assert accuracy == pytest.approx(float(row["accuracy"]), abs=1e-6)
        for c in (1, 2):
            p, t = pred == c, truth == c
            if p.sum() + t.sum() == 0:
                assert row[f"dice_class_{c}"] == "n/a"
            else:
                assert 2 * (p & t).sum() / (p.sum() + t.sum()) == pytest.approx(float(row[f"dice_class_{c}"]), abs=1e-6)
