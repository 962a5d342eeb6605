"""Every documented inference and evaluation option, run through ``python -m monai.bundle run``.

Each run works on a folder of images of different sizes and formats (PNG, JPEG, TIFF in a
sub-folder, NIfTI) with relative or absolute paths, and each test asserts what its option does to
the written files.  The network is :class:`tests.stand_in.StandInNet` (foreground where the image
is bright, or on the left of the network's input), so the expected masks are known exactly; the
checkpoint loader, transforms, inferer, inversion, post-processing and writers are the real ones.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from monai_unet_bundle.curves import PALETTE
from monai_unet_bundle.rle import rle_decode
from tests.conftest import REPO, config, run_bundle
from tests.stand_in import save_stand_in

pytestmark = pytest.mark.slow

STAND_IN = ["--network_def#_target_", "tests.stand_in.StandInNet", "--num_workers", "0"]
RESIZED = ["--spatial_size", "[64,64]"]
#: the subprocess imports tests.stand_in whatever its working directory
WITH_TESTS = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _truths() -> dict[str, np.ndarray]:
    """Foreground of every test image (what the stand-in network predicts at native resolution)."""
    ring = _disk(90, 120, 45, 60, 35) & ~_disk(90, 120, 45, 60, 14)
    blobs = np.zeros((70, 50), bool)
    blobs[4:34, 4:34] = True  # 900 px
    blobs[42:56, 30:44] = True  # 196 px
    blobs[58:64, 6:12] = True  # 36 px
    stripes = np.zeros((48, 160), bool)
    stripes[10:38, 10:70] = True  # 1680 px
    stripes[10:38, 100:140] = True  # 1120 px
    tall = np.zeros((100, 36), bool)
    tall[10:60, 6:30] = True
    scan = np.zeros((40, 56), bool)
    scan[: 40 // 3, : 56 // 2] = True
    scan[40 // 2 :, 3 * 56 // 4 :] = True
    return {"ring": ring, "blobs": blobs, "stripes": stripes, "sub/tall": tall, "scan": scan}


TRUTHS = _truths()
FILES = {"ring": "ring.png", "blobs": "blobs.png", "stripes": "stripes.bmp", "sub/tall": "sub/tall.tif", "scan": "scan.nii.gz"}
AFFINE = np.diag([0.8, 0.6, 2.5, 1.0])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``in/`` with five images of different sizes and formats, ``model.pt`` of the stand-in, ``data/`` for evaluation."""
    root = tmp_path_factory.mktemp("options")
    (root / "in" / "sub").mkdir(parents=True)
    for name, truth in TRUTHS.items():
        pixels = truth.astype(np.uint8) * 255
        if name == "scan":
            nib.save(nib.Nifti1Image(truth.astype(np.float32), AFFINE), root / "in" / FILES[name])
        elif name == "blobs":
            Image.fromarray(pixels, "L").save(root / "in" / FILES[name])
        else:
            Image.fromarray(np.stack([pixels] * 3, -1), "RGB").save(root / "in" / FILES[name])
    save_stand_in(root / "model.pt")
    return root


def infer(root: Path, *args: str, cwd: Path | None = None, expect_rc: int = 0):
    """Run configs/inference.json with the stand-in network in ``cwd`` (default: ``root``)."""
    return run_bundle("--config_file", config("inference.json"), *STAND_IN, *args, cwd=cwd or root, expect_rc=expect_rc, env=WITH_TESTS)


def read_mask(path: Path) -> np.ndarray:
    """A written mask as (H, W) as viewers show it."""
    if path.name.endswith(".nii.gz"):
        return np.asarray(nib.load(path).dataobj)
    return np.array(Image.open(path))


def masks(out: Path) -> dict[str, np.ndarray]:
    """Every image's written mask, as booleans."""
    return {
        name: read_mask(out / (name + (".nii.gz" if name == "scan" else ".png"))) > 0 for name in TRUTHS
    }


@pytest.fixture(scope="module")
def baseline(workspace: Path) -> Path:
    """Defaults, every path relative to the working directory."""
    infer(workspace, "--input_dir", "in", "--output_dir", "out_base", "--ckpt_path", "model.pt", *RESIZED)
    return workspace / "out_base"


