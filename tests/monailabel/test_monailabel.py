"""The packaged bundle in the real MONAI Label (0.8.5), imported the way its ``monaibundle`` sample app does.

The sample app (``sample-apps/monaibundle/main.py`` in the MONAILabel repository) finds bundles with
``get_bundle_models(app_dir, conf)`` in ``app_dir/model/<name>`` and wraps each in
``BundleInferTask(path, conf)`` and ``BundleTrainTask(path, conf)``; ``MONAILabelApp.infer`` and
``MONAILabelApp.train`` then serve the client's requests against a ``LocalDatastore``.  This module
builds exactly that app around a bundle written by ``scripts/package_bundle.py`` and checks what
MONAI Label needs from us: a 2D model, the label names from the metadata, a class-index label map
(0/1, integer, not 0/255) at the image's original size, and training that rewrites
``models/model.pt`` from labels saved in the datastore.

The second half starts the real server (``monailabel start_server`` on 127.0.0.1, a free port) over an
app written by ``scripts/package_bundle.py --app`` and drives it over HTTP with the README's commands:
``/info/``, ``/infer`` on PNG, JPEG, NIfTI and DICOM with every option the annotator can choose,
``/datastore/label``, ``/train`` and epistemic (Monte Carlo dropout) active learning; the server is
stopped by its process id at the end, whatever happens.

It must run where ``monai_unet_bundle`` is NOT installed (scripts/test_monailabel.sh makes such a
venv): the package is only importable from inside the packaged folder, which proves that it travels
with the bundle.  Only monai, monailabel, torch, numpy, PIL, nibabel, requests (MONAI Label's) and the
standard library are imported (and pydicom, MONAI Label's own, to write a DICOM upload).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
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

import requests  # noqa: E402  (one of MONAI Label's own modules: drives the server)
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


_COLOUR_DICOM_CHECK = """
import io
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from monai_unet_bundle.dicom import DicomReader

def save(ds, path, syntax):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.1"
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)

rgb = np.zeros((24, 40, 3), np.uint8)
rgb[..., 0], rgb[4:20, 5:25, 1], rgb[..., 2] = 200, 180, 40
for name in ("rgb", "ybr", "jpeg"):
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 24, 40, 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if name == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=95)
        ds.PhotometricInterpretation, ds.PixelData = "YBR_FULL_422", encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        save(ds, name + ".dcm", JPEGBaseline8Bit)
    else:
        from pydicom.pixel_data_handlers.util import convert_color_space
        stored = rgb if name == "rgb" else convert_color_space(rgb, "RGB", "YBR_FULL")
        ds.PhotometricInterpretation, ds.PixelData = ("RGB" if name == "rgb" else "YBR_FULL"), stored.tobytes()
        save(ds, name + ".dcm", ExplicitVRLittleEndian)
    reader = DicomReader("image")
    array = np.moveaxis(reader.get_data(reader.read(name + ".dcm"))[0], 0, 1).astype(float)
    error = np.abs(array - rgb).mean()
    print(name, pydicom.__version__, round(float(error), 2))
    assert error < 10, (name, error)  # JPEG: 4:2:2 chroma at the block edges; unconverted YBR is ~125 off
