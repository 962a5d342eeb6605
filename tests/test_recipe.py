"""The training recipe's options: augmentation levels, polynomial decay, SGD, batch Dice (units, then one CLI run)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Rand2DElasticd, RandAffined, RandFlipd

from monai_unet_bundle.augment import augmentations
from monai_unet_bundle.budget import TimeBudget
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.losses import SegmentationLoss
from monai_unet_bundle.schedules import build_optimizer, build_scheduler, curve_factor, poly_factor
from tests.conftest import config, run_bundle


def _kinds(level: str, mirror: bool = True) -> list[type]:
    return [type(t) for t in augmentations(level, mirror)]


def test_augmentation_levels():
    assert augmentations("none") == []
    assert _kinds("light").count(RandFlipd) == 2 and RandAffined not in _kinds("light")
    assert RandAffined in _kinds("default") and Rand2DElasticd not in _kinds("default")
    assert Rand2DElasticd in _kinds("heavy") and len(_kinds("heavy")) > len(_kinds("default")) > len(_kinds("light"))
    assert RandFlipd not in _kinds("heavy", mirror="false")
    with pytest.raises(BundleInputError, match="augmentation must be one of none, light, default, heavy"):
        augmentations("strong")
    # geometric transforms move the mask with the image and keep it a class-index map
    label = torch.zeros(1, 48, 48)
    label[0, 10:30, 5:25], label[0, 30:45, 30:45] = 1, 2
    pipeline = Compose(augmentations("heavy"))
    pipeline.set_random_state(seed=3)
    moved = 0
    for _ in range(12):
        out = pipeline({"image": label.clone() / 2, "label": label.clone()})
        assert set(np.unique(np.asarray(out["label"])).tolist()) <= {0.0, 1.0, 2.0}
        moved += int(not torch.equal(torch.as_tensor(out["label"]), label))
    assert moved >= 6


def test_poly_decay_sgd_and_batch_dice():
    net = torch.nn.Conv2d(1, 2, 1)
    sgd = build_optimizer("sgd", net.parameters(), 0.01)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    schedule = build_scheduler("poly", sgd, max_epochs=10)
    rates = []
    for _ in range(5):
        rates.append(sgd.param_groups[0]["lr"])
        schedule.step()
    assert rates == pytest.approx([0.01 * (1 - k / 10) ** 0.9 for k in range(5)])
    with pytest.raises(BundleInputError, match="optimizer_name 'rmsprop' is not supported"):
        build_optimizer("rmsprop", net.parameters(), 0.01)
    budget = TimeBudget(1.0, sgd, shape="poly")
    assert budget.learning_rate_factor(30) == pytest.approx(0.01 + 0.99 * poly_factor(0.5))
    assert budget.learning_rate_factor(60) == pytest.approx(0.01)
    # batch Dice: an image without foreground no longer scores its own near-zero Dice
    logits = torch.zeros(2, 2, 8, 8)
    logits[:, 1] = 3.0  # everything predicted foreground
    labels = torch.zeros(2, 1, 8, 8)
    labels[0, 0, :4] = 1  # the first image is half foreground, the second empty
    per_image = SegmentationLoss("dice", 2)(logits, labels)
    batch = SegmentationLoss("dice", 2, batch_dice=True)(logits, labels)
    assert float(batch) < float(per_image)
    assert not math.isclose(float(batch), float(per_image), rel_tol=1e-3)


def test_flat_cosine_holds_the_rate_for_three_quarters_then_anneals_by_epoch_and_by_time():
    net = torch.nn.Conv2d(1, 2, 1)
    adam = build_optimizer("adam", net.parameters(), 0.001)
    schedule = build_scheduler("flat_cosine", adam, max_epochs=8)
    rates = []
    for _ in range(8):
        rates.append(adam.param_groups[0]["lr"])
        schedule.step()
    assert rates[:7] == pytest.approx([0.001] * 7)  # epochs 0-6: progress up to 6/8 = 0.75, still flat
    assert rates[7] == pytest.approx(0.001 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5))))  # 7/8: half way down
    budget = TimeBudget(1.0, adam, shape="flat_cosine")
    assert budget.learning_rate_factor(40) == 1.0  # 40 s of 60: flat
    assert budget.learning_rate_factor(52.5) == pytest.approx(0.505)  # half way through the last quarter
    assert budget.learning_rate_factor(60) == pytest.approx(0.01)
    assert curve_factor("cosine", 0.5) == pytest.approx(0.505)
    with pytest.raises(BundleInputError, match="must be one of cosine, poly, flat_cosine, got 'step'"):
        curve_factor("step", 0.5)


@pytest.mark.slow
def test_recipe_options_train_through_the_cli(tmp_path, tiny_dataset):
    """heavy augmentation without mirroring, SGD with the polynomial decay and batch Dice: a real training run."""
    run_bundle("--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(tiny_dataset),
               "--spatial_size", "[32,32]", "--num_workers", "0", "--max_epochs", "3", "--augmentation", "heavy",
               "--mirror", "false", "--optimizer_name", "sgd", "--learning_rate", "0.01", "--lr_schedule", "poly",
               "--batch_dice", "true")
    with open(tmp_path / "logs" / "curves.csv") as f:
        rates = [float(r["learning_rate"]) for r in csv.DictReader(f)]
    assert len(rates) == 3
    assert rates == pytest.approx([0.01 * (1 - k / 3) ** 0.9 for k in (1, 2)] + [0.01 * 0.01], rel=1e-3)
    state = torch.load(tmp_path / "models" / "resume.pt", map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert groups[0]["nesterov"] is True and groups[0]["momentum"] == 0.99
    proc = run_bundle("--config_file", config("train.json"), "--bundle_root", str(tmp_path / "bad"), "--dataset_dir",
                      str(tiny_dataset), "--augmentation", "strong", expect_rc=2)
    assert "augmentation is 'strong', but it must be one of none, light, default, heavy" in proc.stderr


def test_dynunet_trains_with_deep_supervision_and_serves_without_repeating_it(tmp_path):
    """``--architecture dynunet`` trains through the CLI (deep supervision in the loss); the plan keeps the network, so
    evaluation and inference, given no network settings, build the same one; masks come out at each image's size."""
    import json

    from PIL import Image

    from tests.conftest import write_pairs

    data = write_pairs(tmp_path / "data", n=4, size=(36, 44), mode="L")
    write_pairs(tmp_path / "data", n=2, size=(50, 30), seed=1, mode="L")  # overwrites two pairs with another size
    run_bundle("--config_file", config("train.json"), "--bundle_root", str(tmp_path / "b"), "--dataset_dir", str(data),
               "--num_workers", "0", "--max_epochs", "2", "--architecture", "dynunet", "--base_features", "4",
               "--activation", "leakyrelu")
    plan = json.loads((tmp_path / "b" / "models" / "plan.json").read_text())
    assert (plan["architecture"], plan["base_features"], plan["activation"]) == ("dynunet", 4, "leakyrelu")
    state = torch.load(tmp_path / "b" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any("deep_supervision_heads" in k for k in state)  # DynUNet's extra heads were trained and saved
    run_bundle("--config_file", config("train.json", "evaluate.json"), "--bundle_root", str(tmp_path / "b"),
               "--dataset_dir", str(data), "--num_workers", "0")
    assert json.loads((tmp_path / "b" / "eval" / "metrics_summary.json").read_text())["mean_over_images"]["dice"]
    out = tmp_path / "out"
    run_bundle("--config_file", config("inference.json"), "--bundle_root", str(tmp_path / "b"),
               "--input_dir", str(data / "images"), "--output_dir", str(out))
    sizes = {Image.open(p).size for p in out.rglob("*.png")}
    assert sizes == {(44, 36), (30, 50)}
    # a model trained with another network than the settings ask for is refused with the values to pass
    proc = run_bundle("--config_file", config("inference.json"), "--bundle_root", str(tmp_path / "b"),
                      "--input_dir", str(data / "images"), "--output_dir", str(tmp_path / "out2"),
                      "--architecture", "basic_unet", expect_rc=2)
    assert "architecture dynunet" in proc.stderr and "basic_unet" in proc.stderr
