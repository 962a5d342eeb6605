from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscrete

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.inferers import SegmentationInferer
from monai_unet_bundle.postprocess import ClassIndexd, PostProcessd, class_index, fill_holes, keep_largest_component, remove_small_objects
from monai_unet_bundle.rle import rle_decode, rle_encode

MASK = np.array(
    [
        [0, 1, 1, 0],
        [0, 0, 1, 1],
        [1, 0, 0, 0],
    ],
    dtype=np.uint8,
)


def test_rle_against_hand_computed_strings():
    # row-major pixels: 0 1 1 0 | 0 0 1 1 | 1 0 0 0 -> runs at 2 (2 long) and 7 (3 long)
    assert rle_encode(MASK) == "2 2 7 3"
    # column-major pixels: 0 0 1 | 1 0 0 | 1 1 0 | 0 1 0 -> runs at 3 (2 long), 7 (2 long), 11 (1 long)
    assert rle_encode(MASK, order="column") == "3 2 7 2 11 1"
    assert rle_encode(np.zeros((2, 2))) == ""


@pytest.mark.parametrize("order", ["row", "column"])
def test_rle_round_trip(order):
    rng = np.random.default_rng(3)
    mask = (rng.random((17, 23)) > 0.6).astype(np.uint8)
    assert np.array_equal(rle_decode(rle_encode(mask, order), mask.shape, order), mask)
    assert np.array_equal(rle_decode(rle_encode(MASK, order), MASK.shape, order), MASK)


def test_rle_errors():
    with pytest.raises(BundleInputError, match="rle_order must be 'row' or 'column'"):
        rle_encode(MASK, order="diagonal")
    with pytest.raises(ValueError, match="outside a mask of 12 pixels"):
        rle_decode("11 5", (3, 4))


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_class_index_equals_monai_argmax_ties_included(num_classes):
    torch.manual_seed(num_classes)
    prob = torch.softmax(torch.randn(num_classes, 40, 48), 0)
    prob[:, :4, :4] = 1.0 / num_classes  # exact ties go to the lowest class, as torch.argmax does
    prob[0, 10, 10], prob[1:, 10, 10] = 0.1, 0.5  # a tie between classes 1.. only
    mt = MetaTensor(prob, meta={"filename_or_obj": "a.png"})
    expected = AsDiscrete(argmax=True)(mt)
    out = ClassIndexd("pred")({"pred": mt})["pred"]
    assert out.shape == (1, 40, 48) and out.dtype == expected.dtype
    assert torch.equal(out.as_tensor(), expected.as_tensor())
    assert out[0, 0, 0] == 0 and out[0, 10, 10] == 1
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.png"
    # the layout an inverted prediction has, and a channels-last one, give the same map
    assert torch.equal(class_index(prob.contiguous()), class_index(prob.permute(1, 2, 0).contiguous().permute(2, 0, 1)))


def test_keep_largest_component_per_class():
    index = np.array(
        [
            [1, 1, 0, 0, 2],
            [1, 0, 0, 0, 0],
            [0, 0, 1, 0, 2],
            [2, 0, 0, 2, 2],
        ]
    )
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 2],
            [0, 0, 0, 2, 2],
        ]
    )
    # class 1: an L of 3 pixels and a lone pixel at [2,2] (touching none: 8-connectivity);
    # class 2: a lone pixel at [0,4], three pixels bottom right, a lone pixel at [3,0]
    assert keep_largest_component(index, 3).tolist() == expected.tolist()


def test_fill_holes_and_remove_small_objects():
    ring = np.zeros((5, 5), int)
    ring[1:4, 1:4] = 1
    ring[2, 2] = 0
    assert fill_holes(ring, 2)[2, 2] == 1
    blobs = np.zeros((6, 6), int)
    blobs[0, 0] = 1
    blobs[3:6, 3:6] = 1
    cleaned = remove_small_objects(blobs, 2, min_size=2)
    assert cleaned[0, 0] == 0 and cleaned[3:6, 3:6].all()
    pred = torch.as_tensor(blobs[None], dtype=torch.float32)
    out = PostProcessd("pred", 2, keep_largest=True)({"pred": pred})["pred"]
    assert out.shape == (1, 6, 6) and out[0, 0, 0] == 0 and int(out.sum()) == 9
    assert PostProcessd("pred", 2)({"pred": pred})["pred"] is pred  # nothing chosen: untouched
    with pytest.raises(BundleInputError, match="remove_smaller_than must be auto or a whole number of pixels >= 0"):
        PostProcessd("pred", 2, min_size=-3)


class _Symmetric(torch.nn.Module):
    """A flip-equivariant stand-in: logits from the pixel value itself."""

    def forward(self, x):
        return torch.cat([-x[:, :1], x[:, :1]], 1) * 3


def test_tta_averages_probabilities_and_matches_an_equivariant_network():
    x = torch.rand(2, 1, 16, 16)
    plain = torch.softmax(SegmentationInferer(tta=False)(x, _Symmetric()), 1)
    tta = torch.softmax(SegmentationInferer(tta=True)(x, _Symmetric()), 1)
    assert torch.allclose(plain, tta, atol=1e-5)
    skewed = torch.nn.Conv2d(1, 2, 3, padding=1)
    a = torch.softmax(SegmentationInferer(tta=False)(x, skewed), 1)
    b = torch.softmax(SegmentationInferer(tta=True)(x, skewed), 1)
    assert not torch.allclose(a, b, atol=1e-4) and torch.allclose(b.sum(1), torch.ones(2, 16, 16), atol=1e-5)


def test_sliding_window_covers_images_larger_than_the_window():
    x = torch.rand(1, 1, 40, 56)
    out = SegmentationInferer(roi_size=(16, 16), sliding_window=True)(x, _Symmetric())
    assert out.shape == (1, 2, 40, 56) and torch.allclose(out, _Symmetric()(x), atol=1e-5)


def test_tta_auto_averages_over_flips_only_for_a_model_trained_with_them():
    from monai_unet_bundle.plan import mirrored

    assert SegmentationInferer(tta="auto", mirrored=True).tta is True
    assert SegmentationInferer(tta="auto", mirrored=False).tta is False
    assert SegmentationInferer(tta="true", mirrored=False).tta is True  # the user's word wins
    assert SegmentationInferer(tta=False, mirrored=True).tta is False
    assert mirrored({"augmentation": "light", "mirror": True}) is True
    assert mirrored({"augmentation": "heavy", "mirror": "false"}) is False
    assert mirrored({"augmentation": "none", "mirror": True}) is False
