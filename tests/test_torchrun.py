"""Real multi-process runs: ``torchrun`` with two CPU processes (gloo) on tiny generated data.

``python -m torch.distributed.run`` is ``torchrun``; calling it through ``sys.executable`` keeps
the test independent of PATH.  ``--tee 3`` prefixes every line a worker prints with its rank
(``[default0]:``), so the tests can tell which rank logged what.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from tests.conftest import CONFIGS, REPO, config, run_bundle, write_pairs

pytestmark = pytest.mark.slow

#: 12 pairs, 5 of them for validation (rank 0 validates 3, rank 1 validates 2), 7 for training
DATA = ["--spatial_size", "[32,32]", "--num_workers", "0", "--val_fraction", "0.42"]
TRAIN = ["--config_file", config("train.json", "multi_gpu_train.json"), *DATA, "--batch_size", "2"]
EVALUATE = ["--config_file", config("train.json", "evaluate.json", "multi_gpu_evaluate.json"), *DATA]
PREFIX = re.compile(r"^\[[A-Za-z_]*?(\d+)\]:(.*)$")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")


def _torchrun_cmd(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--tee", "3", "-m", "monai.bundle", "run"]


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=<nproc> -m monai.bundle run <args>``; must exit 0."""
    cmd = _torchrun_cmd("--standalone", f"--nproc_per_node={nproc}") + list(args)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun exit status {proc.returncode}\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def by_rank(proc: subprocess.CompletedProcess) -> dict[int, list[str]]:
    """The workers' output lines, by rank (from ``--tee``'s prefixes)."""
    lines: dict[int, list[str]] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = PREFIX.match(line)
        if m:
            lines.setdefault(int(m.group(1)), []).append(m.group(2))
    return lines


def count(lines: list[str], text: str) -> int:
    return sum(text in line for line in lines)


def event_file_pids(log_dir: Path) -> set[str]:
    """PIDs in TensorBoard file names ``events.out.tfevents.<time>.<host>.<pid>.<n>``."""
    return {p.name.split(".")[-2] for p in log_dir.glob("events.out.tfevents.*")}


def curve_epochs(log_dir: Path) -> list[int]:
    with open(log_dir / "curves.csv") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("ddp_data") / "data", n=12, seed=1)