def test_defaults_with_relative_paths_write_masks_over_their_images(baseline: Path):
    written = masks(baseline)
    for name, truth in TRUTHS.items():
        assert written[name].shape == truth.shape, name
        assert (written[name] == truth).mean() > 0.97, name  # resized to 64x64 and back: edges may move a pixel
    assert set(np.unique(np.array(Image.open(baseline / "ring.png")))) == {0, 255}  # binary PNG masks are 0/255
    scan = nib.load(baseline / "scan.nii.gz")
    assert np.allclose(scan.affine, AFFINE)
    summary = json.loads((baseline / "inference_summary.json").read_text())
    assert summary["status"] == "finished" and summary["images_written"] == 5 and summary["images_skipped"] == 0
    # the three post-processing options have something to do on these images
    assert not written["ring"][45, 60]  # the ring's hole
    assert written["blobs"][61, 9] and written["blobs"][49, 37]  # the 36 px and 196 px blobs
    assert written["stripes"][24, 120]  # the smaller stripe


def test_sliding_window_keeps_native_resolution_on_images_of_different_sizes(workspace: Path):
    out = workspace / "out_window"
    infer(workspace, "--input_dir", str(workspace / "in"), "--output_dir", str(out), "--ckpt_path", str(workspace / "model.pt"),
          "--spatial_size", "[32,32]", "--sliding_window", "true", "--batch_size", "4")
    for name, written in masks(out).items():
        assert np.array_equal(written, TRUTHS[name]), name  # no resize: every pixel exact


def test_a_model_trained_on_patches_infers_in_sliding_windows_unless_told_otherwise(workspace: Path):
    """sliding_window auto follows the plan beside the model: patches were cut at the images' own resolution."""
    model = workspace / "patched" / "model.pt"
    model.parent.mkdir()
    model.write_bytes((workspace / "model.pt").read_bytes())
    plan = {"num_classes": 2, "class_names": ["background", "foreground"], "in_channels": 3, "spatial_size": [32, 32],
            "batch_size": 4, "normalization": "minmax", "patch_training": True}
    (model.parent / "plan.json").write_text(json.dumps(plan))
    auto = workspace / "out_patched"
    infer(workspace, "--input_dir", "in", "--output_dir", "out_patched", "--ckpt_path", "patched/model.pt")
    for name, written in masks(auto).items():
        assert np.array_equal(written, TRUTHS[name]), name  # native resolution: every pixel exact
    # told otherwise: resized to the 32x32 patch and back, with a warning naming the model and the setting
    proc = infer(workspace, "--input_dir", "in", "--output_dir", "out_patched_resized", "--ckpt_path", "patched/model.pt",
                 "--sliding_window", "false")
    assert "trained on patches at the images' own resolution: sliding_window false resizes" in proc.stdout + proc.stderr
    resized = masks(workspace / "out_patched_resized")
    assert all(resized[n].shape == TRUTHS[n].shape for n in TRUTHS)
    assert not all(np.array_equal(resized[n], TRUTHS[n]) for n in TRUTHS)


def test_tta_averages_the_flipped_predictions(workspace: Path):
    # The ramp network marks the first 60% of its input's last axis, which is the image's height
    # (MONAI holds PIL images as width x height): the top 60% of the picture.  Two of the four
    # flips turn that axis round and mark the bottom 60% instead.
    runs = {}
    for tta in ("false", "true"):
        out = workspace / f"out_ramp_{tta}"
        infer(workspace, "--input_dir", "in", "--output_dir", str(out), "--ckpt_path", "model.pt", *RESIZED,
              "--network_def#mode", "ramp", "--tta", tta, "--save_probabilities", "true")
        runs[tta] = np.array(Image.open(out / "probabilities" / "sub" / "tall_foreground.png")).astype(int)
    top, middle, bottom = slice(0, 30), slice(45, 52), slice(70, 100)  # away from the bands' edges (100 rows)
    assert (runs["false"][top] >= 250).all() and (runs["false"][middle] >= 250).all() and (runs["false"][bottom] <= 5).all()
    # averaged over the flips: all agree on the middle band, half of them on each outer band
    assert (runs["true"][middle] >= 250).all()
    assert (np.abs(runs["true"][top] - 127.5) <= 3).all() and (np.abs(runs["true"][bottom] - 127.5) <= 3).all()


