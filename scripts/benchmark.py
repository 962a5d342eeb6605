"""Measure the bundle against plain PyTorch loops, side by side in one process.

For each input size it measures, with the same network, batch size, input size and data:

* training throughput (images/s) of the trainer built from ``configs/train.json`` (its real
  pipeline: cached data, random flips, loss, optimizer, handlers) against a hand-written loop over
  tensors held in memory;
* inference throughput of ``configs/inference.json`` end to end (files read and masks written)
  and of its forward pass alone, against a plain ``model(x)`` loop on tensors;
* the peak resident memory added by each phase (sampled every 5 ms).

The two sides take turns, round by round (a bundle epoch, then a plain epoch; an inference run,
then the forward passes), so a machine that slows down or speeds up affects both alike; ratios are
medians over the rounds.  The plain loops use a copy of the bundle's network, in its memory layout
(``channels_last`` on the CPU), so a ratio shows what the configs, handlers and transforms cost.
Peak memory of the plain side is measured during its warm-up round, which runs inside the
bundle's phase; the bundle's peak includes its cached data set.

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
import copy
import json
import logging
import statistics
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


class PlainLoop:
    """A hand-written training loop over tensors held in memory: shuffle, slice, step.

    It trains its own copy of the bundle's network (same weights, same memory layout) with the
    same loss, optimizer and learning rate, so the two sides differ only in what the bundle adds.
    """

    def __init__(self, net: torch.nn.Module, samples: list, batch: int, lr: float = 1e-3) -> None:
        self.net = copy.deepcopy(net).train()
        self.images = torch.stack([torch.as_tensor(s["image"]).float() for s in samples])
        self.labels = torch.stack([torch.as_tensor(s["label"]).float() for s in samples])
        self.loss_fn = SegmentationLoss("dice_ce", num_classes=2)
        self.opt = torch.optim.Adam(self.net.parameters(), lr)
        self.batch = batch
        n = len(self.images)
        self.per_epoch = n // batch * batch if n > batch else n  # as the bundle's drop_last

    def epoch(self) -> int:
        """One epoch; returns the number of images trained on."""
        order = torch.randperm(len(self.images))[: self.per_epoch]
        for i in range(0, self.per_epoch, self.batch):
            idx = order[i : i + self.batch]
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.net(self.images[idx]), self.labels[idx])
            loss.backward()
            self.opt.step()
        return self.per_epoch


def training(root: Path, data: Path, size: int, batch: int, rounds: int, workers: int | str, r: dict) -> torch.nn.Module:
    """Train the bundle and the plain loop epoch by epoch in turn; fill ``r`` with images/s and memory.

    The bundle's trainer is built from ``configs/train.json`` and run through the config's own
    ``run`` list (handler wiring, then ``trainer.run()``).  After each of its epochs, once all of the
    bundle's epoch handlers (scheduler, curves, resume checkpoint ...) have run, one plain epoch of
    the same number of images runs.  A bundle epoch is timed from the end of the plain epoch before
    it to the end of its own last handler, so everything the bundle does between and around
    iterations counts.  The first epoch of each side is a warm-up and is not timed.
    """
    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "train.json"), workflow_type="train", bundle_root=str(root),
        dataset_dir=str(data), spatial_size=[size, size], batch_size=batch, max_epochs=rounds + 1,
        val_interval=rounds + 2, num_workers=workers, val_fraction=0.1, resume="false",
    )
    from ignite.engine import Events

    with peak_memory(r, "train_bundle_peak_mib"):
        wf.initialize()
        trainer, net = wf.trainer, wf.parser.get_parsed_content("network")
        dataset = wf.parser.get_parsed_content("train#dataset")
        plain = PlainLoop(net, [dataset[i] for i in range(len(dataset))], batch, wf.parser.get_parsed_content("learning_rate"))
        bundle_s, plain_s, mark = [], [], [0.0]

        def interleave(engine) -> None:
            now = time.perf_counter()
            if engine.state.epoch == 1:
                with peak_memory(r, "train_plain_peak_mib"):
                    plain.epoch()  # warm-up
            else:
                bundle_s.append(now - mark[0])
                start = time.perf_counter()
                plain.epoch()
                plain_s.append(time.perf_counter() - start)
            mark[0] = time.perf_counter()

        # registered when the run starts, so it follows every handler the run list attached
        trainer.add_event_handler(Events.STARTED, lambda e: e.add_event_handler(Events.EPOCH_COMPLETED, interleave))
        wf.run()
    per_epoch = trainer.state.epoch_length * batch if len(dataset) > batch else len(dataset)
    ratios = [p / b for b, p in zip(bundle_s, plain_s, strict=True)]  # per round: bundle images/s over plain images/s
    r["train_images_per_epoch"] = per_epoch
    r["train_bundle_images_s"] = per_epoch * len(bundle_s) / sum(bundle_s)
    r["train_plain_images_s"] = plain.per_epoch * len(plain_s) / sum(plain_s)
    r["train_ratio_per_round"] = [round(x, 3) for x in ratios]
    r["train_ratio_bundle_over_plain"] = round(statistics.median(ratios), 3)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return net


def inference(root: Path, images: Path, out: Path, size: int, batch: int, rounds: int, workers: int | str, r: dict) -> None:
    """Time ``configs/inference.json`` end to end and its forward pass against a plain ``model(x)``.

    Each round runs the whole inference workflow once (files read, predicted, inverted to their
    original size and written), then the same number of images through the bundle's inferer on
    in-memory batches, then through a plain ``model(x)`` loop on the same batches.  The first
    round is a warm-up and is not timed; ratios are medians over the rounds.
    """
    from monai_unet_bundle.inferers import SegmentationInferer

    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "inference.json"), workflow_type="infer", bundle_root=str(root),
        input_dir=str(images), output_dir=str(out), spatial_size=[size, size], batch_size=batch, num_workers=workers,
    )
    with peak_memory(r, "infer_bundle_peak_mib"):
        wf.initialize()
        n = len(wf.dataset_data)
        net = wf.parser.get_parsed_content("network")
        inferer = SegmentationInferer()
        plain_net = copy.deepcopy(net).eval()
        x = torch.rand(batch, 3, size, size)
        steps = max(1, n // batch)
        times: dict[str, list[float]] = {"e2e": [], "fwd_bundle": [], "fwd_plain": []}

        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        def forward(call) -> None:
            with torch.no_grad():
                for _ in range(steps):
                    call()

        net.eval()
        for i in range(rounds + 1):
            t = {
                "e2e": timed(wf.evaluator.run),
                "fwd_bundle": timed(lambda: forward(lambda: inferer(x, net))),
            }
            if i == 0:
                with peak_memory(r, "infer_plain_peak_mib"):
                    t["fwd_plain"] = timed(lambda: forward(lambda: plain_net(x)))
                continue
            t["fwd_plain"] = timed(lambda: forward(lambda: plain_net(x)))
            for key, value in t.items():
                times[key].append(value)
    fwd_images = steps * batch
    r["infer_bundle_end_to_end_images_s"] = n * rounds / sum(times["e2e"])
    r["infer_bundle_forward_images_s"] = fwd_images * rounds / sum(times["fwd_bundle"])
    r["infer_plain_forward_images_s"] = fwd_images * rounds / sum(times["fwd_plain"])
    r["infer_forward_ratio_bundle_over_plain"] = round(
        statistics.median(p / b for b, p in zip(times["fwd_bundle"], times["fwd_plain"], strict=True)), 3
    )
    r["infer_end_to_end_over_forward"] = round(
        statistics.median((n / e) / (fwd_images / f) for e, f in zip(times["e2e"], times["fwd_bundle"], strict=True)), 3
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px, few images: under 3 minutes on 2 cores")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--images", type=int, default=24, help="training images per size (a tenth go to validation)")
    parser.add_argument("--infer_images", type=int, default=16, help="files in the inference folder per size")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side, after one warm-up round")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--num_workers", default="auto", help="the bundle's data loader workers (its default: auto)")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.images, args.infer_images, args.rounds = [256], 17, 8, 2
    workers = int(args.num_workers) if str(args.num_workers).isdigit() else args.num_workers
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    torch.manual_seed(0)
    results = {
        "threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds, "num_workers": args.num_workers,
        "torch": torch.__version__, "sizes": {},
    }
    for size in args.sizes:
        r: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = write_images(tmp / "data", args.images, size)
            net = training(tmp / "bundle", data, size, args.batch_size, args.rounds, workers, r)
            r["channels_last"] = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(
                memory_format=torch.channels_last
            )
            infer_in = write_images(tmp / "infer", args.infer_images, size, seed=1) / "images"
            inference(tmp / "bundle", infer_in, tmp / "pred", size, args.batch_size, args.rounds, workers, r)
        results["sizes"][str(size)] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
    print(f"{'size':>5} {'train bundle':>13} {'train plain':>12} {'ratio':>6} {'fwd bundle':>11} {'fwd plain':>10} {'ratio':>6} {'end-to-end':>11} {'e2e/fwd':>8}  (images/s; ratios: medians of the rounds)")
    for size, r in results["sizes"].items():
        print(
            f"{size:>5} {r['train_bundle_images_s']:>13.2f} {r['train_plain_images_s']:>12.2f} {r['train_ratio_bundle_over_plain']:>6.3f} "
            f"{r['infer_bundle_forward_images_s']:>11.2f} {r['infer_plain_forward_images_s']:>10.2f} {r['infer_forward_ratio_bundle_over_plain']:>6.3f} "
            f"{r['infer_bundle_end_to_end_images_s']:>11.2f} {r['infer_end_to_end_over_forward']:>8.3f}"
        )
        print(f"      training ratio per round: {r['train_ratio_per_round']}; channels_last: {r['channels_last']}")
        print(
            f"      peak MiB: train bundle {r['train_bundle_peak_mib']}, train plain {r['train_plain_peak_mib']}, "
            f"inference bundle {r['infer_bundle_peak_mib']}, inference plain {r['infer_plain_peak_mib']}"
        )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