"""


def test_packaged_reader_turns_colour_dicom_into_rgb_with_monai_labels_pydicom(packaged: dict[str, Path], tmp_path: Path) -> None:
    """RGB, YBR_FULL and JPEG (YBR_FULL_422) DICOM read as RGB with the pydicom MONAI Label pins (2.4), whose
    decoders leave YBR data unconverted; the main suite checks the same with pydicom 3."""
    script = tmp_path / "check.py"
    script.write_text(_COLOUR_DICOM_CHECK)
    env = {**_env(), "PYTHONPATH": str(packaged["bundle"])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["rgb", "ybr", "jpeg"]


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
        # MONAI Label reads every option of the bundle's displayable_configs from the request (clients send them all)
        app.train({"model": NAME, "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.2, "pretrained": True,
                   "learning_rate": 0.001, "input_size": 32})

    assert "Total Records in Dataset: 5" in caplog.text, "training did not take the 5 labelled images from the datastore"
    assert model_pt.stat().st_mtime_ns > before_mtime, "models/model.pt was not rewritten"
    assert _digest(model_pt) != before_digest, "models/model.pt holds the same bytes after training"
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    assert set(state) == before_keys, "the rewritten model.pt is not a plain state dict of network_def"


# ---------------------------------------------------------------------------------------------------------------------
# The real server: `monailabel start_server` on 127.0.0.1, driven over HTTP as a client does.
#
# WALKTHROUGH holds the commands of the README's MONAI Label section, as written there (the README test
# checks that each appears verbatim); the fixtures below run exactly these, with three substitutions:
# the port (8000 -> a free one), `python scripts/...` -> this interpreter and the repository's script,
# and `models/model.pt` -> the weights trained by the `packaged` fixture.  curl lines are run with
# `requests` (see `_curl`), so no curl binary is needed.
# ---------------------------------------------------------------------------------------------------------------------

README_PORT = "8000"
WALKTHROUGH = {
    "package": "python scripts/package_bundle.py apps/unet2d --app --weights models/model.pt",
    "start": (
        "MONAI_LABEL_AUTO_UPDATE_SCORING=false monailabel start_server --app apps/unet2d --studies studies "
        "--host 127.0.0.1 --port 8000 --conf models unet2d_segmentation --conf zoo_source github "
        "--conf epistemic_model unet2d_segmentation"
    ),
    "info": "curl -s http://127.0.0.1:8000/info/",
    "infer": (
        "curl -s -X POST \"http://127.0.0.1:8000/infer/unet2d_segmentation?image=study_0&output=image\" "
        "-F 'params={\"tta\": true, \"fill_holes\": true}' -o study_0_label.png"
    ),
    "label": "curl -s -X PUT \"http://127.0.0.1:8000/datastore/label?image=study_0&tag=final\" -F \"label=@masks/study_0.png\"",
    "train": (
        "curl -s -X POST \"http://127.0.0.1:8000/train/unet2d_segmentation?run_sync=true\" -H \"Content-Type: application/json\" "
        "-d '{\"max_epochs\": 15, \"learning_rate\": 0.01, \"input_size\": 32, \"val_split\": 0.4, \"multi_gpu\": false}'"
    ),
    "scoring": (
        "curl -s -X POST \"http://127.0.0.1:8000/scoring/unet2d_segmentation?run_sync=true\" "
        "-H \"Content-Type: application/json\" -d '{}'"
    ),
    "next": "curl -s -X POST http://127.0.0.1:8000/activelearning/epistemic -H \"Content-Type: application/json\" -d '{}'",
}
#: a second bundle whose class names have capitals and spaces (MONAI Label lower-cases them)
ORGANS = "organs_segmentation"
ORGAN_NAMES = ["Background", "Liver Tumour", "Blood Vessel"]
#: every HTTP call gives up after this many seconds (training is the slowest: about 20 s here)
HTTP_TIMEOUT = 240


def _curl(command: str, port: int, cwd: Path) -> requests.Response:
    """Run one README curl line with ``requests``: -X, -H, -F (``@file`` uploads), -d and -o are understood."""
    import shlex

    args = shlex.split(command.replace(f":{README_PORT}/", f":{port}/"))
    assert args[0] == "curl", command
    method, url, headers, files, data, out = "GET", None, {}, {}, None, None
    i = 1
    while i < len(args):
        a = args[i]
        if a == "-s":
            i += 1
            continue
        if a in ("-X", "-H", "-F", "-d", "-o"):
            value = args[i + 1]
            if a == "-X":
                method = value
            elif a == "-H":
                k, v = value.split(":", 1)
                headers[k.strip()] = v.strip()
            elif a == "-F":
                k, v = value.split("=", 1)
                files[k] = (Path(v[1:]).name, (cwd / v[1:]).read_bytes()) if v.startswith("@") else (None, v)
            elif a == "-d":
                data = value
            else:
                out = cwd / value
            i += 2
            continue
        url = a
        i += 1
    response = requests.request(method, url, headers=headers, files=files or None, data=data, timeout=HTTP_TIMEOUT)
    if out is not None and response.ok:
        out.write_bytes(response.content)
    return response


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_disk_image(path: Path, size: tuple[int, int], centre: tuple[float, float], radius: float, seed: int) -> np.ndarray:
    """An RGB picture of one orange disk on dark noise (as the training data); returns the disk mask."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    image = rng.integers(0, 70, size=(h, w, 3)).astype(np.uint8)
    image[disk] = (210, 90, 40)
    Image.fromarray(image, "RGB").save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(image, "RGB").save(path)
    return disk


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def _patch_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split("#")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(data, indent=4))


