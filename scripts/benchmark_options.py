"""Measure run-time options for the bundle's network on this machine, side by side.

For the default network (``configs/train.json``'s ``network_def``) at each size it times, in one
process, variants taking turns round by round (median of ``--repeats`` rounds after a warm-up):

* a training step (forward, Dice+CE loss, backward, Adam step): default memory layout,
  ``channels_last`` (the bundle's CPU default), 1 thread instead of all, and ``torch.compile``
  with ``--compile`` (its first step, the compilation, reported apart);
* an inference forward pass: default layout, ``channels_last``, ``channels_last`` with batch norm
  folded into the convolutions (the bundle's CPU default), TorchScript (``torch.jit.trace``) and
  ONNX Runtime (when installed);
* on a CUDA GPU only: the training step in float32, with mixed precision (``torch.autocast``) and
  with ``cudnn.benchmark``, and the forward pass in float32 and mixed precision.

``--allocators`` also runs the default training step and forward pass in child processes with
glibc's allocator as it comes, glibc tuned as the bundle does on the CPU
(``monai_unet_bundle.runtime.tune_allocator``), and jemalloc and tcmalloc preloaded
(``LD_PRELOAD``) where found on the system (Debian: ``apt-get install libjemalloc2
libtcmalloc-minimal4``); the children take turns, and each reports its peak resident memory.

    python scripts/benchmark_options.py --sizes 256 512 --compile --allocators
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.bundle import ConfigParser  # noqa: E402

from monai_unet_bundle.fusion import fuse_batch_norm  # noqa: E402
from monai_unet_bundle.losses import SegmentationLoss  # noqa: E402
from monai_unet_bundle.plan import NETWORK  # noqa: E402

ALLOCATORS = {
    "glibc": None,
    "glibc_tuned": "tune_allocator",  # the bundle's CPU default: runtime.tune_allocator (mmap off, no trim)
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}


def network() -> torch.nn.Module:
    """The bundle's default network, built from its config, with fixed weights."""
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(REPO / "configs" / "train.json")
    # the network alone: no data check, no plan from data
    parser["plan"] = {"num_classes": 2, "in_channels": 3, **NETWORK}
    return parser.get_parsed_content("network_def")


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per variant; each round runs every variant once, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step_fn(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """A closure doing one optimisation step (with CUDA autocast and a grad scaler when ``amp``)."""
    loss_fn = SegmentationLoss("dice_ce", 2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, enabled=amp):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def forward_fn(net: torch.nn.Module, x: torch.Tensor, amp: bool = False) -> Callable[[], object]:
    """A closure doing one inference forward pass."""
    net.eval()

    def forward() -> object:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=amp):
            return net(x)

    return forward


def channels_last(net: torch.nn.Module) -> torch.nn.Module:
    return net.to(memory_format=torch.channels_last)


