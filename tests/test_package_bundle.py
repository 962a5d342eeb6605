"""scripts/package_bundle.py: the distributable bundle folder and zip (MONAI Label and model-zoo layout)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "package_bundle.py"
NAME = "unet2d_segmentation"
VERSION = json.loads((REPO / "configs" / "metadata.json").read_text())["version"]


def _load_script():
    spec = importlib.util.spec_from_file_location("package_bundle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


package_bundle = _load_script()


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A small plain state dict, as CheckpointSaver writes models/model.pt."""
    path = tmp_path / "model.pt"
    torch.save({"conv.weight": torch.ones(2, 3), "conv.bias": torch.zeros(2)}, path)
    return path


def test_layout_and_zip(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dist"
    assert package_bundle.main([str(out), "--weights", str(weights)]) == 0
    assert "wrote" in capsys.readouterr().out
    folder, zip_path = out / NAME, out / f"{NAME}_v{VERSION}.zip"
    assert "segmentation" in folder.name
    assert sorted(p.name for p in out.iterdir()) == sorted([folder.name, zip_path.name]), "a temporary folder was left behind"

    files = _files(folder)
    configs = {f"configs/{p.name}" for p in (REPO / "configs").iterdir() if p.suffix == ".json" or p.name == "logging.conf"}
    assert {"configs/train.json", "configs/inference.json", "configs/metadata.json", "configs/logging.conf"} <= configs
    package = {f"monai_unet_bundle/{p.name}" for p in (REPO / "monai_unet_bundle").glob("*.py")}
    docs = {f"docs/{p.relative_to(REPO / 'docs').as_posix()}" for p in (REPO / "docs").rglob("*") if p.is_file()}
    assert files == configs | package | docs | {"LICENSE", "README.md", "models/model.pt"}
    assert "monai_unet_bundle/__init__.py" in files and "docs/README.md" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert (folder / "models" / "model.pt").read_bytes() == weights.read_bytes()
    # without a plan beside the weights, the shipped configs state the settings of old explicitly (MONAI Label
    # trains on its datastore, which the plan cannot see)
    shipped = json.loads((folder / "configs" / "inference.json").read_text())
    repo = json.loads((REPO / "configs" / "inference.json").read_text())
    assert shipped == {**repo, **{k: v for k, v in package_bundle.UNPLANNED.items() if k in repo}}
    assert shipped["normalization"] == "minmax" and shipped["num_classes"] == 2 and repo["num_classes"] == "auto"

    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        assert names == {f"{NAME}/{f}" for f in files}, "the zip must hold exactly the folder, under NAME/"
        assert zf.read(f"{NAME}/configs/metadata.json") == (folder / "configs" / "metadata.json").read_bytes()


def test_without_weights_ships_no_models_folder(tmp_path: Path) -> None:
    assert package_bundle.main([str(tmp_path), "--no_weights", "--name", "cells_segmentation"]) == 0
    assert (tmp_path / "cells_segmentation" / "configs" / "train.json").is_file()
    assert not (tmp_path / "cells_segmentation" / "models").exists()
    assert (tmp_path / f"cells_segmentation_v{VERSION}.zip").is_file()


def test_refuses_to_overwrite_unless_forced(tmp_path: Path, weights: Path) -> None:
    assert package_bundle.main([str(tmp_path), "--no_weights"]) == 0
    marker = tmp_path / NAME / "my_notes.txt"
    marker.write_text("keep me")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--no_weights"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "already exists and is not empty" in proc.stderr and "--force" in proc.stderr
    assert marker.read_text() == "keep me"

    assert package_bundle.main([str(tmp_path), "--weights", str(weights), "--force"]) == 0
    assert not marker.exists(), "--force replaces the folder instead of mixing old and new files"
    assert (tmp_path / NAME / "models" / "model.pt").is_file()


def test_refuses_an_existing_zip_and_accepts_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / NAME).mkdir()
    (tmp_path / f"{NAME}_v{VERSION}.zip").write_bytes(b"old")
    assert package_bundle.main([str(tmp_path), "--no_weights"]) == 2
    assert "zip already exists" in capsys.readouterr().err
    (tmp_path / f"{NAME}_v{VERSION}.zip").unlink()
    assert package_bundle.main([str(tmp_path), "--no_weights"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "unet2d"], "must contain 'segmentation'"),
        (["--name", "a/b_segmentation"], "plain folder name"),
        (["--weights", "missing.pt"], "does not exist"),
    ],
)
def test_bad_arguments_are_one_sentence_with_status_2(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert package_bundle.main([str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out" / NAME).exists()


def test_weights_must_be_a_plain_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, wrapped)
    assert package_bundle.main([str(tmp_path / "out"), "--weights", str(wrapped)]) == 2
    assert "not a plain state dict" in capsys.readouterr().err


#: run in a subprocess: drop the editable install's finder, check the repository is not on sys.path,
#: then parse the inference config, whose imports and network_def need monai_unet_bundle
_IMPORT_CHECK = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
repo = os.path.realpath(sys.argv[1])
assert all(os.path.realpath(p or os.getcwd()) != repo for p in sys.path), sys.path
import monai_unet_bundle
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config("configs/inference.json")
net = parser.get_parsed_content("network_def")
print(type(net).__name__, os.path.realpath(monai_unet_bundle.__file__))
"""


def test_package_is_importable_from_the_packaged_folder(tmp_path: Path) -> None:
    assert package_bundle.main([str(tmp_path), "--no_weights"]) == 0
    folder = tmp_path / NAME
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, str(REPO)], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    net, module_file = proc.stdout.split()[-2:]
    assert net == "BasicUNet"
    assert Path(module_file).parent == (folder / "monai_unet_bundle").resolve()

    # control: the same check from any other folder cannot import the package, so the copy is what served it
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "configs").mkdir()
    control = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, str(REPO)], cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True
    )
    assert control.returncode != 0 and "No module named 'monai_unet_bundle'" in control.stderr


def test_requirements_are_exactly_what_the_metadata_declares(tmp_path: Path) -> None:
    """What the model zoo installs (and scripts/test_monailabel.sh too): the core pins plus required_packages_version."""
    meta = json.loads((REPO / "configs" / "metadata.json").read_text())
    expected = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    expected += [f"{name}=={version}" for name, version in meta["required_packages_version"].items()]
    assert package_bundle.bundle_requirements() == expected
    assert not {r.split("==")[0] for r in expected} & set(meta.get("extra_packages_version", {}))
    printed = subprocess.run(
        ["bash", str(REPO / "scripts" / "test_monailabel.sh"), "--print-requirements"], capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0 and printed.stdout.split() == expected, printed.stderr

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(
        json.dumps({"monai_version": "1.6.1", "required_packages_version": {"scipy": ">=1.10", "fire": " 0.7.1 "}})
    )
    assert package_bundle.bundle_requirements(tmp_path) == ["monai==1.6.1", "scipy>=1.10", "fire==0.7.1"]
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"required_packages_version": ["scipy"]}))
    with pytest.raises(package_bundle.PackagingError, match="must map package names to versions"):
        package_bundle.bundle_requirements(tmp_path)


def test_the_plan_beside_the_weights_is_shipped_into_metadata_and_configs(tmp_path: Path, weights: Path) -> None:
    """A model trained with a plan is shipped with it: models/plan.json, metadata channels and shape, explicit config settings."""
    plan = {
        "num_classes": 3, "class_names": ["background", "liver", "tumour"], "in_channels": 1, "spatial_size": [96, 160],
        "normalization": "zscore", "mask_palette": None, "mask_thresholds": [64.0, 191.5], "batch_size": 8,
        "patch_training": True,
    }
    (weights.parent / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "dist"
    assert package_bundle.main([str(out), "--weights", str(weights)]) == 0
    folder = out / NAME
    assert json.loads((folder / "models" / "plan.json").read_text()) == plan
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert (image["num_channels"], image["spatial_shape"], image["channel_def"]) == (1, [96, 160], {"0": "intensity"})
    assert image["is_patch_data"] is True  # trained on 96x160 patches at the images' own resolution
    assert (pred["num_channels"], pred["channel_def"]) == (3, {"0": "background", "1": "liver", "2": "tumour"})
    for name in ("train.json", "inference.json"):
        config = json.loads((folder / "configs" / name).read_text())
        assert (config["num_classes"], config["in_channels"], config["normalization"]) == (3, 1, "zscore")
        assert config["spatial_size"] == "auto"  # read from models/plan.json, so MONAI Label's input_size can still set it
        assert config["class_names"] == ["background", "liver", "tumour"]
    trained = json.loads((folder / "configs" / "train.json").read_text())
    assert trained["mask_thresholds"] == [64.0, 191.5] and trained["patch_training"] is True  # MONAI Label trains on patches too
    # the packaged metadata still satisfies MONAI's schema
    import jsonschema

    from tests.conftest import SCHEMA

    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