def _organ_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """3-class weights: class 1 ("Liver Tumour") where red > 0.5, class 2 ("Blood Vessel") everywhere else, never 0."""
    out = _red_threshold_weights(state)
    w = out["final_conv.weight"]
    w.zero_()
    w[(1, 0, *[0] * (w.dim() - 2))] = 4.0
    out["final_conv.bias"].copy_(torch.tensor([0.0, -2.0, 1.0]))
    return out


def _shifted_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The red-threshold weights with the first tap one pixel to the right: the mask is the disk shifted left.

    Flipping the image moves that shift to the other side, so test-time augmentation (the average over
    flips) changes the map, where the centred rule is flip-symmetric and would not show it.
    """
    out = _red_threshold_weights(state)
    w = out["conv_0.conv_0.conv.weight"]
    c = w.shape[2] // 2
    w.zero_()
    w[0, 0, c, c + 1] = 1.0
    return out


def _post_processing_image(path: Path) -> dict[str, tuple[int, int]]:
    """64x64 picture: a ring (disk with a dark hole), a small disk and a 2x2 speck; returns a pixel of each."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:64, 0:64]
    image = rng.integers(0, 70, size=(64, 64, 3)).astype(np.uint8)
    ring = ((yy - 32) ** 2 + (xx - 20) ** 2 <= 14**2) & ((yy - 32) ** 2 + (xx - 20) ** 2 > 4**2)
    small = (yy - 12) ** 2 + (xx - 52) ** 2 <= 5**2
    image[ring | small] = (210, 90, 40)
    image[54:56, 52:54] = (210, 90, 40)
    Image.fromarray(image, "RGB").save(path)
    return {"ring": (32, 8), "hole": (32, 20), "small": (12, 52), "speck": (54, 52)}