def cpu_options(size: int, batch: int, repeats: int, compile_: bool) -> dict:
    """Seconds per training step and forward pass for each CPU variant."""
    x = torch.rand(batch, 3, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.8).float()
    r: dict = {}
    train = interleaved(
        {
            "train_step_s": train_step_fn(network(), x, y),
            "train_step_channels_last_s": train_step_fn(channels_last(network()), x, y),
        },
        repeats,
    )
    r.update(train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    r["train_step_1_thread_s"] = interleaved({"one": train_step_fn(network(), x, y)}, max(1, repeats - 1))["one"]
    torch.set_num_threads(threads)
    if compile_:
        try:
            step = train_step_fn(torch.compile(network()), x, y)
            start = time.perf_counter()
            step()
            r["compile_first_step_s"] = time.perf_counter() - start
            r["train_step_compiled_s"] = interleaved({"c": step}, repeats)["c"]
        except Exception as exc:  # a compiler failure is a result, not a crash
            r["train_step_compiled_s"] = None
            r["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    eager = network().eval()
    folded, _ = fuse_batch_norm(channels_last(network()))
    variants = {
        "infer_eager_s": forward_fn(eager, x),
        "infer_channels_last_s": forward_fn(channels_last(copy.deepcopy(eager)), x),
        "infer_channels_last_folded_bn_s": forward_fn(folded, x),
    }
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(eager), x)
    variants["infer_torchscript_s"] = forward_fn(traced, x)
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            torch.onnx.export(eager, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy()}
        variants["infer_onnxruntime_s"] = lambda: session.run(None, feed)
    except ImportError:
        r["infer_onnxruntime_s"] = None
    r.update(interleaved(variants, repeats))
    return r


def gpu_options(size: int, batch: int, repeats: int) -> dict:
    """Seconds per training step and forward pass on the GPU: float32, mixed precision, cudnn.benchmark."""
    device = torch.device("cuda")
    x = torch.rand(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.8).float()
    sync = torch.cuda.synchronize
    r: dict = {"gpu": torch.cuda.get_device_name(0)}
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        tag = "_cudnn_benchmark" if bench else ""
        times = interleaved(
            {
                f"gpu_train_step_fp32{tag}_s": train_step_fn(network().to(device), x, y),
                f"gpu_train_step_amp{tag}_s": train_step_fn(network().to(device), x, y, amp=True),
                f"gpu_train_step_amp_channels_last{tag}_s": train_step_fn(channels_last(network().to(device)), x, y, amp=True),
                f"gpu_infer_fp32{tag}_s": forward_fn(network().to(device), x),
                f"gpu_infer_amp{tag}_s": forward_fn(network().to(device), x, amp=True),
            },
            repeats,
            sync,
        )
        r.update(times)
    torch.backends.cudnn.benchmark = False
    for key in [k for k in r if k.startswith("gpu_") and k.endswith("_s")]:
        r[key[: -len("_s")] + "_images_per_s"] = batch / r[key]
    return r


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[:1] + sys.argv[2:]
from benchmark_options import allocator_child
allocator_child(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "tune")
"""


def allocator_child(size: int, batch: int, repeats: int, tune: bool = False) -> None:
    """In a child process: print the median training step and forward pass seconds as JSON."""
    if tune:
        from monai_unet_bundle.runtime import tune_allocator

        tune_allocator(True, "cpu")
    x = torch.rand(batch, 3, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.8).float()
    net = channels_last(network())
    times = interleaved({"train_step_s": train_step_fn(net, x, y), "infer_s": forward_fn(copy.deepcopy(net), x)}, repeats)
    from benchmark import peak_rss_mib

    times["peak_mib"] = peak_rss_mib()
    print(json.dumps(times))


def allocator_options(size: int, batch: int, repeats: int, rounds: int = 2) -> dict:
    """Run :func:`allocator_child` under each allocator found, the allocators taking turns."""
    found = {name: lib for name, lib in ALLOCATORS.items() if lib in (None, "tune_allocator") or Path(lib).is_file()}
    runs: dict[str, list[dict]] = {name: [] for name in found}
    for _ in range(rounds):
        for name, lib in found.items():
            env = dict(os.environ)
            if lib and lib.startswith("/"):
                env["LD_PRELOAD"] = lib
            tune = "tune" if lib == "tune_allocator" else "default"
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(Path(__file__).parent), str(size), str(batch), str(repeats), tune],
                env=env, capture_output=True, text=True, check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    r: dict = {}
    for name, results in runs.items():
        for key in ("train_step_s", "infer_s", "peak_mib"):
            r[f"allocator_{name}_{key}"] = statistics.median(x[key] for x in results)
    r["allocators_missing"] = [name for name in ALLOCATORS if name not in found]
    return r


def _ratio_base(key: str, r: dict) -> float | None:
    if key.startswith("allocator_"):
        return r.get("allocator_glibc_train_step_s" if "train" in key else "allocator_glibc_infer_s")
    if key.startswith("gpu_train"):
        return r.get("gpu_train_step_fp32_s")
    if key.startswith("gpu_infer"):
        return r.get("gpu_infer_fp32_s")
    if key.startswith("train") or key.startswith("compile"):
        return r.get("train_step_s")
    if key.startswith("infer"):
        return r.get("infer_eager_s")
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print a table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow first step)")
    parser.add_argument("--allocators", action="store_true", help="also compare glibc, jemalloc and tcmalloc in child processes")
    parser.add_argument("--out", type=Path, default=Path("benchmark_options.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # exporter and compiler chatter
    threads = torch.get_num_threads()
    results: dict = {"threads": threads, "batch_size": args.batch_size, "torch": torch.__version__, "sizes": {}}
    for size in args.sizes:
        r = cpu_options(size, args.batch_size, args.repeats, args.compile)
        if args.allocators:
            r.update(allocator_options(size, args.batch_size, args.repeats))
        if torch.cuda.is_available():
            r.update(gpu_options(size, args.batch_size, args.repeats))
        results["sizes"][str(size)] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        print(f"size {size}, batch {args.batch_size}, {threads} CPU threads (seconds; ratio to the baseline in brackets)")
        for key, value in r.items():
            if key.endswith("peak_mib"):
                print(f"  {key:<44} {value:8.0f} MiB")
                continue
            if value is None or isinstance(value, (str, list)):
                if value:
                    print(f"  {key:<44} {value}")
                continue
            base = _ratio_base(key, r)
            ratio = f" [{value / base:.2f}x]" if base and "per_s" not in key and value is not base else ""
            print(f"  {key:<44} {value:8.3f}{ratio}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
