"""Packages that only add optional outputs, and what the bundle does without them.

Training and inference need the packages in ``configs/metadata.json``'s
``required_packages_version``.  The ones in :data:`OPTIONAL` (listed under
``extra_packages_version`` there) only add outputs: without one, the output it feeds is skipped
after ONE warning per process naming the package, what is lost and how to get it back, and the run
goes on.  Installed the model zoo's way (exactly the required packages), as MONAI Label does, a
bundle therefore still trains and infers.

* ``matplotlib``: ``logs/curves.png`` (``logs/curves.csv`` is written either way);
* ``tensorboard``: TensorBoard event files in ``logs/`` (scalars and validation previews; the
  preview PNGs in ``logs/previews/`` are written either way); ``configs/train.json`` hands MONAI's
  ``TensorBoardStatsHandler`` the writer from :func:`tensorboard_stand_in`;
* ``tqdm``: progress bars (training progress is then logged as plain lines).

(``extra_packages_version`` rather than ``optional_packages_version``: MONAI reads the latter as
an old name of ``required_packages_version`` and, when both are present, replaces the required
list with it whenever it loads the metadata.)
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Any

__all__ = ["OPTIONAL", "NullSummaryWriter", "available", "reset", "tensorboard_stand_in"]

logger = logging.getLogger(__name__)

#: package -> (module to import to know it works, distribution to pip install, what is lost without it)
OPTIONAL: dict[str, tuple[str, str, str]] = {
    "matplotlib": ("matplotlib", "matplotlib", "no logs/curves.png (logs/curves.csv is still written)"),
    "tensorboard": (
        "torch.utils.tensorboard",
        "tensorboard",
        "no TensorBoard event files in the log folder (losses, metrics and previews; preview PNGs are still written)",
    ),
    "tqdm": ("tqdm", "tqdm", "no progress bars (training progress is logged as plain lines instead)"),
}

#: package -> whether it imported, once per process
_checked: dict[str, bool] = {}

# MONAI's CacheDataset says the same about tqdm in a warning of its own; one warning per package is enough
warnings.filterwarnings("ignore", message="tqdm is not installed, will not show the caching progress bar")


def _is_main_process() -> bool:
    """Rank 0 or the only process (torchrun's ``RANK`` before a process group exists)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def available(package: str) -> bool:
    """Whether the optional ``package`` (a key of :data:`OPTIONAL`) can be imported.

    The first time it cannot, one warning says what is lost and how to get it; later calls in the
    same process only return ``False``.  Any ``ImportError`` counts as missing, also one raised by
    a broken or too old installation.
    """
    if package not in OPTIONAL:
        raise KeyError(f"{package!r} is not an optional package of this bundle: use one of {', '.join(OPTIONAL)}")
    if package not in _checked:
        module, dist, lost = OPTIONAL[package]
        try:
            importlib.import_module(module)
            _checked[package] = True
        except ImportError as exc:
            _checked[package] = False
            if _is_main_process():
                logger.warning(
                    "optional package %s is not installed (%s): %s; pip install %s to get it.",
                    package, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, lost, dist,
                )
    return _checked[package]


def reset() -> None:
    """Forget which packages were checked (tests)."""
    _checked.clear()


class NullSummaryWriter:
    """Takes the place of TensorBoard's ``SummaryWriter`` when tensorboard is missing: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ignore

    @staticmethod
    def _ignore(*args: Any, **kwargs: Any) -> None:
        return None


def tensorboard_stand_in() -> NullSummaryWriter | None:
    """The ``summary_writer`` argument for MONAI's ``TensorBoardStatsHandler``.

    ``None`` when tensorboard works (the handler then opens and closes its own writer, as
    without the argument), else a :class:`NullSummaryWriter`, after the one warning of
    :func:`available`, so the handler is built and training goes on without event files.
    """
    return None if available("tensorboard") else NullSummaryWriter()
