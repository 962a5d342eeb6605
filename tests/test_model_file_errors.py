"""Model files that inference and evaluation cannot use end in one sentence naming the file and what to do.

``configs/inference.json`` and the ``configs/evaluate.json`` mixin load ``ckpt_path`` through
:class:`monai_unet_bundle.checkpoints.ModelLoader`; these tests give it a folder, empty, truncated
and random files, pickles that carry code (which must never run), a resume checkpoint, and models
trained with other ``num_classes``, ``in_channels``, ``architecture`` or ``base_features``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from monai_unet_bundle.checkpoints import ModelLoader, ResumeCheckpoint, load_model, network_settings, read_state_dict
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.networks import build_network
from monai_unet_bundle.runtime import in_channels_last, place_network
from tests.conftest import TINY, config, run_bundle, write_pairs


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _net(architecture: str = "basic_unet", in_channels: int = 3, num_classes: int = 2, base_features: int = 4) -> torch.nn.Module:
    return build_network(architecture, in_channels=in_channels, out_channels=num_classes, base_features=base_features)


def _save_state(path: Path, **settings) -> Path:
    torch.save(_net(**settings).state_dict(), path)
    return path


def make_file(kind: str, folder: Path, marker: Path | None = None, base_features: int = 4) -> Path:
    """Write a model file of ``kind`` in ``folder`` and return its path."""
    path = folder / f"{kind}.pt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        whole = folder / "whole.pt"
        _save_state(whole, base_features=base_features)
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "code_in_torch_file":
        torch.save({"conv.weight": torch.ones(1), "payload": Payload(marker)}, path)
    elif kind == "code_in_pickle":
        path.write_bytes(pickle.dumps({"payload": Payload(marker)}, protocol=4))
    elif kind == "resume":
        net = _net(base_features=base_features)
        checkpoint = ResumeCheckpoint(path, {"network": net, "optimizer": torch.optim.Adam(net.parameters())})
        engine = Engine(lambda e, b: None)
        engine.state.epoch, engine.state.iteration = 3, 12
        checkpoint.save(engine, finished=True)
    elif kind == "num_classes":
        _save_state(path, num_classes=3, base_features=base_features)
    elif kind == "in_channels":
        _save_state(path, in_channels=1, base_features=base_features)
    elif kind == "architecture":
        _save_state(path, architecture="unet", base_features=base_features)
    elif kind == "base_features":
        _save_state(path, base_features=2 * base_features)
    else:
        raise ValueError(kind)
    return path


#: kind -> the parts of the sentence after "model <path> " (each a regular expression)
MESSAGES = {
    "folder": [r"is a folder, not a model file", r"pass --ckpt_path"],
    "empty": [r"is an empty file \(0 bytes", r"train again, or pass --ckpt_path"],
    "truncated": [r"holds a truncated or damaged PyTorch file \(\d+ bytes\)", r"train again, or pass --ckpt_path"],
    "random": [r"holds no PyTorch data \(4096 bytes", r"train again, or pass --ckpt_path"],
    "code_in_torch_file": [r"holds Python objects besides tensors \((io|builtins)\.open\)", r"never loaded", r"pass --ckpt_path"],
    "code_in_pickle": [r"holds Python objects besides tensors \((io|builtins)\.open\)", r"never loaded", r"pass --ckpt_path"],
    "resume": [r"is a resume checkpoint \(network, optimizer and trainer state\), not a model", r"pass --ckpt_path"],
    "num_classes": [r"was trained for 3 classes while num_classes is 2: pass --num_classes 3 or train again\.$"],
    "in_channels": [r"was trained for 1 input channel while in_channels is 3: pass --in_channels 1 or train again\.$"],
    "architecture": [r"was trained with architecture unet while the settings say architecture basic_unet: "
                     r"pass --architecture unet or train again\.$"],
    "base_features": [r"was trained with base_features (8|32) while the settings say base_features (4|16): "
                      r"pass --base_features (8|32) or train again\.$"],
}


def _check_sentence(text: str, path: Path, kind: str) -> None:
    assert text.startswith(f"model {path} "), text
    assert "\n" not in text.strip(), text
    for pattern in MESSAGES[kind]:
        assert re.search(pattern, text), f"{pattern!r} not in {text!r}"


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_each_bad_file_is_one_sentence(tmp_path: Path, kind: str):
    marker = tmp_path / "MARKER"
    path = make_file(kind, tmp_path, marker)
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(BundleInputError) as caught:
        load_model(path, net)
    _check_sentence(str(caught.value), path, kind)
    assert caught.value.__cause__ is None, "the sentence is the whole story: no chained traceback"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "a refused file changed the network"
    assert not marker.exists(), "loading the file ran code from it"


def test_the_payloads_do_run_code_when_unpickled_without_protection(tmp_path: Path):
    """Control for the tests above: the same files create the marker when loaded with full pickle."""
    marker = tmp_path / "MARKER"
    path = make_file("code_in_pickle", tmp_path, marker)
    with open(path, "rb") as f:
        pickle.load(f)  # noqa: S301 - our own test file
    assert marker.exists()
    marker.unlink()
    path = make_file("code_in_torch_file", tmp_path, marker)
    torch.load(path, weights_only=False)  # noqa: S614 - our own test file
    assert marker.exists()


def test_a_good_model_loads_into_a_wrapped_channels_last_network(tmp_path: Path):
    trained = _net()
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: the network is .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = Wrapper(place_network(_net(), "cpu", "true"))
    assert in_channels_last(wrapped.module)
    assert load_model(path, wrapped) is wrapped
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in wrapped.module.state_dict().items())
    assert in_channels_last(wrapped.module), "loading changed the memory format"

    # a state dict saved from a DistributedDataParallel network ("module." names) loads too
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "ddp.pt")
    other = _net()
    load_model(tmp_path / "ddp.pt", other)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in other.state_dict().items())

    # the handler loads when attached, before the engine runs
    fresh = _net()
    ModelLoader(path, fresh).attach(Engine(lambda e, b: None))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    "settings",
    [
        {"architecture": "basic_unet", "in_channels": 3, "num_classes": 2, "base_features": 4},
        {"architecture": "basic_unet", "in_channels": 1, "num_classes": 5, "base_features": 6},
        {"architecture": "unet", "in_channels": 3, "num_classes": 3, "base_features": 8},
        {"architecture": "unet", "in_channels": 4, "num_classes": 2, "base_features": 2},
    ],
)
def test_settings_are_read_back_from_the_tensor_shapes(settings: dict):
    assert network_settings(_net(**settings).state_dict()) == settings


def test_other_networks_and_other_contents(tmp_path: Path):
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(BundleInputError, match=r"holds the weights of another network .*pass --ckpt_path .* or train again\.$"):
        load_model(tmp_path / "linear.pt", _net())
    assert network_settings(torch.nn.Linear(2, 3).state_dict()) is None
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(BundleInputError, match=r"holds a list, not a state dict of network_def"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"model": _net().state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(BundleInputError, match=r"entries that are not tensors \(model, epoch\).*save network.state_dict\(\) alone"):
        read_state_dict(tmp_path / "wrapped.pt")
    torch.save({}, tmp_path / "nothing.pt")
    with pytest.raises(BundleInputError, match=r"holds an empty dict"):
        read_state_dict(tmp_path / "nothing.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": [1, 2]}))
    with pytest.raises(BundleInputError, match=r"holds a plain Python pickle \(\d+ bytes\), not a PyTorch file"):
        read_state_dict(tmp_path / "plain.pkl")
    with pytest.raises(BundleInputError, match=r"no trained model at .*missing.pt"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "run").mkdir()
    _save_state(tmp_path / "run" / "model.pt")
    with pytest.raises(BundleInputError, match=r"is a folder, not a model file: pass --ckpt_path .*run/model.pt\.$"):
        read_state_dict(tmp_path / "run")


# ------------------------------------------------------------------------------------ real CLI runs

#: kind -> the config(s) it is run through (every kind at least once, both configs several times)
CLI_RUNS = [
    ("folder", "inference"),
    ("truncated", "inference"),
    ("random", "evaluate"),
    ("code_in_torch_file", "inference"),
    ("code_in_pickle", "evaluate"),
    ("resume", "evaluate"),
    ("num_classes", "inference"),
    ("num_classes", "evaluate"),
    ("in_channels", "evaluate"),
    ("architecture", "inference"),
    ("base_features", "evaluate"),
]


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("model_file_data") / "data", n=4)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "workflow"), CLI_RUNS)
def test_cli_ends_in_one_line_with_status_2(tmp_path: Path, cli_data: Path, kind: str, workflow: str):
    marker = tmp_path / "MARKER"
    models = tmp_path / "models"
    models.mkdir()
    path = make_file(kind, models, marker, base_features=16)  # 16: the configs' default base_features
    common = ["--bundle_root", str(tmp_path), "--ckpt_path", str(path), *TINY]
    # without these, num_classes, in_channels, architecture and base_features (auto) are read from the model's
    # weights (there is no plan beside it), which then fit
    common += {"num_classes": ["--num_classes", "2"], "in_channels": ["--in_channels", "3"],
               "architecture": ["--architecture", "basic_unet"], "base_features": ["--base_features", "16"]}.get(kind, [])
    if workflow == "inference":
        args = ["--config_file", config("inference.json"), "--input_dir", str(cli_data / "images"),
                "--output_dir", str(tmp_path / "predictions")]
    else:
        # the evaluator (and its ModelLoader) is built after the data set, whose default in-memory cache shows
        # MONAI's "Loading dataset" progress bar on stderr first; --cache none leaves stderr to the error alone
        cache = [] if kind == "num_classes" else ["--cache", "none"]
        args = ["--config_file", config("train.json", "evaluate.json"), "--dataset_dir", str(cli_data), *cache]
    proc = run_bundle(*args, *common, expect_rc=2)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if workflow == "evaluate" and kind == "num_classes":  # default cache: only the progress bar comes before the error
        assert all(line.startswith("Loading dataset:") for line in lines[:-1]), proc.stderr
        lines = lines[-1:]
    else:
        assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    _check_sentence(lines[0][len("error: "):], path, kind)
    assert not marker.exists(), "the run executed code from the model file"
    assert not (tmp_path / "predictions").exists() or not any((tmp_path / "predictions").iterdir())
