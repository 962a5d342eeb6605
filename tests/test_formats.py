"""Every supported file format and mask encoding, read through the bundle's readers and transforms."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from PIL import Image

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.readers import Image2DReader, Nifti2DReader
from monai_unet_bundle.transforms import EnsureChannelsd, MaskToIndexd, mask_loader

IMAGE = LoadImage(reader=[Nifti2DReader(), Image2DReader(kind="image")], image_only=True, ensure_channel_first=True)


def _load_rgb(path):
    """What the training pipeline feeds the network, as (H, W, 3) for comparison with PIL."""
    img = EnsureChannelsd("image", 3)({"image": IMAGE(str(path))})["image"]
    return np.asarray(img).transpose(2, 1, 0)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("a.png", "RGB"), ("b.jpg", "RGB"), ("c.bmp", "RGB"), ("d.tif", "RGB"), ("e.TIFF", "L"), ("f.gif", "P"), ("g.png", "RGBA"), ("h.png", "LA"), ("i.png", "1")],
)
def test_2d_formats_and_modes_load_as_rgb_in_pil_orientation(tmp_path, name, mode):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb).convert(mode)
    pil.save(tmp_path / name)
    expected = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=np.float32)
    loaded = _load_rgb(tmp_path / name)
    assert loaded.shape == (9, 13, 3)
    if mode in ("L", "LA", "1"):  # grayscale repeated to three channels
        expected = np.asarray(Image.open(tmp_path / name).convert("L"), dtype=np.float32)[..., None].repeat(3, -1)
    assert np.allclose(loaded, expected)


def test_16_bit_tiff_keeps_its_range(tmp_path):
    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(values).save(tmp_path / "deep.tif")
    loaded = IMAGE(str(tmp_path / "deep.tif"))
    assert loaded.shape == (1, 4, 3) and float(loaded.max()) == 55000.0


def test_nifti_volume_with_one_singleton_axis_is_a_slice(tmp_path):
    data = np.random.default_rng(1).random((1, 6, 8)).astype(np.float32)
    affine = np.diag([2.0, 0.5, 0.7, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "s.nii.gz")
    loaded = IMAGE(str(tmp_path / "s.nii.gz"))
    assert loaded.shape == (1, 6, 8) and np.allclose(np.asarray(loaded[0]), data[0])
    # voxel (i, j) of the slice sits where voxel (0, i, j) of the volume sat
    assert np.allclose(np.asarray(loaded.affine) @ [3, 5, 0, 1], affine @ [0, 3, 5, 1])
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "vol.nii")
    with pytest.raises(BundleInputError, match=r"vol.nii has shape \(4, 5, 6\); NIfTI inputs must be 2D slices"):
        IMAGE(str(tmp_path / "vol.nii"))


def _mask(path, palette=False):
    return mask_loader(palette)(str(path))


def test_gif_masks_keep_palette_indices(tmp_path):
    mask = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).convert("P")
    mask.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    mask.save(tmp_path / "car_mask.gif")
    out = MaskToIndexd("label", 2).convert(_mask(tmp_path / "car_mask.gif"))
    assert np.asarray(out[0]).T.tolist() == [[0, 1], [1, 0]]


def test_colour_masks_through_a_palette(tmp_path):
    colours = np.array([[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [255, 0, 0]]], np.uint8)
    Image.fromarray(colours).save(tmp_path / "c.png")
    convert = MaskToIndexd("label", 3, palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    assert np.asarray(convert.convert(_mask(tmp_path / "c.png", palette=True))[0]).T.tolist() == [[0, 1], [2, 1]]
    odd = colours.copy()
    odd[0, 0] = [10, 20, 30]
    Image.fromarray(odd).save(tmp_path / "odd.png")
    with pytest.raises(BundleInputError, match=r"mask .*odd.png holds values \(10, 20, 30\) that map to no class \(expected the mask_palette colours"):
        convert.convert(_mask(tmp_path / "odd.png", palette=True))
    with pytest.raises(BundleInputError, match="mask_palette must list 3 RGB colours"):
        MaskToIndexd("label", 3, palette=[[0, 0, 0], [1, 1, 1]])


def test_grayscale_bins_to_classes(tmp_path):
    Image.fromarray(np.array([[0, 60, 128, 200, 255]], np.uint8)).save(tmp_path / "g.png")
    convert = MaskToIndexd("label", 3, thresholds=[50, 150])
    assert np.asarray(convert.convert(_mask(tmp_path / "g.png"))).ravel().tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(BundleInputError, match="mask_thresholds must be 2 increasing numbers"):
        MaskToIndexd("label", 3, thresholds=[150, 50])


def test_jpeg_masks_are_refused_unless_allowed_then_snapped(tmp_path):
    truth = np.zeros((16, 16), np.uint8)
    truth[4:12, 4:12] = 255
    Image.fromarray(truth).save(tmp_path / "m.jpg", quality=70)
    raw = np.asarray(_mask(tmp_path / "m.jpg"))
    assert len(np.unique(raw)) > 2  # compression really changed the values
    with pytest.raises(BundleInputError, match="m.jpg is a JPEG, whose compression changes mask values: save masks as PNG, or pass --allow_lossy_masks true"):
        MaskToIndexd("label", 2).convert(_mask(tmp_path / "m.jpg"))
    snapped = MaskToIndexd("label", 2, allow_lossy=True).convert(_mask(tmp_path / "m.jpg"))
    assert np.array_equal(np.asarray(snapped[0]).T, truth // 255)


def test_palette_and_thresholds_are_exclusive():
    with pytest.raises(BundleInputError, match="set mask_palette or mask_thresholds, not both"):
        MaskToIndexd("label", 2, palette=[[0, 0, 0], [255, 255, 255]], thresholds=[128])
    assert torch.is_tensor(MaskToIndexd("label", 2).convert(torch.zeros(1, 2, 2)))
