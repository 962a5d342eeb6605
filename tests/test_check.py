"""The pre-flight data check, in-process and through ``python -m monai.bundle run check_data``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_unet_bundle.check import checked_datalists, run_data_check
from monai_unet_bundle.data import DataSource
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.transforms import MaskToIndexd
from tests.conftest import TINY, config, run_bundle, write_pairs


def _check(dataset: Path, tmp_path: Path, **kw):
    source = {k: kw.pop(k) for k in ("datalist", "val_fraction", "seed", "mask_suffix", "val_dataset_dir") if k in kw}
    source.setdefault("val_fraction", 0.25)
    args = dict(num_classes=2, spatial_size=[32, 32], report_path=tmp_path / "report.json")
    args.update(kw)
    return checked_datalists(source=DataSource(dataset, **source), **args)


def _broken_dataset(root: Path) -> Path:
    write_pairs(root, n=4)
    Image.new("RGB", (20, 20)).save(root / "images" / "no_mask.png")
    (root / "images" / "case_01.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    Image.fromarray(np.full((40, 52), 7, np.uint8)).save(root / "masks" / "case_02.png")
    Image.new("L", (30, 30)).save(root / "masks" / "case_03.png")  # image is 40x52
    return root


def test_every_problem_is_listed_at_once(tmp_path):
    data = _broken_dataset(tmp_path / "data")
    with pytest.raises(BundleInputError) as info:
        _check(data, tmp_path, spatial_size=[40, 40])
    message = str(info.value)
    assert len(message.splitlines()) == 5  # one sentence per problem, one problem per line
    for part in (
        "use [48, 48] instead",
        "1 image(s) in", "images/no_mask.png",
        "case_01.png cannot be read",
        "case_02.png holds values 7 that map to no class",
        "case_03.png is 30x30 (height x width) but its image is 40x52",
    ):
        assert part in message, part
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and len(report["problems"]) == 5


def test_a_clean_set_is_summarised_and_cached(tmp_path, caplog):
    data = write_pairs(tmp_path / "data", n=4)
    Image.open(data / "images" / "case_00.png").convert("L").save(data / "images" / "case_00.png")
    Image.open(data / "images" / "case_01.png").convert("RGBA").save(data / "images" / "case_01.png")
    Image.new("L", (40, 52)).save(data / "masks" / "orphan.png")
    lists = _check(data, tmp_path, class_names=["background", "cell"])
    assert len(lists["training"]) == 3 and len(lists["validation"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["channel_mix"] == {"L": 1, "RGBA": 1, "RGB": 2}
    assert report["image_size"]["min_height_width"] == [40, 52]
    assert report["mask_values"] == [0.0, 255.0]
    freq = report["class_pixel_frequency"]
    assert set(freq) == {"background", "cell"} and abs(sum(freq.values()) - 1) < 1e-5 and 0 < freq["cell"] < 0.9
    assert any("orphan.png" in w for w in report["warnings"])
    with caplog.at_level("INFO", logger="monai_unet_bundle.check"):
        assert _check(data, tmp_path, class_names=["background", "cell"]) == lists
    assert "unchanged since the last check" in caplog.text


def test_a_run_checked_before_patch_training_existed_resumes_with_its_cached_plan(tmp_path, caplog):
    data = write_pairs(tmp_path / "data", n=4)
    old = {"num_classes": "auto", "spatial_size": "auto", "in_channels": "auto", "batch_size": "auto", "normalization": "auto",
           "class_weights": None, "loss_name": "dice_ce"}
    report = tmp_path / "report.json"
    _, plan = run_data_check(source=DataSource(data, val_fraction=0.25), settings=old, report_path=report)
    cached = json.loads(report.read_text())
    cached["plan"].pop("patch_training")  # as a plan of then was written
    report.write_text(json.dumps(cached))
    with caplog.at_level("INFO", logger="monai_unet_bundle.check"):
        _, resumed = run_data_check(source=DataSource(data, val_fraction=0.25), settings={**old, "patch_training": "auto"},
                                    report_path=report)
    assert "unchanged since the last check" in caplog.text and "patch_training" not in resumed  # the configs read it as false
    caplog.clear()
    with caplog.at_level("INFO", logger="monai_unet_bundle.check"):
        _, replanned = run_data_check(source=DataSource(data, val_fraction=0.25), settings={**old, "patch_training": "true"},
                                      report_path=report)
    assert "unchanged since the last check" not in caplog.text and replanned["patch_training"] is True


def test_separate_validation_folder_and_csv_datalist(tmp_path):
    train = write_pairs(tmp_path / "train", n=3)
    val = write_pairs(tmp_path / "val", n=2, seed=5)
    lists = _check(train, tmp_path, val_dataset_dir=val)
    assert len(lists["training"]) == 3 and [Path(d["image"]).parent.parent.name for d in lists["validation"]] == ["val", "val"]
    rows = ["image,label,split"] + [f"images/case_0{i}.png,masks/case_0{i}.png,{'validation' if i == 2 else 'training'}" for i in range(3)]
    (train / "list.csv").write_text("\n".join(rows) + "\n")
    lists = _check(train, tmp_path, datalist=train / "list.csv")
    assert len(lists["training"]) == 2 and lists["validation"][0]["image"].endswith("case_02.png")


def test_masks_encoded_by_palette_are_checked_with_it(tmp_path):
    data = write_pairs(tmp_path / "data", n=3)
    for mask in (data / "masks").glob("*.png"):
        m = np.array(Image.open(mask)) > 0
        rgb = np.zeros((*m.shape, 3), np.uint8)
        rgb[m] = [200, 30, 30]
        Image.fromarray(rgb).save(mask)
    to_index = MaskToIndexd("label", 2, palette=[[0, 0, 0], [200, 30, 30]])
    assert len(_check(data, tmp_path, mask_to_index=to_index, val_fraction=0.34)["validation"]) == 1
    with pytest.raises(BundleInputError, match="differing channels"):
        _check(data, tmp_path / "plain")


@pytest.mark.slow
def test_check_data_workflow_id_reports_and_exits_2(tmp_path):
    data = _broken_dataset(tmp_path / "data")
    proc = run_bundle(
        "check_data", "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
        *TINY, expect_rc=2,
    )
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr and "no_mask.png" in proc.stderr
    assert any("case_01.png cannot be read" in line and "replace the file" in line for line in lines)
    assert (tmp_path / "logs" / "data_check.json").is_file() and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_a_mixed_set_of_formats_and_channels_trains(tmp_path):
    data = tmp_path / "data"
    write_pairs(data, n=6)
    images, masks = data / "images", data / "masks"
    Image.open(images / "case_00.png").convert("L").save(images / "case_00.png")
    Image.open(images / "case_01.png").convert("RGBA").save(images / "case_01.png")
    Image.open(images / "case_02.png").save(images / "case_02.JPG", quality=95)
    (images / "case_02.png").unlink()
    mask = Image.open(masks / "case_03.png")
    (masks / "case_03.png").unlink()
    mask.point(lambda v: 1 if v else 0).convert("P").save(masks / "case_03_mask.gif")  # Carvana-style
    gray = np.asarray(Image.open(images / "case_04.png").convert("L"), dtype=np.float32)
    nib.save(nib.Nifti1Image(gray[None], np.eye(4)), images / "case_04.nii.gz")  # a 1xHxW volume
    nib.save(nib.Nifti1Image((np.asarray(Image.open(masks / "case_04.png")) > 0).astype(np.uint8)[None], np.eye(4)), masks / "case_04.nii.gz")
    (images / "case_04.png").unlink()
    (masks / "case_04.png").unlink()
    proc = run_bundle(
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data), "--max_epochs", "2", *TINY,
    )
    assert "data check: 5 training, 1 validation pairs" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "logs" / "data_check.json").read_text())
    assert {"L", "RGBA", "RGB"} <= set(report["channel_mix"]) and any(k.startswith("NIfTI") for k in report["channel_mix"])
    assert (tmp_path / "models" / "model.pt").is_file()


def test_unreadable_masks_and_shared_stems_are_one_named_line_each(tmp_path):
    data = write_pairs(tmp_path / "data", n=4)
    (data / "masks" / "case_01.png").write_bytes(b"")  # zero bytes
    (data / "masks" / "case_02.png").write_text("not an image")
    Image.open(data / "images" / "case_03.png").save(data / "images" / "case_03.jpg")  # a second image of that stem
    with pytest.raises(BundleInputError) as info:
        _check(data, tmp_path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all("Traceback" not in line and "===" not in line for line in lines)
    assert any(line.startswith("mask ") and "case_01.png cannot be read (empty file): replace the file" in line for line in lines)
    assert any("case_02.png cannot be read (" in line and line.endswith("remove its pair from the data.") for line in lines)
    assert any("case_03.jpg" in line and "share one stem" in line and "rename or remove all but one" in line for line in lines)
