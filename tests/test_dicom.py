"""DICOM in, DICOM SEG out, patients kept on one side of every split, no identifiers in outputs.

The files are made in code (``tests/dicom_files.py``) with invented identifiers.  Reading is checked
value by value against the stored pixels; the bundle runs use :class:`tests.stand_in.StandInNet`
(foreground where the image is bright), so every written mask is known exactly.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from monai_unet_bundle.data import DataSource, discover_datalists, file_stem, find_pairs, output_names, scan_inputs, split_pairs
from monai_unet_bundle.dicom import DicomReader, dicom_group, is_dicom, split_frame
from monai_unet_bundle.dicom_seg import DicomSegWriter
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.readers import inspect_image
from monai_unet_bundle.settings import check_settings
from tests.conftest import CONFIGS, config, run_bundle
from tests.dicom_files import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    identifiers,
    patient,
    to_gray16,
    write_dicom,
)
from tests.stand_in import save_stand_in
from tests.test_options import STAND_IN, WITH_TESTS

H, W = 36, 44


def _truth(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A random blocky foreground (what the stand-in network predicts where the image is bright)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), bool)
    for _ in range(3):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        truth[y : y + rng.integers(5, 14), x : x + rng.integers(5, 14)] = True
    return truth


def _load(path: str, kind: str = "image") -> np.ndarray:
    """What DicomReader hands MONAI, back in rows x columns (x channels)."""
    reader = DicomReader(kind)
    array, meta = reader.get_data(reader.read(path))
    assert meta["spatial_shape"].tolist() == list(array.shape[:2])
    return np.moveaxis(array, 0, 1)


# ----------------------------------------------------------------------------------------------- reading


def test_grayscale_gets_rescale_and_monochrome1_is_inverted(tmp_path: Path):
    stored = (np.arange(H * W, dtype=np.uint16).reshape(H, W) % 1000) + 100
    write_dicom(tmp_path / "m2", stored, rescale=(2, -50))
    write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", kind="CR", rescale=(2, -50))
    modality = stored.astype(np.float32) * 2 - 50
    np.testing.assert_array_equal(_load(str(tmp_path / "m2")), modality)
    # MONOCHROME1: high stored values are dark; inverted so that they come out low
    np.testing.assert_array_equal(_load(str(tmp_path / "m1.dcm")), modality.max() + modality.min() - modality)
    assert inspect_image(str(tmp_path / "m1.dcm")) == ((H, W), "DICOM MONOCHROME1")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_lossless_compressed_pixels_decode_exactly(tmp_path: Path, syntax: str):
    stored = (np.random.default_rng(1).integers(0, 4000, (H, W))).astype(np.uint16)
    write_dicom(tmp_path / "x.dcm", stored, syntax=syntax)
    assert pydicom.dcmread(tmp_path / "x.dcm").file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(_load(str(tmp_path / "x.dcm")), stored.astype(np.float32))


def test_colour_arrives_as_rgb_whatever_the_photometric_interpretation(tmp_path: Path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0], rgb[5:30, 5:20, 1], rgb[..., 2] = 200, 180, 40
    write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", kind="ES")
    write_dicom(tmp_path / "ybr.dcm", rgb, photometric="YBR_FULL", kind="ES")
    write_dicom(tmp_path / "jpeg.dcm", rgb, photometric="RGB", kind="ES", syntax=JPEGBaseline8Bit)
    np.testing.assert_array_equal(_load(str(tmp_path / "rgb.dcm")), rgb)
    assert np.abs(_load(str(tmp_path / "ybr.dcm")).astype(int) - rgb).max() <= 2  # YBR <-> RGB rounding
    assert np.abs(_load(str(tmp_path / "jpeg.dcm")).astype(int) - rgb).mean() < 6  # lossy, 4:2:2 chroma
    assert inspect_image(str(tmp_path / "jpeg.dcm"))[1] == "DICOM YBR_FULL_422"


def test_samples_shipped_with_pydicom_decode_like_their_uncompressed_twins():
    plain = _load(get_testdata_file("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(_load(get_testdata_file(name)), plain)
    palette = _load(get_testdata_file("examples_palette.dcm"))  # PALETTE COLOR -> RGB through its LUT
    assert palette.ndim == 3 and palette.shape[-1] == 3 and len(np.unique(palette.reshape(-1, 3), axis=0)) > 8


def test_frames_of_a_clip_are_images_of_their_own(tmp_path: Path):
    clip = np.stack([np.full((H, W, 3), 40 * (k + 1), np.uint8) for k in range(3)])
    write_dicom(tmp_path / "clip.dcm", clip, photometric="RGB", kind="US_MULTI")
    for k in range(3):
        np.testing.assert_array_equal(_load(f"{tmp_path / 'clip.dcm'}#{k + 1}"), clip[k])
    assert file_stem(f"{tmp_path / 'clip.dcm'}#2") == "clip_frame2"
    assert split_frame("a/b.dcm#12") == ("a/b.dcm", 12) and split_frame("a/b#c.dcm") == ("a/b#c.dcm", None)
    with pytest.raises(BundleInputError, match="has 3 frame"):
        _load(f"{tmp_path / 'clip.dcm'}#4")


def test_an_undecodable_transfer_syntax_is_named(tmp_path: Path):
    write_dicom(tmp_path / "x.dcm", np.zeros((H, W), np.uint16))
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # H.264 video (endoscopy): no pip-installable decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a not a codestream"])
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    with pytest.raises(BundleInputError, match=r"x\.dcm cannot be decoded: its transfer syntax is MPEG-4 AVC/H\.264 High Profile / Level 4\.1 \(1\.2\.840\.10008\.1\.2\.4\.102\)"):
        _load(str(tmp_path / "x.dcm"))
    # a truncated file, and the reason inference gives for skipping each of them
    write_dicom(tmp_path / "cut.dcm", np.zeros((H, W), np.uint16), syntax=RLELossless)
    (tmp_path / "cut.dcm").write_bytes((tmp_path / "cut.dcm").read_bytes()[:-300])
    write_dicom(tmp_path / "fine.dcm", np.zeros((H, W), np.uint16))
    scan = scan_inputs(tmp_path)
    assert [Path(i["image"]).name for i in scan.items] == ["fine.dcm"]
    reasons = {Path(s["file"]).name: s["reason"] for s in scan.skipped}
    assert reasons["x.dcm"].startswith("cannot be decoded: its transfer syntax is MPEG-4 AVC/H.264") and "which no installed decoder reads" in reasons["x.dcm"]
    assert reasons["cut.dcm"] == "holds no pixel data: it is damaged, truncated or not an image: export it again"


def test_dicom_is_found_by_its_marker_and_dicomdir_is_not_an_image(tmp_path: Path):
    write_dicom(tmp_path / "1.2.3.4", np.zeros((H, W), np.uint16))
    (tmp_path / "notes.txt").write_text("x" * 200)
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    assert is_dicom(tmp_path / "1.2.3.4") and not is_dicom(tmp_path / "notes.txt") and not is_dicom(tmp_path / "DICOMDIR")
    assert file_stem(tmp_path / "1.2.3.4") == "1.2.3.4"
    assert [Path(i["image"]).name for i in scan_inputs(tmp_path).items] == ["1.2.3.4"]


def test_a_dicom_seg_is_read_as_class_indices_per_source_frame(tmp_path: Path):
    clip = np.stack([np.full((H, W), 100 * (k + 1), np.uint16) for k in range(2)])
    write_dicom(tmp_path / "clip.dcm", clip, kind="US_MULTI")
    write_dicom(tmp_path / "still.dcm", clip[0], kind="DX")
    writer = DicomSegWriter(["background", "a", "b"])
    masks = [_truth(k).astype(np.uint8) + (_truth(k + 10) & ~_truth(k)) * 2 for k in range(3)]
    writer.write(masks[0], f"{tmp_path / 'clip.dcm'}#1", tmp_path / "seg1")
    writer.write(masks[1], f"{tmp_path / 'clip.dcm'}#2", tmp_path / "seg2")
    writer.write(masks[2], str(tmp_path / "still.dcm"), tmp_path / "seg_still")
    np.testing.assert_array_equal(_load(f"{tmp_path / 'seg2.dcm'}#2", "mask"), masks[1])
    np.testing.assert_array_equal(_load(str(tmp_path / "seg_still.dcm"), "mask"), masks[2])
    with pytest.raises(BundleInputError, match="no frame for source frame 1"):
        _load(f"{tmp_path / 'seg2.dcm'}#1", "mask")
    with pytest.raises(BundleInputError, match=r"is a DICOM Segmentation \(a mask\), not an image: keep it with the masks"):
        _load(str(tmp_path / "seg_still.dcm"), "image")


# ----------------------------------------------------------------------------------------------- pairing and groups


def test_masks_pair_by_stem_by_frame_name_and_by_seg_reference(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_dicom(tmp_path / "images" / "IM0001", np.zeros((H, W), np.uint16))
    still = write_dicom(tmp_path / "images" / "still.dcm", np.zeros((H, W), np.uint16))
    write_dicom(tmp_path / "images" / "clip.dcm", np.zeros((2, H, W), np.uint16), kind="US_MULTI")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "masks" / "IM0001.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "masks" / "clip_frame2.png")
    DicomSegWriter(["background", "x"]).write(_truth(0).astype(np.uint8), f"{tmp_path / 'images' / 'clip.dcm'}#1", tmp_path / "masks" / "clip")
    DicomSegWriter(["background", "x"]).write(_truth(1).astype(np.uint8), str(tmp_path / "images" / "still.dcm"), tmp_path / "masks" / "any_name")
    pairs, missing, orphans = find_pairs(tmp_path)
    got = {Path(p["image"]).name: Path(p["label"]).name for p in pairs}
    assert got == {"IM0001": "IM0001.png", "clip.dcm#1": "clip.dcm#1", "clip.dcm#2": "clip_frame2.png", "still.dcm": "any_name.dcm"}
    assert missing == [] and orphans == []
    assert pydicom.dcmread(tmp_path / "masks" / "any_name.dcm").ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == still.SOPInstanceUID


def test_a_split_never_puts_one_group_on_both_sides():
    rng = random.Random(0)
    pairs = [{"image": f"/d/img{i:03d}.png", "label": f"/d/m{i:03d}.png", "group": f"p{rng.randrange(15)}"} for i in range(60)]
    for seed in range(25):
        train, val = split_pairs(pairs, 0.2, seed)
        assert not {p["group"] for p in train} & {p["group"] for p in val}
        assert len(train) + len(val) == 60 and 6 <= len(val) <= 20
    # without groups, the split is what it always was: round(n * fraction) pairs
    plain = [{"image": p["image"], "label": p["label"]} for p in pairs]
    assert len(split_pairs(plain, 0.2, 3)[1]) == 12
    with pytest.raises(BundleInputError, match="belong to one group"):
        split_pairs([{**p, "group": "same"} for p in pairs], 0.2, 0)
    # a big group never turns the split upside down: validation takes what fits, else the smallest group
    uneven = [{"image": f"/d/{g}{i}.png", "label": "", "group": g} for g, n in (("A", 8), ("B", 1), ("C", 1)) for i in range(n)]
    for seed in range(10):
        train, val = split_pairs(uneven, 0.2, seed)
        assert len(val) <= 2 and len(train) >= 8
    assert [len(v) for v in (split_pairs(uneven[:9], 0.1, 0)[1],)] == [1]


def _dicom_set(root: Path, patients: int = 6, per_patient: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for p in range(patients):
        for k in range(per_patient):
            write_dicom(root / "images" / f"p{p}_{k}.dcm", np.zeros((H, W), np.uint16), patient_index=p)
            Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / f"p{p}_{k}.png")
    return root


def test_dicom_images_split_by_patient_and_the_id_is_never_shown(tmp_path: Path):
    data = _dicom_set(tmp_path / "d")
    for seed in range(6):
        lists, problems, _ = discover_datalists(DataSource(data, val_fraction=0.3, seed=seed))
        assert problems == []
        sides = [{Path(d["image"]).name.split("_")[0] for d in lists[k]} for k in ("training", "validation")]
        assert not sides[0] & sides[1] and sides[1]
        groups = {d["group"] for k in lists for d in lists[k]}
        assert len(groups) == 6 and all(g.startswith("patient-") for g in groups)
        assert not any(patient(p)["PatientID"] in g for g in groups for p in range(6))
    assert dicom_group(data / "images" / "p0_0.dcm") == dicom_group(data / "images" / "p0_2.dcm") != dicom_group(data / "images" / "p1_0.dcm")
    # a datalist that puts one patient on both sides is refused, naming files and never the patient's id or its hash
    rows = ["image,label,split", "images/p0_0.dcm,masks/p0_0.png,training", "images/p0_1.dcm,masks/p0_1.png,validation",
            "images/p1_0.dcm,masks/p1_0.png,training"]
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    _, problems, _ = discover_datalists(DataSource(data, datalist=data / "list.csv"))
    assert len(problems) == 1 and problems[0].startswith("the images of one patient (same PatientID) are on 2 sides (training: ")
    assert "p0_1.dcm" in problems[0] and dicom_group(data / "images" / "p0_0.dcm") not in problems[0]


def test_a_clip_named_in_a_datalist_is_one_item_per_frame(tmp_path: Path):
    for name, who in (("a", 0), ("b", 1), ("c", 2)):
        write_dicom(tmp_path / f"{name}.dcm", np.zeros((3, H, W), np.uint16), kind="US_MULTI", patient_index=who)
    for name in ("a", "c"):
        for k in range(3):
            DicomSegWriter(["background", "x"]).write(_truth(k).astype(np.uint8), f"{tmp_path / name}.dcm#{k + 1}", tmp_path / f"{name}_seg{k + 1}")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "one.png")
    datalist = {"training": [{"image": "a.dcm", "label": "a_seg2.dcm"}], "validation": [{"image": "c.dcm", "label": "c_seg1.dcm"}],
                "test": [{"image": "b.dcm"}]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    lists, problems, _ = discover_datalists(DataSource(tmp_path, datalist=tmp_path / "list.json"))
    assert problems == []
    assert [Path(d["image"]).name for d in lists["test"]] == ["b.dcm#1", "b.dcm#2", "b.dcm#3"]
    # each frame is paired with the Segmentation; the reader takes its frames that reference that frame (seg#k)
    assert [(Path(d["image"]).name, Path(d["label"]).name) for d in lists["training"]] == [(f"a.dcm#{k}", f"a_seg2.dcm#{k}") for k in (1, 2, 3)]
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "a.dcm", "label": "one.png"}]}))
    _, problems, _ = discover_datalists(DataSource(tmp_path, datalist=tmp_path / "list.json"))
    assert problems[0].startswith(f"datalist 'training' item {tmp_path / 'a.dcm'} is a clip of 3 frames but its label")


def test_group_pattern_and_group_column_keep_groups_together_and_leaks_are_reported(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for p in range(5):
        for side in ("left", "right"):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / f"P{p:02d}_{side}.png")
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / f"P{p:02d}_{side}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "other.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "other.png")
    for seed in range(6):
        lists, problems, warnings = discover_datalists(DataSource(tmp_path, val_fraction=0.4, seed=seed, group_pattern=r"^(P\d+)_"))
        assert problems == []
        assert not {d["group"] for d in lists["training"] if "group" in d} & {d["group"] for d in lists["validation"] if "group" in d}
    assert warnings == ["group_pattern '^(P\\\\d+)_' matches no part of 1 file name(s), which are each a group of their own: other.png."]
    rows = ["image,label,split,group", "images/P00_left.png,masks/P00_left.png,training,A", "images/P00_right.png,masks/P00_right.png,validation,A",
            "images/P01_left.png,masks/P01_left.png,training,B"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    _, problems, _ = discover_datalists(DataSource(tmp_path, datalist=tmp_path / "list.csv"))
    assert len(problems) == 1 and problems[0].startswith("the images of group 'A' are on 2 sides (training: ")
    datalist = {"training": [{"image": "images/P01_left.png", "label": "masks/P01_left.png", "group": 7}],
                "test": [{"image": "images/P01_right.png", "group": 7}, {"image": "images/P02_right.png", "group": 8}]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    _, problems, _ = discover_datalists(DataSource(tmp_path, datalist=tmp_path / "list.json"))
    assert [p.split(" (")[0] for p in problems] == ["the images of group '7' are on 2 sides", "found 1 image/mask pair(s) and no validation list, so the validation split would be empty and no model could ever be saved: add pairs"]
    with pytest.raises(BundleInputError, match=r"group_pattern is '\(P', but it must be null or a valid regular expression"):
        check_settings(group_pattern="(P")


def test_output_names_of_frames_and_files_without_suffix():
    names = output_names(["/in/clip.dcm#1", "/in/clip.dcm#2", "/in/IM0001", "/in/IM0001.png"], "/in")
    assert names == {"/in/clip.dcm#1": "clip_frame1", "/in/clip.dcm#2": "clip_frame2", "/in/IM0001": "IM0001", "/in/IM0001.png": "IM0001_png"}


# ----------------------------------------------------------------------------------------------- through the CLI

#: name -> (truth, how the file is written)
KINDS = {
    "xray/IM0001": "MONOCHROME2 16-bit, rescaled, no suffix",
    "xray/inverted.dcm": "MONOCHROME1 (CR)",
    "endoscopy.dcm": "RGB as JPEG baseline (YBR_FULL_422)",
    "ybr.dcm": "YBR_FULL uncompressed",
    "rle.dcm": "RLE lossless",
    "j2k.dcm": "JPEG 2000 lossless",
    "jls.dcm": "JPEG-LS lossless",
    "clip.dcm": "ultrasound clip, 3 frames",
}


@pytest.fixture(scope="module")
def dicom_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``in/`` holding every kind of DICOM (each of another patient), a PNG, an undecodable file; the stand-in's model."""
    root = tmp_path_factory.mktemp("dicom")
    (root / "in" / "xray").mkdir(parents=True)
    truths: dict[str, np.ndarray] = {}
    for i, name in enumerate(KINDS):
        path = root / "in" / name
        truth = _truth(i, H + 4 * (i % 3), W - 2 * (i % 4))
        bright = lambda lo, hi, t=truth: np.where(t, hi, lo)  # noqa: E731
        if name == "xray/IM0001":
            write_dicom(path, bright(300, 3300).astype(np.uint16), rescale=(2, -100), patient_index=i)
        elif name == "xray/inverted.dcm":
            write_dicom(path, bright(3300, 300).astype(np.uint16), photometric="MONOCHROME1", kind="CR", patient_index=i)
        elif name in ("endoscopy.dcm", "ybr.dcm"):
            rgb = np.stack([bright(20, 230)] * 3, -1).astype(np.uint8)
            syntax = JPEGBaseline8Bit if name == "endoscopy.dcm" else "1.2.840.10008.1.2.1"
            write_dicom(path, rgb, photometric="RGB" if name == "endoscopy.dcm" else "YBR_FULL", kind="ES", syntax=syntax, patient_index=i, spacing=None)
        elif name == "clip.dcm":
            frames = [_truth(40 + k, *truth.shape) for k in range(3)]
            write_dicom(path, np.stack([np.stack([np.where(f, 220, 30)] * 3, -1) for f in frames]).astype(np.uint8),
                        photometric="RGB", kind="US_MULTI", patient_index=i)
            truths.update({f"clip_frame{k + 1}": f for k, f in enumerate(frames)})
            continue
        else:
            syntax = {"rle.dcm": RLELossless, "j2k.dcm": JPEG2000Lossless, "jls.dcm": JPEGLSLossless}[name]
            ds = write_dicom(path, bright(500, 3500).astype(np.uint16), syntax=syntax, patient_index=i)
            if name == "rle.dcm":  # dates as some systems write them, and a one-part name: highdicom and pydicom warn, quoting them
                ds.PatientBirthDate, ds.StudyDate, ds.PatientName = "1931-07-17", "1987.07.23", "Quixotewright"
                ds.save_as(path, enforce_file_format=True)
        truths[name.rsplit(".", 1)[0] if name.endswith(".dcm") else name] = truth
    photo = _truth(99, 30, 50)
    Image.fromarray((photo * 255).astype(np.uint8)).save(root / "in" / "photo.png")
    truths["photo"] = photo
    # a file whose compression no installed package decodes
    write_dicom(root / "in" / "xl.dcm", np.zeros((H, W), np.uint16), patient_index=20)
    ds = pydicom.dcmread(root / "in" / "xl.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a junk"])
    ds.save_as(root / "in" / "xl.dcm", enforce_file_format=True)
    # a Segmentation among the inputs (PACS exports hold them beside the images): skipped, not predicted
    DicomSegWriter(["background", "x"]).write(_truth(0, H, W).astype(np.uint8), str(root / "in" / "xray" / "IM0001"), root / "in" / "old_seg")
    save_stand_in(root / "model.pt")
    (root / "truths.json").write_text(json.dumps({k: v.astype(int).tolist() for k, v in truths.items()}))
    return root


