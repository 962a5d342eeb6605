from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.losses import (
    LOSS_TERMS,
    SegmentationLoss,
    class_pixel_counts,
    inverse_frequency_weights,
    resolve_class_weights,
)

# two pixels, two classes: pixel 0 is class 0, pixel 1 is class 1; softmax gives p(class 1) = 1/4, 3/4
LOGITS = torch.tensor([[[[0.0, 0.0]], [[-math.log(3), math.log(3)]]]])  # (B=1, C=2, H=1, W=2)
LABELS = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
P1 = torch.tensor([0.25, 0.75])
P = torch.stack([1 - P1, P1])  # (C, pixels)
G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def _dice(p: torch.Tensor, g: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return 1 - (2 * (p * g).sum(-1) + eps) / (p.sum(-1) + g.sum(-1) + eps)


def test_cross_entropy_matches_hand_computation():
    expected = -(math.log(0.75) + math.log(0.75)) / 2
    assert SegmentationLoss("ce", 2)(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-5)
    assert SegmentationLoss("bce", 2)(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-5)
    # weighted: sum(w_y * l) / sum(w_y)
    weighted = SegmentationLoss("ce", 2, class_weights=[1.0, 3.0])(LOGITS, LABELS).item()
    assert weighted == pytest.approx((1 * -math.log(0.75) + 3 * -math.log(0.75)) / 4, rel=1e-5)


def test_weighted_ce_changes_the_loss_when_classes_differ():
    logits = torch.tensor([[[[0.0, 0.0]], [[-math.log(3), 0.0]]]])  # pixel 1 is only 50% class 1
    loss = SegmentationLoss("weighted_ce", 2, class_weights=[1.0, 3.0])(logits, LABELS).item()
    assert loss == pytest.approx((-math.log(0.75) + 3 * -math.log(0.5)) / 4, rel=1e-5)


def test_dice_and_jaccard_match_hand_computation():
    assert SegmentationLoss("dice", 2)(LOGITS, LABELS).item() == pytest.approx(_dice(P, G).mean().item(), rel=1e-5)
    w = torch.tensor([0.5, 1.5])
    assert SegmentationLoss("dice", 2, class_weights=w)(LOGITS, LABELS).item() == pytest.approx(
        (_dice(P, G) * w).mean().item(), rel=1e-5
    )
    inter, union = (P * G).sum(-1), (P + G).sum(-1)
    jaccard = 1 - (inter + 1e-5) / (union - inter + 1e-5)
    ce = -math.log(0.75)
    assert SegmentationLoss("jaccard_bce", 2)(LOGITS, LABELS).item() == pytest.approx(jaccard.mean().item() + ce, rel=1e-5)
    assert SegmentationLoss("dice_ce", 2)(LOGITS, LABELS).item() == pytest.approx(_dice(P, G).mean().item() + ce, rel=1e-5)


def test_focal_and_mse_match_hand_computation():
    # focal, gamma 2: -(1 - p_t)^2 log p_t for the true class, averaged over classes and pixels
    focal = 2 * (-(0.25**2) * math.log(0.75)) / 4
    assert SegmentationLoss("focal", 2)(LOGITS, LABELS).item() == pytest.approx(focal, rel=1e-5)
    assert SegmentationLoss("dice_focal", 2)(LOGITS, LABELS).item() == pytest.approx(focal + _dice(P, G).mean().item(), rel=1e-5)
    mse = ((P - G) ** 2).mean().item()  # 0.0625
    assert SegmentationLoss("mse", 2)(LOGITS, LABELS).item() == pytest.approx(mse, rel=1e-5)


# ------------------------------------------------------------------- class weights, loss by loss
# Independent reference implementations (plain torch, written from the formulas, not from MONAI):
# logits (B, C, H, W), target (B, H, W) class indices, w (C,) class weights or None.

WEIGHTED_LOSSES = [name for name in LOSS_TERMS if name != "mse"]


def _ref_ce(logits, target, w):
    nll = -torch.log_softmax(logits.double(), 1).gather(1, target.unsqueeze(1))[:, 0]  # (B, H, W)
    wy = torch.ones_like(nll) if w is None else w.double()[target]
    return (wy * nll).sum() / wy.sum()  # PyTorch's weighted mean: sum(w_y * l) / sum(w_y)


def _ref_focal(logits, target, w):
    # gamma 2, softmax; only the true class's channel is non-zero; mean over batch, channels, pixels
    logp = torch.log_softmax(logits.double(), 1).gather(1, target.unsqueeze(1))[:, 0]
    per_pixel = -((1 - logp.exp()) ** 2) * logp
    wy = torch.ones_like(per_pixel) if w is None else w.double()[target]
    return (wy * per_pixel).sum() / (logits.shape[0] * logits.shape[1] * target[0].numel())


def _overlaps(logits, target):
    p = torch.softmax(logits.double(), 1)
    g = torch.nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).double()
    return (p * g).sum((2, 3)), p.sum((2, 3)), g.sum((2, 3))  # each (B, C)