@pytest.fixture(scope="module")
def ddp_trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Two epochs of DistributedDataParallel training on two CPU processes."""
    root = tmp_path_factory.mktemp("ddp_trained")
    proc = torchrun(*TRAIN, "--bundle_root", str(root), "--dataset_dir", str(data_dir), "--max_epochs", "2")
    return root, proc


def test_ddp_training_saves_a_plain_state_dict_that_inference_uses(ddp_trained, tmp_path: Path):
    root, _ = ddp_trained
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state), "model.pt holds the DDP wrapper's keys"
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    parser.get_parsed_content("network_def").load_state_dict(state)  # strict
    resume = torch.load(root / "models" / "resume.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in resume["network"]), "resume.pt must also suit a single-process resume"
    assert resume["trainer"]["epoch"] == 2 and resume["trainer"]["finished"]

    # predict two new images of other sizes through the CLI: one mask each, at the image's size
    new = tmp_path / "new"
    new.mkdir()
    sizes = {"a": (37, 45), "b": (50, 29)}  # height, width
    for seed, (stem, size) in enumerate(sizes.items()):
        src = write_pairs(tmp_path / stem, n=1, size=size, seed=seed + 5)
        shutil.copy(src / "images" / "case_00.png", new / f"{stem}.png")
    out = tmp_path / "masks"
    run_bundle(
        "--config_file", config("inference.json"), "--bundle_root", str(root), "--input_dir", str(new),
        "--output_dir", str(out), "--spatial_size", "[32,32]", "--num_workers", "0",
    )
    for stem, (h, w) in sizes.items():
        mask = Image.open(out / f"{stem}.png")
        assert mask.size == (w, h)
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


def test_ddp_training_logs_and_writes_on_rank_0_only(ddp_trained):
    root, proc = ddp_trained
    lines = by_rank(proc)
    assert count(lines[0], "process group: rank 0 of 2 (gloo)") == 1
    assert count(lines[1], "process group: rank 1 of 2 (gloo)") == 1
    assert count(lines[0], "Metrics -- val_mean_dice") == 2 and count(lines[1], "Metrics -- val_mean_dice") == 0
    assert count(lines[0], "epoch 2/2 done") == 1 and count(lines[1], "epoch 2/2 done") == 0
    assert count(lines[0], "saved the best model so far") >= 1 and count(lines[1], "saved the best model so far") == 0
    logs = root / "logs"
    assert len(event_file_pids(logs)) == 1, f"TensorBoard files from several processes: {sorted(logs.iterdir())}"
    assert curve_epochs(logs) == [1, 2]
    assert sorted(p.name for p in (logs / "previews").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]


def _same_csv_reports(ddp: Path, single: Path) -> None:
    """Per-image rows: same files in the same order; scores (printed with 6 decimals) equal up to
    one unit in the last digit, "n/a" exactly where the other has it."""
    with open(ddp) as a, open(single) as b:
        rows, expected = list(csv.reader(a)), list(csv.reader(b))
    assert rows[0] == expected[0] and [r[0] for r in rows] == [r[0] for r in expected]
    for row, want in zip(rows[1:], expected[1:]):
        assert len(row) == len(want) == len(rows[0]), (row, want)
        for name, got, ref in zip(rows[0][1:], row[1:], want[1:]):
            assert (got == "n/a") == (ref == "n/a"), (row[0], name, got, ref)
            if ref != "n/a":
                assert float(got) == pytest.approx(float(ref), rel=0, abs=1.5e-6), (row[0], name, got, ref)


def _same_summary(got: Any, want: Any, where: str = "summary") -> None:
    """JSON summaries: counts (images, support, the confusion matrix) and names exactly, scores up to
    float rounding (ranks and thread counts may add in another order)."""
    assert type(got) is type(want) or {type(got), type(want)} == {int, float}, f"{where}: {got!r} vs {want!r}"
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _same_summary(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same_summary(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12) and math.isfinite(got), f"{where}: {got!r} vs {want!r}"
    else:  # int counts, strings, None (a NaN score)
        assert got == want, f"{where}: {got!r} vs {want!r}"


def test_ddp_evaluation_reports_every_image_once_like_a_single_process(ddp_trained, data_dir: Path, tmp_path: Path):
    root, _ = ddp_trained
    # batch size 1: rank 0 evaluates 3 images in 3 iterations, rank 1 2 in 2
    proc = torchrun(
        *EVALUATE, "--bundle_root", str(root), "--dataset_dir", str(data_dir), "--batch_size", "1",
        "--output_dir", str(tmp_path / "ddp"),
    )
    # the single process with the thread count of each torchrun worker (one), so that the network's
    # outputs, and with them every predicted pixel, are the same
    single = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", config("train.json", "evaluate.json"), *DATA,
         "--batch_size", "1", "--bundle_root", str(root), "--dataset_dir", str(data_dir),
         "--output_dir", str(tmp_path / "single")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, (single.stdout + single.stderr)[-6000:]
    ddp_csv = (tmp_path / "ddp" / "metrics_per_image.csv").read_text()
    assert len(ddp_csv.splitlines()) == 1 + 5
    _same_csv_reports(tmp_path / "ddp" / "metrics_per_image.csv", tmp_path / "single" / "metrics_per_image.csv")
    ddp_summary = json.loads((tmp_path / "ddp" / "metrics_summary.json").read_text())
    single_summary = json.loads((tmp_path / "single" / "metrics_summary.json").read_text())
    _same_summary(ddp_summary, single_summary)
    assert ddp_summary["images"] == 5 and ddp_summary["confusion_matrix"] == single_summary["confusion_matrix"]
    assert sum(map(sum, ddp_summary["confusion_matrix"])) == sum(ddp_summary["all_pixels"]["support"]) > 0
    lines = by_rank(proc)
    assert count(lines[0], "Metrics -- val_mean_dice") == 1 and count(lines[1], "Metrics -- val_mean_dice") == 0
    assert count(lines[0], "evaluation of 5 images") == 1 and count(lines[1], "evaluation of 5 images") == 0


def test_early_stopping_stops_both_ranks_after_the_same_epoch(data_dir: Path, tmp_path: Path):
    # epoch 1 always improves on nothing; epoch 2 cannot beat it by 0.99 -> stop after epoch 2 of 8
    proc = torchrun(
        *TRAIN, "--bundle_root", str(tmp_path), "--dataset_dir", str(data_dir), "--max_epochs", "8",
        "--early_stop_patience", "1", "--early_stop_min_delta", "0.99",
    )
    lines = by_rank(proc)
    for rank in (0, 1):
        assert count(lines[rank], "early stopping: no val_mean_dice improvement") == 1, f"rank {rank}"
        assert count(lines[rank], "SupervisedTrainer - INFO - Terminate signaled") == 1, f"rank {rank}"
        assert count(lines[rank], "SupervisedEvaluator - INFO - Epoch[2] Complete") == 1, f"rank {rank}"
        assert count(lines[rank], "Epoch[3]") == 0, f"rank {rank} trained on"
    resume = torch.load(tmp_path / "models" / "resume.pt", weights_only=True)
    assert resume["trainer"]["epoch"] == 2 and resume["early_stop"]["counter"] == 1
    assert curve_epochs(tmp_path / "logs") == [1, 2]


def test_a_time_budget_stops_both_ranks_at_the_same_iteration(data_dir: Path, tmp_path: Path):
    """Every rank follows rank 0's clock: the same annealed rate and the same last iteration (a rank that
    stopped alone would leave the other waiting in an all-reduce until the timeout)."""
    proc = torchrun(*TRAIN, "--bundle_root", str(tmp_path), "--dataset_dir", str(data_dir), "--max_epochs", "10000",
                    "--time_budget_minutes", "0.1")
    lines = by_rank(proc)
    stop = [line for line in lines[0] if "time budget of 0.1 minutes spent at epoch" in line]
    assert len(stop) == 1 and not any("time budget of" in line for line in lines[1]), "rank 0 reports the stop"
    for rank in (0, 1):
        assert count(lines[rank], "SupervisedTrainer - INFO - Terminate signaled") == 1, f"rank {rank}"
    resume = torch.load(tmp_path / "models" / "resume.pt", weights_only=True)
    assert resume["trainer"]["finished"] and resume["budget"]["spent_seconds"] >= 6.0
    assert f"epoch {resume['trainer']['epoch']}, iteration {resume['trainer']['iteration']}" in stop[0]


def _launch_two_nodes(args: list[str], logs: Path, attempt: int) -> tuple[list[int | None], list[str]]:
    """Start two torchrun agents ('nodes') that rendezvous through a c10d store this process hosts.

    The rendezvous port is not looked up and handed on (another process could take it meanwhile): the
    store binds it and is held until the nodes are done.  Each node finds the endpoint's port in use, so
    joins the store as a client, as the second node does when the first hosts it.  ``--local_addr``
    names this machine by address (no host-name lookup), and ``join_timeout`` ends a rendezvous that
    stalls with torch's own message instead of a silent wait.  Output goes to files, not pipes, so
    neither node can block on a full pipe while the other is read.  Returns exit codes (None: killed
    at the timeout) and the two logs.
    """
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    launch = [
        "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{store.port}",
        "--rdzv_id", f"t{attempt}", "--rdzv_conf", "join_timeout=120", "--local_addr", "127.0.0.1",
    ]
    paths = [logs / f"node{i}_attempt{attempt}.log" for i in range(2)]
    nodes = []
    try:
        for path in paths:
            with open(path, "w") as out:
                nodes.append(subprocess.Popen(_torchrun_cmd(*launch) + args, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT))
        for node in nodes:
            try:
                node.wait(timeout=240)
            except subprocess.TimeoutExpired:
                break
    finally:
        for node in nodes:
            node.kill()
            node.wait()
        del store
    return [n.returncode if n.returncode is not None and n.returncode >= 0 else None for n in nodes], [p.read_text() for p in paths]


def test_two_node_launch_with_c10d_rendezvous(data_dir: Path, tmp_path: Path):
    """The README's multi-node command, with two 'nodes' of one process each on this machine.

    Both nodes run the same command; the agents rendezvous, number the nodes and start one worker each,
    which train one epoch together.  This test once timed out in CI with its output lost, so where it
    stalled is not known.  An attempt in which no worker joined the process group (the nodes never got
    past torch's rendezvous) is tried once more, and only such an attempt: a stall after the workers
    joined fails.
    """
    args = [*TRAIN, "--bundle_root", str(tmp_path / "bundle"), "--dataset_dir", str(data_dir), "--max_epochs", "1"]
    worker_started = re.compile(r"process group: rank (\d) of 2 \(gloo\)")
    for attempt in range(2):
        codes, outputs = _launch_two_nodes(args, tmp_path, attempt)
        if codes == [0, 0] or any(worker_started.search(o) for o in outputs):
            break
    assert codes == [0, 0], f"exit codes {codes} (None: killed after 240 s)\n\n" + "\n\n".join(o[-4000:] for o in outputs)
    ranks = sorted(int(m) for o in outputs for m in worker_started.findall(o))
    assert ranks == [0, 1]
    bundle = tmp_path / "bundle"
    assert (bundle / "models" / "model.pt").is_file() and curve_epochs(bundle / "logs") == [1]
    assert len(event_file_pids(bundle / "logs")) == 1


def test_a_fold_trains_and_evaluates_under_torchrun_on_the_pairs_a_single_process_deals(data_dir: Path, tmp_path: Path):
    """Fold 1 of 3 under torchrun: its own folder, the same deal as one process (whose evaluation accepts the model),
    and a two-rank evaluation that keeps every held-out prediction once."""
    from monai_unet_bundle.postprocess_search import read_predictions

    folds = ["--num_folds", "3", "--fold", "1", "--bundle_root", str(tmp_path), "--dataset_dir", str(data_dir)]
    torchrun(*TRAIN, *folds, "--max_epochs", "1")
    assert (tmp_path / "models" / "fold_1" / "model.pt").is_file() and not (tmp_path / "models" / "model.pt").exists()
    report = json.loads((tmp_path / "logs" / "fold_1" / "data_check.json").read_text())
    held_out = sorted(Path(i).name for i, f in report["folds"]["assignment"].items() if f == 1)
    assert len(held_out) == 4
    # one process deals the pairs the same way: its evaluation accepts the model and scores exactly the held-out pairs
    run_bundle("--config_file", config("train.json", "evaluate.json"), *DATA, *folds, "--output_dir", str(tmp_path / "one"))
    rows = list(csv.DictReader(open(tmp_path / "one" / "metrics_per_image.csv")))
    assert sorted(Path(r["filename"]).name for r in rows) == held_out
    torchrun(*EVALUATE, *folds, "--output_dir", str(tmp_path / "two"))
    kept = read_predictions([tmp_path / "two" / "oof"])
    assert sorted(Path(name).name for name, _, _ in kept) == held_out
    assert (tmp_path / "two" / "report.html").is_file()
