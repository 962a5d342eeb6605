"""K-fold splits: groups never cross folds, class presence is balanced, and folds train and evaluate through the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.folds import FoldDeal, assign_folds, check_folds, fold_folder, split_fold
from tests.conftest import config, run_bundle


def _items(patients: int, per_patient: int) -> list[dict[str, str]]:
    return [
        {"image": f"img/P{p:02d}_{i}.png", "label": f"msk/P{p:02d}_{i}.png", "group": f"P{p:02d}"}
        for p in range(patients) for i in range(per_patient)
    ]


def test_a_group_never_crosses_folds_and_folds_are_even():
    items = _items(patients=11, per_patient=3)
    for seed in range(5):
        folds = assign_folds(items, 5, seed)
        by_group: dict[str, set[int]] = {}
        for item in items:
            by_group.setdefault(item["group"], set()).add(folds[item["image"]])
        assert all(len(f) == 1 for f in by_group.values())  # every patient in exactly one fold
        sizes = Counter(folds.values())
        assert sorted(sizes) == [0, 1, 2, 3, 4] and max(sizes.values()) - min(sizes.values()) <= 3  # one group apart at most
        for k in range(5):
            training, validation = split_fold(items, folds, k)
            assert len(training) + len(validation) == len(items)
            assert not {d["group"] for d in training} & {d["group"] for d in validation}
    assert assign_folds(items, 5, 0) == assign_folds(list(reversed(items)), 5, 0)  # the order of the list does not matter
    assert assign_folds(items, 5, 0) != assign_folds(items, 5, 1)  # the seed does


def test_images_with_a_rare_class_are_spread_over_the_folds():
    items = [{"image": f"i{k:02d}", "label": f"m{k:02d}"} for k in range(20)]
    presence = {f"m{k:02d}": frozenset({1, 2}) if k % 4 == 0 else frozenset({1}) for k in range(20)}  # 5 of 20 have class 2
    for seed in range(3):
        folds = assign_folds(items, 5, seed, presence)
        rare = Counter(folds[f"i{k:02d}"] for k in range(0, 20, 4))
        assert sorted(rare.values()) == [1, 1, 1, 1, 1]
        assert sorted(Counter(folds.values()).values()) == [4, 4, 4, 4, 4]


def test_fold_settings_are_checked():
    assert check_folds(None, 0) is None and fold_folder(None, 0) == ""
    assert check_folds(5, 4) == (5, 4) and fold_folder(5, 2) == "/fold_2"
    with pytest.raises(BundleInputError, match="num_folds must be a whole number of at least 2"):
        check_folds(1, 0)
    assert fold_folder(5, "all") == ""  # the run that trains every fold writes the cross-validation's own files at the top
    with pytest.raises(BundleInputError, match=r"fold must be a whole number from 0 to 4 with num_folds 5; got 5.*--fold all"):
        check_folds(5, 5)
    with pytest.raises(BundleInputError, match="fold must be .* got 'all'"):
        check_folds(5, "all")
    with pytest.raises(BundleInputError, match="needs at least 5 groups .* form 3"):
        assign_folds(_items(patients=3, per_patient=4), 5)


def test_a_resume_under_another_deal_is_refused():
    deal = {"num_folds": 5, "fold": 2, "seed": 0, "deal": "abc"}
    FoldDeal(deal).load_state_dict(FoldDeal(dict(deal)).state_dict())  # the same deal: resumes
    FoldDeal(None).load_state_dict(FoldDeal(None).state_dict())
    with pytest.raises(BundleInputError, match=r"trained fold 2 of 5 \(seed 0\) but these settings deal the pairs as fold 2 of 5 "
                                               r"\(seed 0\) differently, so the model would go on training on pairs it held out"):
        FoldDeal({**deal, "deal": "xyz"}).load_state_dict(FoldDeal(deal).state_dict())  # other data or groups
    with pytest.raises(BundleInputError, match=r"trained without folds but these settings deal the pairs as fold 2 of 5"):
        FoldDeal(deal).load_state_dict(FoldDeal(None).state_dict())


def _grouped_set(root: Path, patients: int = 6, per_patient: int = 2) -> Path:
    """Grayscale 40x48 images named P<patient>_<k>.png with 0/255 masks."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for p in range(patients):
        for k in range(per_patient):
            mask = np.zeros((40, 48), np.uint8)
            y, x = rng.integers(4, 24, 2)
            mask[y:y + 12, x:x + 16] = 255
            image = (rng.random((40, 48)) * 60 + mask * 0.6).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / f"P{p}_{k}.png")
            Image.fromarray(mask).save(root / "masks" / f"P{p}_{k}.png")
    return root


