"""Peak memory and seconds per epoch of the training data pipeline as the data set grows.

For each data set size (512x512 RGB PNG pairs, generated once into ``--work_dir``) and each cache
mode, a fresh process builds ``train#dataset`` and ``train#dataloader`` from ``configs/train.json``
and iterates one epoch twice (the first fills any cache); it reports the second epoch's seconds and
the process's peak resident memory.  No network runs: this measures what the data pipeline costs,
which is what grows with the data set.

    python scripts/benchmark_data.py --sizes 100 1000 --modes memory disk none
    python scripts/benchmark_data.py --sizes 100 1000 10000      # 10,000 pairs: about 5 GB of PNGs

Memory stays bounded when peak RSS stays flat from one size to the next (``disk`` and ``none``);
``memory`` grows by the cached tensors (about 4 MiB per 512x512 RGB pair).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, logging
logging.disable(logging.INFO)
import torch
torch.set_num_threads(1)
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config(sys.argv[1])
parser.update({"bundle_root": sys.argv[2], "dataset_dir": sys.argv[3], "cache": sys.argv[4], "num_workers": int(sys.argv[5]),
               "spatial_size": [512, 512], "batch_size": 4, "val_fraction": 0.01})
loader = parser.get_parsed_content("train#dataloader")
times = []
for _ in range(2):
    start = time.perf_counter()
    for batch in loader:
        pass
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"first_epoch_s": round(times[0], 2), "epoch_s": round(times[1], 2), "peak_rss_mib": round(peak, 1),
                  "worker_peak_rss_mib": round(children, 1), "pairs": len(loader.dataset)}))
"""


def make_pairs(folder: Path, n: int) -> Path:
    """Write (or top up to) ``n`` 512x512 demo pairs in ``folder``."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    from PIL import Image

    from monai_unet_bundle.demo import make_demo_pair

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / "images" / f"p_{i:05d}.png"
        if target.exists():
            continue
        image, mask = make_demo_pair(np.random.default_rng(i), 512, 512)
        Image.fromarray(image).save(target)
        Image.fromarray(mask * 255).save(folder / "masks" / f"p_{i:05d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Run the measurements; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--modes", nargs="+", default=["memory", "disk", "none"], choices=["memory", "disk", "none"])
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/unet_bundle_data_benchmark"))
    parser.add_argument("--out", type=Path, default=Path("benchmark_data.json"))
    args = parser.parse_args(argv)
    results = []
    for n in sorted(args.sizes):
        start = time.perf_counter()
        data = make_pairs(args.work_dir / f"set_{n}", n)
        print(f"{n} pairs ready in {time.perf_counter() - start:.0f} s", flush=True)
        for mode in args.modes:
            root = args.work_dir / f"bundle_{n}_{mode}"
            env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(REPO / "configs" / "train.json"), str(root), str(data), mode, str(args.num_workers)],
                capture_output=True, text=True, env=env,
            )
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return proc.returncode
            row = {"pairs": n, "mode": mode, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(
                f"{n:>6} pairs  {mode:>6}: epoch {row['epoch_s']:>7.2f} s (first {row['first_epoch_s']:.2f} s), "
                f"peak RSS {row['peak_rss_mib']:>7.1f} MiB, workers {row['worker_peak_rss_mib']:.1f} MiB",
                flush=True,
            )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
