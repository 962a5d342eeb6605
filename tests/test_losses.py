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


def test_one_weight_vector_serves_every_weighted_loss():
    logits, labels = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    for name in LOSS_TERMS:
        if name in ("mse", "bce"):
            continue
        value = SegmentationLoss(name, 3, class_weights=[0.2, 1.0, 1.8])(logits, labels)
        assert torch.isfinite(value) and value.item() > 0, name


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
    assert resolve_class_weights(None, "weighted_ce", data, 2, tmp_path) == pytest.approx([0.5, 1.5])  # auto by default: 12 vs 4 pixels
    assert resolve_class_weights([1, 2], "ce", data, 2, tmp_path) == [1.0, 2.0]
    with pytest.raises(BundleInputError, match='class_weights must be "auto", null or a list of 2 numbers'):
        resolve_class_weights("inverse", "ce", data, 2, tmp_path)
