"""Measure the bundle against plain PyTorch loops, side by side in one process.

For each input size it measures, with the same network, batch size, input size and data:

* training throughput (images/s) of the trainer built from ``configs/train.json`` (its real
  pipeline: cached data, random flips, loss, optimizer, handlers) against a hand-written loop over
  tensors held in memory;
* inference throughput of ``configs/inference.json`` end to end (files read and masks written)
  and of its forward pass alone, against a plain ``model(x)`` loop on tensors;
* the peak resident memory added by each phase (sampled every 5 ms).

It prints a table and writes JSON with the ratios.  ``--quick`` (256 px, a few images) finishes
in well under 3 minutes on 2 CPU cores.  Run it on a quiet machine; OpenMP threads are set to sleep
when idle (``OMP_WAIT_POLICY=PASSIVE``) for every side alike.

    python scripts/benchmark.py --quick
    python scripts/benchmark.py --sizes 256 512 --out benchmark.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the OpenMP runtime's start

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.bundle import ConfigWorkflow  # noqa: E402

from monai_unet_bundle.demo import make_demo_pair  # noqa: E402
from monai_unet_bundle.losses import SegmentationLoss  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(result: dict, key: str):
    """Record in ``result[key]`` the peak RSS above the level at entry, in MiB."""
    start, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        result[key] = round(max(0, max(peak[0], _rss_bytes()) - start) / 2**20, 1)


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n RGB PNG images with binary masks at size x size."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = make_demo_pair(rng, size, size)
        Image.fromarray(image).save(folder / "images" / f"b_{i:03d}.png")
        Image.fromarray(mask * 255).save(folder / "masks" / f"b_{i:03d}.png")
    return folder


def bundle_training(root: Path, data: Path, size: int, batch: int, epochs: int, workers: int) -> tuple[float, torch.nn.Module, list]:
    """images/s of the bundle's trainer over all but the first epoch."""
    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "train.json"), workflow_type="train", bundle_root=str(root),
        dataset_dir=str(data), spatial_size=[size, size], batch_size=batch, max_epochs=epochs,
        val_interval=epochs + 1, num_workers=workers, val_fraction=0.1, resume="false",
    )
    wf.initialize()
    trainer = wf.trainer
    marks = {}
    from ignite.engine import Events

    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: marks.__setitem__("t1", time.perf_counter()))
    trainer.add_event_handler(Events.COMPLETED, lambda e: marks.__setitem__("end", time.perf_counter()))
    wf.run()  # the config's own run list: handler wiring, then trainer.run()
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(wf.parser.get_parsed_content("network").state_dict(), root / "models" / "model.pt")
    n = len(wf.train_dataset_data)
    per_epoch = n // batch * batch if n > batch else n
    tensors = [wf.parser.get_parsed_content("train#dataset")[i] for i in range(n)]
    return per_epoch * (epochs - 1) / (marks["end"] - marks["t1"]), wf.parser.get_parsed_content("network_def"), tensors


def plain_training(net: torch.nn.Module, samples: list, batch: int, epochs: int) -> float:
    """images/s of a hand-written loop over in-memory tensors, over all but the first epoch."""
    images = torch.stack([torch.as_tensor(s["image"]).float() for s in samples])
    labels = torch.stack([torch.as_tensor(s["label"]).float() for s in samples])
    loss_fn = SegmentationLoss("dice_ce", num_classes=2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    n = len(images) // batch * batch if len(images) > batch else len(images)
    start = None
    for epoch in range(epochs):
        if epoch == 1:
            start = time.perf_counter()
        order = torch.randperm(len(images))[:n]
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(images[idx]), labels[idx])
            loss.backward()
            opt.step()
    return n * (epochs - 1) / (time.perf_counter() - start)