@pytest.fixture(scope="module")
def server(packaged: dict[str, Path], stand_in_pythonpath: str):
    """`monailabel start_server` over a fresh app from the README's commands; stopped by pid at the end."""
    walk = packaged["root"] / "walkthrough"
    (walk / "studies").mkdir(parents=True)
    (walk / "masks").mkdir()
    (walk / "models").mkdir()
    weights = packaged["root"] / "stage" / NAME / "models" / "model.pt"
    (walk / "models" / "model.pt").write_bytes(weights.read_bytes())
    package = WALKTHROUGH["package"].replace("python scripts/", f"{sys.executable} {REPO}/scripts/").split()
    _run(package, cwd=walk)
    app = walk / "apps" / "unet2d"
    assert (app / "main.py").is_file() and (app / "model" / NAME / PACKAGE).is_dir()
    # the second bundle: 3 classes whose names carry capitals and spaces
    script = str(REPO / "scripts" / "package_bundle.py")
    _run([sys.executable, script, str(app / "model"), "--name", ORGANS, "--no_weights"], cwd=walk)
    organs = app / "model" / ORGANS
    _patch_json(organs / "configs" / "metadata.json", **{
        "network_data_format#outputs#pred#channel_def": {str(i): n for i, n in enumerate(ORGAN_NAMES)},
        "network_data_format#outputs#pred#num_channels": 3,
    })
    for config in ("inference.json", "train.json"):
        _patch_json(organs / "configs" / config, num_classes=3, class_names=ORGAN_NAMES)
    (organs / "models").mkdir()
    torch.save(_organ_weights(_basic_unet_state(3)), organs / "models" / "model.pt")
    # tiny images: 32 px by default for inference, scoring and training (each request may still choose)
    for bundle in (app / "model" / NAME, organs):
        for config in ("inference.json", "train.json"):
            _patch_json(bundle / "configs" / config, **{"displayable_configs#input_size": 32})
    bundle = app / "model" / NAME
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    torch.save(_red_threshold_weights(state), bundle / "models" / "probe.pt")
    torch.save(_shifted_weights(state), bundle / "models" / "probe_shift.pt")

    truths = {}
    for i, size in enumerate(SIZES[:5]):
        _write_pair(walk / "studies" / f"study_{i}.png", walk / "masks" / f"study_{i}.png", size, seed=200 + i, mask_scale=1)
        truths[f"study_{i}"] = np.asarray(Image.open(walk / "masks" / f"study_{i}.png")) > 0
    # unlabelled: one like the training pictures, one unlike them (coloured stripes and noise)
    _write_pair(walk / "studies" / "like.png", None, (44, 52), seed=300)
    rng = np.random.default_rng(301)
    unlike = rng.integers(0, 256, size=(44, 52, 3)).astype(np.uint8)
    unlike[:, ::4] = (40, 200, 230)
    unlike[::6] = (230, 230, 230)
    Image.fromarray(unlike, "RGB").save(walk / "studies" / "unlike.png")

    env = _env()
    env.update(MONAILABEL_PYEXE=sys.executable, MONAI_LABEL_SESSIONS="false")
    if stand_in_pythonpath:
        env["PYTHONPATH"] = stand_in_pythonpath
    start = WALKTHROUGH["start"].split()
    assignments = [a for a in start if "=" in a and a.split("=")[0].isupper()]
    env.update(a.split("=", 1) for a in assignments)
    start = [a for a in start if a not in assignments]
    start[0] = str(Path(sys.executable).parent / "monailabel")
    start += ["--conf", "models", f"{NAME},{ORGANS}"]  # a later --conf wins: serve both bundles
    log_path = walk / "server.log"
    proc, port = None, None
    try:
        for _attempt in range(3):  # the port was free a moment ago; another process may take it first
            port = _free_port()
            args = [a if a != README_PORT else str(port) for a in start]
            with open(log_path, "w") as log:
                proc = subprocess.Popen(args, cwd=walk, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 120
            up = False
            for _poll in range(240):  # at most 240 polls and 120 s
                if time.monotonic() > deadline or proc.poll() is not None:
                    break
                try:
                    up = requests.get(f"http://127.0.0.1:{port}/info/", timeout=5).ok
                except requests.RequestException:
                    up = False
                if up:
                    break
                time.sleep(1)
            if up:
                break
            log_text = log_path.read_text()
            _stop(proc)
            proc = None
            if "address already in use" not in log_text.lower():
                pytest.fail(f"monailabel start_server did not answer /info/ within 120 s:\n{log_text[-4000:]}")
        assert proc is not None, "no free port for monailabel start_server after 3 tries"
        yield {"port": port, "walk": walk, "app": app, "bundle": bundle, "organs": organs, "log": log_path, "truths": truths}
    finally:
        if proc is not None:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server by its process id: SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _basic_unet_state(out_channels: int) -> dict[str, torch.Tensor]:
    """A state dict of the bundle's default network (BasicUNet, 16 base features) with ``out_channels`` outputs."""
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=out_channels, features=(16, 32, 64, 128, 256, 16), norm="batch")
    return net.state_dict()


def _infer(server: dict, image_id: str = "", upload: Path | None = None, model: str = NAME, **params) -> np.ndarray:
    """POST /infer/<model>?output=image for a datastore image or an uploaded file; returns the label map."""
    files = {"params": (None, json.dumps({"device": "cpu", **params}))}
    if upload is not None:
        files["file"] = (upload.name, upload.read_bytes())
    query = {"output": "image", **({"image": image_id} if image_id else {})}
    response = requests.post(f"http://127.0.0.1:{server['port']}/infer/{model}", params=query, files=files, timeout=HTTP_TIMEOUT)
    if not response.ok:
        pytest.fail(f"/infer/{model} answered {response.status_code}: {response.text[:2000]}\n{server['log'].read_text()[-3000:]}")
    name = response.headers.get("content-disposition", "").split("filename=")[-1].strip('"; ')
    out = server["walk"] / f"result{''.join(Path(name).suffixes) or '.png'}"
    out.write_bytes(response.content)
    if out.name.endswith((".nii", ".nii.gz")):
        import nibabel

        return np.asarray(nibabel.load(out).dataobj)
    return np.asarray(Image.open(out))


def _get(server: dict, path: str, **params) -> dict:
    response = requests.get(f"http://127.0.0.1:{server['port']}{path}", params=params, timeout=HTTP_TIMEOUT)
    assert response.ok, f"{path} answered {response.status_code}: {response.text[:2000]}"
    return response.json()


