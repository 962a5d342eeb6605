from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.transforms import EnsureChannelsd, MaskToIndexd, source_name


def _img(t: torch.Tensor, name: str = "/data/x.png") -> MetaTensor:
    return MetaTensor(t, meta={"filename_or_obj": name})


def test_gray_to_rgb_and_alpha_dropped():
    rgb = EnsureChannelsd("image", 3)
    gray = torch.rand(1, 4, 5)
    out = rgb({"image": _img(gray)})["image"]
    assert out.shape == (3, 4, 5) and torch.equal(out[2], gray[0])
    rgba = torch.rand(4, 4, 5)
    assert torch.equal(rgb({"image": _img(rgba)})["image"], rgba[:3])
    gray_alpha = torch.rand(2, 4, 5)
    assert torch.equal(EnsureChannelsd("image", 1)({"image": _img(gray_alpha)})["image"], gray_alpha[:1])


def test_rgb_to_gray_uses_luma_weights():
    rgb = torch.zeros(3, 2, 2)
    rgb[0] = 1.0  # pure red
    out = EnsureChannelsd("image", 1)({"image": _img(rgb)})["image"]
    assert out.shape == (1, 2, 2)
    assert torch.allclose(out, torch.full((1, 2, 2), 0.299))


def test_channel_errors_name_setting_and_file():
    with pytest.raises(BundleInputError, match="in_channels must be 1 .* or 3"):
        EnsureChannelsd("image", 2)
    with pytest.raises(BundleInputError, match="/data/x.png has 5 channels"):
        EnsureChannelsd("image", 3)({"image": _img(torch.rand(5, 2, 2))})


def test_binary_mask_0_255_becomes_0_1():
    mask = _img(torch.tensor([[[0.0, 255.0], [255.0, 0.0]]]))
    out = MaskToIndexd("label", 2)({"label": mask})["label"]
    assert out.tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    same = _img(torch.tensor([[[0.0, 1.0]]]))
    assert MaskToIndexd("label", 2)({"label": same})["label"].tolist() == [[[0.0, 1.0]]]


def test_rgb_saved_gray_mask_is_reduced_to_one_channel():
    mask = _img(torch.tensor([[[0.0, 255.0]]]).repeat(3, 1, 1))
    assert MaskToIndexd("label", 2)({"label": mask})["label"].shape == (1, 1, 2)


def test_values_outside_classes_are_named():
    with pytest.raises(BundleInputError, match=r"mask /m/a.png holds values 3, 7 that map to no class \(expected 0..2"):
        MaskToIndexd("label", 3)({"label": _img(torch.tensor([[[0.0, 3.0, 7.0, 1.0]]]), "/m/a.png")})
    with pytest.raises(BundleInputError, match="values 128 .*expected 0/1 or 0/255"):
        MaskToIndexd("label", 2)({"label": _img(torch.tensor([[[0.0, 128.0, 255.0]]]))})
    with pytest.raises(BundleInputError, match="differing channels"):
        MaskToIndexd("label", 2)({"label": _img(torch.tensor([[[0.0]], [[1.0]], [[0.0]]]))})
    with pytest.raises(BundleInputError, match="num_classes must be an integer of at least 2"):
        MaskToIndexd("label", 1)


def test_source_name_without_meta():
    assert source_name(torch.zeros(1)) == "<unknown file>"


def test_item_source_takes_the_first_named_key():
    from monai_unet_bundle.transforms import item_source

    item = {"image": torch.zeros(1), "label": _img(torch.zeros(1, 1, 1), "/m/l.png"), "pred": _img(torch.zeros(1), "/p.png")}
    assert item_source(item) == "/m/l.png"
    assert item_source(item, ("pred",)) == "/p.png"
    assert item_source({"image": torch.zeros(1)}) == "<unknown file>"
