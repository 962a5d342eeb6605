"""Measure run-time options for the bundle's network on this machine, side by side in one process.

For the default network (``configs/train.json``'s ``network_def``) at each size, it times:

* a training step (forward, Dice+CE loss, backward, Adam step) in the default memory format and in
  ``channels_last``, and with ``torch.compile`` (its first step, the compilation, reported apart);
* an inference forward pass in eager PyTorch, TorchScript (``torch.jit.trace``) and ONNX Runtime;
* the same eager step with 1 thread instead of all.

Every variant runs after a warm-up, and the median of ``--repeats`` runs is kept.

    python scripts/benchmark_options.py --sizes 256 512 --batch_size 4
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.bundle import ConfigParser  # noqa: E402

from monai_unet_bundle.losses import SegmentationLoss  # noqa: E402


def network() -> torch.nn.Module:
    """The bundle's default network, built from its config."""
    parser = ConfigParser()
    parser.read_config(REPO / "configs" / "train.json")
    return parser.get_parsed_content("network_def")


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A closure doing one optimisation step."""
    loss_fn = SegmentationLoss("dice_ce", 2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print a table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow first step)")
    parser.add_argument("--out", type=Path, default=Path("benchmark_options.json"))
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    results: dict = {"threads": threads, "batch_size": args.batch_size, "sizes": {}}
    for size in args.sizes:
        torch.manual_seed(0)
        x = torch.rand(args.batch_size, 3, size, size)
        y = (torch.rand(args.batch_size, 1, size, size) > 0.8).float()
        r: dict = {}
        r["train_step_s"] = median_time(train_step_fn(network(), x, y), args.repeats)
        cl_net = network().to(memory_format=torch.channels_last)
        r["train_step_channels_last_s"] = median_time(
            train_step_fn(cl_net, x.contiguous(memory_format=torch.channels_last), y), args.repeats
        )
        torch.set_num_threads(1)
        r["train_step_1_thread_s"] = median_time(train_step_fn(network(), x, y), max(1, args.repeats - 1))
        torch.set_num_threads(threads)
        if args.compile:
            try:
                step = train_step_fn(torch.compile(network()), x, y)
                start = time.perf_counter()
                step()
                r["compile_first_step_s"] = time.perf_counter() - start
                r["train_step_compiled_s"] = median_time(step, args.repeats)
            except Exception as exc:  # report a compiler failure as a result, not a crash
                r["train_step_compiled_s"] = None
                r["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        net = network().eval()
        with torch.no_grad():
            r["infer_eager_s"] = median_time(lambda: net(x), args.repeats)
            traced = torch.jit.trace(net, x)
            r["infer_torchscript_s"] = median_time(lambda: traced(x), args.repeats)
        try:
            import onnxruntime as ort

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "m.onnx"
                torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=False)
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                feed = {"image": x.numpy()}
                r["infer_onnxruntime_s"] = median_time(lambda: session.run(None, feed), args.repeats)
        except ImportError:
            r["infer_onnxruntime_s"] = None
        results["sizes"][str(size)] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        base_t, base_i = r["train_step_s"], r["infer_eager_s"]
        print(f"size {size}, batch {args.batch_size}, {threads} threads (seconds; ratio to the default in brackets)")
        for key, value in r.items():
            if value is None:
                continue
            if isinstance(value, str):
                print(f"  {key:<28} {value}")
                continue
            ref = base_t if key.startswith("train") else base_i if key.startswith("infer") else None
            ratio = f" [{value / ref:.2f}x]" if ref and key not in ("train_step_s", "infer_eager_s") else ""
            print(f"  {key:<28} {value:8.3f}{ratio}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
