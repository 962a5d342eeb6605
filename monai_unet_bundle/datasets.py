"""Data sets that scale: in memory, on a disk cache, or streamed, chosen by one knob.

``cache``:

* ``memory``: MONAI's ``CacheDataset`` keeps the output of the deterministic transforms (loaded,
  converted, resized) in RAM; the fastest, and right while it fits.
* ``disk``: MONAI's ``PersistentDataset`` writes that output once to ``cache_dir`` and reads it back
  every epoch; memory stays bounded whatever the data set's size.
* ``none``: MONAI's ``Dataset`` reads and transforms every file every epoch; bounded memory, no disk.
* ``auto`` (default): ``memory`` when the cached tensors need less than a quarter of the memory
  available now, else ``disk``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.optional import available

__all__ = ["CACHE_MODES", "available_memory_bytes", "cached_size", "choose_cache", "loader_workers", "make_dataset"]

logger = logging.getLogger(__name__)

CACHE_MODES = ("auto", "memory", "disk", "none")


def available_memory_bytes() -> int:
    """Memory the system can give now (``MemAvailable``), or 4 GiB when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def choose_cache(cache: str, n_items: int, spatial_size: Sequence[int], in_channels: int, memory: int | None = None) -> str:
    """Resolve ``cache`` (``auto`` -> ``memory`` or ``disk``) for ``n_items`` cached image/mask pairs.

    Raises:
        BundleInputError: for a value not in :data:`CACHE_MODES`.
    """
    if cache not in CACHE_MODES:
        raise BundleInputError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}.")
    if cache != "auto":
        return cache
    pixels = 1
    for s in spatial_size:
        pixels *= int(s)
    need = n_items * pixels * (in_channels + 1) * 4  # float32 image channels + mask
    budget = (memory if memory is not None else available_memory_bytes()) // 4
    choice = "memory" if need <= budget else "disk"
    logger.info("cache auto: %d pairs need %.0f MiB cached, budget %.0f MiB: %s", n_items, need / 2**20, budget / 2**20, choice)
    return choice


def cached_size(plan: Mapping[str, Any]) -> list[int]:
    """The size of a cached image: ``spatial_size``, or with patch training (images kept at their own size) the
    median image's, which the plan records from the data check."""
    median = (plan.get("data") or {}).get("median_height_width")
    if plan.get("patch_training") and median:
        return [int(round(s)) for s in median]
    return list(plan["spatial_size"])


def loader_workers(num_workers: int | str, cache: str = "memory", device: str | None = None) -> int:
    """Data loader processes: the number given, or for ``auto`` what suits this machine.

    With data cached in memory the workers only flip tensors, so one or two are enough (on 2
    cores, one worker took training from 0.95 to 0.98 of a plain loop's speed).  Reading files
    (``disk``/``none``, and inference) keeps more busy, up to one per core but one.  Inference on
    the CPU (``device`` given and not CUDA) is the exception: there the network already uses
    every core, and a worker decoding files beside it slowed inference on 2 cores from 12.9 to
    9.0 images/s, so ``auto`` gives no worker up to 4 cores and one per 4 cores above that.
    """
    if isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0:
        return num_workers
    if num_workers != "auto":
        raise BundleInputError(f"num_workers must be a whole number >= 0 or \"auto\", got {num_workers!r}.")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cache == "memory":
        return min(2, cpus // 2)
    if device is not None and not str(device).startswith("cuda"):
        return 0 if cpus <= 4 else min(8, cpus // 4)
    return max(1, min(8, cpus - 1))


def make_dataset(
    data: Sequence[dict],
    transform: Callable,
    cache: str = "auto",
    cache_dir: str | Path = "cache/persistent",
    spatial_size: Sequence[int] = (512, 512),
    in_channels: int = 3,
    num_workers: int = 0,
    plan: Mapping[str, Any] | None = None,
) -> Dataset:
    """Build the data set for ``data`` with the caching chosen by ``cache`` (see the module docstring).

    ``plan``: the training plan; the disk cache goes in a sub-folder named by its hash, since MONAI's
    ``PersistentDataset`` keys entries by the data item only and a new plan (size, normalisation,
    channels) must not reuse tensors made under another.
    """
    mode = choose_cache(cache, len(data), spatial_size, in_channels)
    if plan is not None:
        key = json.dumps({k: plan.get(k) for k in ("spatial_size", "in_channels", "normalization", "num_classes",
                                                   "mask_palette", "mask_thresholds")}, sort_keys=True)
        if plan.get("patch_training"):  # images kept at their own size (earlier caches keep their folder names)
            key += " patches"
        cache_dir = Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:12]
    if mode == "memory":
        available("tqdm")  # our one warning when it is missing (MONAI's own about the caching bar is silenced)
        return CacheDataset(data=data, transform=transform, cache_rate=1.0, num_workers=num_workers or None)
    if mode == "disk":
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data=data, transform=transform, cache_dir=str(cache_dir))
    return Dataset(data=data, transform=transform)
