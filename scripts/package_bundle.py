"""Write a distributable copy of the bundle (a folder and its zip), as the MONAI model zoo ships bundles.

The folder ``OUT_DIR/NAME/`` holds ``configs/`` (every ``*.json`` plus ``logging.conf``), ``docs/``,
``LICENSE``, ``README.md``, ``models/model.pt`` when weights are given or present, and a copy of the
``monai_unet_bundle`` package.  The training plan beside the weights (``plan.json``) is shipped too,
and written into the metadata and the stand-alone configs (:func:`apply_plan`), so MONAI Label
builds, trains and describes the model that was trained.  Without a plan, the shipped configs say the
settings of old explicitly (binary, RGB, 512x512, min-max; :data:`UNPLANNED`), because MONAI Label
trains on its own datastore, which a plan made from ``dataset_dir`` would not see.  The package sits at the bundle root because MONAI Label puts the
bundle folder first on ``sys.path`` before it parses the configs, and ``python -m monai.bundle run``
run from inside the folder finds it on the current directory: either way the configs' imports work
without installing anything.  ``OUT_DIR/NAME_vVERSION.zip`` holds the same folder (``NAME/...``) with
the version from ``configs/metadata.json``, the layout ``monai.bundle download`` unpacks.

    python scripts/package_bundle.py dist                              # dist/unet2d_segmentation/ + zip
    python scripts/package_bundle.py dist --weights runs/best/model.pt --force
    python scripts/package_bundle.py dist --no_weights                 # configs and code only
    python scripts/package_bundle.py ~/apps/monaibundle/model          # ready for MONAI Label's monaibundle app
    python scripts/package_bundle.py apps/unet2d --app                 # a whole MONAI Label app: main.py + model/NAME/

With ``--app`` OUT_DIR becomes a MONAI Label app folder: ``OUT_DIR/main.py`` (:data:`APP_MAIN`, the
``monaibundle`` sample app's bundle handling plus the ``epistemic`` active-learning strategy, which the
sample app of MONAI Label 0.8.5 scores but does not offer, and NIfTI labels that keep the image's affine)
and the bundle in ``OUT_DIR/model/NAME/``.

Without ``--weights`` or ``--no_weights`` the repository's ``models/model.pt`` is shipped when it exists.

:func:`bundle_requirements` lists what installing the bundle the model zoo's way puts in an
environment (``monai``, ``torch`` and ``numpy`` at the metadata's versions plus every
``required_packages_version`` entry, pinned); ``scripts/test_monailabel.sh`` installs exactly
that, so the MONAI Label tests run on what the metadata declares and nothing more.

MONAI Label infers the task from the folder name, so NAME must contain ``segmentation``.  An
existing non-empty output folder (or zip) is never overwritten unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

#: the repository root, which is the bundle root the copy is made from
REPO = Path(__file__).resolve().parents[1]
#: the folder name MONAI Label sees; "segmentation" in it makes MONAI Label treat the model as a segmentation model
DEFAULT_NAME = "unet2d_segmentation"
#: the Python package the configs import
PACKAGE = "monai_unet_bundle"
#: the training plan beside model.pt (monai_unet_bundle.plan.PLAN_FILE; not imported: this script runs without the package installed)
PLAN_FILE = "plan.json"
#: files that never belong in a distributed bundle
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")
EXIT_USAGE = 2


#: ``main.py`` of the app ``--app`` writes (MONAI Label 0.8.5): every bundle named by ``--conf models`` is one
#: infer and one train task, as in MONAI Label's ``monaibundle`` sample app (NIfTI labels keep the image's
#: affine, which MONAI Label drops for 2D); with ``--conf epistemic_model NAME``
#: the bundle is also scored by Monte Carlo dropout and ``/activelearning/epistemic`` serves the most uncertain
#: unlabelled image first
APP_MAIN = '''"""MONAI Label app written by monai-unet-bundle's scripts/package_bundle.py --app (MONAI Label 0.8.5).

    monailabel start_server --app APP --studies IMAGES --conf models unet2d_segmentation --conf zoo_source github \\
        [--conf epistemic_model unet2d_segmentation] [--conf epistemic_dropout 0.2] [--conf epistemic_simulation_size 5]
