from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.metrics import SegmentationReport, confusion_matrix, default_class_names, scores


def test_confusion_matrix_rows_are_truth():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    assert confusion_matrix(pred, truth, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match="class indices must lie in 0..1"):
        confusion_matrix(np.array([2]), np.array([0]), 2)


def test_scores_from_a_hand_computed_matrix():
    cm = np.array([[50, 2, 3], [4, 20, 1], [0, 5, 15]])
    s = scores(cm)
    # class 1: TP 20, FP 2+5, FN 4+1
    assert s["dice"][1] == pytest.approx(40 / 52)
    assert s["iou"][1] == pytest.approx(20 / 32)
    assert s["precision"][1] == pytest.approx(20 / 27)
    assert s["recall"][1] == pytest.approx(20 / 25)
    p, r = 20 / 27, 20 / 25
    assert s["f1"][1] == pytest.approx(2 * p * r / (p + r))
    assert s["support"] == [55, 25, 20]
    assert s["accuracy"] == pytest.approx(85 / 100)
    assert s["mean_dice"] == pytest.approx((40 / 52 + 30 / 39) / 2)  # class 2: TP 15, FP 4, FN 5


def test_empty_ground_truth_conventions():
    absent = scores(np.array([[10, 0], [0, 0]]))  # class 1 in neither truth nor prediction
    assert math.isnan(absent["dice"][1]) and math.isnan(absent["mean_dice"])
    assert math.isnan(absent["precision"][1]) and math.isnan(absent["f1"][1])
    false_alarm = scores(np.array([[8, 2], [0, 0]]))  # predicted but absent from the truth
    assert false_alarm["dice"][1] == 0.0 and false_alarm["iou"][1] == 0.0 and false_alarm["precision"][1] == 0.0


def _item(pred_idx, label_idx, name, k):
    onehot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a), k).permute(2, 0, 1).float()  # noqa: E731
    return {"pred": onehot(pred_idx), "label": onehot(label_idx), "image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": name})}


def test_report_writes_csv_json_and_markdown(tmp_path):
    a_truth = np.array([[0, 1], [2, 2]]); a_pred = np.array([[0, 1], [2, 0]])
    b_truth = np.array([[0, 0], [0, 1]]); b_pred = np.array([[0, 0], [0, 1]])
    batches = [[_item(a_pred, a_truth, "/d/a.png", 3)], [_item(b_pred, b_truth, "/d/b.png", 3)]]
    engine = Engine(lambda e, batch: batch)
    report = SegmentationReport(tmp_path / "eval", 3, ["background", "cell", "nucleus"])
    report.attach(engine)
    engine.run(batches, max_epochs=1)

    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics_per_image.csv")))
    assert [r["filename"] for r in rows] == ["/d/a.png", "/d/b.png"]
    assert float(rows[0]["dice_nucleus"]) == pytest.approx(2 / 3, abs=1e-6)  # TP 1, FN 1
    assert float(rows[0]["mean_dice"]) == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)
    assert rows[1]["dice_nucleus"] == "n/a" and float(rows[1]["mean_dice"]) == 1.0  # absent class left out
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["images"] == 2
    assert summary["mean_over_images"]["mean_dice"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert summary["confusion_matrix"] == [[4, 0, 0], [0, 2, 0], [1, 0, 1]]
    assert summary["all_pixels"]["accuracy"] == pytest.approx(7 / 8)
    md = (tmp_path / "eval" / "metrics_report.md").read_text()
    assert "| nucleus | 0.6667 | 0.5000 | 1.0000 | 0.5000 | 0.6667 | 2 |" in md
    # a second run starts afresh
    engine.run([batches[1]], max_epochs=1)
    assert len(list(csv.DictReader(open(tmp_path / "eval" / "metrics_per_image.csv")))) == 1


def test_class_names():
    assert default_class_names(2) == ["background", "foreground"]
    assert default_class_names(4) == ["background", "class_1", "class_2", "class_3"]
    with pytest.raises(BundleInputError, match="class_names has 2 names but num_classes=3: pass --class_names with 3 names"):
        SegmentationReport("x", 3, ["a", "b"])


def test_the_report_never_overwrites_files_an_evaluation_did_not_write(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics_report.md").write_text("my own notes")
    with pytest.raises(BundleInputError, match=r"^evaluation would overwrite .*metrics_report\.md'.*choose a new or empty --output_dir"):
        SegmentationReport(out, 2)
    (out / "metrics_report.md").unlink()
    report = SegmentationReport(out, 2)
    report.rows = [("a.png", np.array([[3, 1], [0, 4]]))]
    report.write()
    SegmentationReport(out, 2)  # a second evaluation may replace the first one's files
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleInputError, match="is a file"):
        SegmentationReport(tmp_path / "file", 2)
