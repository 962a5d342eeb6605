"""InferenceOutputs without a network: where the RLE CSV goes, what it refuses to overwrite, file names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from monai_unet_bundle.data import scan_inputs
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.outputs import SUMMARY_NAME, InferenceOutputs


def _scan(tmp_path: Path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (8, 6)).save(tmp_path / "in" / name)
    return scan_inputs(tmp_path / "in", tmp_path / "out")


def test_rle_csv_is_absolute_as_given_and_relative_under_output_dir(tmp_path: Path):
    scan = _scan(tmp_path)
    absolute = tmp_path / "elsewhere" / "sub.csv"
    assert InferenceOutputs(tmp_path / "out", 2, scan, rle_csv=str(absolute)).rle_csv == absolute
    assert InferenceOutputs(tmp_path / "out", 2, scan, rle_csv="k/sub.csv").rle_csv == tmp_path / "out" / "k" / "sub.csv"
    for bad in ("sub.txt", str(tmp_path / "in")):
        with pytest.raises(BundleInputError, match=r"^rle_csv .* must name a \.csv file"):
            InferenceOutputs(tmp_path / "out", 2, scan, rle_csv=bad)


def test_files_no_inference_run_wrote_are_never_overwritten(tmp_path: Path):
    scan = _scan(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"the user's own file")
    with pytest.raises(BundleInputError, match=r"^inference would overwrite .*a\.png'.*choose a new or empty --output_dir"):
        InferenceOutputs(out, 2, scan)
    # once an earlier run recorded it as its own output (here: planned before an interruption), it may be replaced
    (out / SUMMARY_NAME).write_text(json.dumps({"status": "running", "planned": [str(out / "a.png")]}))
    InferenceOutputs(out, 2, scan)
    # the RLE CSV too
    (tmp_path / "old.csv").write_text("img,rle_mask\n")
    with pytest.raises(BundleInputError, match="old.csv"):
        InferenceOutputs(out, 2, scan, rle_csv=str(tmp_path / "old.csv"))


def test_an_input_is_never_overwritten_even_by_a_repeated_run(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("L", (8, 6)).save(out / "a.png")  # an input that lies where its own mask would go
    scan = scan_inputs(tmp_path / "elsewhere", out, [str(out / "a.png")])
    (out / SUMMARY_NAME).write_text(json.dumps({"status": "finished", "written": [{"mask": str(out / "a.png")}]}))
    with pytest.raises(BundleInputError, match=r"would overwrite .*out/a\.png'"):
        InferenceOutputs(out, 2, scan)


def test_class_names_become_safe_file_names(tmp_path: Path):
    outputs = InferenceOutputs(tmp_path / "out", 3, _scan(tmp_path), class_names=["background", "Left/right lung", "../x"])
    assert outputs.file_class_names == ["background", "Left_right_lung", "x"]
    outputs = InferenceOutputs(tmp_path / "out", 3, outputs.scan, class_names=["background", "Left/right lung", "../x"], probabilities=True)
    planned = {p.relative_to(tmp_path / "out").as_posix() for p in outputs.planned_files()}
    assert "probabilities/a_Left_right_lung.png" in planned and "probabilities/b_x.png" in planned
