from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_unet_bundle.data import (
    DataSource,
    build_datalists,
    evaluation_items,
    file_stem,
    find_pairs,
    list_images,
    output_names,
    scan_inputs,
    split_pairs,
)
from monai_unet_bundle.errors import BundleInputError


def _touch_png(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size).save(path)
    return path


def test_file_stem_handles_double_and_upper_case_extensions():
    assert file_stem("/x/a.nii.gz") == "a"
    assert file_stem("b.PNG") == "b"
    assert file_stem("c.d.tif") == "c.d"


def test_pairs_by_stem_with_suffix_and_subfolders(tmp_path):
    _touch_png(tmp_path / "images" / "car_01.png")
    _touch_png(tmp_path / "images" / "sub" / "car_02.PNG")
    _touch_png(tmp_path / "masks" / "car_01_mask.png")
    _touch_png(tmp_path / "masks" / "sub" / "car_02_mask.png")
    pairs, missing, orphans = find_pairs(tmp_path, mask_suffix="_mask")
    assert [Path(p["label"]).name for p in pairs] == ["car_01_mask.png", "car_02_mask.png"]
    assert missing == [] and orphans == []
    # without an explicit suffix, '_mask' is still recognised
    assert find_pairs(tmp_path)[0] == pairs


def test_missing_mask_is_named(tmp_path):
    _touch_png(tmp_path / "images" / "a.png")
    _touch_png(tmp_path / "images" / "b.png")
    _touch_png(tmp_path / "masks" / "a.png")
    _touch_png(tmp_path / "masks" / "z.png")
    assert find_pairs(tmp_path)[1:] == (["images/b.png"], ["masks/z.png"])
    with pytest.raises(BundleInputError, match=r"1 image\(s\).*no mask.*images/b.png"):
        build_datalists(DataSource(tmp_path))


def test_missing_masks_folder_is_named(tmp_path):
    _touch_png(tmp_path / "images" / "a.png")
    with pytest.raises(BundleInputError, match=r"has no 'masks/' folder"):
        find_pairs(tmp_path)