def test_a_fold_trains_into_its_own_folder_and_evaluates_on_its_held_out_patients(tmp_path):
    data = _grouped_set(tmp_path / "data")
    common = ("--bundle_root", str(tmp_path / "b"), "--dataset_dir", str(data), "--num_folds", "3", "--fold", "1",
              "--group_pattern", "^(P\\d+)_", "--num_workers", "0")
    run_bundle("--config_file", config("train.json"), *common, "--max_epochs", "1", "--spatial_size", "[32,32]")
    assert (tmp_path / "b" / "models" / "fold_1" / "model.pt").is_file()
    assert (tmp_path / "b" / "models" / "fold_1" / "plan.json").is_file()
    assert not (tmp_path / "b" / "models" / "model.pt").exists()
    report = json.loads((tmp_path / "b" / "logs" / "fold_1" / "data_check.json").read_text())
    assignment = report["folds"]["assignment"]
    assert report["folds"]["pairs_per_fold"] == [4, 4, 4] and report["folds"]["groups_per_fold"] == [2, 2, 2]
    patients_by_fold: dict[int, set[str]] = {}
    for image, fold in assignment.items():
        patients_by_fold.setdefault(fold, set()).add(Path(image).name.split("_")[0])
    assert sum(len(p) for p in patients_by_fold.values()) == 6  # no patient in two folds
    held_out = sorted(Path(i).name for i, f in assignment.items() if f == 1)
    # evaluation of the fold scores exactly its held-out pairs, with the fold's model
    run_bundle("--config_file", config("train.json", "evaluate.json"), *common)
    scored = json.loads((tmp_path / "b" / "eval" / "fold_1" / "metrics_summary.json").read_text())
    rows = (tmp_path / "b" / "eval" / "fold_1" / "metrics_per_image.csv").read_text().splitlines()[1:]
    assert sorted(Path(r.split(",")[0]).name for r in rows) == held_out and scored["mean_over_images"]["dice"]
    # the same model evaluated under another deal (another seed) would score pairs it trained on: refused
    proc = run_bundle("--config_file", config("train.json", "evaluate.json"), *common, "--seed", "5", expect_rc=2)
    assert "so it would be scored on pairs it trained on: pass the --num_folds, --fold, --seed" in proc.stderr
    # continuing the fold's training under another deal would train on pairs it held out: refused
    proc = run_bundle("--config_file", config("train.json"), *common, "--max_epochs", "2", "--spatial_size", "[32,32]",
                      "--seed", "5", "--resume", "true", expect_rc=2)
    assert "the resume checkpoint was trained fold 1 of 3 (seed 0) but these settings deal the pairs as fold 1 of 3 (seed 5)" in proc.stderr
    proc = run_bundle("--config_file", config("train.json"), *common[:-6], "--num_folds", "3", "--fold", "3", expect_rc=2)
    assert "fold is 3, but it must be a whole number from 0 to num_folds - 1" in proc.stderr


