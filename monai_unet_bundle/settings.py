"""The bundle's top-level settings: what each accepts, checked once before a workflow starts.

Settings arrive from JSON and from the command line, where ``python -m monai.bundle run`` passes
``--tta false`` as the *string* ``"false"`` (and ``--tta False`` as a boolean), ``--batch_size 4``
as an int and ``--batch_size four`` as a string.  :func:`check_settings` runs as the first step of
every workflow (the configs' ``initialize`` lists call it through the ``settings`` id): it checks
every setting it is given under its command-line name and raises one
:class:`~monai_unet_bundle.errors.BundleInputError` with one sentence per bad setting, before any
data is read or any file is written.  Components that take a switch read it with :func:`flag`,
which accepts exactly what :func:`check_settings` accepts, so ``"false"`` never counts as true.

:data:`SETTINGS` lists every setting this module knows, with what it accepts; a test compares it
with the README's settings tables.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_unet_bundle.errors import BundleInputError, install_excepthook

__all__ = ["SETTINGS", "auto_flag", "check_settings", "flag", "is_auto"]

_TRUE, _FALSE = ("true",), ("false",)


def flag(value: Any, name: str) -> bool:
    """Read an on/off setting: ``true``/``false`` in any case, or a JSON/Python boolean.

    Args:
        value: the setting's value as the config or the command line gave it.
        name: the setting's name, for the error.

    Raises:
        BundleInputError: for anything else (``"yes"``, ``1``, ``None`` ...), so that no value is
            silently taken as true.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BundleInputError(f"{name} must be true or false, got {value!r}: pass --{name} true or --{name} false.")


def auto_flag(value: Any, name: str) -> str:
    """Read a setting that is ``auto``, ``true`` or ``false`` (any case, or a boolean) as one of those words.

    Raises:
        BundleInputError: for anything else, naming the setting.
    """
    text = str(value).strip().lower() if isinstance(value, (bool, str)) else None
    if text not in ("auto", "true", "false"):
        raise BundleInputError(f"{name} must be auto, true or false, got {value!r}: pass --{name} auto, true or false.")
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: a setting's check: ``None`` when the value is acceptable, else what it must be (or it raises
#: :class:`BundleInputError` with a sentence of its own)
Check = Callable[[Any, Mapping[str, Any]], "str | None"]


def _boolean(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE) else "true or false"


def _auto_boolean(value: Any, _: Mapping[str, Any]) -> str | None:
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in ("auto", *_TRUE, *_FALSE)):
        return None
    return "auto, true or false"


def _integer(minimum: int) -> Check:
    def check(value: Any, _: Mapping[str, Any]) -> str | None:
        return None if _is_int(value) and value >= minimum else f"a whole number of at least {minimum}"

    return check


