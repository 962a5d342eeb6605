"""Segmentation losses chosen by name, with one convention for class weights.

Every loss takes raw logits ``(B, C, H, W)`` with ``C == num_classes`` and class-index labels
``(B, 1, H, W)``.  Binary segmentation uses two channels with softmax: the foreground probability is
then exactly the sigmoid of the logit difference, so binary cross-entropy and two-class
cross-entropy are the same function and one code path serves both.

Class weights are always a vector of length ``num_classes``, background first.  MONAI's ``DiceLoss``
wants the background entry dropped when ``include_background=False`` while ``DiceCELoss`` drops it
itself; here every Dice term includes the background channel, so the same full vector goes to every
term unchanged and the difference never reaches the user.  ``class_weights="auto"`` computes inverse
pixel frequencies from the training masks once (cached on disk), normalised to mean 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

from monai_unet_bundle.atomic import atomic_write_text
from monai_unet_bundle.data import fingerprint
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.settings import flag
from monai_unet_bundle.transforms import MaskToIndexd, mask_loader

__all__ = [
    "LOSS_TERMS",
    "SegmentationLoss",
    "class_pixel_counts",
    "inverse_frequency_weights",
    "resolve_class_weights",
]

logger = logging.getLogger(__name__)

#: loss name -> the terms summed; "bce" is binary cross-entropy (two-class softmax), "weighted_ce"
#: is cross-entropy with class weights ("auto" when none are given)
LOSS_TERMS: dict[str, tuple[str, ...]] = {
    "dice_ce": ("dice", "ce"),
    "dice": ("dice",),
    "ce": ("ce",),
    "bce": ("ce",),
    "focal": ("focal",),
    "dice_focal": ("dice", "focal"),
    "jaccard_bce": ("jaccard", "ce"),
    "mse": ("mse",),
    "weighted_ce": ("ce",),
}
_UNWEIGHTED = ("mse",)


def _check_weights(weights: Sequence[float] | torch.Tensor, num_classes: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != num_classes or not torch.isfinite(w).all() or (w < 0).any():
        raise BundleInputError(
            f"class_weights must be {num_classes} non-negative numbers, one per class with background first "
            f"(num_classes={num_classes}), or \"auto\"; got {list(np.round(np.asarray(weights, dtype=float), 4))}."
        )
    return w


class SegmentationLoss(torch.nn.Module):
    """A loss from :data:`LOSS_TERMS`, computed on logits and class-index labels.

    Args:
        name: one of :data:`LOSS_TERMS`.
        num_classes: channels of the logits, background included.
        class_weights: ``None`` or ``num_classes`` non-negative weights, background first.
        batch_dice: compute the Dice (and Jaccard) terms over the whole batch as one volume, as
            nnU-Net does, instead of per image and then averaged; images with little or no
            foreground then no longer give large, noisy Dice losses.

    Raises:
        BundleInputError: for an unknown name, a weight vector of the wrong length, ``bce`` with more
            than two classes, or weights given to a loss that takes none.

    Example:
        >>> loss = SegmentationLoss("dice_ce", num_classes=3, class_weights=[0.2, 1.0, 1.8])
        >>> loss(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))).ndim
        0
    """

    def __init__(
        self, name: str, num_classes: int, class_weights: Sequence[float] | torch.Tensor | None = None, batch_dice: bool = False
    ) -> None:
        super().__init__()
        if name not in LOSS_TERMS:
            raise BundleInputError(f"loss_name {name!r} is not supported: use one of {', '.join(LOSS_TERMS)}.")
        if name == "bce" and num_classes != 2:
            raise BundleInputError(f"loss_name 'bce' is for binary segmentation; with num_classes={num_classes} use 'ce'.")
        if class_weights is not None and name in _UNWEIGHTED:
            raise BundleInputError(f"loss_name {name!r} takes no class_weights: remove class_weights or choose another loss.")
        self.name, self.num_classes, self.terms = name, num_classes, LOSS_TERMS[name]
        weight = None if class_weights is None else _check_weights(class_weights, num_classes)
        self.register_buffer("class_weight", weight)
        batch = flag(batch_dice, "batch_dice")
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=True, weight=weight, batch=batch)
        self.jaccard = DiceLoss(to_onehot_y=True, softmax=True, include_background=True, weight=weight, jaccard=True, batch=batch)
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, include_background=True, gamma=2.0, weight=weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the loss terms, each a mean over the batch.

        ``logits`` of one dimension more than ``labels`` are a deep supervision stack ``(B, S, C, H, W)``
        (:class:`~monai_unet_bundle.networks.DeepSupervisedUNet`): the loss of output ``s`` is weighted by
        ``2**-s`` (the full-size output most, as nnU-Net does), the weights summing to one.
        """
        if labels.ndim >= 3 and logits.ndim == labels.ndim + 1:
            weights = [0.5**s for s in range(logits.shape[1])]
            return sum(w * self(logits[:, s], labels) for s, w in enumerate(weights)) / sum(weights)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, the loss expects num_classes={self.num_classes}")
        target = labels[:, 0].long() if labels.ndim == logits.ndim else labels.long()
        total = logits.new_zeros(())
        for term in self.terms:
            if term == "ce":
                total = total + F.cross_entropy(logits, target, weight=self.class_weight)
            elif term == "mse":
                onehot = F.one_hot(target, self.num_classes).movedim(-1, 1).to(logits.dtype)
                total = total + F.mse_loss(torch.softmax(logits, dim=1), onehot)
            else:
                total = total + getattr(self, term)(logits, target.unsqueeze(1))
        return total


