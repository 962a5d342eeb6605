"""Shared fixtures: tiny generated data sets and real ``python -m monai.bundle`` runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_unet_bundle.demo import make_demo_pair

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"

#: settings that keep every bundle run in the suite tiny
TINY = ["--spatial_size", "[32,32]", "--batch_size", "4", "--num_workers", "0"]


def write_pairs(root: Path, n: int = 6, size: tuple[int, int] = (40, 52), seed: int = 0, mode: str = "RGB") -> Path:
    """Write ``n`` demo-style image/mask pairs (masks 0/255) under ``root/images`` and ``root/masks``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = make_demo_pair(rng, *size)
        Image.fromarray(image, "RGB").convert(mode).save(root / "images" / f"case_{i:02d}.png")
        Image.fromarray(mask * 255, "L").save(root / "masks" / f"case_{i:02d}.png")
    return root


def run_bundle(
    *args: str, cwd: Path = REPO, expect_rc: int | None = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <args>`` in a real subprocess and check its exit status.

    ``env`` adds or replaces environment variables of the subprocess.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(
            f"exit status {proc.returncode} (expected {expect_rc})\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


def config(*names: str) -> str:
    """The ``--config_file`` value for one or more files in ``configs/``."""
    paths = [str(CONFIGS / n) for n in names]
    return paths[0] if len(paths) == 1 else "[" + ",".join(f"'{p}'" for p in paths) + "]"


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Six 40x52 RGB pairs in ``tmp_path/data``."""
    return write_pairs(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle root with ``models/model.pt`` trained for 2 epochs on 8 tiny pairs through the CLI."""
    root = tmp_path_factory.mktemp("trained")
    data = write_pairs(root / "data", n=8, seed=1)
    run_bundle(
        "--config_file", config("train.json"), "--bundle_root", str(root), "--dataset_dir", str(data),
        "--max_epochs", "2", *TINY,
    )
    return root
