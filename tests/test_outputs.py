"""InferenceOutputs without a network: where the RLE CSV goes, what it refuses to overwrite, file names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from monai_unet_bundle.data import scan_inputs
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.outputs import SUMMARY_NAME, WRITTEN_BY, InferenceOutputs


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
    (out / SUMMARY_NAME).write_text(json.dumps({"written_by": WRITTEN_BY, "status": "running", "planned": [str(out / "a.png")]}))
    InferenceOutputs(out, 2, scan)
    # a JSON file of the same name that an inference run did not write proves nothing
    (out / SUMMARY_NAME).write_text(json.dumps({"my": "data", "planned": [str(out / "a.png")]}))
    with pytest.raises(BundleInputError, match="would overwrite .*inference_summary.json"):
        InferenceOutputs(out, 2, scan)
    (out / SUMMARY_NAME).write_text(json.dumps({"written_by": WRITTEN_BY, "status": "running", "planned": [str(out / "a.png")]}))
    # the RLE CSV too
    (tmp_path / "old.csv").write_text("img,rle_mask\n")
    with pytest.raises(BundleInputError, match="old.csv"):
        InferenceOutputs(out, 2, scan, rle_csv=str(tmp_path / "old.csv"))


def test_an_input_is_never_overwritten_even_by_a_repeated_run(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("L", (8, 6)).save(out / "a.png")  # an input that lies where its own mask would go
    scan = scan_inputs(tmp_path / "elsewhere", out, [str(out / "a.png")])
    (out / SUMMARY_NAME).write_text(json.dumps({"written_by": WRITTEN_BY, "status": "finished", "written": [{"mask": str(out / "a.png")}]}))
    with pytest.raises(BundleInputError, match=r"would overwrite .*out/a\.png'"):
        InferenceOutputs(out, 2, scan)


def test_class_names_become_safe_file_names(tmp_path: Path):
    outputs = InferenceOutputs(tmp_path / "out", 3, _scan(tmp_path), class_names=["background", "Left/right lung", "../x"])
    assert outputs.file_class_names == ["background", "Left_right_lung", "x"]
    outputs = InferenceOutputs(tmp_path / "out", 3, outputs.scan, class_names=["background", "Left/right lung", "../x"], probabilities=True)
    planned = {p.relative_to(tmp_path / "out").as_posix() for p in outputs.planned_files()}
    assert "probabilities/a_Left_right_lung.png" in planned and "probabilities/b_x.png" in planned


def test_a_run_with_fewer_outputs_keeps_the_earlier_ones_as_its_own(tmp_path: Path):
    scan = _scan(tmp_path)
    out = tmp_path / "out"
    first = InferenceOutputs(out, 2, scan, overlays=True, rle_csv="r.csv")
    first._started(None)
    for path in first.planned_files():  # what the first run wrote
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name != SUMMARY_NAME:
            path.write_bytes(b"x")
    first.finish(None)
    second = InferenceOutputs(out, 2, scan)  # masks only
    second._started(None)
    second.finish(None)
    # the overlays and the CSV are still recorded as written by inference, so a third run may replace them
    InferenceOutputs(out, 2, scan, overlays=True, rle_csv="r.csv")
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert str(out / "r.csv") in summary["files"] and str(out / "overlays" / "a.png") in summary["files"]
