"""Multi-process training and evaluation under ``torchrun`` (``configs/multi_gpu_*.json``).

The two mixins ``configs/multi_gpu_train.json`` and ``configs/multi_gpu_evaluate.json`` call these
helpers; everything here also works with one process and on a CPU (backend ``gloo``), which is how
the tests run it.

* :func:`init_process_group` joins the process group that ``torchrun`` describes in the
  environment, binds each process to its GPU, and tells ignite about the group.  The last step
  matters: when the group is created outside ignite, ignite's first ``get_rank()`` (or
  ``device()``, ``get_world_size()`` ...) builds its view of the group with a collective
  (``new_group`` + ``all_reduce``), which deadlocks when only some ranks make that first call
  (``if not items or idist.get_rank() != 0``).  Doing it here, on every rank at the same point,
  removes that trap.
* :func:`evaluation_sampler` shards a validation or test set without duplicating images whenever
  every rank can get at least one.
* :class:`DistributedSegmentationReport` gathers the per-image rows of all ranks and writes the
  evaluation report once, on rank 0, in data-set order.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sized
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.data import DistributedSampler

from monai_unet_bundle.metrics import SegmentationReport

__all__ = [
    "DistributedSegmentationReport",
    "backend_for",
    "ddp_device_ids",
    "destroy_process_group",
    "evaluation_sampler",
    "init_process_group",
    "is_main_process",
    "local_device",
]

logger = logging.getLogger(__name__)


def backend_for(device: str | torch.device) -> str:
    """The ``torch.distributed`` backend for ``device``: ``nccl`` on CUDA GPUs, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.

    ``torchrun`` sets ``LOCAL_RANK`` (the process's index on its node); without it, 0.
    """
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def ddp_device_ids(device: str | torch.device) -> list[int] | None:
    """``device_ids`` for ``DistributedDataParallel``: ``[index]`` for one GPU, ``None`` for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return [device.index if device.index is not None else torch.cuda.current_device()]


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process).

    Reads the process group when there is one, else ``torchrun``'s ``RANK`` variable, so it gives
    the right answer even in a config expression evaluated before :func:`init_process_group`.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_process_group(backend: str | None = None, device: str | torch.device | None = None, **kwargs: Any) -> None:
    """Join the default process group and make ignite use it.

    Args:
        backend: ``nccl`` or ``gloo``; default :func:`backend_for` ``device``.
        device: this process's device (default :func:`local_device`); a CUDA device becomes the
            current device before the group is created, as NCCL needs.
        kwargs: passed to :func:`torch.distributed.init_process_group` (e.g. ``timeout``, or
            ``init_method``/``world_size``/``rank`` outside ``torchrun``).

    Does nothing to the group when it already exists (it is still handed to ignite).
    """
    device = torch.device(device) if device is not None else local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or backend_for(device), **kwargs)
    idist.sync()  # ignite's one collective, on every rank at the same point (see the module docstring)
    logger.info(
        "process group: rank %d of %d (%s), device %s", dist.get_rank(), dist.get_world_size(), dist.get_backend(), device
    )


def destroy_process_group() -> None:
    """Leave the process group (if any) and tell ignite that the run is serial again."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    idist.sync()


def evaluation_sampler(
    dataset: Sized, num_replicas: int | None = None, rank: int | None = None, shuffle: bool = False
) -> DistributedSampler:
    """A sampler that splits ``dataset`` over the ranks for validation or evaluation.

    Every image is seen exactly once (MONAI's ``even_divisible=False``) when the set has at least
    one image per rank; some ranks then get one image more than others, which is harmless for
    evaluation.  A smaller set is padded by repeating images, because a rank without any data
    would stop with an error: the metrics then count up to ``world size - 1`` images twice
    (:class:`DistributedSegmentationReport` drops the repeats).

    Args:
        dataset: the validation or test dataset.
        num_replicas: world size (default: from the process group).
        rank: this rank (default: from the process group).
        shuffle: shuffle the order (not needed for evaluation).
    """
    world = num_replicas if num_replicas is not None else dist.get_world_size()
    return DistributedSampler(
        dataset, even_divisible=len(dataset) < world, num_replicas=num_replicas, rank=rank, shuffle=shuffle
    )


class DistributedSegmentationReport(SegmentationReport):
    """:class:`~monai_unet_bundle.metrics.SegmentationReport` for a data set split over ranks.

    Each rank collects the rows of its own images; at the end the rows of all ranks are gathered,
    put back into data-set order (with ``sampler``, the one the evaluation data loader uses;
    images that padding repeated are kept once), and rank 0 writes the files.  Every rank
    returns the same summary.  With a single process it is exactly ``SegmentationReport``.

    Args:
        args, kwargs: as for ``SegmentationReport`` (``output_dir``, ``num_classes`` ...).
        sampler: the evaluation data loader's sampler; without it, rows are listed rank by rank.
    """

    def __init__(self, *args: Any, sampler: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler = sampler

    def _gather_rows(self) -> list:
        indices = list(iter(self.sampler)) if self.sampler is not None else None
        if indices is not None and len(indices) != len(self.rows):
            warnings.warn(
                f"rank {dist.get_rank()} collected {len(self.rows)} rows for {len(indices)} sampled images: "
                "rows are listed rank by rank",
                stacklevel=2,
            )
            indices = None
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (indices, self.rows))
        if any(idx is None for idx, _ in gathered):
            return [row for _, rows in gathered for row in rows]
        by_index: dict[int, Any] = {}
        for idx, rows in gathered:
            for i, row in zip(idx, rows):
                by_index.setdefault(int(i), row)
        return [by_index[i] for i in sorted(by_index)]

    def write(self, engine: Engine | None = None) -> dict[str, Any]:
        """Gather every rank's rows; rank 0 writes the CSV, JSON and Markdown files; returns the summary."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rows = self._gather_rows()
            if dist.get_rank() != 0:
                return self.summary()
        return super().write(engine)