def test_post_processing_options_each_change_what_they_should(workspace: Path, baseline: Path):
    base = masks(baseline)
    out = workspace / "out_fill_small"
    infer(workspace, "--input_dir", "in", "--output_dir", str(out), "--ckpt_path", "model.pt", *RESIZED,
          "--fill_holes", "true", "--remove_smaller_than", "100")
    filled = masks(out)
    assert filled["ring"][45, 60] and (filled["ring"] >= base["ring"]).all()  # the hole is filled, nothing removed
    assert ndimage.binary_fill_holes(filled["ring"]).sum() == filled["ring"].sum()
    assert not filled["blobs"][58:64, 6:12].any()  # 36 px < 100: removed
    assert filled["blobs"][49, 37] and filled["blobs"][20, 20]  # 196 and 900 px: kept
    assert np.array_equal(filled["stripes"], base["stripes"])

    out = workspace / "out_largest"
    infer(workspace, "--input_dir", "in", "--output_dir", str(out), "--ckpt_path", "model.pt", *RESIZED,
          "--keep_largest_component", "true")
    largest = masks(out)
    assert not largest["stripes"][:, 90:].any() and np.array_equal(largest["stripes"][:, :90], base["stripes"][:, :90])
    assert not largest["blobs"][40:, :].any() and largest["blobs"][20, 20]
    assert np.array_equal(largest["ring"], base["ring"])  # one object, hole kept
    for name in TRUTHS:
        assert ndimage.label(largest[name], np.ones((3, 3)))[1] <= 1, name


def test_extra_outputs_and_rle_with_absolute_paths(workspace: Path):
    out = workspace / "out_extras"
    rle = workspace / "elsewhere" / "submission.csv"  # absolute, outside output_dir, folder not yet there
    infer(workspace, "--input_dir", str(workspace / "in"), "--output_dir", str(out), "--ckpt_path", str(workspace / "model.pt"),
          *RESIZED, "--save_overlays", "true", "--save_colour_masks", "true", "--save_probabilities", "true",
          "--rle_csv", str(rle), "--rle_order", "column", cwd=REPO)
    assert not (out / str(rle).lstrip("/")).exists()
    rows = {r["img"]: r["rle_mask"] for r in csv.DictReader(rle.open())}
    assert sorted(rows) == sorted(FILES.values())  # file names, with the sub-folder under input_dir
    written = masks(out)
    for name in ("ring", "blobs", "stripes", "sub/tall"):
        mask = written[name]
        assert np.array_equal(rle_decode(rows[FILES[name]], mask.shape, "column"), mask), name
        assert not np.array_equal(rle_decode(rows[FILES[name]], mask.shape, "row"), mask), name
        colour = np.array(Image.open(out / "colour" / f"{name}.png"))
        assert np.array_equal(colour[mask], np.broadcast_to(PALETTE[1], colour[mask].shape)) and not colour[~mask].any()
        original = np.array(Image.open(workspace / "in" / FILES[name]).convert("RGB"))
        over = np.array(Image.open(out / "overlays" / f"{name}.png"))
        changed = (over != original).any(-1)
        assert over.shape == original.shape and not (changed & ~mask).any() and changed[mask].mean() > 0.9, name
        prob = np.array(Image.open(out / "probabilities" / f"{name}_foreground.png"))
        assert prob[mask].min() >= 127 and prob[~mask].max() <= 128, name  # the mask is the arg-max of these
    assert (out / "scan.nii.gz").is_file() and (out / "colour" / "scan.png").is_file()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["rle_csv"] == str(rle) and summary["rle_order"] == "column"
    assert sorted(Path(w["overlay"]).relative_to(out).as_posix() for w in summary["written"]) == sorted(
        f"overlays/{n}.png" for n in TRUTHS
    )


