"""``--fold all``: the command line each fold's run repeats, and the runs it refuses to start."""

from __future__ import annotations

import pytest

from monai_unet_bundle.cross_validate import config_argument, run_all_folds, split_command_line
from monai_unet_bundle.errors import BundleInputError
from tests.conftest import config, run_bundle


def test_each_fold_repeats_the_command_line_without_the_settings_it_sets_itself():
    configs, rest = split_command_line(
        ["--config_file", "['configs/train.json','mine.json']", "--fold", "all", "--num_folds=3", "--dataset_dir", "d",
         "--bundle_root", "runs/cv", "--spatial_size", "[32,32]"]
    )
    assert configs == ["configs/train.json", "mine.json"] and rest == ["--dataset_dir", "d", "--spatial_size", "[32,32]"]
    assert split_command_line(["--config_file=a/train.json,b.json", "--fold=all"]) == (["a/train.json", "b.json"], [])
    assert split_command_line(["--config_file", "configs/train.json", "--seed", "4"]) == (["configs/train.json"], ["--seed", "4"])
    assert config_argument(["a/train.json"]) == "a/train.json"
    assert config_argument(["a/train.json", "b.json"]) == "['a/train.json','b.json']"
    assert split_command_line(["--config_file", config_argument(["a/train.json", "b c.json"])])[0] == ["a/train.json", "b c.json"]


def test_a_numbered_fold_runs_as_before_and_fold_all_refuses_torchrun_and_python_callers(monkeypatch):
    assert run_all_folds(1, 3, ".") is None  # not "all": the run goes on
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BundleInputError, match="cannot run under torchrun: .*scripts/cross_validate.py --torchrun N"):
        run_all_folds("all", 3, ".", argv=["monai/bundle/__main__.py", "run", "--config_file", "configs/train.json"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(BundleInputError, match="from Python, call monai_unet_bundle.cross_validate.cross_validate"):
        run_all_folds("all", 3, ".", argv=["my_script.py", "--fold", "all"])


def test_fold_all_needs_num_folds(tmp_path):
    proc = run_bundle("--config_file", config("train.json"), "--fold", "all", "--bundle_root", str(tmp_path), expect_rc=2)
    assert "fold is 'all', but it must be 0 while num_folds is null (set --num_folds K to train fold k, or every fold with --fold all)" in proc.stderr
    assert not (tmp_path / "models").exists()
