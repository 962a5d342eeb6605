"""MONAI's own bundle tools on this bundle: metadata schema, network I/O check, TorchScript export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out

from tests.conftest import CONFIGS, REPO, SCHEMA, SCHEMA_MD5

META = CONFIGS / "metadata.json"


def _python_module(*args: str, cwd: Path = REPO):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not SCHEMA.is_file(), reason=f"MONAI's bundle schema is not at {SCHEMA}")
def test_metadata_verifies_offline_against_monai_schema(tmp_path: Path):
    schema = tmp_path / SCHEMA.name
    shutil.copy(SCHEMA, schema)  # verify_metadata would download over a file with the wrong hash
    proc = _python_module(
        "monai.bundle", "verify_metadata", "--meta_file", str(META), "--filepath", str(schema), "--hash_val", SCHEMA_MD5
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_metadata_describes_a_2d_model_for_monai_label():
    meta = json.loads(META.read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["required_packages_version"]
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert len(image["spatial_shape"]) == 2 and len(pred["spatial_shape"]) == 2
    assert pred["channel_def"] == {"0": "background", "1": "foreground"}
    assert pred["num_channels"] == 2 and image["num_channels"] == 3
    for key in ("intended_use", "data_source", "limitations", "description"):
        assert meta[key].strip()


def test_configs_are_indented_json_and_train_inference_stand_alone():
    for path in CONFIGS.glob("*.json"):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path.name} is not 4-space indented JSON"
    for name in ("train.json", "inference.json"):
        assert "configs/" not in (CONFIGS / name).read_text(), f"{name} must not pull in other config files"


def test_verify_net_in_out():
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(CONFIGS / "inference.json"), n=2, device="cpu")


@pytest.mark.slow
def test_ckpt_export_to_torchscript_matches_the_network(trained_bundle: Path, tmp_path: Path):
    target = tmp_path / "model.ts"
    proc = _python_module(
        "monai.bundle", "ckpt_export", "network_def", "--filepath", str(target),
        "--ckpt_file", str(trained_bundle / "models" / "model.pt"),
        "--meta_file", str(META), "--config_file", str(CONFIGS / "inference.json"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scripted = torch.jit.load(str(target))
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained_bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


ONNX_KWARGS = (
    "{'dynamo': False, 'input_names': ['image'], 'output_names': ['logits'], "
    "'dynamic_axes': {'image': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch', 2: 'height', 3: 'width'}}}"
)


@pytest.mark.slow
def test_onnx_export_matches_pytorch_in_onnx_runtime(trained_bundle: Path, tmp_path: Path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    target = tmp_path / "model.onnx"
    proc = _python_module(
        "monai.bundle", "onnx_export", "network_def", "--filepath", str(target),
        "--ckpt_file", str(trained_bundle / "models" / "model.pt"), "--meta_file", str(META),
        "--config_file", str(CONFIGS / "inference.json"), "--use_trace", "True", "--input_shape", "[1,3,64,64]",
        "--converter_kwargs", ONNX_KWARGS,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained_bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 48, 80)  # another batch and size than the export's sample: dynamic axes
    (onnx_out,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert np.allclose(onnx_out, net(x).numpy(), atol=1e-4)


def test_model_zoo_files_license_and_bundle_card():
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    card = (REPO / "docs" / "README.md").read_text()
    for heading in ("## Overview", "## Data", "## Training", "## Performance", "## Commands", "## Intended use and limitations"):
        assert heading in card, heading
    assert "CPU" in card and "Dice" in card  # figures come with the hardware they were measured on