def _weighted_mean(per_class, w):  # mean over (B, C) of w_c * term
    return per_class.mean() if w is None else (per_class * w.double()).mean()


def _ref_dice(logits, target, w, eps=1e-5):
    inter, psum, gsum = _overlaps(logits, target)
    return _weighted_mean(1 - (2 * inter + eps) / (psum + gsum + eps), w)


def _ref_jaccard(logits, target, w, eps=1e-5):
    inter, psum, gsum = _overlaps(logits, target)
    return _weighted_mean(1 - (2 * inter + eps) / (2 * (psum + gsum - inter) + eps), w)


_REF_TERMS = {"ce": _ref_ce, "focal": _ref_focal, "dice": _ref_dice, "jaccard": _ref_jaccard}


def _reference(name, logits, labels, weights):
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    target = labels[:, 0].long()
    return sum(_REF_TERMS[term](logits, target, w) for term in LOSS_TERMS[name]).item()


def _num_classes(name: str) -> int:
    return 2 if name == "bce" else 3


def test_every_loss_but_mse_takes_weights():
    expected = ["dice_ce", "dice", "ce", "bce", "focal", "dice_focal", "jaccard_bce", "weighted_ce"]
    assert sorted(WEIGHTED_LOSSES) == sorted(expected)
    assert {t for name in WEIGHTED_LOSSES for t in LOSS_TERMS[name]} == set(_REF_TERMS)


@pytest.mark.parametrize("name", WEIGHTED_LOSSES)
def test_weighted_loss_matches_a_hand_computation(name):
    torch.manual_seed(7)
    c = _num_classes(name)
    logits, labels = 2 * torch.randn(2, c, 6, 5), torch.randint(0, c, (2, 1, 6, 5))
    weights = [0.2, 1.0, 1.8][:c] if c == 3 else [0.3, 1.7]
    unweighted = SegmentationLoss(name, c)(logits, labels).item()
    assert unweighted == pytest.approx(_reference(name, logits, labels, None), rel=1e-5)
    assert SegmentationLoss(name, c, class_weights=[1.0] * c)(logits, labels).item() == pytest.approx(unweighted, rel=1e-6)
    expected = _reference(name, logits, labels, weights)
    assert abs(expected - unweighted) > 1e-3 * unweighted  # the weights matter here: ignoring them fails below
    assert SegmentationLoss(name, c, class_weights=weights)(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def _wrong_on_class_1(c: int, margin: float = 6.0):
    """Labels with every class present and logits right (by ``margin``) on every pixel except those of
    class 1, which are confidently predicted as class 2 (as background when there are two classes)."""
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 0], [1, 0, 2, 0, 1, 2]]) % c
    labels = labels.view(1, 1, 3, 6)
    target = labels[:, 0]
    right = torch.nn.functional.one_hot(target, c).movedim(-1, 1).float() * margin
    wrong_class = torch.where(target == 1, torch.full_like(target, 2 if c == 3 else 0), target)
    wrong = torch.nn.functional.one_hot(wrong_class, c).movedim(-1, 1).float() * margin
    return right, wrong, labels


@pytest.mark.parametrize("name", WEIGHTED_LOSSES)
def test_class_1_weight_scales_only_the_class_1_error(name):
    c = _num_classes(name)
    right, wrong, labels = _wrong_on_class_1(c)
    assert (labels == 1).sum() >= 4 and torch.equal(right.argmax(1) == wrong.argmax(1), labels[:, 0] != 1)

    def loss(logits, w1):
        weights = [1.0, w1, 1.0][:c]
        return SegmentationLoss(name, c, class_weights=weights)(logits, labels).item()

    # the error on class 1 pixels costs more the more class 1 weighs ...
    values = [loss(wrong, w1) for w1 in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a + 1e-3 for a, b in zip(values, values[1:])), values
    # ... and the right prediction stays below the wrong one whenever class 1 counts
    assert loss(right, 1.0) < values[2] - 0.1
    # each value is the hand computation, weight 0 included
    for w1, value in zip((0.0, 0.5, 1.0, 2.0, 4.0), values):
        assert value == pytest.approx(_reference(name, wrong, labels, [1.0, w1, 1.0][:c]), rel=1e-5, abs=1e-7), w1
    if set(LOSS_TERMS[name]) <= {"ce", "focal"}:
        # pixel-wise terms: with class 1 weighing nothing its pixels drop out, so the error on them
        # costs nothing and the loss is that of the error-free prediction
        assert values[0] == pytest.approx(loss(right, 0.0), rel=1e-6, abs=1e-9)
        assert values[0] < 1e-2 * values[2]
    # (a Dice or Jaccard term also counts the class 1 pixels as false positives of the class they were
    # given, so with weight 0 only the class 1 Dice term drops out: the hand computation above covers it)


