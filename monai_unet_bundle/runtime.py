"""Run-time switches: mixed precision and deterministic mode."""

from __future__ import annotations

import logging
import warnings

import torch
from monai.utils import set_determinism

from monai_unet_bundle.errors import BundleInputError

__all__ = ["configure_determinism", "resolve_amp"]

logger = logging.getLogger(__name__)


def _as_choice(value: bool | str, setting: str) -> str:
    text = str(value).strip().lower()
    if text not in ("auto", "true", "false"):
        raise BundleInputError(f"{setting} must be auto, true or false, got {value!r}.")
    return text


def resolve_amp(amp: bool | str, device: str | torch.device) -> bool:
    """Whether to train with mixed precision: ``auto`` means on CUDA only.

    Asking for it on a CPU gives a warning and full precision (CPU autocast to bfloat16 is slower
    than float32 for these convolutions on common CPUs).
    """
    choice = _as_choice(amp, "amp")
    on_cuda = torch.device(device).type == "cuda"
    if choice == "true" and not on_cuda:
        warnings.warn("amp=true has no effect on the CPU: training in full precision.", stacklevel=2)
        return False
    return on_cuda and choice != "false"


def configure_determinism(seed: int, deterministic: bool | str = False) -> None:
    """Seed every generator; with ``deterministic`` also demand deterministic algorithms.

    Deterministic mode makes repeated runs on the same hardware give the same numbers, at some
    cost in speed (and ``cudnn.benchmark`` off).
    """
    strict = _as_choice(deterministic, "deterministic") == "true"
    set_determinism(seed=int(seed), use_deterministic_algorithms=strict)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not strict
    logger.info("seed %d, deterministic algorithms %s", seed, "on" if strict else "off")
