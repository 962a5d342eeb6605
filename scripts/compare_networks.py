"""Validation Dice reached per CPU-minute for candidate networks, on the built-in demo data.

Each candidate trains through ``configs/train.json`` (+ ``configs/demo.json``) in its own process
with no data loader workers, and after every validation the process's CPU time (all threads,
counted from the trainer's start, so data caching is left out) and the validation mean Dice are
recorded.  CPU time, unlike wall time, barely changes when another
process shares the machine, so candidates measured one after another compare fairly.

    python scripts/compare_networks.py --epochs 8                # binary demo
    python scripts/compare_networks.py --epochs 8 --num_classes 3

Candidates: ``--architecture basic_unet`` (MONAI's ``BasicUNet``, the classic max-pool U-Net, the
default) with base features 8, 16 (default) and 32, and ``--architecture unet`` (MONAI's strided
``UNet``, channels 16..256, two residual units).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CANDIDATES = {
    "basic_unet_f8": {"base_features": 8},
    "basic_unet_f16": {"base_features": 16},
    "basic_unet_f32": {"base_features": 32},
    "unet_f16": {"architecture": "unet", "base_features": 16},
}

CHILD = r"""
import json, sys, time, logging
logging.disable(logging.INFO)
import torch
torch.set_num_threads(int(sys.argv[4]))
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
overrides = json.loads(sys.argv[3])
wf = ConfigWorkflow(config_file=[sys.argv[1] + "/configs/train.json", sys.argv[1] + "/configs/demo.json"],
                    workflow_type="train", bundle_root=sys.argv[2], **overrides)
wf.initialize()
rows, start = [], {}
wf.trainer.add_event_handler(Events.STARTED, lambda e: start.setdefault("cpu", time.process_time()))  # after data caching
evaluator = wf.parser.get_parsed_content("validate#evaluator")
evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: rows.append(
    {"epoch": e.state.epoch, "cpu_s": round(time.process_time() - start["cpu"], 2), "val_mean_dice": float(e.state.metrics["val_mean_dice"])}))
params = sum(p.numel() for p in wf.parser.get_parsed_content("network_def").parameters())
wf.run()
print(json.dumps({"params": params, "rows": rows}))
"""


def dice_at(rows: list[dict], cpu_seconds: float) -> float | None:
    """Best validation Dice reached within ``cpu_seconds`` of CPU time."""
    reached = [r["val_mean_dice"] for r in rows if r["cpu_s"] <= cpu_seconds]
    return round(max(reached), 4) if reached else None


def main(argv: list[str] | None = None) -> int:
    """Train every candidate and print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("compare_networks.json"))
    args = parser.parse_args(argv)
    data_root = Path(tempfile.mkdtemp(prefix="compare_networks_"))
    results = {}
    for name in args.candidates:
        overrides = {"max_epochs": args.epochs, "num_workers": 0, "num_classes": args.num_classes, "resume": "false",
                     "num_previews": 0, **CANDIDATES[name]}
        # all candidates share one generated demo set (bundle_root/data/demo*)
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(REPO), str(data_root), json.dumps(overrides), str(args.threads)],
            capture_output=True, text=True, env=env,
        )
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = out["rows"]
        results[name] = {
            "params": out["params"],
            "rows": rows,
            "best_dice": round(max(r["val_mean_dice"] for r in rows), 4),
            "cpu_s_per_epoch": round(rows[-1]["cpu_s"] / len(rows), 1),
            "dice_at_1_cpu_min": dice_at(rows, 60),
            "dice_at_3_cpu_min": dice_at(rows, 180),
        }
        r = results[name]
        print(
            f"{name:>16}: {r['params'] / 1e6:5.2f} M params, {r['cpu_s_per_epoch']:6.1f} CPU s/epoch, "
            f"best Dice {r['best_dice']:.4f}, Dice within 1 CPU-min {r['dice_at_1_cpu_min']}, within 3 {r['dice_at_3_cpu_min']}",
            flush=True,
        )
    args.out.write_text(json.dumps({"num_classes": args.num_classes, "epochs": args.epochs, "results": results}, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