def test_server_info_shows_a_2d_model_its_labels_and_the_annotator_options(server: dict) -> None:
    """/info/: 2D segmentation models; class names lower-cased by MONAI Label but at their indices; no background."""
    response = _curl(WALKTHROUGH["info"], server["port"], server["walk"])
    assert response.ok, response.text
    info = response.json()
    model, organs = info["models"][NAME], info["models"][ORGANS]
    assert model["dimension"] == 2 and model["type"] == "segmentation"
    assert model["labels"] == {"foreground": 1}
    # "Liver Tumour" and "Blood Vessel" keep their indices under MONAI Label's lower-casing; "Background" is not offered
    assert organs["labels"] == {"liver tumour": 1, "blood vessel": 2}
    assert sorted(info["labels"]) == ["blood vessel", "foreground", "liver tumour"]
    assert not any("background" in name.lower() for name in info["labels"])
    # what the annotator can choose: inference options and training options, from displayable_configs
    infer_options = {"input_size": 32, "tta": "auto", "sliding_window": "auto", "keep_largest_component": "auto",
                     "fill_holes": "auto", "remove_smaller_than": "auto"}
    assert infer_options.items() <= model["config"].items()
    train = info["trainers"][NAME]["config"]
    assert {"max_epochs": 100, "learning_rate": 0.001, "input_size": 32, "val_split": 0.2}.items() <= train.items()
    assert "epistemic" in info["strategies"] and NAME in info["scoring"]


