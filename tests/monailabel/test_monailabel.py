"""The packaged bundle in the real MONAI Label (0.8.5), imported the way its ``monaibundle`` sample app does.

The sample app (``sample-apps/monaibundle/main.py`` in the MONAILabel repository) finds bundles with
``get_bundle_models(app_dir, conf)`` in ``app_dir/model/<name>`` and wraps each in
``BundleInferTask(path, conf)`` and ``BundleTrainTask(path, conf)``; ``MONAILabelApp.infer`` and
``MONAILabelApp.train`` then serve the client's requests against a ``LocalDatastore``.  This module
builds exactly that app around a bundle written by ``scripts/package_bundle.py`` and checks what
MONAI Label needs from us: a 2D model, the label names from the metadata, a class-index label map
(0/1, integer, not 0/255) at the image's original size, and training that rewrites
``models/model.pt`` from labels saved in the datastore.

It must run where ``monai_unet_bundle`` is NOT installed (scripts/test_monailabel.sh makes such a
venv): the package is only importable from inside the packaged folder, which proves that it travels
with the bundle.  Only monai, monailabel, torch, numpy, PIL and the standard library are imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.monailabel

# not pytest.importorskip: where tests/ is on sys.path (the main suite) this very folder would import
# as an empty namespace package called monailabel; only a regular package is the real one
_spec = importlib.util.find_spec("monailabel")
if _spec is None or _spec.origin in (None, "namespace"):
    pytest.skip(
        "monailabel is not installed in this environment; scripts/test_monailabel.sh runs these tests in their own venv",
        allow_module_level=True,
    )

import torch  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402
from monailabel.utils.others.generic import get_bundle_models  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NAME = "unet2d_segmentation"
PACKAGE = "monai_unet_bundle"
#: image sizes (height, width): non-square so a transposed result cannot pass for a correct one
SIZES = [(40, 56), (48, 36), (44, 52), (52, 44), (36, 60), (56, 40)]


def _env() -> dict[str, str]:
    """Environment for subprocesses: quiet, 2 threads, and nothing that could make the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd`` and fail with its output unless it exits 0."""
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def _write_pair(image_path: Path, mask_path: Path | None, size: tuple[int, int], seed: int, mask_scale: int = 255) -> None:
    """Write an RGB picture of one bright disk on dark noise, and its mask (``mask_scale`` inside, 0 outside)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w, rng.uniform(0.18, 0.28) * min(h, w)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = rng.integers(0, 70, size=(h, w, 3)).astype(np.uint8)
    image[disk] = (210, 90, 40)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, "RGB").save(image_path)
    if mask_path is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((disk * mask_scale).astype(np.uint8), "L").save(mask_path)


