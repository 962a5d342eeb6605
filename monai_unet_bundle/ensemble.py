"""Fold ensembles: inference and evaluation with several models at once, their probabilities averaged.

``ckpt_path`` names the model(s):

* one ``model.pt`` (as always);
* a list of model files, e.g. ``--ckpt_path "['runs/cv/models/fold_0/model.pt','runs/cv/models/fold_3/model.pt']"``;
* a cross-validation's models folder (``runs/cv/models``): every ``fold_k/model.pt`` in it.  A fold
  folder without a model (a fold still training) is refused rather than silently left out.

:class:`FoldEnsemble` runs every model on the same input and returns the logarithm of the mean of
their softmax outputs, so the softmax that follows in the pipeline yields exactly the averaged
probabilities, and flip test-time augmentation (:class:`~monai_unet_bundle.inferers.SegmentationInferer`)
averages over models and flips alike.  All models must have been trained with the same plan
(classes, channels, input size, normalisation, network); the plans are compared when they are read.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_unet_bundle.errors import BundleInputError

__all__ = ["FoldEnsemble", "fold_models", "load_models", "model_files", "replicate"]

logger = logging.getLogger(__name__)

#: the model file each fold's training writes into its ``fold_k`` folder
MODEL_FILE = "model.pt"
_FOLD = re.compile(r"^fold_(\d+)$")


def fold_models(folder: str | Path) -> list[Path] | None:
    """The ``fold_k/model.pt`` files of a cross-validation's models folder, by fold number.

    Returns:
        The model files, or ``None`` when ``folder`` holds no ``fold_k`` folder.

    Raises:
        BundleInputError: when a fold folder has no model yet.
    """
    folds = sorted(
        (int(m.group(1)), p) for p in Path(folder).iterdir() if p.is_dir() and (m := _FOLD.match(p.name))
    )
    if not folds:
        return None
    missing = [str(p) for _, p in folds if not (p / MODEL_FILE).is_file()]
    if missing:
        raise BundleInputError(
            f"{', '.join(missing)} has no {MODEL_FILE} (a fold not trained or still training): finish it with "
            f"scripts/cross_validate.py, or pass --ckpt_path with a list of the model files to ensemble."
        )
    return [p / MODEL_FILE for _, p in folds]


def model_files(ckpt_path: str | Path | Sequence[str | Path]) -> list[str]:
    """``ckpt_path`` as a list of model files (see the module docstring).

    A path that is neither a file nor a folds folder is returned as it is, so that the model check
    explains it in its own sentence.

    Raises:
        BundleInputError: for an empty list, a list entry that is not a path, or a fold without a model.
    """
    if isinstance(ckpt_path, (str, Path)):
        path = Path(ckpt_path)
        folds = fold_models(path) if path.is_dir() else None
        return [str(p) for p in folds] if folds else [str(ckpt_path)]
    if not isinstance(ckpt_path, Sequence) or not ckpt_path or not all(isinstance(p, (str, Path)) for p in ckpt_path):
        raise BundleInputError(
            f"ckpt_path is {ckpt_path!r}: pass --ckpt_path with a model.pt, a list of model files or a "
            f"cross-validation's models folder."
        )
    files = [f for p in ckpt_path for f in model_files(p)]
    if len(set(files)) != len(files):
        raise BundleInputError(f"ckpt_path names a model twice ({files}): pass each model once.")
    return files


class FoldEnsemble(torch.nn.Module):
    """Several networks of one architecture run as one: the log of their mean softmax output.

    Args:
        members: the networks (already holding their weights, or loaded later by :func:`load_models`).
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a FoldEnsemble needs at least one network")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            prob = torch.softmax(member(x), dim=1)
            total = prob if total is None else total + prob
        return torch.log(total / len(self.members) + 1e-8)


def replicate(network: torch.nn.Module, ckpt_path: Any) -> torch.nn.Module:
    """``network`` itself for one model file, else a :class:`FoldEnsemble` of one copy per model file."""
    files = model_files(ckpt_path)
    if len(files) == 1:
        return network
    logger.info("ensembling %d models: %s", len(files), ", ".join(files))
    return FoldEnsemble([network] + [copy.deepcopy(network) for _ in files[1:]])


#: attribute in which :func:`load_models` notes, on the network, which files (and versions of them) it holds
_LOADED = "_bundle_loaded_models"


def _file_stamps(files: Sequence[str]) -> tuple[tuple[Any, ...], ...] | None:
    """``(resolved path, inode, modification and change times, size)`` of each file, or ``None`` if any
    cannot be read (a model saved again is a new inode: the bundle writes it beside and renames it in)."""
    try:
        return tuple(
            (str(Path(f).resolve()), (st := Path(f).stat()).st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size) for f in files
        )
    except OSError:
        return None


def load_models(ckpt_path: Any, network: torch.nn.Module, skip_loaded: bool = False) -> list[str]:
    """Load the model file(s) of ``ckpt_path`` into ``network`` (a :class:`FoldEnsemble` takes one each).

    Args:
        ckpt_path: as :func:`model_files` reads it.
        network: the network (or a :func:`replicate` of it, or either wrapped for data parallelism).
        skip_loaded: leave the weights as they are when this function already loaded the same files
            into ``network`` and none has changed on disk since (inference's and evaluation's model
            check loads them before the data are read; the evaluator's :class:`ModelLoader` then
            need not read them again).

    Returns:
        The model files (loaded, or already held).

    Raises:
        BundleInputError: as :func:`~monai_unet_bundle.checkpoints.load_model` for any file.
    """
    from monai_unet_bundle.checkpoints import load_model

    files = model_files(ckpt_path)
    net = getattr(network, "module", network)
    stamps = _file_stamps(files)
    if skip_loaded and stamps is not None and getattr(net, _LOADED, None) == stamps:
        logger.debug("weights of %s already loaded", ", ".join(files))
        return files
    members = list(net.members) if isinstance(net, FoldEnsemble) else [network]
    if len(members) != len(files):
        raise RuntimeError(f"the network holds {len(members)} models but ckpt_path names {len(files)}: build it with replicate()")
    net.__dict__.pop(_LOADED, None)  # a load that fails halfway leaves no note of files it did not finish
    for path, member in zip(files, members):
        load_model(path, member)
    object.__setattr__(net, _LOADED, stamps)  # a plain attribute, not a module, buffer or parameter
    return files
