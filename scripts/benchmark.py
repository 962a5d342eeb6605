"""Measure the bundle against plain PyTorch loops, side by side in one process.

For each input size it measures, with the same network, batch size, input size and data:

* training throughput (images/s) of the trainer built from ``configs/train.json`` (its real
  pipeline: cached data, random flips, loss, optimizer, handlers) against a hand-written loop over
  tensors held in memory;
* inference throughput of ``configs/inference.json`` end to end (files read and masks written)
  and of its forward pass alone, against a plain ``model(x)`` loop on tensors;
* the peak resident memory each side adds, each measured in a process of its own.

The two sides take turns, round by round (a bundle epoch, then a plain epoch; an inference run,
then the forward passes), so a machine that slows down or speeds up affects both alike; ratios are
medians over the rounds.  The plain loops use a copy of the bundle's network, in its memory layout
(``channels_last`` on the CPU), so a ratio shows what the configs, handlers and transforms cost.
The bundle's training peak includes its cached data set; the plain sides run without the
bundle's CPU allocator tuning (``fast_allocator``), as a hand-written script would.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.bundle import ConfigWorkflow  # noqa: E402

from monai_unet_bundle.demo import make_demo_pair  # noqa: E402
from monai_unet_bundle.losses import SegmentationLoss  # noqa: E402
from monai_unet_bundle.runtime import in_channels_last  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``; unlike ``ru_maxrss``, not inherited from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(side: str, size: int, batch: int, tmp: Path, workers: int | str) -> None:
    """In a fresh process: run one side's work once and print the peak resident memory it added.

    The peak (``VmHWM``) is taken over the whole process and the level after the imports is
    subtracted.  Each side gets its own process because the bundle keeps freed memory for reuse
    on the CPU (``fast_allocator``), which would hide the peaks of whatever ran after it.  The
    plain sides run without the bundle's allocator tuning, as a hand-written script would.
    """
    base = _rss_mib()
    if side == "train_bundle":
        training(tmp / "memory_bundle", tmp / "data", size, batch, 0, workers, {}, plain_side=False)
    elif side == "infer_bundle":
        wf = ConfigWorkflow(
            config_file=str(REPO / "configs" / "inference.json"), workflow_type="infer", bundle_root=str(tmp / "bundle"),
            input_dir=str(tmp / "infer" / "images"), output_dir=str(tmp / "memory_pred"), spatial_size=[size, size],
            batch_size=batch, num_workers=workers,
        )
        wf.initialize()
        wf.run()
    else:
        from monai_unet_bundle.networks import build_network
        from monai_unet_bundle.runtime import place_network

        net = place_network(build_network(), "cpu")
        n = len(list((tmp / "data" / "images").iterdir()))
        if side == "train_plain":
            samples = [{"image": torch.rand(3, size, size), "label": (torch.rand(1, size, size) > 0.8).float()} for _ in range(n)]
            PlainLoop(net, samples, batch).epoch()
        else:
            x = torch.rand(batch, 3, size, size)
            with torch.no_grad():
                for _ in range(2):
                    net.eval()(x)
    print(json.dumps({"peak_mib": round(peak_rss_mib() - base, 1)}))


def peak_memory(side: str, size: int, batch: int, tmp: Path, workers: int | str, threads: int) -> float:
    """Run :func:`memory_child` for ``side`` in a child process; returns MiB."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory_child", side, "--sizes", str(size), "--batch_size", str(batch),
         "--tmp", str(tmp), "--num_workers", str(workers), "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


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