def bundle_inference(root: Path, images: Path, out: Path, size: int, batch: int, workers: int) -> tuple[float, torch.nn.Module]:
    """images/s of configs/inference.json end to end (read, predict, invert, write)."""
    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "inference.json"), workflow_type="infer", bundle_root=str(root),
        input_dir=str(images), output_dir=str(out), spatial_size=[size, size], batch_size=batch, num_workers=workers,
    )
    wf.initialize()
    n = len(wf.dataset_data)
    wf.evaluator.run()  # warm-up: first-touch allocations, thread pools
    start = time.perf_counter()
    wf.evaluator.run()
    return n / (time.perf_counter() - start), wf.parser.get_parsed_content("network")


def forward_throughput(net: torch.nn.Module, inferer, size: int, batch: int, repeats: int) -> float:
    """images/s of ``inferer(x, net)`` on in-memory batches (after one warm-up batch)."""
    x = torch.rand(batch, 3, size, size)
    net.eval()
    with torch.no_grad():
        inferer(x, net)
        start = time.perf_counter()
        for _ in range(repeats):
            inferer(x, net)
    return batch * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px, few images: under 3 minutes on 2 cores")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--images", type=int, default=24, help="training images per size")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per side (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--num_workers", type=int, default=0, help="bundle data loader workers")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.images, args.epochs = [256], 17, 3
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    torch.manual_seed(0)
    results = {"threads": args.threads, "batch_size": args.batch_size, "torch": torch.__version__, "sizes": {}}
    for size in args.sizes:
        r: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = write_images(tmp / "data", args.images, size)
            with peak_memory(r, "train_bundle_peak_mib"):
                r["train_bundle_images_s"], net_def, samples = bundle_training(
                    tmp / "bundle", data, size, args.batch_size, args.epochs, args.num_workers
                )
            with peak_memory(r, "train_plain_peak_mib"):
                r["train_plain_images_s"] = plain_training(net_def, samples[: len(samples)], args.batch_size, args.epochs)
            infer_in = write_images(tmp / "infer", max(args.batch_size * 2, 8), size, seed=1) / "images"
            with peak_memory(r, "infer_bundle_peak_mib"):
                r["infer_bundle_end_to_end_images_s"], net = bundle_inference(
                    tmp / "bundle", infer_in, tmp / "pred", size, args.batch_size, args.num_workers
                )
            from monai_unet_bundle.inferers import SegmentationInferer

            repeats = 3 if args.quick else 5
            r["infer_bundle_forward_images_s"] = forward_throughput(net, SegmentationInferer(), size, args.batch_size, repeats)
            with peak_memory(r, "infer_plain_peak_mib"):
                r["infer_plain_forward_images_s"] = forward_throughput(net, lambda x, m: m(x), size, args.batch_size, repeats)
        r["train_ratio_bundle_over_plain"] = round(r["train_bundle_images_s"] / r["train_plain_images_s"], 3)
        r["infer_forward_ratio_bundle_over_plain"] = round(r["infer_bundle_forward_images_s"] / r["infer_plain_forward_images_s"], 3)
        r["infer_end_to_end_over_forward"] = round(r["infer_bundle_end_to_end_images_s"] / r["infer_bundle_forward_images_s"], 3)
        results["sizes"][str(size)] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
    print(f"{'size':>5} {'train bundle':>13} {'train plain':>12} {'ratio':>6} {'fwd bundle':>11} {'fwd plain':>10} {'ratio':>6} {'end-to-end':>11} {'e2e/fwd':>8}  (images/s)")
    for size, r in results["sizes"].items():
        print(
            f"{size:>5} {r['train_bundle_images_s']:>13.2f} {r['train_plain_images_s']:>12.2f} {r['train_ratio_bundle_over_plain']:>6.3f} "
            f"{r['infer_bundle_forward_images_s']:>11.2f} {r['infer_plain_forward_images_s']:>10.2f} {r['infer_forward_ratio_bundle_over_plain']:>6.3f} "
            f"{r['infer_bundle_end_to_end_images_s']:>11.2f} {r['infer_end_to_end_over_forward']:>8.3f}"
        )
        print(
            f"      peak MiB: train bundle {r['train_bundle_peak_mib']}, train plain {r['train_plain_peak_mib']}, "
            f"inference bundle {r['infer_bundle_peak_mib']}, inference plain {r['infer_plain_peak_mib']}"
        )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
