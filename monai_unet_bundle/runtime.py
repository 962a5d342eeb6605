"""Run-time switches: where the network lives and in which memory layout, the CPU memory allocator,
mixed precision, determinism."""

from __future__ import annotations

import ctypes
import logging
import sys
import warnings

import torch
from monai.utils import set_determinism

from monai_unet_bundle.settings import auto_flag, flag

__all__ = ["configure_determinism", "in_channels_last", "place_network", "resolve_amp", "tune_allocator", "use_channels_last"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

logger = logging.getLogger(__name__)


def resolve_amp(amp: bool | str, device: str | torch.device) -> bool:
    """Whether to train with mixed precision: ``auto`` means on CUDA only.

    Asking for it on a CPU gives a warning and full precision (CPU autocast to bfloat16 is slower
    than float32 for these convolutions on common CPUs).
    """
    choice = auto_flag(amp, "amp")
    on_cuda = torch.device(device).type == "cuda"
    if choice == "true" and not on_cuda:
        warnings.warn("amp=true has no effect on the CPU: training in full precision.", stacklevel=2)
        return False
    return on_cuda and choice != "false"


def use_channels_last(channels_last: bool | str, device: str | torch.device) -> bool:
    """Whether to hold the network's weights in the ``channels_last`` (NHWC) memory layout.

    ``auto`` means on the CPU only, where it was measured (``scripts/benchmark_options.py``, 2-core
    CPU, torch 2.13): a training step 10-16% shorter and an inference pass 33-49% shorter at 256
    and 512 px, with the same results up to float rounding.  It was not measured on a GPU, so
    ``auto`` leaves CUDA in the default layout; ``true`` turns it on anywhere.
    """
    choice = auto_flag(channels_last, "channels_last")
    return choice == "true" or (choice == "auto" and torch.device(device).type == "cpu")


def place_network(network: torch.nn.Module, device: str | torch.device, channels_last: bool | str = "auto") -> torch.nn.Module:
    """Move ``network`` to ``device`` and, where :func:`use_channels_last` says so, to ``channels_last``.

    Only the weights change layout: a convolution given NHWC weights runs in NHWC and hands its
    layout on, so inputs need no conversion.  The module is changed in place and returned; its
    state dict loads into a network of either layout.
    """
    network = network.to(device)
    if use_channels_last(channels_last, device):
        network = network.to(memory_format=torch.channels_last)
    return network


def in_channels_last(network: torch.nn.Module) -> bool:
    """Whether ``network``'s 2D convolution weights are in the ``channels_last`` layout (its first one tells)."""
    weight = next((m.weight for m in network.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def tune_allocator(fast_allocator: bool | str = "auto", device: str | torch.device = "cpu") -> bool:
    """Keep freed memory in the process for reuse instead of handing it back to the system.

    glibc's ``malloc`` gives every block above 32 MiB its own ``mmap`` and returns it to the
    system when freed; the activations of a 512x512 batch are such blocks, so each training step
    and forward pass maps fresh memory and pays a page fault per 4 KiB page of it.  Turning
    ``mmap`` off (``M_MMAP_MAX = 0``) and never trimming the heap (``M_TRIM_THRESHOLD``) lets
    the next step reuse the same pages.  Measured on the 2-core CPU here at 512x512, batch 4
    (``scripts/benchmark_options.py --allocators``): a training step 35% shorter (5.13 -> 3.36 s)
    and a forward pass 27% shorter (1.07 -> 0.79 s), as fast as tcmalloc; the price is a higher
    peak resident memory (3.0 instead of 2.4 GiB), which also stays with the process until it
    ends.  (tcmalloc, where installed, gives the same speed without that price: preload it and
    pass ``--fast_allocator false``.)

    ``auto`` tunes it for CPU devices on Linux with glibc; on a GPU the large blocks live in
    CUDA's own caching allocator, so nothing is changed.  It affects the whole process and is
    never undone.  Returns whether the allocator was tuned.
    """
    choice = auto_flag(fast_allocator, "fast_allocator")
    if choice == "false" or (choice == "auto" and torch.device(device).type != "cpu"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    tuned = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    logger.info("CPU allocator: %s", "freed memory kept for reuse (mmap off, no trim)" if tuned else "glibc refused the tuning")
    return tuned


def configure_determinism(seed: int, deterministic: bool | str = False) -> None:
    """Seed every generator; with ``deterministic`` also demand deterministic algorithms.

    Deterministic mode makes repeated runs on the same hardware give the same numbers, at some
    cost in speed (and ``cudnn.benchmark`` off).
    """
    strict = flag(deterministic, "deterministic")
    set_determinism(seed=int(seed), use_deterministic_algorithms=strict)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not strict
    logger.info("seed %d, deterministic algorithms %s", seed, "on" if strict else "off")