def _package(out_dir: Path, *extra: str) -> Path:
    """Run scripts/package_bundle.py (never importing the project) and return the bundle folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, str(REPO / "scripts" / "package_bundle.py"), str(out_dir), "--name", NAME, *extra], cwd=out_dir)
    return out_dir / NAME


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_label(result: dict) -> np.ndarray:
    """The label map MONAI Label wrote for an ``infer`` request, as an array."""
    label_file = Path(result["file"])
    assert label_file.suffix == ".png" and label_file.is_file(), f"no PNG label file in {result}"
    return np.asarray(Image.open(label_file))


def _red_threshold_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BasicUNet`` weights under which class 1 wins exactly where the (scaled) red channel exceeds 0.5.

    Every convolution is zeroed and every batch norm made the identity, except a centre-tap path
    that carries input channel 0 through the first encoder level, the skip connection and the last
    decoder block into ``final_conv``, whose class-1 logit becomes ``red - 0.5`` (class 0 stays 0).
    ELU is the identity on the non-negative values this path carries.
    """
    path = ["conv_0.conv_0.conv.weight", "conv_0.conv_1.conv.weight", "upcat_1.convs.conv_0.conv.weight", "upcat_1.convs.conv_1.conv.weight"]
    missing = [k for k in [*path, "final_conv.weight", "final_conv.bias"] if k not in state]
    assert not missing, f"network_def is no longer the BasicUNet these weights are built for (missing {missing})"
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = value.clone()
        elif key.endswith(("running_var", "adn.N.weight")):
            out[key] = torch.ones_like(value)
        else:
            out[key] = torch.zeros_like(value)
    for key in path:
        out[key][(0, 0, *[s // 2 for s in out[key].shape[2:]])] = 1.0  # channel 0 -> channel 0, centre tap
    out["final_conv.weight"][(1, 0, *[0] * (out["final_conv.weight"].dim() - 2))] = 1.0
    out["final_conv.bias"][1] = -0.5
    return out


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory, label_run_required: bool) -> dict[str, Path]:
    """Package the bundle, train it 1 epoch through ``monai.bundle run``, package it again with those weights.

    Returns the MONAI Label app folder (``app/model/unet2d_segmentation`` is the bundle) and the
    training data folder.
    """
    if importlib.util.find_spec(PACKAGE) is not None:
        where = importlib.util.find_spec(PACKAGE).origin
        message = f"{PACKAGE} is importable here ({where}), so this run could not show that it travels with the bundle"
        if label_run_required:
            pytest.fail(message)
        pytest.skip(message + "; scripts/test_monailabel.sh runs these tests in a venv without it")
    root = tmp_path_factory.mktemp("monailabel")
    data = root / "data"
    for i, size in enumerate(SIZES):
        _write_pair(data / "images" / f"case_{i}.png", data / "masks" / f"case_{i}.png", size, seed=i)

    stage = _package(root / "stage", "--no_weights")
    assert not (stage / "models").exists()
    # the package is importable from the bundle folder as cwd: `monai.bundle run` needs nothing installed
    _run(
        [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--dataset_dir", str(data),
            "--spatial_size", "[32,32]", "--max_epochs", "1", "--num_workers", "0", "--bundle_root", ".",
        ],
        cwd=stage,
    )
    weights = stage / "models" / "model.pt"
    assert weights.is_file(), "one epoch of training through monai.bundle wrote no models/model.pt"

    app_dir = root / "app"
    bundle = _package(app_dir / "model", "--weights", str(weights))
    assert _digest(bundle / "models" / "model.pt") == _digest(weights)
    assert (app_dir / "model" / f"{NAME}_v{json.loads((bundle / 'configs' / 'metadata.json').read_text())['version']}.zip").is_file()
    return {"app_dir": app_dir, "bundle": bundle, "data": data, "root": root}


class BundleApp(MONAILabelApp):
    """The ``monaibundle`` sample app's model handling: every bundle in ``--conf models`` is one infer and one train task."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.models = get_bundle_models(app_dir, conf)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="bundle app", description="test", version="1")

    def init_infers(self):
        return {n: BundleInferTask(b, self.conf) for n, b in self.models.items()}

    def init_trainers(self):
        trainers = {}
        for n, b in self.models.items():
            t = BundleTrainTask(b, self.conf)
            if t and t.is_valid():
                trainers[n] = t
        return trainers

    def init_strategies(self):
        return {}


@pytest.fixture(scope="module")
def app(packaged: dict[str, Path]) -> BundleApp:
    """The app over a local datastore of 5 PNG images with final labels (class indices 0/1) saved through it."""
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False  # as the sample app's main(): no file watcher thread
    settings.MONAI_LABEL_SESSIONS = False  # no session store under the home folder
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False  # no background scoring after training
    studies = packaged["root"] / "studies"
    masks = packaged["root"] / "submitted"
    for i, size in enumerate(SIZES[:5]):
        _write_pair(studies / f"study_{i}.png", masks / f"study_{i}.png", size, seed=100 + i, mask_scale=1)
    # zoo_source other than "monaihosting": use the local bundle in app_dir/model without asking the model zoo
    conf = {"models": NAME, "zoo_source": "github", "preload": "false"}
    application = BundleApp(str(packaged["app_dir"]), str(studies), conf)
    store = application.datastore()
    for i in range(5):
        store.save_label(f"study_{i}", str(masks / f"study_{i}.png"), "final", {})
    return application


def test_package_travels_with_the_bundle(app: BundleApp, packaged: dict[str, Path]) -> None:
    """The configs' imports were served by the copy inside the packaged folder, and MONAI Label took the model."""
    module = sys.modules.get(PACKAGE)
    assert module is not None, f"MONAI Label parsed the configs without importing {PACKAGE}"
    assert Path(module.__file__).resolve().parent == (packaged["bundle"] / PACKAGE).resolve()
    assert str(packaged["bundle"]) not in sys.path, "MONAI Label should take the bundle off sys.path again"
    assert NAME in app._infers and app._infers[NAME].is_valid()
    assert NAME in app._trainers


def test_info_reports_a_2d_segmentation_model_with_the_metadata_labels(app: BundleApp, packaged: dict[str, Path]) -> None:
    """MONAI Label sees a 2D segmentation model labelled from metadata.json (it lists every class but background)."""
    info = app.info()
    model = info["models"][NAME]
    assert model["dimension"] == 2, "MONAI Label takes len(spatial_shape) as the dimension; 2 means a 2D model"
    assert model["type"] == "segmentation", "MONAI Label infers the type from the folder name"
    channel_def = json.loads((packaged["bundle"] / "configs" / "metadata.json").read_text())
    channel_def = channel_def["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channel_def == {"0": "background", "1": "foreground"}
    assert model["labels"] == {"foreground": 1}  # background (channel 0) is implied for segmentation models
    assert info["labels"] == ["foreground"]
    assert NAME in info["trainers"]
    assert info["models"][NAME]["config"]["model_filename"] == ["model.pt"]


def test_infer_returns_a_class_index_map_at_the_original_size(app: BundleApp, packaged: dict[str, Path]) -> None:
    """A PNG in the datastore comes back as a 0/1 integer map of its own size (the 1-epoch weights)."""
    image_id, (height, width) = "study_0", SIZES[0]
    assert Image.open(app.datastore().get_image_uri(image_id)).size == (width, height)

    result = app.infer({"model": NAME, "image": image_id, "device": "cpu"})

    assert result["params"]["label_names"] == {"foreground": 1}
    label = _read_label(result)
    assert label.shape == (height, width), f"label map {label.shape} is not the image's size {(height, width)}"
    assert label.dtype.kind in "ui", f"label map has dtype {label.dtype}, not an integer type"
    values = set(np.unique(label).tolist())
    assert values <= {0, 1}, f"label map holds {sorted(values)}, not class indices 0/1 (0/255 would mean SaveImaged scaling leaked in)"


def test_infer_puts_the_mask_where_the_object_is(app: BundleApp, packaged: dict[str, Path]) -> None:
    """With weights that segment "red > 0.5", MONAI Label's map matches the drawn disk and the bundle's own output.

    One epoch cannot teach the U-Net anything, so its maps say nothing about orientation or which
    value means foreground.  These weights make the network a known pixel rule; MONAI Label picks
    them through its ``model_filename`` option, as a user picking another ``models/*.pt`` does.
    """
    bundle = packaged["bundle"]
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    torch.save(_red_threshold_weights(state), bundle / "models" / "probe.pt")
    image_id, (height, width) = "study_1", SIZES[1]
    image_path = Path(app.datastore().get_image_uri(image_id))
    truth = np.asarray(Image.open(packaged["root"] / "submitted" / image_path.name)) > 0

    result = app.infer({"model": NAME, "image": image_id, "device": "cpu", "model_filename": "probe.pt"})

    label = _read_label(result)
    assert label.shape == (height, width)
    assert set(np.unique(label).tolist()) == {0, 1}
    dice = 2 * np.logical_and(label == 1, truth).sum() / ((label == 1).sum() + truth.sum())
    assert dice > 0.9, f"foreground (1) does not cover the drawn disk: Dice {dice:.3f}"

    # the same image through the bundle's own inference config (binary masks saved 0/255) agrees pixel for pixel
    in_dir, out_dir = packaged["root"] / "cli_inputs", packaged["root"] / "cli_predictions"
    in_dir.mkdir()
    (in_dir / image_path.name).write_bytes(image_path.read_bytes())
    _run(
        [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input_dir", str(in_dir),
            "--output_dir", str(out_dir), "--ckpt_path", "models/probe.pt", "--num_workers", "0", "--device", "cpu",
            "--bundle_root", ".",
        ],
        cwd=bundle,
    )
    cli_mask = np.asarray(Image.open(out_dir / image_path.name))
    np.testing.assert_array_equal(label.astype(np.int64) * 255, cli_mask.astype(np.int64))
    (bundle / "models" / "probe.pt").unlink()


def test_train_rewrites_the_bundle_model(app: BundleApp, packaged: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """One epoch of ``BundleTrainTask`` on the datastore's labelled images writes a new ``models/model.pt``."""
    model_pt = packaged["bundle"] / "models" / "model.pt"
    before_digest, before_mtime = _digest(model_pt), model_pt.stat().st_mtime_ns
    before_keys = set(torch.load(model_pt, map_location="cpu", weights_only=True))

    with caplog.at_level(logging.INFO, logger="monailabel.tasks.train.bundle"):
        app.train({"model": NAME, "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.2, "pretrained": True})

    assert "Total Records in Dataset: 5" in caplog.text, "training did not take the 5 labelled images from the datastore"
    assert model_pt.stat().st_mtime_ns > before_mtime, "models/model.pt was not rewritten"
    assert _digest(model_pt) != before_digest, "models/model.pt holds the same bytes after training"
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    assert set(state) == before_keys, "the rewritten model.pt is not a plain state dict of network_def"