def test_server_infers_png_jpeg_and_nifti_at_their_size_and_orientation(server: dict) -> None:
    """/infer on PNG (datastore), JPEG and NIfTI (uploaded): class indices 0/1 at the original size, on the object."""
    walk, truths = server["walk"], server["truths"]
    label = _infer(server, "study_1", model_filename="probe.pt", input_size=64)
    assert label.shape == truths["study_1"].shape and label.dtype.kind in "ui"
    assert set(np.unique(label).tolist()) == {0, 1}
    assert _dice(label == 1, truths["study_1"]) > 0.9

    jpeg = walk / "upload.jpg"
    disk = _write_disk_image(jpeg, (46, 62), (15.0, 40.0), 9.0, seed=7)
    # MONAI Label writes the label in the image's format unless told otherwise: a JPEG label would be lossy
    label = _infer(server, upload=jpeg, model_filename="probe.pt", input_size=64, result_extension=".png")
    assert label.shape == (46, 62) and set(np.unique(label).tolist()) == {0, 1}
    assert _dice(label == 1, disk) > 0.9, "the JPEG's mask is not on its disk (flipped or transposed?)"

    import nibabel

    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:38, 0:58]
    disk = (yy - 12) ** 2 + (xx - 40) ** 2 <= 8**2
    slice_ = rng.integers(0, 70, size=(38, 58)).astype(np.float32)
    slice_[disk] = 200.0
    nifti = walk / "upload.nii.gz"
    affine = np.array([[0.0, -0.5, 0.0, 12.0], [0.7, 0.0, 0.0, -30.0], [0.0, 0.0, 2.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
    nibabel.save(nibabel.Nifti1Image(slice_, affine), nifti)
    label = np.squeeze(_infer(server, upload=nifti, model_filename="probe.pt", input_size=64))
    assert label.shape == (38, 58), f"NIfTI label {label.shape} is not the slice's shape (38, 58)"
    # the label lies where the slice lies: same affine (MONAI Label alone writes 2D labels without it)
    np.testing.assert_allclose(nibabel.load(walk / "result.nii.gz").affine, affine, atol=1e-6)
    assert set(np.unique(label).tolist()) == {0, 1}
    assert _dice(label == 1, disk) > 0.9, "the NIfTI label is not on its disk in the slice's own index order"


def _write_dicom_disk(path: Path, size: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """A 16-bit MONOCHROME1 X-ray-like DICOM file (no suffix needed) with a dark disk, bright once inverted; returns the disk."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    stored = np.where(disk, 300, 3000).astype(np.uint16)  # MONOCHROME1: low values are bright
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "ANON", "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = h, w, 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=True)
    else:  # MONAI Label 0.8.5 pins pydicom 2.4
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
    return disk


def test_server_infers_a_dicom_image_as_a_label_map(server: dict) -> None:
    """/infer on an uploaded DICOM (MONOCHROME1, read with MONAI Label's own pydicom): a 0/1 map at rows x columns, on the disk."""
    dicom = server["walk"] / "upload.dcm"
    disk = _write_dicom_disk(dicom, (42, 56), (14.0, 38.0), 9.0)
    label = _infer(server, upload=dicom, model_filename="probe.pt", input_size=64, result_extension=".png")
    assert label.shape == (42, 56) and set(np.unique(label).tolist()) == {0, 1}
    assert _dice(label == 1, disk) > 0.9, "the DICOM's mask is not on its disk (not inverted, flipped or transposed?)"


def test_server_honours_the_inference_options(server: dict) -> None:
    """input_size, keep_largest_component, fill_holes, remove_smaller_than and tta, each chosen per request."""
    walk = server["walk"]
    picture = walk / "shapes.png"
    at = _post_processing_image(picture)

    def infer(**options):
        label = _infer(server, upload=picture, model_filename="probe.pt", **{"input_size": 64, **options})
        return {name: int(label[yx]) for name, yx in at.items()}, label

    base, base_map = infer()
    assert base == {"ring": 1, "hole": 0, "small": 1, "speck": 1}
    assert infer(keep_largest_component=True)[0] == {"ring": 1, "hole": 0, "small": 0, "speck": 0}
    assert infer(fill_holes=True)[0] == {"ring": 1, "hole": 1, "small": 1, "speck": 1}
    assert infer(remove_smaller_than=10)[0] == {"ring": 1, "hole": 0, "small": 1, "speck": 0}
    coarse, coarse_map = infer(input_size=16)  # a 2x2 speck does not survive a 4x smaller input
    assert coarse["speck"] == 0 and coarse["ring"] == 1 and coarse_map.shape == base_map.shape
    # sliding_window: no resize, 16 px patches at the image's own resolution, so the speck stays
    windows, windows_map = infer(input_size=16, sliding_window=True)
    assert windows == base and windows_map.shape == base_map.shape

    # tta: averaging over flips changes what the (deliberately asymmetric) network draws, exactly as the
    # bundle's own inference does with --tta true
    plain = _infer(server, upload=picture, model_filename="probe_shift.pt", input_size=64)
    tta = _infer(server, upload=picture, model_filename="probe_shift.pt", input_size=64, tta=True)
    assert not np.array_equal(plain, tta), "tta=true gave the same map as tta=false"
    in_dir, out_dir = walk / "cli_in", walk / "cli_out"
    in_dir.mkdir()
    (in_dir / picture.name).write_bytes(picture.read_bytes())
    _run(
        [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input_dir", str(in_dir),
            "--output_dir", str(out_dir), "--ckpt_path", "models/probe_shift.pt", "--num_workers", "0", "--device", "cpu",
            "--bundle_root", ".", "--spatial_size", "[64,64]", "--tta", "true",
        ],
        cwd=server["bundle"],
    )
    cli = np.asarray(Image.open(out_dir / picture.name)).astype(np.int64)
    np.testing.assert_array_equal(tta.astype(np.int64) * 255, cli)


def test_server_label_values_are_the_bundles_class_indices(server: dict) -> None:
    """The 3-class bundle: MONAI Label's map holds 1 ("Liver Tumour") on the disk and 2 ("Blood Vessel") elsewhere."""
    picture = server["walk"] / "organs.png"
    disk = _write_disk_image(picture, (40, 50), (20.0, 30.0), 8.0, seed=9)
    label = _infer(server, upload=picture, model=ORGANS)
    assert label.shape == (40, 50) and set(np.unique(label).tolist()) == {1, 2}
    assert _dice(label == 1, disk) > 0.9 and _dice(label == 2, ~disk) > 0.9
    files = {"params": (None, json.dumps({"device": "cpu"})), "file": (picture.name, picture.read_bytes())}
    response = requests.post(
        f"http://127.0.0.1:{server['port']}/infer/{ORGANS}", params={"output": "json"}, files=files, timeout=HTTP_TIMEOUT
    )
    assert response.ok and response.json()["label_names"] == {"liver tumour": 1, "blood vessel": 2}


@pytest.fixture(scope="module")
def trained(server: dict) -> dict:
    """The README's steps: infer, save 5 labels through /datastore/label, train through /train."""
    port, walk, bundle = server["port"], server["walk"], server["bundle"]
    response = _curl(WALKTHROUGH["infer"], port, walk)
    assert response.ok, response.text[:2000]
    first = np.asarray(Image.open(walk / "study_0_label.png"))
    assert first.shape == server["truths"]["study_0"].shape and set(np.unique(first).tolist()) <= {0, 1}
    before = np.asarray(Image.open(walk / "study_0_label.png")).copy()
    for i in range(5):
        response = _curl(WALKTHROUGH["label"].replace("study_0", f"study_{i}"), port, walk)
        assert response.ok and response.json()["label"] == f"study_{i}", response.text[:2000]
    assert _get(server, "/info/")["datastore"]["completed"] == 5
    model_pt = bundle / "models" / "model.pt"
    digest, mtime = _digest(model_pt), model_pt.stat().st_mtime_ns
    started = time.monotonic()
    response = _curl(WALKTHROUGH["train"], port, walk)
    seconds = time.monotonic() - started
    assert response.ok, f"/train answered {response.status_code}: {response.text[:2000]}\n{server['log'].read_text()[-4000:]}"
    log_offset = len(server["log"].read_text())
    after = _infer(server, "study_0", tta=True, fill_holes=True)
    reload_log = server["log"].read_text()[log_offset:]
    return {"before": before, "after": after, "digest": digest, "mtime": mtime, "seconds": seconds, "reload_log": reload_log}


def test_server_trains_on_the_saved_labels_with_the_chosen_settings(server: dict, trained: dict) -> None:
    """/train rewrites models/model.pt with max_epochs, learning_rate, input_size and val_split as sent; /infer then uses it."""
    bundle, log = server["bundle"], server["log"].read_text()
    model_pt = bundle / "models" / "model.pt"
    assert model_pt.stat().st_mtime_ns > trained["mtime"] and _digest(model_pt) != trained["digest"], "model.pt was not rewritten"
    assert "Total Records in Dataset: 5; Validation Split: 0.4" in log
    assert "Total Records for Training: 3" in log and "Total Records for Validation: 2" in log
    rows = (bundle / "logs" / "curves.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 15, f"{len(rows)} epochs in logs/curves.csv, not the 15 requested"
    header = (bundle / "logs" / "curves.csv").read_text().splitlines()[0].split(",")
    first_lr = float(rows[0].split(",")[header.index("learning_rate")])
    assert 0.005 < first_lr <= 0.01, f"the first epoch's learning rate {first_lr} is not the requested 0.01 (flat, then annealed)"
    assert json.loads((bundle / "logs" / "data_check.json").read_text())["spatial_size"] == [32, 32]
    assert "Reload model from cache" in trained["reload_log"], "the /infer after training did not load the new model.pt"
    assert not np.array_equal(trained["before"], trained["after"]), "the map before and after training is the same"


def test_epistemic_active_learning_ranks_the_unlike_image_first(server: dict, trained: dict) -> None:
    """Monte Carlo dropout scoring (network_def gets dropout) puts the unlike picture above the one like the training data."""
    port, walk = server["port"], server["walk"]
    response = _curl(WALKTHROUGH["scoring"], port, walk)
    assert response.ok, f"/scoring answered {response.status_code}: {response.text[:2000]}\n{server['log'].read_text()[-4000:]}"
    assert response.json()["executed"] == 2  # the two unlabelled pictures
    scores = {i: _get(server, "/datastore/image/info", image=i)["epistemic_entropy"] for i in ("like", "unlike")}
    assert scores["unlike"] > 2 * scores["like"], f"epistemic entropies {scores}"
    response = _curl(WALKTHROUGH["next"], port, walk)
    assert response.ok and response.json()["id"] == "unlike", response.text[:2000]


def test_readme_walkthrough_is_the_commands_these_tests_run() -> None:
    """Every command the server tests run appears verbatim in the README's MONAI Label section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## MONAI Label and the model zoo", 1)[1].split("\n## ", 1)[0]
    text = section.replace(" \\\n    ", " ")
    missing = [name for name, command in WALKTHROUGH.items() if command not in text]
    assert not missing, f"README's MONAI Label section lacks the commands: {missing}"