@pytest.mark.slow
def test_cross_validate_trains_every_fold_and_predicts_every_pair_once_out_of_fold(tmp_path):
    import csv
    import subprocess
    import sys

    from tests.conftest import REPO

    data = _grouped_set(tmp_path / "data", patients=4, per_patient=2)
    settings = ["--dataset_dir", str(data), "--group_pattern", "^(P\\d+)_", "--max_epochs", "1", "--spatial_size", "[32,32]",
                "--num_workers", "0"]
    # the bundle's own command line with --fold all: each fold in a run of its own, then the summary
    proc = run_bundle("--config_file", config("train.json"), "--num_folds", "2", "--fold", "all", "--bundle_root", "cv",
                      *settings, cwd=tmp_path)
    assert "fold all: 2 folds, one after another" in proc.stdout and "fold 1: trained and evaluated in" in proc.stdout
    assert not (tmp_path / "cv" / "models" / "model.pt").exists()
    for k in (0, 1):
        assert (tmp_path / "cv" / "models" / f"fold_{k}" / "model.pt").is_file()
    # every pair is scored exactly once, by the fold that held it out, and its patient is never on both sides
    scored = []
    for k in (0, 1):
        with open(tmp_path / "cv" / "eval" / f"fold_{k}" / "metrics_per_image.csv") as f:
            scored += [Path(r["filename"]).name for r in csv.DictReader(f)]
    assert sorted(scored) == sorted(p.name for p in (data / "images").iterdir())
    result = json.loads((tmp_path / "cv" / "eval" / "cross_validation.json").read_text())
    assert result["num_folds"] == 2 and result["out_of_fold"]["images"] == 8
    dice = [f["dice"][1] for f in result["folds"]]
    assert result["mean"]["dice"][1] == pytest.approx(float(np.mean(dice)))
    assert result["sd"]["dice"][1] == pytest.approx(float(np.std(dice, ddof=1)))
    rows = list(csv.DictReader(open(tmp_path / "cv" / "eval" / "cross_validation.csv")))
    assert [(r["fold"], r["class"]) for r in rows][::2] == [("0", "background"), ("1", "background"), ("mean", "background"),
                                                            ("sd", "background"), ("out_of_fold", "background")]
    assert "out of fold: 8 images" in proc.stdout
    page = (tmp_path / "cv" / "eval" / "cross_validation.html").read_text()
    assert page.count("<polyline") == 4 and "<figcaption>fold " in page  # both folds' curves, their worst images
    # every held-out prediction is kept at original size, and post-processing is chosen on them and stored with each fold
    kept = sorted((tmp_path / "cv" / "eval").glob("fold_*/oof/*.npz"))
    assert len(kept) == 8 and np.load(kept[0])["pred"].shape == (48, 40)  # as MONAI reads a PNG: width first
    chosen = json.loads((tmp_path / "cv" / "eval" / "postprocessing.json").read_text())
    assert chosen["images"] == 8 and chosen["trials"] and "post-processing chosen out of fold" in proc.stdout
    for k in (0, 1):
        assert json.loads((tmp_path / "cv" / "models" / f"fold_{k}" / "plan.json").read_text())["postprocessing"] == chosen["choice"]
    # again through scripts/cross_validate.py: finished folds are not trained again (resume), and the summary is the same
    model = tmp_path / "cv" / "models" / "fold_1" / "model.pt"
    written = model.stat().st_mtime_ns
    command = [sys.executable, str(REPO / "scripts" / "cross_validate.py"), "--num_folds", "2", "--bundle_root", "cv", "--", *settings]
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "fold 1: its training finished earlier" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert model.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "cv" / "eval" / "cross_validation.json").read_text())["folds"] == result["folds"]
    # evaluation with --fold all scores and summarises the trained folds, training nothing
    (tmp_path / "cv" / "eval" / "cross_validation.json").unlink()
    proc = run_bundle("--config_file", config("train.json", "evaluate.json"), "--num_folds", "2", "--fold", "all",
                      "--bundle_root", "cv", *settings, cwd=tmp_path)
    assert "fold 0: evaluated in" in proc.stdout and "trained and evaluated" not in proc.stdout and model.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "cv" / "eval" / "cross_validation.json").read_text())["folds"] == result["folds"]
    # the folds folder as ckpt_path (relative): one ensemble whose probabilities are the folds' mean, at each image's size
    new = tmp_path / "new"
    new.mkdir()
    rng = np.random.default_rng(1)
    for name, shape in (("small.png", (30, 44)), ("large.png", (70, 52))):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(new / name)
    (new / "broken.png").write_bytes(b"not an image")
    probs, logs = {}, {}
    for label, ckpt in (("ensemble", "cv/models"), ("fold_0", "cv/models/fold_0/model.pt"), ("fold_1", "cv/models/fold_1/model.pt")):
        proc = run_bundle("--config_file", config("inference.json"), "--ckpt_path", ckpt, "--input_dir", "new",
                          "--output_dir", f"out_{label}", "--save_probabilities", "true", "--num_workers", "0", cwd=tmp_path)
        masks = {p.name: np.asarray(Image.open(p)).shape for p in (tmp_path / f"out_{label}").glob("*.png")}
        assert masks == {"small.png": (30, 44), "large.png": (70, 52)}, (label, masks)
        probs[label] = np.asarray(Image.open(tmp_path / f"out_{label}" / "probabilities" / "large_foreground.png"), float)
        logs[label] = proc.stdout + proc.stderr
        assert "broken.png" in logs[label]
    assert "ensembling 2 models: cv/models/fold_0/model.pt, cv/models/fold_1/model.pt" in logs["ensemble"]
    assert "ensembling" not in logs["fold_0"]
    assert np.abs(probs["ensemble"] - (probs["fold_0"] + probs["fold_1"]) / 2).max() <= 1.0  # 8-bit rounding
    # a post-processing choice in the folds' plans is applied while the settings are auto; the user's own setting wins
    for k in (0, 1):
        plan_file = tmp_path / "cv" / "models" / f"fold_{k}" / "plan.json"
        plan = json.loads(plan_file.read_text())
        plan["postprocessing"] = {"remove_smaller_than": [0, 100_000], "fill_holes": [], "keep_largest_component": []}
        plan_file.write_text(json.dumps(plan))
    raw = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "out_ensemble").glob("*.png")}
    assert any(m.any() for m in raw.values())  # the raw ensemble draws some foreground
    for label, extra in (("chosen", []), ("mine", ["--remove_smaller_than", "0"])):
        proc = run_bundle("--config_file", config("inference.json"), "--ckpt_path", "cv/models", "--input_dir", "new",
                          "--output_dir", f"out_{label}", "--num_workers", "0", *extra, cwd=tmp_path)
        masks = {n: np.asarray(Image.open(tmp_path / f"out_{label}" / n)) for n in raw}
        if label == "chosen":  # every object is under 100000 pixels: all dropped
            assert not any(m.any() for m in masks.values()) and "class 1: drop objects under 100000 px" in proc.stdout + proc.stderr
        else:
            assert all((masks[n] == m).all() for n, m in raw.items())