def test_setting_errors_are_precise():
    with pytest.raises(BundleInputError, match="loss_name 'tversky' is not supported: use one of dice_ce"):
        SegmentationLoss("tversky", 2)
    with pytest.raises(BundleInputError, match=r"class_weights must be 3 non-negative numbers, one per class with background first"):
        SegmentationLoss("dice_ce", 3, class_weights=[1.0, 2.0])
    with pytest.raises(BundleInputError, match="class_weights must be 2 non-negative"):
        SegmentationLoss("ce", 2, class_weights=[1.0, -1.0])
    with pytest.raises(BundleInputError, match="'bce' is for binary segmentation; with num_classes=3 use 'ce'"):
        SegmentationLoss("bce", 3)
    with pytest.raises(BundleInputError, match="'mse' takes no class_weights"):
        SegmentationLoss("mse", 2, class_weights=[1.0, 1.0])


def test_inverse_frequency_weights():
    assert inverse_frequency_weights([900, 100]).round(4).tolist() == [0.2, 1.8]
    w = inverse_frequency_weights([50, 0, 50])
    assert w.tolist() == [1.5, 0.0, 1.5]  # an absent class gets weight 0; mean stays 1


def _masks(tmp_path, arrays):
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"m{i}.png"))
        Image.fromarray(np.asarray(a, dtype=np.uint8)).save(paths[-1])
    return paths


def test_auto_weights_from_a_known_mask_set_are_cached(tmp_path):
    a = np.zeros((10, 10)); a[:2] = 1; a[9, :5] = 2  # 75 / 20 / 5 pixels
    b = np.zeros((10, 10)); b[:3] = 1  # 70 / 30 / 0
    files = _masks(tmp_path, [a, b])
    assert class_pixel_counts(files, 3).tolist() == [145, 50, 5]
    data = [{"image": f, "label": f} for f in files]
    weights = resolve_class_weights("auto", "dice_ce", data, 3, tmp_path / "cache")
    expected = np.array([200 / 145, 200 / 50, 200 / 5])
    assert np.allclose(weights, expected * 3 / expected.sum())
    (cache,) = (tmp_path / "cache").glob("class_weights_*.json")
    assert json.loads(cache.read_text())["pixel_counts"] == [145, 50, 5]
    cache.write_text(json.dumps({"pixel_counts": [1, 1, 1], "weights": [7.0, 8.0, 9.0]}))
    assert resolve_class_weights("auto", "dice_ce", data, 3, tmp_path / "cache") == [7.0, 8.0, 9.0]  # read, not recomputed
    os.utime(files[0], ns=(1, 1))  # a changed file invalidates the cache
    assert np.allclose(resolve_class_weights("auto", "dice_ce", data, 3, tmp_path / "cache"), expected * 3 / expected.sum())


def test_weight_setting_resolution(tmp_path):
    data = [{"label": f} for f in _masks(tmp_path, [np.eye(4) * 255])]
    assert resolve_class_weights(None, "dice_ce", data, 2, tmp_path) is None
    assert resolve_class_weights(None, "weighted_ce", data, 2, tmp_path) == pytest.approx([0.5, 1.5])  # inverse frequency by default: 12 vs 4 pixels
    assert resolve_class_weights("inverse_frequency", "dice_ce", data, 2, tmp_path) == pytest.approx([0.5, 1.5])
    assert resolve_class_weights([1, 2], "ce", data, 2, tmp_path) == [1.0, 2.0]
    with pytest.raises(BundleInputError, match="class_weights must be auto, inverse_frequency, null or a list of 2 numbers"):
        resolve_class_weights("inverse", "ce", data, 2, tmp_path)
