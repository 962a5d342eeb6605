"""The plan: settings derived from the data (unit checks of each rule, then real bundle runs given only the data)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.plan import (
    DataFingerprint,
    image_depth,
    make_plan,
    mask_histogram,
    plan_class_weights,
    plan_batch,
    plan_classes,
    plan_patch,
    plan_size,
    saved_plan,
)
from monai_unet_bundle.transforms import MaskToIndex, NormalizeImaged
from tests.conftest import config, run_bundle

AUTO_SETTINGS = {k: "auto" for k in ("num_classes", "in_channels", "spatial_size", "batch_size", "normalization", "class_weights", "class_names")}


def _fp(masks: list[np.ndarray], sizes=((100, 200),), modes=("L",)) -> DataFingerprint:
    fp = DataFingerprint(n_training=len(masks))
    for i, m in enumerate(masks):
        fp.masks[f"m{i}.png"] = mask_histogram(m[None] if m.ndim == 2 else m)
    for (h, w), mode in zip(sizes, modes):
        fp.heights.append(h)
        fp.widths.append(w)
        fp.modes[mode] += 1
    return fp


def _factory(k, palette, thresholds):
    return MaskToIndex(k, palette, thresholds)


@pytest.mark.parametrize(
    ("values", "expected_k", "thresholds"),
    [
        ([0, 255], 2, None),
        ([0, 1], 2, None),
        ([0, 1, 2, 3], 4, None),
        ([0, 128, 255], 3, [64.0, 191.5]),
    ],
)
def test_classes_are_read_from_the_mask_values(values, expected_k, thresholds):
    masks = [np.array([values], dtype=np.uint8).repeat(4, 0), np.zeros((4, 4), np.uint8)]
    k, palette, cuts, why = plan_classes(_fp(masks), AUTO_SETTINGS)
    assert (k, palette, cuts) == (expected_k, None, thresholds)
    assert why != "set"
    # the pipeline's own conversion then maps every value to a distinct class 0..k-1
    converted = MaskToIndex(k, palette, cuts)(torch.tensor(np.array(values, dtype=np.float64)[None, None]))
    assert converted.ravel().tolist() == list(range(k)) if expected_k == len(values) else True


def test_a_value_in_one_mask_of_many_is_not_planned_as_a_class():
    """0/255 masks plus one damaged mask holding 7: still binary, and the pipeline refuses the damaged mask by name."""
    masks = [np.array([[0, 255]], np.uint8)] * 5 + [np.array([[0, 7, 255]], np.uint8)]
    k, palette, cuts, _ = plan_classes(_fp(masks), AUTO_SETTINGS)
    assert (k, palette, cuts) == (2, None, None)
    from monai.data import MetaTensor

    damaged = MetaTensor(torch.tensor([[[0.0, 7.0, 255.0]]]), meta={"filename_or_obj": "m5.png"})
    with pytest.raises(BundleInputError, match="m5.png holds values 7 that map to no class"):
        MaskToIndex(k)(damaged)


def test_colour_masks_get_a_palette_with_black_first():
    rgb = np.zeros((3, 4, 4), np.uint8)
    rgb[:, 0, 0] = (0, 255, 0)
    rgb[:, 1, 1] = (255, 0, 0)
    k, palette, cuts, _ = plan_classes(_fp([rgb]), AUTO_SETTINGS)
    assert k == 3 and cuts is None
    assert palette == [[0, 0, 0], [0, 255, 0], [255, 0, 0]]


def test_explicit_settings_win_and_unreadable_values_are_refused():
    masks = [np.array([[0, 128, 255]], np.uint8)]
    assert plan_classes(_fp(masks), {**AUTO_SETTINGS, "num_classes": 5})[0] == 5
    assert plan_classes(_fp(masks), {**AUTO_SETTINGS, "mask_thresholds": [100]})[:3] == (2, None, [100])
    # uneven levels with 0 and 255 among them are binary masks with stray values (reported per file by the check)
    assert plan_classes(_fp([np.array([[0, 7, 255]], np.uint8)]), AUTO_SETTINGS)[:3] == (2, None, None)
    with pytest.raises(BundleInputError, match=r"3 distinct values \(0, 7, 200\), which are neither"):
        plan_classes(_fp([np.array([[0, 7, 200]], np.uint8)]), AUTO_SETTINGS)
    many = [np.arange(0, 200, 4, dtype=np.uint8)[None].repeat(2, 0)]  # 50 gray levels: not classes
    with pytest.raises(BundleInputError, match="50 distinct values.*neither class indices.*--num_classes with --mask_thresholds"):
        plan_classes(_fp(many), AUTO_SETTINGS)


def test_size_keeps_the_aspect_ratio_within_the_budget_on_the_stride_grid():
    fp = _fp([], sizes=((600, 1000), (500, 900), (700, 1100)), modes=("L", "L", "L"))
    size, why = plan_size(fp, "auto", "auto", "cpu")
    assert all(s % 16 == 0 for s in size)
    assert size[0] * size[1] <= 256 * 256 * 1.15
    assert abs(size[1] / size[0] - 1000 / 600) < 0.15  # the median image's aspect ratio
    assert "median image 600x1000" in why
    small = _fp([], sizes=((50, 70),), modes=("L",))
    assert plan_size(small, "auto", "auto", "cpu")[0] == [48, 64]  # never enlarged beyond the stride grid
    assert plan_size(fp, [64, 96], "auto", "cpu") == ([64, 96], "set")
    assert plan_size(fp, "auto", 128, "cpu") == ([128, 128], "input_size")
    assert plan_size(fp, [64, 96], 128, "cpu") == ([64, 96], "set")  # a size given on the command line wins
    assert plan_size(fp, "auto", "auto", "cuda")[0][0] > size[0]  # a GPU gets a larger budget
    # a short time budget on a CPU buys a smaller input (50 epochs at the expected speed); a long one changes nothing
    fp.n_training = 100
    short, why = plan_size(fp, "auto", "auto", "cpu", minutes=5)
    assert short[0] * short[1] < size[0] * size[1] / 2 and "5 minutes buy 50 epochs of 100 images" in why
    assert abs(short[1] / short[0] - 1000 / 600) < 0.2 and max(short) >= 128
    assert plan_size(fp, "auto", "auto", "cpu", minutes=120)[0] == size
    # but not below 128 pixels on the longer side, nor an image's own size
    tiny, why = plan_size(fp, "auto", "auto", "cpu", minutes=0.5)
    assert tiny == [80, 128] and "no smaller than 128 pixels on the longer side" in why
    small.n_training = 1000
    assert plan_size(small, "auto", "auto", "cpu", minutes=0.5)[0] == [48, 64]


def test_batch_size_fills_the_device_budget_with_small_steps_on_a_cpu():
    assert plan_batch([144, 144], "auto", "cpu", 80)[0] == 6
    assert plan_batch([256, 256], "auto", "cpu", 80)[0] == 4  # never below 4 images (batch norm)
    assert plan_batch([512, 512], "auto", "cuda", 80)[0] == 8
    assert plan_batch([64, 64], "auto", "cuda", 80)[0] == 32
    assert plan_batch([64, 64], "auto", "cpu", 3)[0] == 3  # at most the training pairs
    assert plan_batch([64, 64], 5, "cpu", 80) == (5, "set")


def test_normalization_and_weights_follow_the_kind_of_data():
    assert [image_depth(m) for m in ("L", "RGB", "P", "I;16", "F", "NIfTI int16", "NIfTI uint8", "DICOM MONOCHROME2", "DICOM RGB")] == [
        "8-bit", "8-bit", "8-bit", "wide", "wide", "wide", "8-bit", "wide", "8-bit"]
    rare = np.zeros((100, 100), np.uint8)
    rare[:5, :5] = 1  # 0.25% foreground
    plan = make_plan(_fp([rare], modes=("I;16",)), AUTO_SETTINGS, "cpu", _factory)
    assert plan["normalization"] == "percentile" and plan["in_channels"] == 1
    weights = plan["class_weights"]
    assert weights[1] > 10 * weights[0] and abs(sum(weights) / 2 - 1) < 1e-3
    common = np.zeros((10, 10), np.uint8)
    common[:5] = 1
    plan = make_plan(_fp([common], modes=("RGB",)), AUTO_SETTINGS, "cpu", _factory)
    assert plan["class_weights"] is None and plan["normalization"] == "unit" and plan["in_channels"] == 3
    assert plan_class_weights(np.array([90, 10]), "auto", "weighted_ce")[0] == "inverse_frequency"
    with pytest.raises(BundleInputError, match="class_names lists 3 names but there are 2 classes"):
        make_plan(_fp([common]), {**AUTO_SETTINGS, "class_names": ["a", "b", "c"]}, "cpu", _factory)


def test_normalize_modes():
    img = torch.tensor([[[0.0, 51.0], [102.0, 255.0]]])
    assert torch.allclose(NormalizeImaged("image", "unit")({"image": img})["image"], img / 255)
    assert NormalizeImaged("image", "minmax")({"image": img})["image"].max() == 1
    hot = torch.cat([torch.linspace(0, 1000, 999), torch.tensor([1e6])]).view(1, 40, 25)
    z = NormalizeImaged("image", "zscore")({"image": hot})["image"]
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    assert float(z.max()) < 2.5  # the hot pixel was clipped to the 99.5th percentile, not allowed to set the scale
    p = NormalizeImaged("image", "percentile")({"image": hot})["image"]
    assert float(p.min()) == 0.0 and float(p.max()) == 1.0
    assert 0.4 < float(p.view(-1)[500]) < 0.6  # the middle of the range stays in the middle: the hot pixel set no scale
    with pytest.raises(BundleInputError, match="normalization"):
        NormalizeImaged("image", "bogus")


def test_patches_only_for_images_too_large_to_resize_into_the_budget():
    large = _fp([], sizes=((1400, 1100), (1200, 1000), (1500, 1300)), modes=("L", "L", "L"))
    patches, why = plan_patch(large, "auto", None, "cpu")
    assert patches and "median image 1400x1100" in why and "would scale it by 0.21" in why
    assert plan_patch(large, "auto", None, "cuda")[0]  # 0.42 into a GPU's 512x512 budget: still patches
    # 512x512 (a CT slice) resizes to 256x256 on a CPU at a scale of 0.5: whole images, as before
    ct = _fp([], sizes=((512, 512),), modes=("L",))
    assert plan_patch(ct, "auto", None, "cpu") == (False, "the median image 512x512 resizes into the cpu budget at a scale of 0.50")
    assert not plan_patch(ct, "auto", None, "cuda")[0]
    assert plan_patch(large, "auto", [256, 256], "cpu") == (False, "spatial_size set: whole images resized to it")
    assert plan_patch(ct, "true", None, "cpu") == (True, "set") and plan_patch(large, False, None, "cpu") == (False, "set")
    with pytest.raises(BundleInputError, match="patch_training"):
        plan_patch(large, "yes", None, "cpu")


def test_plan_records_patch_training_and_inference_follows_it(tmp_path):
    masks = [np.pad(np.ones((300, 300), np.uint8), 500)] * 8
    fp = _fp(masks, sizes=((1300, 1300),) * 8, modes=("L",) * 8)
    plan = make_plan(fp, {**AUTO_SETTINGS, "loss_name": "dice_ce", "patch_training": "auto"}, "cpu", _factory)
    assert plan["patch_training"] and plan["training"].startswith("patches of spatial_size at the images' own resolution")
    assert plan["spatial_size"] == [256, 256]  # the patch: the device's budget in the median image's shape
    # 1300x1300 holds 25.8 patches of 256x256: a quarter of that per image and epoch, but at most half the batch of 4
    assert plan["batch_size"] == 4 and plan["patches_per_image"] == 2 and "2 image(s) per batch of 4" in plan["why"]["patches_per_image"]
    assert make_plan(fp, {**AUTO_SETTINGS, "loss_name": "dice_ce", "batch_size": 16}, "cpu", _factory)["patches_per_image"] == 6
    given = make_plan(fp, {**AUTO_SETTINGS, "loss_name": "dice_ce", "input_size": 128}, "cpu", _factory)
    assert not given["patch_training"] and given["spatial_size"] == [128, 128] and given["patches_per_image"] == 1
    # inference's sliding_window auto follows the model's plan; a plan from before patch training means whole images
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert saved_plan(ckpt, {"sliding_window": "auto"})["sliding_window"] is True
    assert saved_plan(ckpt, {})["sliding_window"] is True
    assert saved_plan(ckpt, {"sliding_window": "false"})["sliding_window"] is False
    (tmp_path / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "patch_training"}))
    old = saved_plan(ckpt, {"sliding_window": "auto"})
    assert old["patch_training"] is False and old["sliding_window"] is False
    assert saved_plan(ckpt, {"sliding_window": True})["sliding_window"] is True


def test_saved_plan_falls_back_on_the_weights(tmp_path):
    from monai_unet_bundle.networks import build_network

    ckpt = tmp_path / "model.pt"
    torch.save(build_network(in_channels=1, out_channels=4, base_features=2).state_dict(), ckpt)
    plan = saved_plan(ckpt, {"num_classes": "auto", "in_channels": "auto", "spatial_size": "auto", "class_names": "auto"})
    assert (plan["num_classes"], plan["in_channels"], plan["spatial_size"]) == (4, 1, [512, 512])
    assert plan["class_names"] == ["background", "class_1", "class_2", "class_3"]
    assert (plan["architecture"], plan["base_features"], plan["activation"]) == ("basic_unet", 2, "elu")  # from the weights
    # a plan written before the network was part of it: the weights tell the network
    strided = tmp_path / "strided" / "model.pt"
    strided.parent.mkdir()
    torch.save(build_network("unet", in_channels=1, out_channels=4, base_features=4).state_dict(), strided)
    old = {k: v for k, v in plan.items() if k not in ("architecture", "base_features", "activation")}
    (strided.parent / "plan.json").write_text(json.dumps(old))
    assert [saved_plan(strided, {})[k] for k in ("architecture", "base_features", "activation")] == ["unet", 4, "elu"]
    assert saved_plan(strided, {"activation": "relu", "architecture": "auto"})["activation"] == "relu"  # settings win
    (strided.parent / "plan.json").write_text(json.dumps({**old, "architecture": "dynunet", "base_features": 8, "activation": "leakyrelu"}))
    assert [saved_plan(strided, {"base_features": "auto"})[k] for k in ("architecture", "base_features", "activation")] == [
        "dynunet", 8, "leakyrelu"]  # the plan's network, when it has one
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "spatial_size": [96, 64], "normalization": "zscore"}))
    plan = saved_plan(ckpt, {"num_classes": "auto", "spatial_size": "auto", "batch_size": 3})
    assert plan["spatial_size"] == [96, 64] and plan["normalization"] == "zscore" and plan["batch_size"] == 3
    plan = saved_plan(ckpt, {"mask_thresholds": [100.0], "input_size": 64, "spatial_size": [32, 48]})
    assert plan["mask_thresholds"] == [100.0] and plan["spatial_size"] == [32, 48]
    assert saved_plan(ckpt, {"input_size": 64, "spatial_size": "auto"})["spatial_size"] == [64, 64]
    # an earlier run's model kept as model_<time>.pt keeps its own plan beside it
    kept = tmp_path / "model_20261202-120000.pt"
    kept.write_bytes(ckpt.read_bytes())
    (tmp_path / "model_20261202-120000.plan.json").write_text(json.dumps({**plan, "spatial_size": [16, 16]}))
    assert saved_plan(kept, {})["spatial_size"] == [16, 16] and saved_plan(ckpt, {})["spatial_size"] == [96, 64]
    (tmp_path / "plan.json").write_text("not json")
    with pytest.raises(BundleInputError, match="plan.json is not a plan written by training.*--normalization"):
        saved_plan(ckpt, {})
    (tmp_path / "plan.json").write_text(json.dumps({"num_classes": 2}))
    with pytest.raises(BundleInputError, match=r"\(no in_channels, spatial_size, batch_size, normalization, class_names\)"):
        saved_plan(ckpt, {})


def _gray_three_class_set(root: Path, n: int = 10) -> Path:
    """Grayscale images of different sizes with masks whose classes are gray levels 0/128/255 (no class settings work)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = int(rng.integers(40, 56)), int(rng.integers(60, 80))
        mask = np.zeros((h, w), np.uint8)
        mask[5:20, 5:25] = 128
        mask[h - 18 : h - 4, w - 30 : w - 6] = 255
        image = (rng.normal(60, 10, (h, w)) + (mask == 128) * 80 + (mask == 255) * 160).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"img_{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"img_{i:02d}.png")
    return root


