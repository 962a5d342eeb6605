from __future__ import annotations

import nibabel as nib
import numpy as np
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from monai_unet_bundle.writers import SaveMaskd, is_nifti

LOAD = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])


def _asymmetric(h: int = 7, w: int = 11) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[0, :3] = 1  # top-left bar: any flip or transpose moves it
    mask[: h // 2, w - 1] = 1  # right edge, upper half only
    return mask


def test_is_nifti():
    assert is_nifti("a.nii") and is_nifti("/x/b.NII.GZ") and not is_nifti("c.png")


def test_binary_png_round_trip_keeps_orientation_and_writes_0_255(tmp_path):
    truth = _asymmetric()
    Image.fromarray(truth * 200).save(tmp_path / "in.png")
    loaded = LOAD({"image": str(tmp_path / "in.png")})["image"]
    SaveMaskd("pred", tmp_path / "out", num_classes=2, data_root_dir=tmp_path)({"pred": (loaded > 0).float()})
    written = np.array(Image.open(tmp_path / "out" / "in.png"))
    assert written.dtype == np.uint8 and set(np.unique(written)) == {0, 255}
    assert np.array_equal(written, truth * 255)


def test_multiclass_png_keeps_class_indices(tmp_path):
    truth = _asymmetric() * 2
    truth[-1, -1] = 1
    Image.fromarray(truth).save(tmp_path / "m.jpg", quality=100)  # any 2D input becomes a PNG mask
    loaded = LOAD({"image": str(tmp_path / "m.jpg")})["image"]
    pred = loaded.clone()
    pred.array = truth.T[None].astype(np.float32)  # MONAI's PIL reader holds images as (W, H)
    SaveMaskd("pred", tmp_path / "out", num_classes=3)({"pred": pred})
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "m.png")), truth)


def test_nifti_in_nifti_out_with_the_input_affine(tmp_path):
    truth = _asymmetric().astype(np.float32)
    affine = np.diag([0.7, 0.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    nib.save(nib.Nifti1Image(truth, affine), tmp_path / "scan.nii.gz")
    loaded = LOAD({"image": str(tmp_path / "scan.nii.gz")})["image"]
    SaveMaskd("pred", tmp_path / "out", num_classes=2)({"pred": (loaded > 0).float()})
    out = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert out.shape == truth.shape
    assert np.array_equal(np.asarray(out.dataobj), truth.astype(np.uint8))
    assert np.allclose(out.affine, affine)