"""

import logging

import monailabel
from monai.transforms import Invertd, SaveImaged
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import get_bundle_models, strtobool

logger = logging.getLogger(__name__)


class Bundle2DInferTask(BundleInferTask):
    """BundleInferTask whose NIfTI label maps keep the image's affine (spacing, origin, direction).

    MONAI Label 0.8.5 writes 2D labels through ITK without the affine, so a viewer would place the
    label of a NIfTI slice with non-default geometry somewhere else than the slice; the label's
    array is right, so only its header is rewritten here, with the affine the image was read with.
    """

    def writer(self, data, extension=None, dtype=None):
        label_file, result = super().writer(data, extension, dtype)
        affine = (data.get("image_meta_dict") or {}).get("affine")
        if isinstance(label_file, str) and label_file.lower().endswith((".nii", ".nii.gz")) and affine is not None:
            import nibabel
            import numpy as np

            label = nibabel.load(label_file)
            if len(label.shape) == 2:
                array = np.asarray(label.dataobj)
                nibabel.save(nibabel.Nifti1Image(array, np.asarray(affine, dtype=np.float64)), label_file)
        return label_file, result


class SequentialEpistemicScoring(EpistemicScoring):
    """Epistemic scoring one image at a time (MONAI Label's default is 2 threads).

    The threads share one bundle config, which ``BundleInferTask`` re-parses on every request of a
    bundle with ``displayable_configs``: two at once fail with "can not find expected ID".
    """

    def __call__(self, request, datastore):
        return super().__call__({"max_workers": 1, **request}, datastore)


class BundleApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.models = get_bundle_models(app_dir, conf)
        epistemic = conf.get("epistemic_model")
        self.epistemic_models = get_bundle_models(app_dir, conf, conf_key="epistemic_model") if epistemic else {}
        self.epistemic_max_samples = int(conf.get("epistemic_max_samples", "0"))
        self.epistemic_simulation_size = int(conf.get("epistemic_simulation_size", "5"))
        self.epistemic_dropout = float(conf.get("epistemic_dropout", "0.2"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"monai-unet-bundle app (MONAI Label {monailabel.__version__})",
            description="2D U-Net bundles served as MONAI Label models",
            version=monailabel.__version__,
        )

    def init_infers(self):
        return {name: Bundle2DInferTask(path, self.conf) for name, path in self.models.items()}

    def init_trainers(self):
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers = {}
        for name, path in self.models.items():
            task = BundleTrainTask(path, self.conf)
            if task and task.is_valid():
                trainers[name] = task
        return trainers

    def init_strategies(self):
        strategies = {"random": Random(), "first": First()}
        if self.epistemic_models:
            strategies["epistemic"] = Epistemic()
        return strategies

    def init_scoring_methods(self):
        methods = {}
        for name, path in self.epistemic_models.items():
            # the network in training mode with dropout written into network_def: Monte Carlo dropout
            task = BundleInferTask(
                path, self.conf, train_mode=True, skip_writer=True, dropout=self.epistemic_dropout,
                post_filter=[SaveImaged, Invertd],
            )
            methods[name] = SequentialEpistemicScoring(
                task, max_samples=self.epistemic_max_samples, simulation_size=self.epistemic_simulation_size
            )
        logger.info(f"Active learning scoring methods: {list(methods)}")
        return methods
'''


class PackagingError(Exception):
    """A problem with the command line or the source tree, explained in one sentence."""


def _is_nonempty(path: Path) -> bool:
    """Whether ``path`` exists and is anything but an empty folder."""
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def bundle_version(source: Path = REPO) -> str:
    """Return ``version`` from ``source/configs/metadata.json``.

    Raises:
        PackagingError: when the file is missing, not JSON, or has no version.
    """
    meta_file = source / "configs" / "metadata.json"
    try:
        version = json.loads(meta_file.read_text()).get("version")
    except (OSError, ValueError) as exc:
        raise PackagingError(f"cannot read the bundle version from {meta_file} ({exc}).") from None
    if not version:
        raise PackagingError(f"{meta_file} has no 'version': add one such as \"0.1.0\".")
    return str(version)


def bundle_requirements(source: Path = REPO) -> list[str]:
    """The pip requirements the model zoo derives from ``source/configs/metadata.json``.

    ``monai==monai_version``, ``torch==pytorch_version``, ``numpy==numpy_version``, then each
    ``required_packages_version`` entry as ``name==version`` (a version that starts with an
    operator such as ``>=`` is kept as written), as the model zoo's CI does.  The packages in
    ``extra_packages_version`` only add outputs and are not listed.

    Raises:
        PackagingError: when the file is missing or not JSON, or ``required_packages_version`` is
            not a mapping of names to versions.
    """
    meta_file = source / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise PackagingError(f"cannot read the package versions from {meta_file} ({exc}).") from None
    pins = [("monai", meta.get("monai_version")), ("torch", meta.get("pytorch_version")), ("numpy", meta.get("numpy_version"))]
    required = meta.get("required_packages_version", {})
    if not isinstance(required, dict):
        raise PackagingError(f"{meta_file}: required_packages_version must map package names to versions.")
    lines = []
    for name, version in [*pins, *required.items()]:
        if version is None:
            continue
        version = str(version).strip()
        if not version:
            lines.append(name)
        else:
            lines.append(f"{name}{version}" if version[0] in "<>=!~" else f"{name}=={version}")
    return lines


def check_weights(weights: Path) -> None:
    """Check that ``weights`` is a plain state dict (tensor per parameter name), as MONAI Label loads it.

    Raises:
        PackagingError: when the file is missing, unreadable, or holds something else.
    """
    if not weights.is_file():
        raise PackagingError(f"--weights {str(weights)!r} does not exist: pass the path of a model.pt written by training.")
    import torch

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file cannot be shipped
        raise PackagingError(f"--weights {str(weights)!r} cannot be read by torch.load ({type(exc).__name__}: {exc}).") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PackagingError(
            f"--weights {str(weights)!r} is not a plain state dict of network_def (name -> tensor), which MONAI Label expects."
        )


def copy_bundle(dest: Path, weights: Path | None, source: Path = REPO) -> None:
    """Copy the bundle's distributable files from ``source`` into the empty or new folder ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    configs = dest / "configs"
    configs.mkdir()
    for path in sorted((source / "configs").iterdir()):
        if path.is_file() and (path.suffix == ".json" or path.name == "logging.conf"):
            shutil.copy2(path, configs / path.name)
    if (source / "docs").is_dir():
        shutil.copytree(source / "docs", dest / "docs", ignore=IGNORED)
    for name in ("LICENSE", "README.md"):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    shutil.copytree(source / PACKAGE, dest / PACKAGE, ignore=IGNORED)
    plan = None
    if weights is not None:
        (dest / "models").mkdir()
        shutil.copy2(weights, dest / "models" / "model.pt")
        own = weights.with_name(f"{weights.stem}.{PLAN_FILE}")  # an earlier run's kept model has its own plan
        plan_file = own if own.is_file() else weights.parent / PLAN_FILE
        network = trained_network(weights, source)
        if plan_file.is_file():
            plan = json.loads(plan_file.read_text())
            apply_plan(dest, {**network, **plan})  # a plan from before the network was kept in it: the weights tell
        else:
            freeze_settings(dest, {**UNPLANNED, **network})
    if plan is None and weights is None:
        freeze_settings(dest, UNPLANNED)


def trained_network(weights: Path, source: Path = REPO) -> dict:
    """``architecture``, ``base_features`` (read from the weights' tensor shapes) and ``activation`` (ELU, which
    the weights cannot tell) of a model of this bundle, for configs that must build it; ``{}`` for other files."""
    sys.path.insert(0, str(source))
    try:
        from monai_unet_bundle.plan import checkpoint_settings, fill_network
    finally:
        sys.path.remove(str(source))
    found = checkpoint_settings(weights)
    return fill_network({}, found) if found else {}


#: plan items written into the shipped configs as explicit settings
FROZEN = ("num_classes", "class_names", "in_channels", "normalization", "batch_size", "patch_training", "architecture",
          "base_features", "activation")
#: what a bundle shipped without a plan says explicitly: MONAI Label trains on its datastore, which the
#: plan cannot read (it plans from dataset_dir), so the shipped configs keep the settings of old
#: (spatial_size stays auto: inference reads it from models/plan.json, else 512x512, and MONAI Label's input_size sets it)
UNPLANNED = {"num_classes": 2, "in_channels": 3, "normalization": "minmax", "batch_size": 4, "class_weights": None}


def freeze_settings(bundle: Path, values: dict) -> None:
    """Write ``values`` as the top-level settings of the shipped ``train.json`` and ``inference.json`` (where each has the id)."""
    for name in ("train.json", "inference.json"):
        path = bundle / "configs" / name
        config = json.loads(path.read_text())
        config.update({k: v for k, v in values.items() if k in config})
        path.write_text(json.dumps(config, indent=4) + "\n")


def apply_plan(bundle: Path, plan: dict) -> None:
    """Ship the plan the weights were trained with: ``models/plan.json``, the metadata, and the stand-alone configs.

    MONAI Label trains and infers from ``train.json`` and ``inference.json`` on data of its own
    datastore and reads the model's input and output from ``metadata.json``, so the plan's classes,
    channels, normalisation, batch size, class weights and network become those files' settings (instead of
    ``auto``; ``spatial_size`` stays ``auto``, read from ``models/plan.json`` unless MONAI Label's
    ``input_size`` sets it), and the metadata's ``channel_def``, ``num_channels`` and
    ``spatial_shape`` describe the model (``is_patch_data`` for a model trained on patches).
    """
    (bundle / "models" / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    configs = bundle / "configs"
    values = {k: plan[k] for k in FROZEN if k in plan}
    values["class_weights"] = plan.get("class_weights")
    values.update({k: plan[k] for k in ("mask_palette", "mask_thresholds") if plan.get(k) is not None})
    freeze_settings(bundle, values)
    meta_file = configs / "metadata.json"
    meta = json.loads(meta_file.read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    rgb = plan["in_channels"] == 3
    image.update({
        "num_channels": plan["in_channels"], "modality": "RGB" if rgb else "grayscale",
        "channel_def": {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "intensity"},
        "spatial_shape": list(plan["spatial_size"]),
        "is_patch_data": bool(plan.get("patch_training")),
        "value_range": [0, 1] if plan.get("normalization") in ("unit", "minmax") else [],
    })
    pred.update({
        "num_channels": plan["num_classes"], "spatial_shape": list(plan["spatial_size"]),
        "channel_def": {str(i): n for i, n in enumerate(plan["class_names"])},
    })
    meta_file.write_text(json.dumps(meta, indent=4) + "\n")


def write_zip(folder: Path, zip_path: Path) -> None:
    """Zip ``folder`` so that every entry starts with ``folder.name/``, as model-zoo zips do."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(folder.name) / path.relative_to(folder))


def package_bundle(
    out_dir: Path, name: str = DEFAULT_NAME, weights: Path | None = None, force: bool = False, source: Path = REPO
) -> tuple[Path, Path]:
    """Write ``out_dir/name/`` and ``out_dir/name_vVERSION.zip``.

    The folder is assembled in a temporary sibling and renamed into place, so an interrupted run
    never leaves a half-written bundle behind.

    Args:
        out_dir: folder that receives the bundle folder and the zip (created when missing).
        name: bundle folder name; must contain ``segmentation`` and be a plain folder name.
        weights: ``model.pt`` to ship as ``models/model.pt``; ``None`` ships no weights.
        force: replace an existing bundle folder and zip of the same name.
        source: bundle root to copy from (the repository by default).

    Returns:
        ``(folder, zip_path)``.

    Raises:
        PackagingError: on a bad name, unreadable weights, or an existing output without ``force``.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise PackagingError(f"--name {name!r} must be a plain folder name such as {DEFAULT_NAME!r}.")
    if "segmentation" not in name.lower():
        raise PackagingError(
            f"--name {name!r} must contain 'segmentation' because MONAI Label infers the task from the folder name; "
            f"use e.g. {DEFAULT_NAME!r}."
        )
    if weights is not None:
        check_weights(weights)
    version = bundle_version(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder, zip_path = out_dir / name, out_dir / f"{name}_v{version}.zip"
    if not force:
        for path in (folder, zip_path):
            if _is_nonempty(path):
                raise PackagingError(f"{path} already exists and is not empty: choose another output folder or pass --force.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        staged = tmp / name
        copy_bundle(staged, weights, source)
        staged_zip = tmp / zip_path.name
        write_zip(staged, staged_zip)
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        elif folder.exists() or folder.is_symlink():
            folder.unlink()
        os.replace(staged, folder)
        os.replace(staged_zip, zip_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, zip_path


def write_app(app_dir: Path, force: bool = False) -> Path:
    """Write :data:`APP_MAIN` as ``app_dir/main.py`` (the folder is created when missing).

    Raises:
        PackagingError: when another ``main.py`` is there and ``force`` is not given.
    """
    main_py = app_dir / "main.py"
    if main_py.exists() and not force and main_py.read_text() != APP_MAIN:
        raise PackagingError(f"{main_py} already exists and is another app: choose another folder or pass --force.")
    app_dir.mkdir(parents=True, exist_ok=True)
    main_py.write_text(APP_MAIN)
    return main_py


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and write the bundle; returns the exit status (2 for a usage problem)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder that receives NAME/ and NAME_vVERSION.zip")
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help=f"bundle folder name, must contain 'segmentation' (default {DEFAULT_NAME})"
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="model.pt to ship as models/model.pt (default: the repository's models/model.pt when present, else none)",
    )
    weights.add_argument("--no_weights", action="store_true", help="ship no models/model.pt even when the repository has one")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder and zip of the same name")
    parser.add_argument(
        "--app", action="store_true", help="make OUT_DIR a MONAI Label app: OUT_DIR/main.py and the bundle in OUT_DIR/model/NAME/"
    )
    args = parser.parse_args(argv)
    weights = args.weights
    if weights is None and not args.no_weights and (REPO / "models" / "model.pt").is_file():
        weights = REPO / "models" / "model.pt"
    try:
        if args.app:
            write_app(args.out_dir, args.force)
        folder, zip_path = package_bundle(args.out_dir / "model" if args.app else args.out_dir, args.name, weights, args.force)
    except PackagingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    shipped = "with models/model.pt" if weights is not None else "without weights (no models/model.pt)"
    print(f"wrote {folder} ({shipped}) and {zip_path}")
    if args.app:
        start = f"monailabel start_server --app {args.out_dir} --studies IMAGES --conf models {args.name} --conf zoo_source github"
        print(f"wrote {args.out_dir / 'main.py'}; start it with: {start}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