@pytest.mark.slow
def test_bundle_given_only_the_data_plans_trains_evaluates_and_infers(tmp_path):
    """Training given nothing but the folder plans 3 classes, 1 channel and a wide input; evaluation and
    inference read the plan from models/, so their command lines need no class, channel or size settings."""
    data = _gray_three_class_set(tmp_path / "data")
    bundle = tmp_path / "bundle"
    run_bundle("--config_file", config("train.json"), "--bundle_root", str(bundle), "--dataset_dir", str(data),
               "--max_epochs", "2", "--num_workers", "0")
    plan = json.loads((bundle / "logs" / "plan.json").read_text())
    assert plan == json.loads((bundle / "models" / "plan.json").read_text())
    assert plan["num_classes"] == 3 and plan["mask_thresholds"] == [64.0, 191.5] and plan["in_channels"] == 1
    assert plan["spatial_size"][1] > plan["spatial_size"][0] and all(s % 16 == 0 for s in plan["spatial_size"])
    assert plan["normalization"] == "unit" and plan["why"]["num_classes"].startswith("3 evenly spread gray levels")
    report = json.loads((bundle / "logs" / "data_check.json").read_text())
    assert report["plan"] == plan and set(report["class_pixel_frequency"]) == {"background", "class_1", "class_2"}

    run_bundle("--config_file", config("train.json", "evaluate.json"), "--bundle_root", str(bundle), "--dataset_dir", str(data),
               "--num_workers", "0")
    metrics = json.loads((bundle / "eval" / "metrics_summary.json").read_text())
    assert len(metrics["mean_over_images"]["dice"]) == 3

    out = tmp_path / "out"
    run_bundle("--config_file", config("inference.json"), "--bundle_root", str(bundle), "--input_dir", str(data / "images"),
               "--output_dir", str(out), "--num_workers", "0")
    for image in sorted((data / "images").glob("*.png")):
        pred = np.asarray(Image.open(out / image.name))
        assert pred.shape == np.asarray(Image.open(image)).shape  # original size
        assert set(np.unique(pred).tolist()) <= {0, 1, 2}

    # an explicit setting still wins over the plan, and a bad one is refused with its name
    proc = run_bundle("--config_file", config("inference.json"), "--bundle_root", str(bundle), "--input_dir", str(data / "images"),
                      "--output_dir", str(tmp_path / "out2"), "--in_channels", "3", expect_rc=2)
    assert "was trained for 1 input channel while in_channels is 3: pass --in_channels 1" in proc.stderr


@pytest.mark.slow
def test_nifti_slices_get_percentile_and_the_planned_size(tmp_path):
    """16-bit NIfTI slices of two shapes: z-score normalisation and a non-square size from the median slice."""
    rng = np.random.default_rng(1)
    data = tmp_path / "nii"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(6):
        h, w = (48, 96) if i % 2 else (50, 100)
        label = np.zeros((h, w), np.uint8)
        label[10:30, 20:60] = 1
        image = (rng.normal(-800, 50, (h, w)) + label.astype(np.float64) * 900).astype(np.int16)
        nib.save(nib.Nifti1Image(image, np.eye(4)), data / "images" / f"s{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), data / "masks" / f"s{i}.nii.gz")
    bundle = tmp_path / "bundle"
    run_bundle("--config_file", config("train.json"), "--bundle_root", str(bundle), "--dataset_dir", str(data),
               "--max_epochs", "1", "--num_workers", "0")
    plan = json.loads((bundle / "models" / "plan.json").read_text())
    assert plan["normalization"] == "percentile" and plan["num_classes"] == 2 and plan["in_channels"] == 1
    assert plan["spatial_size"] == [48, 96]
