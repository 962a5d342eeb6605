"""The inference config, run for real: sizes, orientation, formats and unreadable files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from tests.conftest import CONFIGS, TINY, config, run_bundle

pytestmark = pytest.mark.slow


class ThresholdNet(torch.nn.Module):
    """A stand-in network whose prediction is 'first channel brighter than 0.5', to follow pixels exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x[:, :1]
        return torch.cat([0.5 - g, g - 0.5], dim=1) * 50


def _blocky_asymmetric(h: int, w: int) -> np.ndarray:
    """A 0/1 pattern of large blocks that no flip, rotation or transpose maps onto itself."""
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 3, : w // 2] = 1
    mask[h // 2 :, 3 * w // 4 :] = 1
    return mask


def test_masks_lie_over_their_inputs_at_the_original_size(tmp_path: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    truths = {}
    for name, (h, w) in {"tall": (90, 41), "wide": (37, 101)}.items():
        truths[name] = _blocky_asymmetric(h, w)
        rgb = np.stack([truths[name] * 220 + 10] * 3, axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(inputs / f"{name}.png")
    affine = np.diag([0.8, 0.6, 3.0, 1.0])
    truths["scan"] = _blocky_asymmetric(45, 70)
    nib.save(nib.Nifti1Image(truths["scan"].astype(np.float32), affine), inputs / "scan.nii.gz")
    truths["volume"] = _blocky_asymmetric(38, 66)
    vol_affine = np.array([[0.0, 0.0, 0.9, 5.0], [0.0, 0.7, 0.0, -2.0], [2.5, 0.0, 0.0, 1.0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(truths["volume"][None].astype(np.float32), vol_affine), inputs / "volume.nii")  # 1 x H x W
    truths["middle"] = _blocky_asymmetric(40, 50)
    mid_affine = np.diag([0.7, 1.5, 0.9, 1.0])
    nib.save(nib.Nifti1Image(truths["middle"][:, None, :].astype(np.float32), mid_affine), inputs / "middle.nii.gz")  # H x 1 x W

    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(tmp_path),
        input_dir=str(inputs),
        output_dir=str(tmp_path / "out"),
        spatial_size=[64, 64],
        num_workers=0,
        network_def=ThresholdNet(),
        handlers=[],  # no model file to load: the stand-in network is used as it is
        model_check=None,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()

    for name in ("tall", "wide"):
        written = np.array(Image.open(tmp_path / "out" / f"{name}.png"))
        assert written.shape == truths[name].shape
        agree = (written > 0) == (truths[name] > 0)
        assert agree.mean() > 0.97, f"{name}: the mask does not lie over its image"
        assert ((written[::-1, ::-1] > 0) == (truths[name] > 0)).mean() < 0.8  # a rotated mask would fail
    scan = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert scan.shape == truths["scan"].shape and np.allclose(scan.affine, affine)
    assert (np.asarray(scan.dataobj) == truths["scan"]).mean() > 0.97
    volume = nib.load(tmp_path / "out" / "volume.nii.gz")
    assert volume.shape == (1, *truths["volume"].shape)  # the input's own shape: 1 x H x W
    assert np.allclose(volume.affine, vol_affine)  # so every pixel keeps its world position
    assert (np.asarray(volume.dataobj)[0] == truths["volume"]).mean() > 0.97
    middle = nib.load(tmp_path / "out" / "middle.nii.gz")
    assert middle.shape == (40, 1, 50) and np.allclose(middle.affine, mid_affine)
    assert (np.asarray(middle.dataobj)[:, 0, :] == truths["middle"]).mean() > 0.97


def test_cli_inference_writes_every_readable_file_and_skips_broken_ones(trained_bundle: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"a.png": (33, 57), "b.jpg": (61, 29), "sub/c.tif": (48, 48)}
    for rel, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(inputs / rel)
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(inputs / "gray.png")  # grayscale input
    sizes["gray.png"] = (20, 30)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    proc = run_bundle(
        "--config_file", config("inference.json"), "--bundle_root", str(trained_bundle),
        "--input_dir", str(inputs), "--output_dir", str(out), *TINY,
    )
    assert "broken.png" in proc.stdout + proc.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "b.png", "gray.png", "inference_summary.json", "sub/c.png"]
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["images_written"] == 4 and summary["images_skipped"] == 1
    assert summary["skipped"][0]["file"].endswith("broken.png") and summary["skipped"][0]["reason"]
    assert sorted(Path(w["mask"]).relative_to(out).as_posix() for w in summary["written"]) == ["a.png", "b.png", "gray.png", "sub/c.png"]
    assert summary["seconds_per_image"] > 0
    for rel, (h, w) in sizes.items():
        mask = np.array(Image.open(out / (rel.rsplit(".", 1)[0] + ".png")))
        assert mask.shape == (h, w) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
    assert (inputs / "broken.png").read_bytes().endswith(b"truncated")  # inputs untouched


def test_inference_refuses_to_write_into_its_input_folder(trained_bundle: Path, tmp_path: Path):
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    proc = run_bundle(
        "--config_file", config("inference.json"), "--bundle_root", str(trained_bundle),
        "--input_dir", str(tmp_path), "--output_dir", str(tmp_path), *TINY, expect_rc=2,
    )
    assert "is the same folder as input_dir" in proc.stderr


def test_cli_extra_outputs_agree_with_the_masks(trained_bundle: Path, tmp_path: Path):
    from monai_unet_bundle.rle import rle_decode

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w) in {"p.png": (30, 45), "q.png": (52, 20)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(inputs / name)
    (inputs / "list.json").write_text(json.dumps({"test": [{"image": "p.png"}, {"image": "q.png"}]}))
    out = tmp_path / "out"
    run_bundle(
        "--config_file", config("inference.json"), "--bundle_root", str(trained_bundle), "--input_dir", str(inputs),
        "--input_files", str(inputs / "list.json"), "--output_dir", str(out), "--save_overlays", "true",
        "--save_colour_masks", "true", "--save_probabilities", "true", "--rle_csv", "submission.csv",
        "--rle_order", "column", "--tta", "true", "--fill_holes", "true", "--remove_smaller_than", "3", *TINY,
    )
    rows = dict(line.split(",", 1) for line in (out / "submission.csv").read_text().splitlines()[1:])
    assert sorted(rows) == ["p.png", "q.png"]
    for name in ("p", "q"):
        mask = np.array(Image.open(out / f"{name}.png")) > 0
        assert np.array_equal(rle_decode(rows[f"{name}.png"], mask.shape, "column"), mask)
        colour = np.array(Image.open(out / "colour" / f"{name}.png"))
        assert colour.shape == (*mask.shape, 3) and np.array_equal(colour.any(-1), mask)
        overlay = np.array(Image.open(out / "overlays" / f"{name}.png"))
        original = np.array(Image.open(inputs / f"{name}.png"))
        assert overlay.shape == original.shape and np.array_equal((overlay != original).any(-1) & ~mask, np.zeros_like(mask))
        prob = np.array(Image.open(out / "probabilities" / f"{name}_foreground.png"))
        assert prob.shape == mask.shape
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["images_written"] == 2 and summary["rle_order"] == "column"


def test_cli_sliding_window_keeps_the_native_size(trained_bundle: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (75, 101, 3), dtype=np.uint8)).save(inputs / "big.png")
    run_bundle(
        "--config_file", config("inference.json"), "--bundle_root", str(trained_bundle), "--input_dir", str(inputs),
        "--output_dir", str(tmp_path / "out"), "--sliding_window", "true", "--keep_largest_component", "true", *TINY,
    )
    mask = np.array(Image.open(tmp_path / "out" / "big.png"))
    assert mask.shape == (75, 101) and set(np.unique(mask)) <= {0, 255}