def _truths(root: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v, bool) for k, v in json.loads((root / "truths.json").read_text()).items()}


def _infer(root: Path, out: str, *args: str, cwd: Path | None = None):
    return run_bundle(
        "--config_file", config("inference.json"), *STAND_IN, "--ckpt_path", str(root / "model.pt"), "--in_channels", "1",
        "--sliding_window", "true", "--spatial_size", "[32,32]", "--output_dir", out, *args,
        cwd=cwd or root, env=WITH_TESTS,
    )


@pytest.mark.slow
def test_inference_writes_seg_and_png_equal_to_the_truth_with_references(dicom_workspace: Path):
    root = dicom_workspace
    proc = _infer(root, "out_both", "--input_dir", "in", "--output_format", "png+dicom_seg", "--class_names", "['background','lesion']")
    out = root / "out_both"
    summary = json.loads((out / "inference_summary.json").read_text())
    reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert sorted(reasons) == ["in/old_seg.dcm", "in/xl.dcm"]
    assert "H.264 High Profile / Level 4.1 (1.2.840.10008.1.2.4.102)" in reasons["in/xl.dcm"]
    assert reasons["in/old_seg.dcm"] == "is a DICOM Segmentation (a mask), not an image: keep it with the masks"
    assert "xl.dcm" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    # the malformed dates did not stop its Segmentation, and no warning quoted them (or the one-part name)
    assert (out / "rle.dcm").is_file() and pydicom.dcmread(out / "rle.dcm").PatientBirthDate == ""
    for value in ("1931-07-17", "1987.07.23", "Quixotewright"):
        assert value not in proc.stdout + proc.stderr
    records = {Path(r["image"]).as_posix(): r for r in summary["written"]}
    assert records["in/xray/IM0001"]["pixel_spacing_mm"] == [0.2, 0.2] and records["in/endoscopy.dcm"]["pixel_spacing_mm"] is None
    for name, truth in _truths(root).items():
        png = np.array(Image.open(out / f"{name}.png")) > 0
        np.testing.assert_array_equal(png, truth, err_msg=name)
        if name == "photo":
            assert not (out / "photo.dcm").exists()
            continue
        seg_path = out / f"{name}.dcm"
        source_file = root / "in" / (f"{name}.dcm" if (root / "in" / f"{name}.dcm").exists() else "clip.dcm" if "frame" in name else name)
        source = pydicom.dcmread(source_file)
        seg = hd.seg.segread(seg_path)  # highdicom reads it back
        plain = pydicom.dcmread(seg_path)  # and so does pydicom
        assert plain.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and plain.Rows == source.Rows and plain.Columns == source.Columns
        assert plain.StudyInstanceUID == source.StudyInstanceUID and plain.PatientID == source.PatientID
        assert plain.SeriesInstanceUID != source.SeriesInstanceUID
        ref = plain.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == source.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        if "frame" in name:
            assert int(ref.ReferencedInstanceSequence[0].ReferencedFrameNumber) == int(name[-1])
        assert [s.SegmentLabel for s in plain.SegmentSequence] == ["lesion"]
        category = plain.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "85756007")
        assert seg.get_segment_numbers() == [1]
        np.testing.assert_array_equal(plain.pixel_array.reshape(source.Rows, source.Columns) > 0, png, err_msg=name)


