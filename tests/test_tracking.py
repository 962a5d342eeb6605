"""Experiment tracking through MONAI's own ``--tracking`` mechanism, with a local MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CONFIGS, TINY, config, run_bundle, write_pairs

pytestmark = pytest.mark.slow


def _runs(db: Path):
    mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra")
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(db)))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, runs


def test_mlflow_settings_log_parameters_metrics_and_the_model(tmp_path: Path):
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra")
    data = write_pairs(tmp_path / "data", n=6)
    run_bundle(
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
        "--max_epochs", "2", "--tracking", str(CONFIGS / "mlflow.json"), *TINY,
    )
    client, runs = _runs(tmp_path / "eval" / "mlruns.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["loss_name"] == "dice_ce"
    assert run.data.params["spatial_size"] == "[32, 32]" and run.data.params["max_epochs"] == "2"
    assert {"train_loss", "val_mean_dice"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_mean_dice")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "curves.csv", "curves.png"} <= artifacts


def test_plain_tracking_mlflow_works_too(tmp_path: Path):
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra")
    data = write_pairs(tmp_path / "data", n=6)
    run_bundle(
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
        "--max_epochs", "1", "--tracking", "mlflow", *TINY,
    )
    _, runs = _runs(tmp_path / "eval" / "mlruns.db")
    assert len(runs) == 1 and {"train_loss", "val_mean_dice"} <= set(runs[0].data.metrics)
