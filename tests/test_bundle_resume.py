"""A real training process killed with SIGKILL, then resumed with the same command."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY, config, run_bundle, write_pairs

pytestmark = pytest.mark.slow


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["trainer"]["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def test_sigkill_then_resume_continues_the_run(tmp_path: Path):
    data = write_pairs(tmp_path / "data", n=8)
    args = [
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
        "--max_epochs", "7", "--early_stop_patience", "100", "--early_stop_min_delta", "1.0", *TINY,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    resume = tmp_path / "models" / "resume.pt"
    deadline = time.time() + 300
    while _checkpoint_epoch(resume) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"

    state = torch.load(resume, weights_only=True)  # intact after the kill
    killed_at = state["trainer"]["epoch"]
    assert 3 <= killed_at < 7 and state["trainer"]["finished"] is False
    counter = state["early_stop"]["counter"]
    assert counter == killed_at - 1  # min_delta 1.0: only the first validation (from -inf) counts as an improvement
    torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # the best model is intact too
    # a write the kill interrupted may leave its temporary file (never a half-written target) ...
    (tmp_path / "models" / ".resume.pt.killed.tmp").write_bytes(b"half a checkpoint")

    second = run_bundle(*args)
    log = second.stdout + second.stderr
    assert f"resumed from {resume} at epoch {killed_at}" in log
    assert f"early stopping restored: counter {counter} of patience 100" in log
    assert f"epoch {killed_at + 1}/7 done" in log and f"epoch {killed_at}/7 done" not in log
    # ... which the resumed run clears
    assert not [p.name for p in (tmp_path / "models").iterdir() if p.name.endswith(".tmp")]
    final = torch.load(resume, weights_only=True)
    assert final["trainer"]["epoch"] == 7 and final["trainer"]["finished"] is True
    assert final["early_stop"]["counter"] == 6
    rows = list(csv.DictReader(open(tmp_path / "logs" / "curves.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 8))  # one row per validation, across the kill
    assert (tmp_path / "logs" / "curves.png").is_file()
    assert len(list((tmp_path / "logs" / "previews").glob("epoch_*.png"))) == 7

    # the same command after a finished run starts a new run instead of doing nothing
    third = run_bundle(*args[:-len(TINY)], *TINY, "--max_epochs", "1")
    assert "belongs to a finished run: starting a new run" in third.stdout + third.stderr
