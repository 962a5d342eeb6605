from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ignite.engine import Engine

from monai_unet_bundle import checkpoints
from monai_unet_bundle.atomic import atomic_save
from monai_unet_bundle.checkpoints import ModelLoader, check_model
from monai_unet_bundle.data import evaluation_items
from monai_unet_bundle.ensemble import FoldEnsemble, load_models, model_files, replicate
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.networks import build_network
from monai_unet_bundle.plan import saved_plan


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network("basic_unet", in_channels=1, out_channels=3, base_features=4)


def _plan(folder: Path, **changes) -> None:
    plan = {"num_classes": 3, "in_channels": 1, "spatial_size": [32, 32], "normalization": "minmax", "batch_size": 2,
            "class_names": ["background", "a", "b"], "mask_palette": None, "mask_thresholds": None, "class_weights": None,
            "architecture": "basic_unet", "base_features": 4, "activation": "elu"}
    (folder / "plan.json").write_text(json.dumps({**plan, **changes}))


def _folds(root: Path, n: int) -> list[Path]:
    files = []
    for k in range(n):
        folder = root / f"fold_{k}"
        folder.mkdir(parents=True)
        torch.save(_net(k).state_dict(), folder / "model.pt")
        _plan(folder, folds={"num_folds": n, "fold": k})  # the fold differs; the ensemble keys do not
        files.append(folder / "model.pt")
    return files


def test_ckpt_path_names_one_model_a_list_or_a_folds_folder(tmp_path):
    files = _folds(tmp_path / "models", 3)
    (tmp_path / "models" / "fold_10").mkdir()  # sorted by number, not as text: fold_10 after fold_2
    torch.save(_net(9).state_dict(), tmp_path / "models" / "fold_10" / "model.pt")
    assert model_files(str(files[0])) == [str(files[0])]
    assert model_files([str(files[2]), str(files[0])]) == [str(files[2]), str(files[0])]
    assert [Path(f).parent.name for f in model_files(str(tmp_path / "models"))] == ["fold_0", "fold_1", "fold_2", "fold_10"]
    assert model_files(str(tmp_path / "nowhere.pt")) == [str(tmp_path / "nowhere.pt")]  # the model check explains it
    (tmp_path / "models" / "fold_3").mkdir()
    with pytest.raises(BundleInputError, match=r"fold_3 has no model.pt .*finish it with scripts/cross_validate.py"):
        model_files(str(tmp_path / "models"))
    with pytest.raises(BundleInputError, match="names a model twice"):
        model_files([str(files[0]), str(files[0])])
    with pytest.raises(BundleInputError, match="ckpt_path is \\[\\]: pass --ckpt_path with a model.pt"):
        model_files([])


def test_an_ensemble_returns_the_log_of_the_mean_probabilities_of_its_models(tmp_path):
    files = _folds(tmp_path / "models", 2)
    single = _net(100)
    assert replicate(single, str(files[0])) is single
    ensemble = replicate(single, str(tmp_path / "models"))
    assert isinstance(ensemble, FoldEnsemble) and len(ensemble.members) == 2
    assert check_model(str(tmp_path / "models"), ensemble) == f"{files[0]}, {files[1]}"
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = sum(torch.softmax(_net(k).eval()(x), dim=1) for k in (0, 1)) / 2
        got = torch.softmax(ensemble.eval()(x), dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, torch.softmax(_net(0).eval()(x), dim=1), atol=1e-3)
    with pytest.raises(RuntimeError, match="holds 2 models but ckpt_path names 1"):
        load_models(str(files[0]), ensemble)
    bad = tmp_path / "other.pt"
    torch.save(build_network("basic_unet", in_channels=1, out_channels=2, base_features=4).state_dict(), bad)
    with pytest.raises(BundleInputError, match="other.pt"):  # each file is checked as a single model would be
        load_models([str(files[0]), str(bad)], ensemble)


def test_the_evaluators_model_loader_does_not_read_again_what_the_model_check_loaded(tmp_path, monkeypatch):
    files = _folds(tmp_path / "models", 2)
    ensemble = replicate(_net(100), str(tmp_path / "models"))
    reads = []
    real = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda path, net: reads.append(Path(path).parent.name) or real(path, net))
    check_model(str(tmp_path / "models"), ensemble)
    ModelLoader(str(tmp_path / "models"), ensemble).attach(Engine(lambda e, b: None))
    assert reads == ["fold_0", "fold_1"]  # once each, by the model check
    atomic_save(_net(7).state_dict(), files[1])  # saved again, as training saves: read again, with every other
    ModelLoader(str(tmp_path / "models"), ensemble).attach(Engine(lambda e, b: None))
    assert reads == ["fold_0", "fold_1", "fold_0", "fold_1"]
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ensemble.members[1].eval()(x), _net(7).eval()(x), atol=1e-6)
    fresh = replicate(_net(100), str(tmp_path / "models"))  # another network holding other weights is loaded
    ModelLoader(str(tmp_path / "models"), fresh).attach(Engine(lambda e, b: None))
    assert reads[-2:] == ["fold_0", "fold_1"] and len(reads) == 6
    bad = tmp_path / "other.pt"
    torch.save(build_network("basic_unet", in_channels=1, out_channels=2, base_features=4).state_dict(), bad)
    with pytest.raises(BundleInputError):  # fold_0's file goes in, the other is refused: the network holds a mix
        load_models([str(files[0]), str(bad)], ensemble)
    ModelLoader(str(tmp_path / "models"), ensemble).attach(Engine(lambda e, b: None))
    assert len(reads) == 10 and reads[-2:] == ["fold_0", "fold_1"]  # so the folds are read again, not skipped


def test_models_of_different_plans_are_not_ensembled(tmp_path):
    files = _folds(tmp_path / "models", 2)
    assert saved_plan(str(tmp_path / "models"), {})["spatial_size"] == [32, 32]
    _plan(files[1].parent, spatial_size=[64, 64])
    with pytest.raises(BundleInputError, match=r"fold_1/model.pt was not trained with the plan of .*fold_0/model.pt "
                                               r"\(spatial_size \[32, 32\] against \[64, 64\]\): ensemble only models of one plan"):
        saved_plan([str(f) for f in files], {})
    assert saved_plan([str(f) for f in files], {"spatial_size": [48, 48]})["spatial_size"] == [48, 48]  # a setting wins for all


def test_an_ensemble_is_scored_on_labelled_test_pairs_only():
    lists = {"training": [{"image": "a", "label": "a"}], "validation": [{"image": "v", "label": "v"}]}
    assert evaluation_items(lists) == lists["validation"]
    with pytest.raises(BundleInputError, match="an ensemble of 5 models can only be scored on labelled test pairs"):
        evaluation_items(lists, models=5)
    lists["test"] = [{"image": "t", "label": "t"}]
    assert evaluation_items(lists, models=5) == lists["test"]