def training(
    root: Path, data: Path, size: int, batch: int, rounds: int, workers: int | str, r: dict, plain_side: bool = True
) -> torch.nn.Module:
    """Train the bundle and the plain loop epoch by epoch in turn; fill ``r`` with images/s.

    The bundle's trainer is built from ``configs/train.json`` and run through the config's own
    ``run`` list (handler wiring, then ``trainer.run()``).  After each of its epochs, once all of the
    bundle's epoch handlers (scheduler, curves, resume checkpoint ...) have run and the resume
    checkpoint it writes in the background is on disk, one plain epoch of the same number of
    images runs.  A bundle epoch is timed from the end of the plain epoch before it to that point,
    so everything the bundle does between and around iterations counts, its checkpoint write
    included.  The first epoch of each side is a warm-up and is not timed.
    """
    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "train.json"), workflow_type="train", bundle_root=str(root),
        dataset_dir=str(data), spatial_size=[size, size], batch_size=batch, max_epochs=rounds + 1,
        val_interval=rounds + 2, num_workers=workers, val_fraction=0.1, resume="false",
        # no validation while timing: the settings check refuses val_interval > max_epochs (no model
        # would ever be saved), so this measurement skips it and keeps the other initialize steps
        initialize=["$@determinism", "$@allocator"],
    )
    from ignite.engine import Events

    from monai_unet_bundle.checkpoints import ResumeCheckpoint

    wf.initialize()
    trainer, net = wf.trainer, wf.parser.get_parsed_content("network")
    checkpoint = next(h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, ResumeCheckpoint))
    dataset = wf.parser.get_parsed_content("train#dataset")
    plain = PlainLoop(net, [dataset[i] for i in range(len(dataset))], batch, wf.parser.get_parsed_content("learning_rate"))
    bundle_s, plain_s, mark = [], [], [0.0]

    def interleave(engine) -> None:
        checkpoint.wait()  # the bundle's own background write is charged to the bundle
        now = time.perf_counter()
        if engine.state.epoch > 1:
            bundle_s.append(now - mark[0])
        start = time.perf_counter()
        plain.epoch()  # the first one is the plain side's warm-up
        if engine.state.epoch > 1:
            plain_s.append(time.perf_counter() - start)
        mark[0] = time.perf_counter()

    if plain_side:
        # registered when the run starts, so it follows every handler the run list attached
        trainer.add_event_handler(Events.STARTED, lambda e: e.add_event_handler(Events.EPOCH_COMPLETED, interleave))
    wf.run()
    if not plain_side:
        return net
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
    original size and written), then in-memory batches through the bundle's inferer and through a
    plain ``model(x)``, taking turns batch by batch.  The first
    round is a warm-up and is not timed; ratios are medians over the rounds.
    """
    from monai_unet_bundle.inferers import SegmentationInferer

    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "inference.json"), workflow_type="infer", bundle_root=str(root),
        input_dir=str(images), output_dir=str(out), spatial_size=[size, size], batch_size=batch, num_workers=workers,
    )
    wf.initialize()
    n = len(wf.dataset_data)
    net = wf.parser.get_parsed_content("network")
    inferer = SegmentationInferer()
    plain_net = copy.deepcopy(net).eval()
    x = torch.rand(batch, 3, size, size)
    steps = max(8, n // batch)  # enough batches that the one-off folding of batch norm is amortised
    times: dict[str, list[float]] = {"e2e": [], "fwd_bundle": [], "fwd_plain": []}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def forwards() -> tuple[float, float]:
        """Seconds of ``steps`` batches through the bundle's inferer and through ``model(x)``.

        The two take turns batch by batch, in alternating order, so neither always runs on the
        memory the other has just freed.
        """
        spent = {"bundle": 0.0, "plain": 0.0}
        calls = {"bundle": lambda: inferer(x, net), "plain": lambda: plain_net(x)}
        with torch.no_grad():
            for k in range(steps):
                for side in ("bundle", "plain") if k % 2 == 0 else ("plain", "bundle"):
                    spent[side] += timed(calls[side])
        return spent["bundle"], spent["plain"]

    net.eval()
    for i in range(rounds + 1):
        t = {"e2e": timed(wf.evaluator.run)}
        t["fwd_bundle"], t["fwd_plain"] = forwards()
        if i == 0:
            continue  # warm-up
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
    parser.add_argument("--infer_images", type=int, default=32, help="files in the inference folder per size")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side, after one warm-up round")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--num_workers", default="auto", help="the bundle's data loader workers (its default: auto)")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--memory_child", choices=["train_bundle", "train_plain", "infer_bundle", "infer_plain"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.images, args.infer_images, args.rounds = [256], 24, 32, 2
    workers = int(args.num_workers) if str(args.num_workers).isdigit() else args.num_workers
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    if args.memory_child:
        memory_child(args.memory_child, args.sizes[0], args.batch_size, args.tmp, workers)
        return 0
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
            r["channels_last"] = in_channels_last(net)
            infer_in = write_images(tmp / "infer", args.infer_images, size, seed=1) / "images"
            inference(tmp / "bundle", infer_in, tmp / "pred", size, args.batch_size, args.rounds, workers, r)
            for side in ("train_bundle", "train_plain", "infer_bundle", "infer_plain"):
                r[f"{side}_peak_mib"] = peak_memory(side, size, args.batch_size, tmp, args.num_workers, args.threads)
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
            f"      peak MiB added (each in its own process): train bundle {r['train_bundle_peak_mib']}, train plain {r['train_plain_peak_mib']}, "
            f"inference bundle {r['infer_bundle_peak_mib']}, inference plain {r['infer_plain_peak_mib']}"
        )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