@pytest.mark.slow
def test_auto_writes_seg_for_dicom_and_png_for_the_rest_with_absolute_paths(dicom_workspace: Path, tmp_path: Path):
    root = dicom_workspace
    _infer(root, str(tmp_path / "auto"), "--input_dir", str(root / "in"), cwd=tmp_path)
    written = sorted(p.relative_to(tmp_path / "auto").as_posix() for p in (tmp_path / "auto").rglob("*") if p.is_file())
    expected = sorted({f"{n}.dcm" for n in _truths(root) if n != "photo"} | {"photo.png", "inference_summary.json"})
    assert written == expected
    # a frame named in input_files is predicted alone, and once when its file is named too; reports name it clip.dcm#2
    _infer(root, str(tmp_path / "one"), "--input_files", f"['{root / 'in' / 'clip.dcm'}#2']", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["clip_frame2.dcm", "inference_summary.json"]
    _infer(root, str(tmp_path / "two"), "--input_files", f"['{root / 'in' / 'clip.dcm'}#2','in/clip.dcm']", cwd=root)
    summary = json.loads((tmp_path / "two" / "inference_summary.json").read_text())
    assert sorted(Path(r["image"]).name for r in summary["written"]) == ["clip.dcm#1", "clip.dcm#2", "clip.dcm#3"]


@pytest.mark.slow
def test_training_on_dicom_writes_no_identifier_anywhere(tmp_path: Path):
    """Train (with previews and TensorBoard), evaluate and infer on DICOM of 4 patients; scan every file written."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(8):
        truth = _truth(i)
        write_dicom(data / "images" / f"IM{i:04d}", np.where(truth, 3000, 200).astype(np.uint16), patient_index=i // 2)
        Image.fromarray((truth * 255).astype(np.uint8)).save(data / "masks" / f"IM{i:04d}.png")
    clip = [_truth(50 + k) for k in range(2)]
    write_dicom(data / "images" / "clip.dcm", np.stack([np.stack([np.where(f, 220, 30)] * 3, -1) for f in clip]).astype(np.uint8),
                photometric="RGB", kind="US_MULTI", patient_index=4)
    for k, f in enumerate(clip):
        DicomSegWriter(["background", "lesion"]).write(f.astype(np.uint8), f"{data / 'images' / 'clip.dcm'}#{k + 1}", data / "masks" / f"clip_seg{k + 1}")
    for name in ("photo_a", "photo_b"):  # PNG images among the DICOM ones: items without a patient group in the same batches
        truth = _truth(len(name))
        Image.fromarray((truth * 255).astype(np.uint8)).save(data / "images" / f"{name}.png")
        Image.fromarray((truth * 255).astype(np.uint8)).save(data / "masks" / f"{name}.png")
    bundle = tmp_path / "bundle"
    common = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--in_channels", "1", "--spatial_size", "[32,32]", "--num_workers", "0"]
    # with MLflow tracking too (its SQLite store and artifacts are scanned below), from tmp_path so nothing lands elsewhere
    tracking = ["--tracking", str(CONFIGS / "mlflow.json")] if importlib.util.find_spec("mlflow") else []
    run_bundle("--config_file", config("train.json"), *common, "--max_epochs", "2", "--batch_size", "4", "--num_previews", "2",
               *tracking, cwd=tmp_path)
    report = json.loads((bundle / "logs" / "data_check.json").read_text())
    assert report["ok"] and report["counts"] == {"training": 10, "validation": 2} and report["groups"] == 7
    run_bundle("--config_file", config("train.json", "evaluate.json"), *common)
    run_bundle("--config_file", config("inference.json"), "--bundle_root", str(bundle), "--input_dir", str(data / "images"),
               "--output_dir", str(tmp_path / "pred"), "--in_channels", "1", "--spatial_size", "[32,32]", "--num_workers", "0",
               "--save_overlays", "true", "--output_format", "png+dicom_seg")
    secrets = [s.encode() for p in range(5) for s in identifiers(p)]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and data not in p.parents]
    assert len([f for f in files if f.parent.name == "logs" or "events" in f.name]) >= 2
    assert not tracking or (bundle / "eval" / "mlruns.db").is_file()
    segs = [f for f in files if f.suffix == ".dcm"]
    assert len(segs) == 10 and not (tmp_path / "pred" / "photo_a.dcm").exists()
    for file in files:
        content = file.read_bytes()
        if file in segs:
            # a Segmentation carries its patient and study (the standard requires them, so that PACS files it with
            # its image); those attributes are the source's, and nothing else of the patient's is in it
            seg = pydicom.dcmread(file)
            for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyDate"):
                value = str(seg.get(key, "") or "")
                content = content.replace(value.encode(), b"") if value else content
        leaked = [s.decode() for s in secrets if s in content]
        assert not leaked, f"{file} holds {leaked}"