def _seed(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if _is_int(value) and value >= 0 else "a whole number of at least 0"


def _positive(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if _is_number(value) and value > 0 else "a number above 0"


def _non_negative(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if _is_number(value) and value >= 0 else "a number of at least 0"


def _fraction(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if _is_number(value) and 0 < value < 1 else "a number between 0 and 1 (exclusive), e.g. 0.2"


def _choice(*choices: str) -> Check:
    def check(value: Any, _: Mapping[str, Any]) -> str | None:
        return None if isinstance(value, str) and value in choices else "one of " + ", ".join(choices)

    return check


def is_auto(value: Any) -> bool:
    """Whether a setting is left to the plan or the bundle (``"auto"`` in any case)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def _num_classes(value: Any, _: Mapping[str, Any]) -> str | None:
    if is_auto(value) or (_is_int(value) and value >= 2):
        return None
    return "auto (read from the masks) or a whole number of at least 2 (classes including background; 2 = binary)"


def _in_channels(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if is_auto(value) or (_is_int(value) and value in (1, 3)) else "auto (from the images), 1 (grayscale) or 3 (RGB)"


def _auto_or_integer(minimum: int) -> Check:
    def check(value: Any, _: Mapping[str, Any]) -> str | None:
        return None if is_auto(value) or (_is_int(value) and value >= minimum) else f"auto or a whole number of at least {minimum}"

    return check


def _workers(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if value == "auto" or (_is_int(value) and value >= 0) else "auto or a whole number of at least 0"


def _spatial_size(value: Any, _: Mapping[str, Any]) -> str | None:
    from monai_unet_bundle.networks import check_spatial_size

    if is_auto(value):
        return None
    check_spatial_size(value)  # its own sentence names the nearest valid size
    return None


def _class_names(value: Any, values: Mapping[str, Any]) -> str | None:
    k = values.get("num_classes")
    if is_auto(value):
        return None
    ok = isinstance(value, (list, tuple)) and all(isinstance(n, str) and n.strip() for n in value)
    ok = ok and len({str(n).strip().lower() for n in value}) == len(value)
    if ok and (not _is_int(k) or len(value) == k):
        return None
    count = f"{k} " if _is_int(k) else ""
    return f"a list of {count}distinct names, background first, e.g. \"['background','lesion']\""


def _class_weights(value: Any, values: Mapping[str, Any]) -> str | None:
    k = values.get("num_classes")
    if value is None or value in ("auto", "inverse_frequency"):
        return None
    if isinstance(value, (list, tuple)) and all(_is_number(w) and w >= 0 for w in value) and (not _is_int(k) or len(value) == k):
        return None
    return f"null, auto, inverse_frequency, or a list of {k if _is_int(k) else 'num_classes'} numbers of at least 0, background first"


def _device(value: Any, _: Mapping[str, Any]) -> str | None:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return "cpu, cuda or cuda:N"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "cpu (this machine has no CUDA device)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"cpu or cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
    elif device.type != "cpu":
        return "cpu, cuda or cuda:N"
    return None


def _optional_csv(value: Any, _: Mapping[str, Any]) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower().endswith(".csv")):
        return None
    return "null or the name of a .csv file (absolute, or relative to output_dir)"


def _optional_text(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if value is None or (isinstance(value, str) and value.strip()) else "null or a path"


def _model_paths(value: Any, _: Mapping[str, Any]) -> str | None:
    if isinstance(value, str) and value.strip():
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return None
    return "a model file, a list of model files or a cross-validation's models folder"


def _output_folder(value: Any, _: Mapping[str, Any]) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "a folder path"
    if Path(value).is_file():
        return "a folder, not an existing file"
    return None


def _input_files(value: Any, _: Mapping[str, Any]) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.strip() for v in value):
        return None
    return "null, an image path, a list of image paths, or a CSV/JSON list file"


def _text(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if isinstance(value, str) else "text"


def _output_format(value: Any, values: Mapping[str, Any]) -> str | None:
    from monai_unet_bundle.writers import OUTPUT_FORMATS  # imported here: writers imports this module (through transforms)

    return _choice(*OUTPUT_FORMATS)(value, values)


def _regex(value: Any, _: Mapping[str, Any]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        try:
            re.compile(value)
            return None
        except re.error as exc:
            return f"null or a valid regular expression ({exc}) whose first group names the group, e.g. '^(P\\d+)_'"
    return "null or a regular expression whose first group names the group, e.g. '^(P\\d+)_'"


#: every top-level setting this module checks, by its command-line name
SETTINGS: dict[str, Check] = {
    # data
    "dataset_dir": _optional_text,
    "datalist": _optional_text,
    "val_dataset_dir": _optional_text,
    "mask_suffix": _text,
    "allow_lossy_masks": _boolean,
    "val_fraction": _fraction,
    "group_pattern": _regex,
    "seed": _seed,
    "num_folds": lambda value, _: None if value is None or (_is_int(value) and value >= 2) else "null (one split by val_fraction) or a whole number of at least 2, e.g. 5",
    "fold": lambda value, values: (
        None if _is_int(value) and 0 <= value < (values.get("num_folds") if _is_int(values.get("num_folds")) else 1)
        else None if value == "all" and _is_int(values.get("num_folds"))
        else "0 while num_folds is null (set --num_folds K to train fold k, or every fold with --fold all)" if not _is_int(values.get("num_folds"))
        else "a whole number from 0 to num_folds - 1, or all (every fold, one after another)"
    ),
    "num_classes": _num_classes,
    "class_names": _class_names,
    "in_channels": _in_channels,
    "spatial_size": _spatial_size,
    "input_size": _auto_or_integer(16),
    "normalization": _choice("auto", "unit", "percentile", "zscore", "minmax"),
    # network
    "architecture": _choice("auto", "basic_unet", "unet", "dynunet"),
    "base_features": _auto_or_integer(1),
    "activation": _choice("auto", "elu", "relu", "leakyrelu"),
    "dropout": lambda value, _: (
        None if _is_number(value) and 0 <= value < 1 else "a number from 0 up to (not including) 1, e.g. 0.2"
    ),
    # training
    "max_epochs": _integer(1),
    "batch_size": _auto_or_integer(1),
    "patch_training": _auto_boolean,
    "learning_rate": lambda value, _: None if is_auto(value) or (_is_number(value) and value > 0) else "auto or a number above 0",
    "lr_schedule": _choice("cosine", "plateau", "step", "constant", "poly", "flat_cosine"),
    "optimizer_name": _choice("adam", "sgd"),
    "augmentation": _choice("none", "light", "default", "heavy"),
    "mirror": _boolean,
    "time_budget_minutes": lambda value, _: None if value is None or (_is_number(value) and value > 0) else "null or a number of minutes above 0, e.g. 20",
    "loss_name": _choice("dice_ce", "dice", "ce", "bce", "focal", "dice_focal", "jaccard_bce", "mse", "weighted_ce"),
    "class_weights": _class_weights,
    "batch_dice": _boolean,
    "val_interval": _integer(1),
    "early_stop_patience": _auto_or_integer(0),
    "early_stop_min_delta": _non_negative,
    "resume": _auto_boolean,
    "amp": _auto_boolean,
    "deterministic": _boolean,
    "num_previews": _integer(0),
    "cache": _choice("auto", "memory", "disk", "none"),
    # machine
    "channels_last": _auto_boolean,
    "fast_allocator": _auto_boolean,
    "num_workers": _workers,
    "device": _device,
    # inference
    "input_dir": _optional_text,
    "output_dir": _output_folder,
    "input_files": _input_files,
    "ckpt_path": _model_paths,
    "tta": _auto_boolean,
    "sliding_window": _auto_boolean,
    "keep_largest_component": _auto_boolean,
    "fill_holes": _auto_boolean,
    "remove_smaller_than": _auto_or_integer(0),
    "save_overlays": _boolean,
    "save_colour_masks": _boolean,
    "save_probabilities": _boolean,
    "rle_csv": _optional_csv,
    "rle_order": _choice("row", "column"),
    "output_format": lambda value, values: _output_format(value, values),
}


def check_settings(**values: Any) -> dict[str, Any]:
    """Check every given setting; raise one error naming each bad one.

    It also installs the command line's error hook (:func:`~monai_unet_bundle.errors.install_excepthook`),
    as the first step of every workflow.

    Args:
        values: setting name -> value, as the workflow resolved it (only known names are checked;
            e.g. ``mask_palette`` and ``mask_thresholds`` are checked against the masks by
            :class:`~monai_unet_bundle.transforms.MaskToIndexd`).

    Returns:
        ``values``, with every on/off setting as a real boolean (those that also take ``auto`` as given).

    Raises:
        BundleInputError: one sentence per bad setting, one per line, e.g. ``batch_size is 'four',
            but it must be a whole number of at least 1: pass --batch_size with such a value.``

    Example:
        >>> check_settings(save_overlays="False", batch_size=4)["save_overlays"]
        False
    """
    install_excepthook()
    problems = []
    checked = dict(values)
    for name, value in values.items():
        check = SETTINGS.get(name)
        if check is None:
            continue
        try:
            expected = check(value, values)
        except BundleInputError as exc:  # a check with a sentence of its own
            problems.append(str(exc))
            continue
        if expected is not None:
            problems.append(f"{name} is {value!r}, but it must be {expected}: pass --{name} with such a value.")
        elif check is _boolean:
            checked[name] = flag(value, name)
    problems += _cross_checks(values, problems)
    if problems:
        raise BundleInputError("\n".join(problems))
    return checked


def _cross_checks(values: Mapping[str, Any], problems: Sequence[str]) -> list[str]:
    """Problems of settings that are each fine alone but not together."""
    found = []
    bad = {p.split(" ", 1)[0] for p in problems}
    interval, epochs = values.get("val_interval"), values.get("max_epochs")
    if _is_int(interval) and _is_int(epochs) and not {"val_interval", "max_epochs"} & bad and interval > epochs:
        found.append(
            f"val_interval {interval} is larger than max_epochs {epochs}, so training would never validate and never "
            f"save a model: pass --val_interval {epochs} or less."
        )
    return found
