"""The configs read as declarations: short expressions, few imports, overrides by id, ids MONAI Label duplicates kept equal."""

from __future__ import annotations

import json
import re

import pytest
from monai.bundle import ConfigParser

from tests.conftest import CONFIGS

FILES = sorted(p.name for p in CONFIGS.glob("*.json") if p.name != "metadata.json")
MIXINS = ["evaluate.json", "multi_gpu_train.json", "multi_gpu_evaluate.json", "demo.json"]
#: the config sets users run, as MONAI merges them
RUNS = [
    ["train.json"],
    ["inference.json"],
    ["train.json", "evaluate.json"],
    ["train.json", "multi_gpu_train.json"],
    ["train.json", "evaluate.json", "multi_gpu_evaluate.json"],
]


def _load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


@pytest.mark.parametrize("name", FILES)
def test_expressions_are_short_and_imports_few(name: str):
    config = _load(name)
    long = [s for s in _strings(config) if s.startswith("$") and len(s) > 100]
    assert not long, f"{name}: expressions over 100 characters: {long}"
    imports = config.get("imports", []) + config.get("+imports", [])
    assert len(imports) <= 6, f"{name} imports {len(imports)} modules"


@pytest.mark.parametrize("name", MIXINS)
def test_mixins_override_by_id_and_extend_lists_with_plus(name: str):
    for key in _load(name):
        assert not re.search(r"#\d+(#|$)", key), f"{name}: {key} reaches into a list by position"
        assert key not in ("imports", "initialize"), f"{name}: {key} restates a list; extend it with +{key}"


@pytest.mark.parametrize("files", RUNS, ids=lambda f: "+".join(f))
def test_every_module_an_expression_names_is_imported(files: list[str]):
    merged = ConfigParser.load_config_files([str(CONFIGS / f) for f in files])
    imported = {m for s in merged.get("imports", []) for m in re.findall(r"import ([\w.]+)", s)}
    for text in _strings(merged):
        if not text.startswith("$") or text.startswith("$import"):
            continue
        for module in re.findall(r"\b(monai_unet_bundle(?:\.\w+)+)\.\w+\(", text):
            # MONAI binds only an undotted import's name: the package itself must be imported too
            for needed in ("monai_unet_bundle", module):
                assert needed in imported, f"{'+'.join(files)}: {text!r} needs $import {needed}"


#: ids that MONAI Label reads from train.json and inference.json separately, so both must say the same
SHARED = [
    "bundle_root", "num_classes", "class_names", "in_channels", "normalization", "spatial_size", "architecture", "base_features",
    "activation", "batch_size", "num_workers", "channels_last", "fast_allocator", "device", "network_def", "network",
]


def test_ids_train_and_inference_both_hold_are_equal():
    train, inference = _load("train.json"), _load("inference.json")
    for key in SHARED:
        assert train[key] == inference[key], f"{key} differs between train.json and inference.json"
    # the image path through the pipeline: read, channels, intensity, resize
    image_steps = [t for t in train["train"]["deterministic_transforms"] if isinstance(t, dict)]
    loads = [t for t in image_steps if t["_target_"] == "LoadImaged" and t["keys"] == "image"]
    assert loads and loads[0] == inference["preprocessing"]["transforms"][0]
    by_target = {t["_target_"]: t for t in inference["preprocessing"]["transforms"]}
    for target in ("monai_unet_bundle.transforms.EnsureChannelsd", "monai_unet_bundle.transforms.NormalizeImaged"):
        assert next(t for t in image_steps if t["_target_"] == target) == by_target[target]
    resize = next(t for t in image_steps if t["_target_"] == "Resized")
    assert resize["spatial_size"] == by_target["Resized"]["spatial_size"]
    assert (resize["mode"][0], resize["anti_aliasing"][0]) == (by_target["Resized"]["mode"], by_target["Resized"]["anti_aliasing"])
    # the demo data set lives in the same folder for both
    assert train["demo_dir"] == inference["dataset_dir"]


@pytest.mark.parametrize(
    "name, ids",
    [
        ("train.json", ["settings", "demo_dataset", "data_check", "plan_settings", "cache_mode"]),
        ("inference.json", ["settings", "inputs", "model_check", "plan"]),
        ("evaluate.json", ["validate#dataset#data", "model_check", "saved_plan"]),
        ("multi_gpu_train.json", ["process_group"]),
    ],
)
def test_non_obvious_components_say_what_they_do(name: str, ids: list[str]):
    config = _load(name)
    for key in ids:
        node = config[key] if key in config else config
        if key not in config:
            for part in key.split("#"):
                node = node[part]
        assert isinstance(node, dict) and node.get("_desc_"), f"{name}: {key} has no _desc_"


@pytest.mark.parametrize("tta", [False, True])
def test_evaluation_runs_images_through_inference_s_inferer_with_its_tta(tta: bool):
    """evaluate.json scores what inference would write: the same inferer, flips averaged with --tta true."""
    from monai_unet_bundle.inferers import SegmentationInferer

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser["plan"] = {"spatial_size": [32, 48], "batch_size": 4}
    parser["tta"] = tta
    inferer = parser.get_parsed_content("validate#inferer")
    assert isinstance(inferer, SegmentationInferer) and inferer.tta is tta and inferer.window is None
