"""The training and evaluation configs, run for real through ``monai.bundle``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from tests.conftest import CONFIGS, TINY, config, run_bundle, write_pairs

pytestmark = pytest.mark.slow


def test_training_saves_a_plain_state_dict(trained_bundle: Path):
    state = torch.load(trained_bundle / "models" / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    parser = ConfigParser()
    parser.read_config(CONFIGS / "train.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state)  # strict: every key matches the bundle's network
    assert list((trained_bundle / "logs").glob("events.out.tfevents.*")), "TensorBoard logs missing"


def test_train_workflow_has_every_property(tiny_dataset: Path, tmp_path: Path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(tiny_dataset),
        spatial_size=[32, 32],
        num_workers=0,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == 100 and workflow.val_interval == 1
    assert len(workflow.train_dataset_data) + len(workflow.val_dataset_data) == 6


def test_demo_data_is_created_when_no_dataset_is_given(tmp_path: Path):
    run_bundle("--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--max_epochs", "1", *TINY)
    assert len(list((tmp_path / "data" / "demo" / "images").glob("*.png"))) == 100
    assert (tmp_path / "models" / "model.pt").is_file()


def test_evaluation_writes_per_image_metrics_and_summary(trained_bundle: Path, tmp_path: Path):
    out = tmp_path / "eval"
    proc = run_bundle(
        "--config_file", config("train.json", "evaluate.json"), "--bundle_root", str(trained_bundle),
        "--dataset_dir", str(trained_bundle / "data"), "--output_dir", str(out), *TINY,
    )
    with open(out / "metrics_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # 20% of 8 pairs, the same split as training
    assert all(Path(r["filename"]).parent.name == "images" for r in rows)
    dice = [float(r["dice_foreground"]) for r in rows if r["dice_foreground"] != "n/a"]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["class_names"] == ["background", "foreground"]
    assert summary["mean_over_images"]["mean_dice"] == pytest.approx(sum(dice) / len(dice), abs=1e-5)
    # MONAI's MeanDice (the key metric) agrees with the report: both at the original image size
    logged = [line for line in (proc.stdout + proc.stderr).splitlines() if "Metrics -- val_mean_dice:" in line]
    assert logged and float(logged[-1].rsplit(":", 1)[1]) == pytest.approx(sum(dice) / len(dice), abs=1e-4)
    assert "| foreground |" in (out / "metrics_report.md").read_text()


def test_evaluation_scores_after_the_post_processing_inference_applies(trained_bundle: Path, tmp_path: Path):
    root = tmp_path / "bundle"
    shutil.copytree(trained_bundle / "models", root / "models")
    plan_file = root / "models" / "plan.json"
    plan = json.loads(plan_file.read_text())
    # a choice (as cross-validation stores it) that drops every object: its effect on the scores cannot be missed
    plan["postprocessing"] = {"remove_smaller_than": [0, 10**9], "fill_holes": [], "keep_largest_component": []}
    plan_file.write_text(json.dumps(plan))
    common = ["--config_file", config("train.json", "evaluate.json"), "--bundle_root", str(root),
              "--dataset_dir", str(trained_bundle / "data"), *TINY]

    run_bundle(*common, "--output_dir", str(tmp_path / "auto"))
    summary = json.loads((tmp_path / "auto" / "metrics_summary.json").read_text())
    assert summary["postprocessing"]["remove_smaller_than"] == [0, 10**9]
    with open(tmp_path / "auto" / "metrics_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["dice_foreground"]) == 0.0 for r in rows)  # every mask has foreground
    assert summary["confusion_matrix"][0][1] == summary["confusion_matrix"][1][1] == 0  # nothing predicted foreground
    note = "Scored after post-processing, as inference applies it: class 1: drop objects under 1000000000 px."
    assert note in (tmp_path / "auto" / "metrics_report.md").read_text()
    assert note in (tmp_path / "auto" / "report.html").read_text()

    run_bundle(*common, "--output_dir", str(tmp_path / "off"), "--remove_smaller_than", "0")  # the user's setting wins
    summary = json.loads((tmp_path / "off" / "metrics_summary.json").read_text())
    assert summary["postprocessing"] is None
    assert summary["confusion_matrix"][0][1] + summary["confusion_matrix"][1][1] > 0  # the network's own foreground
    assert "Scored without post-processing." in (tmp_path / "off" / "metrics_report.md").read_text()


def test_evaluation_without_a_model_says_so(tmp_path: Path, tiny_dataset: Path):
    proc = run_bundle(
        "--config_file", config("train.json", "evaluate.json"), "--bundle_root", str(tmp_path),
        "--dataset_dir", str(tiny_dataset), *TINY, expect_rc=2,
    )
    assert "error: no trained model at" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spatial_size", "[40,40]"], "spatial_size [40, 40] is not divisible by the U-Net's total stride 16: use [48, 48] instead."),
        (["--activation", "swish"], "activation is 'swish', but it must be one of auto, elu, relu, leakyrelu: pass --activation with such a value."),
        (["--dataset_dir", "/nonexistent/x"], "dataset_dir '/nonexistent/x' does not exist"),
    ],
)
def test_bad_settings_end_in_one_sentence(tmp_path: Path, tiny_dataset: Path, args: list[str], message: str):
    full = ["--dataset_dir", str(tiny_dataset), "--num_workers", "0", *args]
    proc = run_bundle("--config_file", config("train.json"), "--bundle_root", str(tmp_path), *full, expect_rc=2)
    assert proc.stderr.splitlines() == ["error: " + message] if message.endswith(".") else message in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models").exists()


def test_an_empty_validation_split_stops_before_training(tmp_path: Path):
    data = write_pairs(tmp_path / "one", n=1)
    proc = run_bundle(
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data), *TINY, expect_rc=2
    )
    assert proc.stderr.strip().splitlines() == [
        "error: found 1 image/mask pair(s) and no validation list, so the validation split would be empty and no model "
        "could ever be saved: add pairs (at least 2), or give validation pairs with --val_dataset_dir or a datalist."
    ]
    assert "Epoch" not in proc.stdout
