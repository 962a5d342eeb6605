"""Documented training and data settings, each run through ``python -m monai.bundle run`` and checked in the files it writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import config, run_bundle, write_pairs

pytestmark = pytest.mark.slow


def test_training_knobs_change_what_training_writes(tmp_path: Path):
    data = write_pairs(tmp_path / "data", n=8, size=(36, 44))
    proc = run_bundle(
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
        "--spatial_size", "[32,32]", "--batch_size", "2", "--num_workers", "0", "--max_epochs", "4",
        "--architecture", "unet", "--base_features", "8", "--activation", "relu", "--learning_rate", "0.004",
        "--lr_schedule", "step", "--val_interval", "2", "--num_previews", "2", "--cache", "disk", "--amp", "true",
        "--deterministic", "true", "--seed", "3", "--val_fraction", "0.25", "--early_stop_patience", "0",
        "--loss_name", "focal", "--class_weights", "[0.5,2.0]", "--channels_last", "false", "--fast_allocator", "false",
        env={"PYTHONWARNINGS": "default"},  # the amp warning is a Python warning
    )
    log = proc.stdout + proc.stderr
    assert "data check: 6 training, 2 validation pairs" in log  # val_fraction 0.25 of 8
    assert "seed 3, deterministic algorithms on" in log
    assert "amp=true has no effect on the CPU" in log
    assert "class weights" in log.lower() and "0.5" in log
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    first = next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    assert first.shape[0] == 8 and any(k.startswith("model.") for k in state)  # MONAI's strided UNet, 8 base features
    rows = list(csv.DictReader((tmp_path / "logs" / "curves.csv").open()))
    assert [int(float(r["epoch"])) for r in rows] == [2, 4]  # validated every 2 epochs
    lrs = [float(r["learning_rate"]) for r in rows]
    assert lrs[1] == pytest.approx(lrs[0] / 4) and lrs[0] < 0.004  # halved every epoch (step, 4 epochs)
    previews = sorted(p.name for p in (tmp_path / "logs" / "previews").glob("*.png"))
    assert previews == ["epoch_0002.png", "epoch_0004.png"]
    strip = Image.open(tmp_path / "logs" / "previews" / "epoch_0004.png")
    assert strip.height > strip.width / 3 * 1.5  # two image rows (image | truth | prediction each)
    assert any((tmp_path / "cache" / "persistent" / "train").iterdir())  # disk cache
    # inference given no network settings builds the strided UNet of width 8 with ReLU from the plan
    plan = json.loads((tmp_path / "models" / "plan.json").read_text())
    assert (plan["architecture"], plan["base_features"], plan["activation"]) == ("unet", 8, "relu")
    run_bundle("--config_file", config("inference.json"), "--bundle_root", str(tmp_path), "--input_dir", str(data / "images"),
               "--output_dir", str(tmp_path / "out"))
    assert len(list((tmp_path / "out").rglob("*.png"))) == 8


def test_patch_training_cuts_native_patches_and_validates_evaluates_and_infers_whole_images(tmp_path: Path):
    """Images of nine sizes: training batches 32x32 patches cut at the images' own resolution (a resize would have
    fitted them whole), several per image, about half centred on foreground, and an image smaller than a patch padded
    up; validation, evaluation and inference (sliding_window auto) run sliding windows over whole images and give
    masks and scores at their own size."""
    from monai.bundle import ConfigParser

    from tests.conftest import CONFIGS, make_demo_pair

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    sizes = [(24, 40), (100, 120), (128, 96), (112, 112), (96, 128), (120, 100), (104, 90), (90, 140), (110, 110)]
    for i, (h, w) in enumerate(sizes):
        image, mask = make_demo_pair(rng, h, w)
        Image.fromarray(image, "RGB").convert("L").save(data / "images" / f"case_{i}.png")
        Image.fromarray(mask * 255, "L").save(data / "masks" / f"case_{i}.png")
    pair = [{"image": f"images/case_{i}.png", "label": f"masks/case_{i}.png"} for i in range(len(sizes))]
    (data / "list.json").write_text(json.dumps({"training": pair[1:8], "validation": [pair[0], pair[8]]}))
    settings = {"patch_training": True, "spatial_size": [32, 32], "batch_size": 8}
    # the configured pipelines: 3 patches per image (a quarter of the median image's area), so 2 images per batch
    parser = ConfigParser()
    parser.read_config(CONFIGS / "train.json")
    parser.update({"bundle_root": str(tmp_path / "probe"), "dataset_dir": str(data), "datalist": str(data / "list.json"),
                   "augmentation": "none", "cache": "none", "num_workers": 0, **settings})
    assert parser.get_parsed_content("plan")["patches_per_image"] == 3
    assert parser.get_parsed_content("train#dataloader").batch_size == 2
    assert parser.get_parsed_content("validate#dataloader").batch_size == 1  # whole images of different sizes
    assert list(parser.get_parsed_content("validate#inferer").window.roi_size) == [32, 32]  # sliding windows
    dataset = parser.get_parsed_content("train#dataset")
    centred_on_foreground = 0
    for i in range(len(dataset)):
        for _ in range(3):
            patches = dataset[i]
            assert len(patches) == 3
            for patch in patches:
                assert tuple(patch["image"].shape) == (1, 32, 32) and tuple(patch["label"].shape) == (1, 32, 32)
                centred_on_foreground += int(patch["label"][0, 16, 16] > 0)
        # each patch is a window of the image at its own resolution (MONAI holds a PNG width first)
        native = np.asarray(Image.open(dataset.data[i]["image"]), np.float32).T / 255
        windows = np.lib.stride_tricks.sliding_window_view(native, (32, 32))
        for patch in patches:
            assert np.isclose(windows, patch["image"][0].numpy(), atol=1e-6).all(axis=(-2, -1)).any(), dataset.data[i]["image"]
    assert 0.25 < centred_on_foreground / (9 * len(dataset)) < 0.85  # half by design, plus background patches that hit it
    small = parser.get_parsed_content("validate#dataset")[0]  # 24 high: padded to a patch, still its own pixels
    assert tuple(small["image"].shape) == (1, 40, 32) and (small["image"][0, :, :4] == 0).all()
    # through the command line: train, evaluate (the small image at its size), infer every image at its size
    options = ["--patch_training", "true", "--spatial_size", "[32,32]", "--batch_size", "8", "--num_workers", "0",
               "--datalist", str(data / "list.json")]
    proc = run_bundle("--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
                      "--max_epochs", "2", *options)
    plan = json.loads((tmp_path / "models" / "plan.json").read_text())
    assert plan["patch_training"] is True and plan["spatial_size"] == [32, 32] and "patch_training True" in proc.stdout + proc.stderr
    assert len(list(csv.DictReader((tmp_path / "logs" / "curves.csv").open()))) == 2
    run_bundle("--config_file", config("train.json", "evaluate.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
               "--num_workers", "0", "--datalist", str(data / "list.json"))
    rows = {Path(r["filename"]).name: r for r in csv.DictReader((tmp_path / "eval" / "metrics_per_image.csv").open())}
    assert set(rows) == {"case_0.png", "case_8.png"}
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert sum(summary["all_pixels"]["support"]) == 24 * 40 + 110 * 110  # scored at the images' own size, padding removed
    run_bundle("--config_file", config("inference.json"), "--bundle_root", str(tmp_path), "--input_dir", str(data / "images"),
               "--output_dir", str(tmp_path / "out"))
    for i, (h, w) in enumerate(sizes):
        written = np.array(Image.open(tmp_path / "out" / f"case_{i}.png"))
        assert written.shape == (h, w) and set(np.unique(written)) <= {0, 255}


def test_mask_encodings_are_read_as_documented(tmp_path: Path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    palette = [[0, 0, 0], [200, 30, 30], [30, 200, 30]]
    expected = np.zeros(3, np.int64)
    for i in range(4):
        index = np.zeros((30, 40), np.int64)
        index[5:15, 5:20], index[18:28, 22:38] = 1, 2
        index = np.roll(index, i, axis=1)
        expected += np.bincount(index.ravel(), minlength=3)
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(data / "images" / f"c{i}.png")
        Image.fromarray(np.asarray(palette, np.uint8)[index]).save(data / "masks" / f"c{i}_seg.jpg", quality=92)

    def check(*args: str, rc: int = 0):
        return run_bundle("check_data", "--config_file", config("train.json"), "--bundle_root", str(tmp_path),
                          "--dataset_dir", str(data), "--spatial_size", "[32,32]", "--num_classes", "3", *args, expect_rc=rc)

    # JPEG colour masks: refused unless lossy masks are allowed, then snapped to the nearest palette colour
    proc = check("--mask_suffix", "_seg", "--mask_palette", json.dumps(palette), rc=2)
    assert "is a JPEG" in proc.stderr and "--allow_lossy_masks true" in proc.stderr
    check("--mask_suffix", "_seg", "--mask_palette", json.dumps(palette), "--allow_lossy_masks", "true")
    report = json.loads((tmp_path / "logs" / "data_check.json").read_text())
    freq = np.array(list(report["class_pixel_frequency"].values()))
    assert np.allclose(freq, expected / expected.sum(), atol=0.02)

    # grayscale bins: below 50 is class 0, 50 up to 150 class 1, 150 and above class 2
    for mask in (data / "masks").glob("*.jpg"):
        mask.unlink()
    gray = np.zeros((30, 40), np.uint8)
    gray[:, 10:20], gray[:, 20:] = 100, 220
    for i in range(4):
        Image.fromarray(gray).save(data / "masks" / f"c{i}.png")
    check("--mask_thresholds", "[50,150]")
    report = json.loads((tmp_path / "logs" / "data_check.json").read_text())
    assert list(report["class_pixel_frequency"].values()) == pytest.approx([0.25, 0.25, 0.5])
    proc = check(rc=2)  # without the thresholds those values are no class indices
    assert "holds values 100, 220 that map to no class" in proc.stderr
