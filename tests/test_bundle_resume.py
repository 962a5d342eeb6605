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


#: ``python -m monai.bundle <argv[3:]>`` in which the resume checkpoint of epoch ``argv[2]`` is never
#: finished: once its bytes are in the temporary file and before the rename, the writing thread
#: creates the file ``argv[1]`` and waits for ever.  Training goes on meanwhile (the checkpoint is
#: written in the background) until the end of the next epoch, whose save waits for that write.
#: So the kill the test sends when the file appears always finds the previous epoch's checkpoint on
#: disk, the interrupted write's temporary file beside it, and training unfinished.
_HOLD_CHECKPOINT_WRITE = """
import runpy, sys, threading
from pathlib import Path
import torch
marker, hold_epoch = Path(sys.argv[1]), int(sys.argv[2])
real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    trainer = obj.get("trainer") if isinstance(obj, dict) else None
    if isinstance(trainer, dict) and trainer.get("epoch") == hold_epoch and not trainer.get("finished"):
        marker.touch()
        threading.Event().wait()
torch.save = save
sys.argv = ["monai.bundle", *sys.argv[3:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def test_sigkill_then_resume_continues_the_run(tmp_path: Path):
    data = write_pairs(tmp_path / "data", n=8)
    args = [
        "--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data),
        "--max_epochs", "7", "--early_stop_patience", "100", "--early_stop_min_delta", "1.0", *TINY,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    marker, killed_log = tmp_path / "writing_epoch_4", tmp_path / "killed_run.log"
    with open(killed_log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_CHECKPOINT_WRITE, str(marker), "4", "run", *args], cwd=REPO, env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 600  # generous: the 4 epochs take seconds, but the machine may be busy
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"no epoch-4 checkpoint write began (exit status {proc.poll()}):\n{killed_log.read_text()[-4000:]}"
        assert proc.poll() is None, "training ended although its epoch-4 checkpoint write never finished"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    resume = tmp_path / "models" / "resume.pt"
    state = torch.load(resume, weights_only=True)  # intact after the kill
    killed_at = state["trainer"]["epoch"]
    assert killed_at == 3 and state["trainer"]["finished"] is False
    counter = state["early_stop"]["counter"]
    assert counter == killed_at - 1  # min_delta 1.0: only the first validation (from -inf) counts as an improvement
    torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # the best model is intact too
    # the write the kill interrupted left its temporary file (never a half-written target) ...
    assert len(list((tmp_path / "models").glob(".resume.pt.*.tmp"))) == 1

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
    # previews at most every 30 s: each run's first validation, and the last one when training ended
    previews = {p.name for p in (tmp_path / "logs" / "previews").glob("epoch_*.png")}
    assert {"epoch_0001.png", f"epoch_{killed_at + 1:04d}.png", "epoch_0007.png"} <= previews

    # the same command after a finished run starts a new run instead of doing nothing
    third = run_bundle(*args[:-len(TINY)], *TINY, "--max_epochs", "1")
    assert "belongs to a finished run: starting a new run" in third.stdout + third.stderr