def test_split_is_deterministic_and_never_empty():
    pairs = [{"image": f"{i}.png", "label": f"{i}.png"} for i in range(10)]
    train, val = split_pairs(pairs, 0.2, seed=3)
    assert (train, val) == split_pairs(list(reversed(pairs)), 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert not {p["image"] for p in train} & {p["image"] for p in val}
    assert split_pairs(pairs, 0.2, seed=4) != (train, val)
    # a tiny fraction still keeps one validation pair
    assert len(split_pairs(pairs[:3], 0.01)[1]) == 1


def test_split_refuses_a_single_pair_and_bad_fraction():
    with pytest.raises(BundleInputError, match=r"validation split would be empty .*: add pairs \(at least 2\), or give validation pairs"):
        split_pairs([{"image": "a", "label": "a"}], 0.2)
    for bad in (1.0, 0, -0.5, "abc", None, True):
        with pytest.raises(BundleInputError, match=r"val_fraction must be a number between 0 and 1 \(exclusive\), e.g. 0.2; got"):
            split_pairs([{"image": "a", "label": "a"}] * 3, bad)


def test_datalist_paths_are_relative_to_dataset_dir(tmp_path):
    for name in ("a", "b", "c"):
        _touch_png(tmp_path / "img" / f"{name}.png")
        _touch_png(tmp_path / "lab" / f"{name}.png")
    spec = {
        "training": [{"image": "img/a.png", "label": "lab/a.png"}, {"image": "img/b.png", "label": "lab/b.png"}],
        "validation": [{"image": "img/c.png", "label": "lab/c.png"}],
        "test": [{"image": "img/c.png", "label": "lab/c.png"}],
    }
    (tmp_path / "list.json").write_text(json.dumps(spec))
    lists = build_datalists(DataSource(tmp_path, tmp_path / "list.json"))
    # every item carries a group ("": a group of its own), so that a batch's items all have the same keys
    assert lists["validation"] == [{"image": str(tmp_path / "img/c.png"), "label": str(tmp_path / "lab/c.png"), "group": ""}]
    assert len(lists["training"]) == 2 and len(lists["test"]) == 1


def test_datalist_without_validation_is_split(tmp_path):
    items = []
    for name in "abcde":
        items.append({"image": str(_touch_png(tmp_path / f"{name}.png")), "label": str(_touch_png(tmp_path / f"{name}_m.png"))})
    (tmp_path / "list.json").write_text(json.dumps({"training": items}))
    lists = build_datalists(DataSource(tmp_path, tmp_path / "list.json", val_fraction=0.4))
    assert len(lists["validation"]) == 2 and len(lists["training"]) == 3


def test_datalist_errors_name_the_file(tmp_path):
    with pytest.raises(BundleInputError, match="does not exist"):
        build_datalists(DataSource(tmp_path, tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BundleInputError, match="bad.json.*not valid JSON"):
        build_datalists(DataSource(tmp_path, tmp_path / "bad.json"))
    (tmp_path / "gone.json").write_text(json.dumps({"training": [{"image": "x.png", "label": "y.png"}]}))
    with pytest.raises(BundleInputError, match="x.png.*does not exist"):
        build_datalists(DataSource(tmp_path, tmp_path / "gone.json"))


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(BundleInputError, match="dataset_dir .* does not exist"):
        build_datalists(DataSource(tmp_path / "nope"))


def test_list_images_skips_unreadable_files(tmp_path, caplog):
    _touch_png(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.zeros((6, 8, 4), np.float32), np.eye(4)), tmp_path / "in" / "volume.nii.gz")  # not a slice
    Image.new("L", (7, 1)).save(tmp_path / "in" / "thin.png")  # 1 pixel high: no mask can be written
    with caplog.at_level("WARNING"):
        scan = scan_inputs(tmp_path / "in")
    assert scan.items == [{"image": str(tmp_path / "in" / "good.png"), "output_name": "good"}]
    reasons = {Path(s["file"]).name: s["reason"] for s in scan.skipped}
    assert sorted(reasons) == ["broken.png", "empty.jpg", "thin.png", "volume.nii.gz"] and "not a 2D slice" in reasons["volume.nii.gz"]
    assert reasons["empty.jpg"] == "empty file" and "is 1x7 pixels" in reasons["thin.png"]
    assert "broken.png" in caplog.text


def test_list_images_protects_inputs(tmp_path):
    _touch_png(tmp_path / "in" / "a.png")
    _touch_png(tmp_path / "in" / "pred" / "a.png")  # an earlier run's output inside input_dir
    with pytest.raises(BundleInputError, match="same folder as input_dir"):
        list_images(tmp_path / "in", tmp_path / "in")
    assert [d["image"] for d in list_images(tmp_path / "in", tmp_path / "in" / "pred")] == [str(tmp_path / "in" / "a.png")]
    # input_dir inside output_dir: the inputs are still inputs
    assert [d["image"] for d in list_images(tmp_path / "in" / "pred", tmp_path / "in")] == [str(tmp_path / "in" / "pred" / "a.png")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(BundleInputError, match="no readable image .* found in input_dir"):
        list_images(tmp_path / "empty", tmp_path / "out")


def test_output_names_never_clash(tmp_path):
    for rel in ("a.png", "a.jpg", "A.tif", "sub/a.png", "scan.nii.gz", "scan.nii"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(b"")  # names only: nothing is read
    other = tmp_path / "elsewhere" / "a.png"
    _touch_png(other)
    paths = [str(tmp_path / "in" / r) for r in ("a.png", "a.jpg", "A.tif", "sub/a.png", "scan.nii.gz", "scan.nii")] + [str(other)]
    names = output_names(paths, tmp_path / "in")
    assert names[paths[0]] == "a" and names[paths[1]] == "a_jpg" and names[paths[2]] == "A_tif"
    assert names[paths[3]] == "sub/a" and names[paths[4]] == "scan" and names[paths[5]] == "scan_nii"
    assert names[str(other)] == "a_png"  # outside input_dir: named by stem, which is taken
    assert len({n.lower() for n in names.values()}) == len(paths)


def test_inference_lists_need_only_an_image_column(tmp_path):
    for name in ("a", "b", "c"):
        _touch_png(tmp_path / "in" / f"{name}.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "only_images.csv").write_text("image\na.png\nb.png\n")
    scan = scan_inputs(tmp_path / "in", tmp_path / "out", str(tmp_path / "lists" / "only_images.csv"))
    assert [Path(d["image"]).name for d in scan.items] == ["a.png", "b.png"]
    (tmp_path / "split.csv").write_text("image,label,split\nin/c.png,,test\nin/a.png,x.png,training\n")
    scan = scan_inputs(tmp_path / "nowhere", tmp_path / "out", str(tmp_path / "split.csv"))  # beside the list file
    assert [d["image"] for d in scan.items] == [str(tmp_path / "in" / "c.png")]  # only the test rows
    (tmp_path / "lists" / "plain.json").write_text(json.dumps(["a.png", {"image": "c.png"}, "a.png"]))
    scan = scan_inputs(tmp_path / "in", tmp_path / "out", str(tmp_path / "lists" / "plain.json"))
    assert [Path(d["image"]).name for d in scan.items] == ["a.png", "c.png"]  # named twice, predicted once
    (tmp_path / "lists" / "bad.json").write_text(json.dumps([{"label": "x.png"}]))
    with pytest.raises(BundleInputError, match=r"item 0 is .*each item must be an image path"):
        scan_inputs(tmp_path / "in", tmp_path / "out", str(tmp_path / "lists" / "bad.json"))
    (tmp_path / "lists" / "nolabel.csv").write_text("image\na.png\n")
    with pytest.raises(BundleInputError, match="needs a header row with 'image' and 'label' columns"):
        build_datalists(DataSource(tmp_path, tmp_path / "lists" / "nolabel.csv"))
    with pytest.raises(BundleInputError, match="does not exist"):
        scan_inputs(tmp_path / "in", tmp_path / "out", str(tmp_path / "lists" / "missing.csv"))


def test_evaluation_scores_labelled_test_items_else_validation(caplog):
    val = [{"image": "v.png", "label": "vm.png"}]
    with caplog.at_level("WARNING"):
        assert evaluation_items({"validation": val, "test": [{"image": "t.png"}]}) == val
    assert "none of the 1 test items has a 'label'" in caplog.text
    labelled = {"image": "u.png", "label": "um.png"}
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert evaluation_items({"validation": val, "test": [{"image": "t.png"}, labelled]}) == [labelled]
    assert "1 of the 2 test items have no 'label'" in caplog.text
    assert evaluation_items({"validation": val}) == val
    with pytest.raises(BundleInputError, match="nothing to evaluate"):
        evaluation_items({"validation": [], "test": [{"image": "t.png"}]})