def _fake_fold(folder: Path, dice: list, precision: list, rows: list[str], cm: list) -> Path:
    folder.mkdir(parents=True)
    summary = {"images": len(rows), "class_names": ["background", "lesion"],
               "mean_over_images": {"mean_dice": dice[1], "dice": dice, "iou": [d / 2 for d in dice]},
               "all_pixels": {"precision": precision, "recall": [1.0, 0.5]}, "confusion_matrix": cm}
    (folder / "metrics_summary.json").write_text(json.dumps(summary))
    (folder / "metrics_per_image.csv").write_text("filename,mean_dice\n" + "\n".join(rows) + "\n")
    return folder


def test_out_of_fold_summary_keeps_fold_ids_and_undefined_scores(tmp_path):
    import csv
    import math

    from monai_unet_bundle.crossval import summarise_folds, write_cross_validation

    a = _fake_fold(tmp_path / "fold_0", [0.9, 0.6], [0.95, None], ["a.png,0.600000", "b.png,n/a"], [[90, 0], [5, 5]])
    b = _fake_fold(tmp_path / "fold_2", [0.8, 0.8], [0.9, 0.7], ["c.png,0.800000"], [[80, 10], [0, 10]])
    result = summarise_folds({2: b, 0: a}, num_folds=3)
    assert [f["fold"] for f in result["folds"]] == [0, 2] and result["missing"] == [1]
    assert result["mean"]["dice"] == pytest.approx([0.85, 0.7])
    assert result["sd"]["dice"][1] == pytest.approx(float(np.std([0.6, 0.8], ddof=1)))
    assert result["mean"]["precision"] == pytest.approx([0.925, 0.7]) and result["sd"]["precision"][1] is None  # one defined
    assert result["out_of_fold"]["images"] == 3
    assert result["out_of_fold"]["mean_dice_over_images"] == pytest.approx(0.7)  # the n/a image is left out
    pooled = result["out_of_fold"]["all_pixels"]
    assert pooled["dice"][1] == pytest.approx(2 * 15 / (2 * 15 + 10 + 5))  # all folds' pixels in one matrix
    paths = write_cross_validation(result, tmp_path / "out")
    text = paths[0].read_text()
    assert "NaN" not in text and json.loads(text)["folds"][0]["precision"] == [0.95, None]
    rows = list(csv.DictReader(open(paths[1])))
    assert [r["fold"] for r in rows] == ["0", "0", "2", "2", "mean", "mean", "sd", "sd", "out_of_fold", "out_of_fold"]
    assert rows[1]["precision"] == "" and not math.isnan(float(rows[3]["dice"]))
    with pytest.raises(BundleInputError, match="fold_1.*does not exist: evaluate that fold first"):
        summarise_folds({1: tmp_path / "fold_1"})