def class_pixel_counts(label_files: Sequence[str], num_classes: int, to_index: MaskToIndexd | None = None) -> np.ndarray:
    """Count the pixels of each class over ``label_files``, read as the training pipeline reads them."""
    to_index = to_index or MaskToIndexd("label", num_classes)
    load = mask_loader(to_index.palette is not None)
    counts = np.zeros(num_classes, dtype=np.int64)
    for path in label_files:
        mask = to_index.convert(load(path))
        counts += np.bincount(np.asarray(mask, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes]
    return counts


def inverse_frequency_weights(counts: Sequence[int]) -> np.ndarray:
    """Weights proportional to 1 / pixel frequency, normalised to mean 1; absent classes get weight 0.

    Example:
        >>> inverse_frequency_weights([900, 100]).round(2).tolist()
        [0.2, 1.8]
    """
    c = np.asarray(counts, dtype=np.float64)
    w = np.zeros_like(c)
    present = c > 0
    w[present] = c[present].sum() / c[present]
    return w * (len(c) / w.sum()) if w.sum() > 0 else np.ones_like(c)


def _cache_key(label_files: Sequence[str], num_classes: int) -> str:
    return fingerprint(label_files, {"num_classes": num_classes})[:16]


def resolve_class_weights(
    class_weights: str | Sequence[float] | None,
    loss_name: str,
    training_data: Sequence[dict],
    num_classes: int,
    cache_dir: str | Path,
    mask_to_index: MaskToIndexd | None = None,
) -> list[float] | None:
    """Turn the ``class_weights`` setting into a weight vector (or ``None``).

    ``"inverse_frequency"`` (the plan's choice for ``weighted_ce``; ``"auto"`` means the same here)
    computes :func:`inverse_frequency_weights` from the training masks once and caches the result in ``cache_dir`` keyed by the files' paths, sizes and
    modification times.  The vector used is logged.
    """
    if class_weights is None and loss_name == "weighted_ce":
        class_weights = "inverse_frequency"
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        if class_weights not in ("auto", "inverse_frequency"):
            raise BundleInputError(
                f"class_weights must be auto, inverse_frequency, null or a list of {num_classes} numbers, got {class_weights!r}."
            )
        files = [d["label"] for d in training_data]
        cache = Path(cache_dir) / f"class_weights_{_cache_key(files, num_classes)}.json"
        if cache.is_file():
            stored = json.loads(cache.read_text())
            weights, counts = stored["weights"], stored["pixel_counts"]
        else:
            counts = class_pixel_counts(files, num_classes, mask_to_index).tolist()
            weights = inverse_frequency_weights(counts).tolist()
            atomic_write_text(cache, json.dumps({"pixel_counts": counts, "weights": weights}, indent=2))
        freq = np.asarray(counts, dtype=float) / max(1, sum(counts))
        logger.info(
            "class weights (auto, inverse pixel frequency over %d masks): %s; pixel frequencies: %s",
            len(files), [round(w, 4) for w in weights], [round(f, 4) for f in freq],
        )
        return [float(w) for w in weights]
    weights = _check_weights(class_weights, num_classes).tolist()
    logger.info("class weights: %s", weights)
    return weights
