"""K-fold cross-validation splits: seeded, grouped (a patient never crosses folds), balanced by class presence.

With ``num_folds`` K set, the training pairs (and a datalist's validation pairs, pooled with them) are
dealt into K folds; training with ``fold`` k validates on fold k and trains on the others, into
``models/fold_k`` and ``logs/fold_k``.  The deal is deterministic for the same pairs, groups, masks and
``seed``, so each fold's run (and its evaluation, and a resumed run) sees the same split:

* pairs with the same ``group`` (a patient: see :func:`~monai_unet_bundle.data.assign_groups`) are
  dealt together, so no group is on both sides of any fold's split;
* groups are taken in a seeded random order, those whose set of foreground classes present is the
  rarest first (the largest first among equals), and each goes to the fold holding the fewest pairs
  of that kind so far (then the fewest pairs): every fold gets its share of images with and without
  each class, where the data allow.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from monai_unet_bundle.errors import BundleInputError

__all__ = ["FoldDeal", "assign_folds", "check_folds", "fold_folder", "split_fold"]


def check_folds(num_folds: Any, fold: Any) -> tuple[int, int] | None:
    """``(num_folds, fold)`` as ints, or ``None`` when ``num_folds`` is not set (one split by ``val_fraction``).

    Raises:
        BundleInputError: for a ``num_folds`` below 2 or a ``fold`` outside ``0 .. num_folds - 1``.
    """
    if num_folds is None:
        return None
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise BundleInputError(f"num_folds must be a whole number of at least 2 (e.g. 5), or null for one split; got {num_folds!r}.")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise BundleInputError(
            f"fold must be a whole number from 0 to {num_folds - 1} with num_folds {num_folds}; got {fold!r}: "
            f"train each fold with its own command (--fold 0, --fold 1, ...), or all of them with --fold all."
        )
    return num_folds, fold


def fold_folder(num_folds: Any = None, fold: Any = 0) -> str:
    """The suffix of a fold's ``models/`` and ``logs/`` folders: ``/fold_k``, or ``""`` without folds and for
    ``fold`` "all" (the run that trains every fold, into ``models/fold_k`` each; :mod:`monai_unet_bundle.cross_validate`)."""
    if fold == "all" and num_folds is not None:
        check_folds(num_folds, 0)
        return ""
    folds = check_folds(num_folds, fold)
    return "" if folds is None else f"/fold_{folds[1]}"


def assign_folds(
    items: Sequence[Mapping[str, str]], num_folds: int, seed: int = 0, presence: Mapping[str, frozenset[int]] | None = None
) -> dict[str, int]:
    """Deal the items into ``num_folds`` folds; return image -> fold.

    Args:
        items: pairs with ``image``, ``label`` and (optionally) ``group``.
        num_folds: K.
        seed: seed of the order in which groups are dealt.
        presence: mask file -> the foreground classes present in it; without it, folds are only
            balanced by size.

    Raises:
        BundleInputError: when there are fewer groups than folds.
    """
    groups: dict[str, list[Mapping[str, str]]] = {}
    for item in sorted(items, key=lambda d: d["image"]):
        groups.setdefault(item.get("group") or f"\0{item['image']}", []).append(item)
    if len(groups) < num_folds:
        raise BundleInputError(
            f"num_folds {num_folds} needs at least {num_folds} groups (patients) but the pairs form {len(groups)}: "
            f"lower --num_folds, or check --group_pattern."
        )
    presence = presence or {}
    kind = {key: frozenset().union(*(presence.get(d.get("label", ""), frozenset()) for d in members)) for key, members in groups.items()}
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    frequency = Counter(kind.values())
    keys.sort(key=lambda key: (frequency[kind[key]], -len(groups[key])))  # stable: ties keep the seeded order
    per_kind: list[Counter] = [Counter() for _ in range(num_folds)]
    sizes = [0] * num_folds
    folds: dict[str, int] = {}
    for key in keys:
        target = min(range(num_folds), key=lambda f: (per_kind[f][kind[key]], sizes[f], f))
        per_kind[target][kind[key]] += len(groups[key])
        sizes[target] += len(groups[key])
        for item in groups[key]:
            folds[item["image"]] = target
    return folds


def split_fold(items: Sequence[dict[str, str]], folds: Mapping[str, int], fold: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(training, validation)``: the items of every other fold, and those of ``fold``."""
    training = [d for d in items if folds[d["image"]] != fold]
    validation = [d for d in items if folds[d["image"]] == fold]
    return training, validation


class FoldDeal:
    """The fold deal a run trains on, kept in its resume checkpoint so that a resume under another deal is refused.

    A fold resumed with another ``seed``, ``group_pattern``, data or ``num_folds`` would go on training
    on pairs it held out before, and its out-of-fold scores would no longer be out of fold.

    Args:
        deal: the plan's ``folds`` entry (``num_folds``, ``fold``, ``seed`` and the digest of the deal),
            or ``None`` for a run without folds.
    """

    def __init__(self, deal: Mapping[str, Any] | None) -> None:
        self.deal = dict(deal) if deal else None

    def state_dict(self) -> dict[str, Any]:
        """The deal, for the resume checkpoint."""
        return {"deal": self.deal}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint trained under another deal.

        Raises:
            BundleInputError: naming both deals and what to do.
        """
        saved = state.get("deal")
        if saved == self.deal:
            return

        def describe(deal: Mapping[str, Any] | None) -> str:
            return "without folds" if not deal else f"fold {deal.get('fold')} of {deal.get('num_folds')} (seed {deal.get('seed')})"

        raise BundleInputError(
            f"the resume checkpoint was trained {describe(saved)} but these settings deal the pairs as {describe(self.deal)}"
            f"{' differently' if describe(saved) == describe(self.deal) else ''}, so the model would go on training on pairs "
            f"it held out: pass the --num_folds, --fold, --seed and --group_pattern it was trained with, on the same data, "
            f"or --resume false to train this fold afresh."
        )
