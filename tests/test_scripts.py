from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), *args], capture_output=True, text=True)


def test_make_demo_data_writes_pairs_and_never_overwrites(tmp_path):
    out = tmp_path / "cells"
    proc = _run(str(out), "--n_images", "3", "--min_size", "20", "--max_size", "24")
    assert proc.returncode == 0, proc.stderr
    images = sorted((out / "images").glob("*.png"))
    assert [p.name for p in images] == sorted(p.name for p in (out / "masks").glob("*.png"))
    assert len(images) == 3 and 20 <= min(Image.open(images[0]).size) <= 24
    assert set(np.unique(np.array(Image.open(out / "masks" / images[0].name)))) <= {0, 255}
    before = images[0].read_bytes()
    again = _run(str(out), "--n_images", "3", "--seed", "9")
    assert again.returncode == 2 and "is not empty" in again.stderr
    assert images[0].read_bytes() == before


def test_configure_classes_updates_metadata_and_both_configs(tmp_path):
    import json
    import shutil

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    script = str(REPO / "scripts" / "configure_classes.py")
    proc = subprocess.run(
        [sys.executable, script, "background", "liver", "tumour", "--in_channels", "1", "--bundle_root", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "liver", "2": "tumour"} and pred["num_channels"] == 3
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    for name in ("train.json", "inference.json"):
        config = json.loads((tmp_path / "configs" / name).read_text())
        assert (config["num_classes"], config["class_names"], config["in_channels"]) == (3, ["background", "liver", "tumour"], 1)
    bad = subprocess.run([sys.executable, script, "only", "--bundle_root", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "give at least two class names" in bad.stderr
    # MONAI Label lower-cases label names: names equal but for capitals would merge into one label
    bad = subprocess.run([sys.executable, script, "background", "Liver", "liver", "--bundle_root", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "differ in more than capitals" in bad.stderr
    bad = subprocess.run([sys.executable, script, "lesion", "background", "--bundle_root", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "'background' must be the first class" in bad.stderr


@pytest.mark.slow
def test_benchmark_runs_both_sides_and_writes_the_ratios(tmp_path):
    import json

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--sizes", "32", "--images", "11", "--infer_images", "4",
         "--rounds", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["sizes"]["32"]
    for key in ("train_bundle_images_s", "train_plain_images_s", "infer_bundle_forward_images_s",
                "infer_plain_forward_images_s", "infer_bundle_end_to_end_images_s"):
        assert r[key] > 0, key
    assert r["train_ratio_bundle_over_plain"] == pytest.approx(r["train_ratio_per_round"][0], abs=1e-3)
    import torch

    assert r["channels_last"] is (not torch.cuda.is_available())  # channels_last auto: on for CPUs
    assert r["train_bundle_peak_mib"] > 0 and r["infer_bundle_peak_mib"] >= 0
    assert "train bundle" in proc.stdout and "written to" in proc.stdout


@pytest.mark.slow
def test_benchmark_accuracy_scores_every_side_on_a_folder_and_a_demo_set(tmp_path):
    """The planned bundle, the explicit bundle and the plain loop train, are scored on the same held-out pairs at
    original size, and the plain loop gets the planned bundle's wall time."""
    import json

    from tests.conftest import write_pairs

    folder = write_pairs(tmp_path / "cells", n=10, size=(36, 44), mode="L")
    out = tmp_path / "accuracy.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_accuracy.py"), "--sets", str(folder), "demo_multiclass",
         "--minutes", "0.05", "--input_size", "32", "--batch_size", "4", "--features", "8", "--demo_images", "12", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cells, multi = json.loads(out.read_text())
    assert (cells["set"], cells["num_classes"], cells["in_channels"], cells["test_pairs"]) == ("cells", 2, 1, 2)
    assert (multi["num_classes"], multi["in_channels"], multi["test_pairs"]) == (3, 3, 2)
    for result in (cells, multi):
        for side in ("auto", "explicit", "plain"):
            assert 0.0 <= result[side]["mean_dice"] <= 1.0 and len(result[side]["dice"]) == result["num_classes"]
            assert result[side]["epochs"] >= 1
        # equal wall time: the plain loop ran (about) as long as the planned bundle's whole training process
        assert result["plain"]["train_seconds"] == pytest.approx(result["auto"]["train_seconds"], rel=0.5, abs=5)
        assert result["explicit"]["plan"]["spatial_size"] == [32, 32]
        # time to reach the plain loop's Dice: read off the validation curve, whose times grow and fit the wall time
        for side in ("auto", "explicit"):
            curve = result[side]["val_curve"]
            assert len(curve) == result[side]["epochs"] and all(0 < a[0] <= b[0] for a, b in zip(curve, curve[1:]))
            assert curve[-1][0] == pytest.approx(result[side]["train_seconds"], abs=0.2)
            reach = result[side]["reach_plain_seconds"]
            reached = [t for t, dice in curve if dice >= result["plain"]["mean_dice"]]
            assert reach == (reached[0] if reached else None)
    # given only the data, the bundle planned the classes and channels the plain loop was given
    assert (cells["auto"]["plan"]["num_classes"], cells["auto"]["plan"]["in_channels"]) == (2, 1)
    assert (multi["auto"]["plan"]["num_classes"], multi["auto"]["plan"]["in_channels"]) == (3, 3)
    assert cells["auto"]["plan"]["spatial_size"] == [32, 48]  # the 36x44 images' aspect on the stride grid
    assert "reaches plain's Dice at s" in proc.stdout
    assert "| cells | 2 | explicit |" in proc.stdout and "| demo_multiclass | 3 | plain |" in proc.stdout
