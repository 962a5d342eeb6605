"""Post-processing chosen per class on out-of-fold predictions, and applied by inference while its settings are auto."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.postprocess import PostProcessd, apply_choice
from monai_unet_bundle.postprocess_search import (
    choose_for_cross_validation,
    choose_postprocessing,
    read_predictions,
    size_candidates,
    write_predictions,
)


def _pairs(n: int = 6) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Class 1: one blob per image, predicted with stray specks.  Class 2: two rings per image, predicted with holes.

    Dropping specks (or keeping the largest) helps class 1; filling holes helps class 2; keeping only
    the largest of class 2's two true rings would halve its Dice.
    """
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        truth = np.zeros((64, 64), np.int64)
        y, x = rng.integers(4, 16, 2)
        truth[y:y + 14, x:x + 14] = 1
        for top in (36, 50):
            truth[top:top + 12, 36:48] = 2
        pred = truth.copy()
        pred[60, 2] = pred[2, 60] = pred[30, 5] = 1  # specks
        pred[top + 4:top + 8, 40:44] = 0  # a hole in the second ring (background inside class 2)
        pred[40:44, 40:44] = 0  # and in the first
        items.append((f"img{i}.png", pred, truth))
    return items


def test_each_step_is_kept_only_where_it_raises_the_mean_and_lowers_no_class():
    items = _pairs()
    result = choose_postprocessing(items, 3)
    choice = result["choice"]
    assert choice["fill_holes"] == [2]
    assert 2 not in choice["keep_largest_component"]  # would drop a true ring
    assert choice["remove_smaller_than"][1] > 1 or 1 in choice["keep_largest_component"]  # the specks go
    assert result["mean_dice_after"] > result["mean_dice_before"]
    assert all(a >= b for a, b in zip(result["dice_after"][1:], result["dice_before"][1:]))
    cleaned = apply_choice(items[0][1], 3, choice)
    assert (cleaned == items[0][2]).all()  # here the chosen steps restore the truth exactly
    rejected = [t for t in result["trials"] if t["class"] == 2 and t["step"] == "keep_largest_component"]
    assert rejected and not rejected[0]["better"] and rejected[0]["lowers_classes"] == [2]


def test_nothing_is_chosen_when_nothing_helps():
    truth = np.zeros((32, 32), np.int64)
    truth[4:12, 4:12] = 1
    truth[20:28, 20:28] = 1  # two true objects, predicted exactly
    result = choose_postprocessing([("a", truth.copy(), truth)], 2)
    assert result["choice"] == {"remove_smaller_than": [0, 0], "fill_holes": [], "keep_largest_component": []}
    assert result["description"] == "class 1: nothing"
    assert size_candidates([truth], 1) == [6, 16, 32, 64] and size_candidates([truth], 2) == []


def test_inference_applies_the_choice_while_the_settings_are_auto_and_the_users_settings_win():
    _, pred, truth = _pairs(1)[0]
    chosen = choose_postprocessing(_pairs(), 3)["choice"]
    data = {"pred": torch.as_tensor(pred[None])}
    auto = PostProcessd("pred", 3, keep_largest="auto", fill_holes="auto", min_size="auto", chosen=chosen)(data)["pred"]
    assert (auto[0].numpy() == truth).all()
    assert PostProcessd("pred", 3, "auto", "auto", "auto", chosen=None)(data)["pred"] is data["pred"]  # nothing chosen
    mine = PostProcessd("pred", 3, keep_largest="false", fill_holes=False, min_size=0, chosen=chosen)(data)["pred"]
    assert mine is data["pred"]  # explicit off wins over the choice
    every = PostProcessd("pred", 3, keep_largest=True, fill_holes="auto", min_size="auto", chosen=chosen)(data)["pred"]
    assert (every[0].numpy() == 2).sum() < (truth == 2).sum()  # largest for every class: one true ring is lost
    with pytest.raises(BundleInputError, match="plan's post-processing names 2 classes but the model has 3"):
        PostProcessd("pred", 3, min_size="auto", chosen={"remove_smaller_than": [0, 5]})
    with pytest.raises(BundleInputError, match="fill_holes must be auto, true or false"):
        PostProcessd("pred", 3, fill_holes="sometimes")


def test_cross_validation_stores_the_choice_beside_every_fold_model(tmp_path):
    items = _pairs(4)
    for k in (0, 1):
        (tmp_path / "models" / f"fold_{k}").mkdir(parents=True)
        (tmp_path / "models" / f"fold_{k}" / "plan.json").write_text(json.dumps({"num_classes": 3, "fold": k}))
    for i, (name, pred, truth) in enumerate(items[:2]):
        write_predictions(tmp_path / "eval" / "fold_0" / "oof", i, name, pred, truth)
    assert choose_for_cross_validation(tmp_path, 2) is None  # fold 1 not evaluated yet
    for i, (name, pred, truth) in enumerate(items[2:]):
        write_predictions(tmp_path / "eval" / "fold_1" / "oof", i, name, pred, truth)
    assert [n for n, _, _ in read_predictions([tmp_path / "eval" / f"fold_{k}" / "oof" for k in (0, 1)])] == [n for n, _, _ in items]
    result = choose_for_cross_validation(tmp_path, 2)
    assert result["images"] == 4 and result["choice"]["fill_holes"] == [2]
    assert json.loads((tmp_path / "eval" / "postprocessing.json").read_text())["choice"] == result["choice"]
    for k in (0, 1):
        plan = json.loads((tmp_path / "models" / f"fold_{k}" / "plan.json").read_text())
        assert plan == {"num_classes": 3, "fold": k, "postprocessing": result["choice"]}