def test_input_files_csv_runtime_knobs_and_in_channels(workspace: Path, baseline: Path):
    (workspace / "lists").mkdir(exist_ok=True)
    (workspace / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # an image-only CSV, entries relative to input_dir, beside the list, or missing
    (workspace / "lists" / "todo.csv").write_text("image\nring.png\nsub/tall.tif\n../broken.png\nmissing.png\n")
    out = workspace / "out_csv"
    proc = infer(workspace, "--input_dir", "in", "--input_files", "lists/todo.csv", "--output_dir", "out_csv",
                 "--ckpt_path", "model.pt", *RESIZED, "--in_channels", "1", "--channels_last", "false", "--fast_allocator", "false",
                 "--num_workers", "1", "--batch_size", "3", "--device", "cpu", "--rle_csv", "rle/row.csv", "--rle_order", "row")
    base = masks(baseline)
    for name in ("ring", "sub/tall"):
        assert np.array_equal(read_mask(out / f"{name}.png") > 0, base[name]), name  # luma of gray RGB = the same image
    assert not (out / "blobs.png").exists() and not (out / "tall.png").exists()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["images_written"] == 2
    assert sorted(Path(s["file"]).name for s in summary["skipped"]) == ["broken.png", "missing.png"]
    assert "2 colour image(s) become grayscale" in proc.stdout + proc.stderr  # said once, before predicting
    rows = {r["img"]: r["rle_mask"] for r in csv.DictReader((out / "rle" / "row.csv").open())}
    assert np.array_equal(rle_decode(rows["ring.png"], base["ring"].shape, "row"), base["ring"])


def test_multiclass_masks_colours_and_probability_names(workspace: Path):
    inputs = workspace / "in3"
    inputs.mkdir()
    three = np.zeros((60, 81), np.uint8)
    three[:, 27:54], three[:, 54:] = 128, 255
    Image.fromarray(three, "L").save(inputs / "three.png")
    Image.fromarray(np.ascontiguousarray(three.T[::-1]), "L").save(inputs / "turned.png")  # 81 x 60
    out = workspace / "out3"
    infer(workspace, "--input_dir", "in3", "--output_dir", str(out), "--ckpt_path", "model.pt", *RESIZED,
          "--num_classes", "3", "--class_names", "['background','liver','tumour']", "--save_colour_masks", "true",
          "--save_probabilities", "true")
    expected = {"three": np.digitize(three, [64, 192]), "turned": np.digitize(np.ascontiguousarray(three.T[::-1]), [64, 192])}
    for name, truth in expected.items():
        mask = np.array(Image.open(out / f"{name}.png"))
        assert mask.shape == truth.shape and set(np.unique(mask)) == {0, 1, 2}  # class indices, not 0/255
        assert (mask == truth).mean() > 0.97
        colour = np.array(Image.open(out / "colour" / f"{name}.png"))
        for c in (1, 2):
            assert (colour[mask == c] == PALETTE[c]).all()
        for c, cname in ((1, "liver"), (2, "tumour")):
            prob = np.array(Image.open(out / "probabilities" / f"{name}_{cname}.png"))
            assert ((prob > 127) == (mask == c)).mean() > 0.99


def test_evaluation_scores_the_labelled_test_list_with_relative_and_absolute_paths(workspace: Path):
    data = workspace / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for name in ("ring", "blobs", "stripes"):
        src = workspace / "in" / FILES[name]
        Image.open(src).save(data / "images" / f"{name}.png")
        Image.fromarray(TRUTHS[name].astype(np.uint8) * 255).save(data / "masks" / f"{name}.png")
    Image.fromarray((~TRUTHS["stripes"]).astype(np.uint8)).save(data / "masks" / "stripes_wrong.png")  # 0/1, inverted
    spec = {
        "training": [{"image": "images/ring.png", "label": "masks/ring.png"}, {"image": "images/blobs.png", "label": "masks/blobs.png"}],
        "validation": [{"image": "images/blobs.png", "label": "masks/blobs.png"}],
        "test": [
            {"image": "images/ring.png", "label": "masks/ring.png"},
            {"image": "images/stripes.png", "label": "masks/stripes_wrong.png"},
            {"image": "images/stripes.png"},
        ],
    }
    (data / "list.json").write_text(json.dumps(spec))
    proc = run_bundle(
        "--config_file", config("train.json", "evaluate.json"), *STAND_IN, *RESIZED, "--bundle_root", ".",
        "--dataset_dir", "data", "--datalist", "data/list.json", "--ckpt_path", str(workspace / "model.pt"),
        "--output_dir", "eval_rel", "--class_names", "['background','lesion']", cwd=workspace, env=WITH_TESTS,
    )
    assert "1 of the 3 test items have no 'label'" in proc.stdout + proc.stderr
    rows = list(csv.DictReader((workspace / "eval_rel" / "metrics_per_image.csv").open()))
    scores = {Path(r["filename"]).name: float(r["dice_lesion"]) for r in rows}
    assert set(scores) == {"ring.png", "stripes.png"}  # the labelled test items, nothing else
    assert scores["ring.png"] > 0.95 and scores["stripes.png"] < 0.05  # scored against the mask files themselves
    summary = json.loads((workspace / "eval_rel" / "metrics_summary.json").read_text())
    assert summary["images"] == 2 and summary["class_names"] == ["background", "lesion"]
    report = (workspace / "eval_rel" / "metrics_report.md").read_text()
    assert "| lesion |" in report and "| foreground |" not in report
