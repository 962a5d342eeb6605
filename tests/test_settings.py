"""The settings check: what each setting accepts, the error lines, and agreement with the README."""

from __future__ import annotations

import re

import pytest

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.settings import SETTINGS, check_settings, flag
from tests.conftest import REPO, TINY, config, run_bundle

#: documented ids that are not plain values to check here: paths and encodings checked where they are used
CHECKED_ELSEWHERE = {"bundle_root", "mask_palette", "mask_thresholds"}


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("False", False), (" TRUE ", True)])
def test_flag_reads_true_and_false_in_any_case(value, expected):
    assert flag(value, "tta") is expected


@pytest.mark.parametrize("value", ["yes", "no", "1", 1, 0, None, "", "ture"])
def test_flag_refuses_anything_else_naming_the_setting(value):
    with pytest.raises(BundleInputError, match=r"^tta must be true or false, got .*: pass --tta true or --tta false\.$"):
        flag(value, "tta")


def test_check_settings_returns_real_booleans_and_accepts_the_defaults():
    checked = check_settings(tta="auto", save_overlays="False", sliding_window="true", fill_holes="auto", batch_size=4, num_workers="auto", device="cpu", spatial_size=[512, 512],
                             num_classes=3, class_names=["background", "a", "b"], class_weights="auto", rle_csv=None, val_fraction=0.2)
    assert checked["save_overlays"] is False and checked["tta"] == "auto" and checked["sliding_window"] == "true" and checked["fill_holes"] == "auto" and checked["batch_size"] == 4


@pytest.mark.parametrize(
    "name, value",
    [
        ("batch_size", 0), ("batch_size", "four"), ("batch_size", 2.5), ("batch_size", True), ("max_epochs", -1),
        ("learning_rate", 0), ("learning_rate", "fast"), ("val_fraction", 1.0), ("num_classes", 1), ("in_channels", 2),
        ("architecture", "resnet"), ("activation", "tanh"), ("lr_schedule", "exponential"), ("loss_name", "dice_bce"),
        ("num_workers", -1), ("cache", "ram"), ("rle_order", "diagonal"), ("rle_csv", "out.txt"), ("device", "gpu"),
        ("amp", "maybe"), ("resume", "yes"), ("remove_smaller_than", -3), ("early_stop_min_delta", -0.1),
        ("class_weights", [1.0]), ("input_files", 3), ("seed", "x"),
    ],
)
def test_each_bad_value_is_one_sentence_naming_the_setting(name, value):
    with pytest.raises(BundleInputError) as info:
        check_settings(**{name: value, "num_classes": 2} if name != "num_classes" else {name: value})
    lines = str(info.value).splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{name} is {value!r}, but it must be ") and lines[0].endswith(f": pass --{name} with such a value.")


def test_spatial_size_names_the_nearest_valid_size_and_several_problems_are_listed_together():
    with pytest.raises(BundleInputError) as info:
        check_settings(spatial_size=[500, 500], tta="yes", num_classes=3, class_names=["background", "x"])
    lines = str(info.value).splitlines()
    assert lines[0] == "spatial_size [500, 500] is not divisible by the U-Net's total stride 16: use [496, 496] instead."
    assert lines[1].startswith("tta must be true or false") or lines[1].startswith("tta is 'yes'")
    assert any(line.startswith("class_names is ['background', 'x'], but it must be a list of 3 distinct names") for line in lines)
    assert len(lines) == 3


def _readme_table_ids(heading: str) -> set[str]:
    """The ids in the first column of the table under ``heading`` in the README."""
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    ids = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            ids.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return ids


def test_the_settings_check_and_the_readme_tables_agree():
    documented = _readme_table_ids("## Settings") | _readme_table_ids("## Inference options")
    assert documented - CHECKED_ELSEWHERE == set(SETTINGS), (
        f"only in the README: {sorted(documented - CHECKED_ELSEWHERE - set(SETTINGS))}; "
        f"only in settings.py: {sorted(set(SETTINGS) - documented)}"
    )


def test_every_row_of_the_readme_tables_names_an_existing_test():
    text = (REPO / "README.md").read_text()
    names = set()
    for heading in ("## Settings", "## Inference options"):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        assert rows
        for row in rows:
            found = re.findall(r"`(test_[a-z0-9_]+)`", row)
            assert found, f"no test named in the row: {row}"
            names.update(found)
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    missing = sorted(n for n in names if f"def {n}(" not in sources)
    assert not missing, f"the README names tests that do not exist: {missing}"


@pytest.mark.slow
def test_bad_settings_on_the_command_line_end_in_one_line_each_and_exit_2(tmp_path):
    proc = run_bundle(
        "--config_file", config("inference.json"), "--bundle_root", str(tmp_path), "--input_dir", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), *TINY, "--tta", "yes", "--batch_size", "four", "--rle_order", "diagonal",
        expect_rc=2,
    )
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in proc.stderr + proc.stdout
    for line, name in zip(sorted(lines), ("batch_size", "rle_order", "tta")):
        assert line.startswith(f"error: {name} is ") and line.endswith(f"pass --{name} with such a value."), line
    assert not (tmp_path / "out").exists()  # nothing written
    proc = run_bundle(
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(tmp_path),
        *TINY, "--max_epochs", "0", "--deterministic", "sometimes", expect_rc=2,
    )
    assert sorted(proc.stderr.strip().splitlines()) == [
        "error: deterministic is 'sometimes', but it must be true or false: pass --deterministic with such a value.",
        "error: max_epochs is 0, but it must be a whole number of at least 1: pass --max_epochs with such a value.",
    ]
    assert not (tmp_path / "models").exists() and not (tmp_path / "logs").exists()


def test_settings_that_cannot_work_together_are_refused():
    with pytest.raises(BundleInputError, match=r"^val_interval 5 is larger than max_epochs 2, .*: pass --val_interval 2 or less\.$"):
        check_settings(val_interval=5, max_epochs=2)
    check_settings(val_interval=2, max_epochs=2)
    with pytest.raises(BundleInputError) as info:  # a bad value alone is reported once, not again as a clash
        check_settings(val_interval="x", max_epochs=2)
    assert len(str(info.value).splitlines()) == 1


def test_an_output_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "report.txt").write_text("mine")
    with pytest.raises(BundleInputError, match=r"^output_dir is '.*report\.txt', but it must be a folder, not an existing file"):
        check_settings(output_dir=str(tmp_path / "report.txt"))
    check_settings(output_dir=str(tmp_path / "new_folder"))
