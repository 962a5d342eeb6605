"""A whole cross-validation: train every fold, evaluate it out of fold, summarise, choose post-processing.

For each fold k, one after another, each in a run of its own:

1. ``python -m monai.bundle run`` with the training configs and ``--num_folds K --fold k`` trains into
   ``models/fold_k`` (``logs/fold_k``); an interrupted fold resumes where it stopped (``resume auto``) and a
   finished one is not trained again unless ``retrain``;
2. the same configs with ``evaluate.json`` score the fold's held-out pairs at original size into ``eval/fold_k``;

then ``eval/cross_validation.json``, ``.csv`` and ``.html`` summarise every fold evaluated so far
(:mod:`monai_unet_bundle.crossval`), and post-processing is chosen per class on the out-of-fold predictions
(:mod:`monai_unet_bundle.postprocess_search`) and stored in every fold's ``plan.json``, which inference applies.

Two entry points run these steps: ``scripts/cross_validate.py`` (options of its own, bundle settings after
``--``), and ``--fold all`` on the bundle's own command line, where :func:`run_all_folds` (``train.json``'s
``all_folds``, run right after the settings check) repeats that command line once per fold, with
``--fold k`` in place of ``--fold all``, and then ends the run.  With ``evaluate.json`` in the configs,
``--fold all`` evaluates and summarises the folds already trained.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_unet_bundle.checkpoints import run_finished
from monai_unet_bundle.crossval import summarise_folds, write_cross_validation, write_cross_validation_html
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.postprocess_search import choose_for_cross_validation

__all__ = ["config_argument", "cross_validate", "run_all_folds", "split_command_line"]

#: settings this module sets itself on each fold's command line
OWN = ("--config_file", "--fold", "--num_folds", "--bundle_root")


def config_argument(paths: Sequence[str | Path]) -> str:
    """``--config_file``'s value for these files: the path, or a list that ``monai.bundle`` reads in order."""
    paths = [str(p) for p in paths]
    return paths[0] if len(paths) == 1 else "[" + ",".join(repr(p) for p in paths) + "]"


def _config_files(value: str) -> list[str]:
    """The files of a ``--config_file`` value as ``monai.bundle`` reads them: a path, a list literal or commas."""
    text = value.strip()
    if text.startswith("["):
        try:
            return [str(p) for p in ast.literal_eval(text)]
        except (ValueError, SyntaxError) as exc:
            raise BundleInputError(f"--config_file {value} is not a list of paths such as \"['configs/train.json','my.json']\".") from exc
    return [p for p in text.split(",") if p] if "," in text and not Path(text).is_file() else [text]


def split_command_line(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(config files, other arguments)`` of a ``monai.bundle run`` command line (after ``run``), without the
    settings this module sets on each fold's command line (:data:`OWN`); ``--key value`` and ``--key=value`` alike."""
    configs: list[str] = []
    rest: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        key, has_value, value = tokens[i].partition("=")
        if key in OWN:
            if not has_value:
                i += 1
                value = tokens[i] if i < len(tokens) else ""
            if key == "--config_file":
                configs = _config_files(value)
        else:
            rest.append(tokens[i])
        i += 1
    return configs, rest


def _run(command: list[str]) -> None:
    print("+", " ".join(f'"{part}"' if set(part) & set(" []'*$") else part for part in command), flush=True)
    code = subprocess.run(command, cwd=os.getcwd()).returncode
    if code:
        raise SystemExit(code)


def cross_validate(
    num_folds: int,
    bundle_root: str | Path,
    bundle_args: Sequence[str] = (),
    train_configs: Sequence[str | Path] = (),
    evaluate_configs: Sequence[str | Path] = (),
    folds: Sequence[int] | None = None,
    torchrun: int = 0,
    skip_training: bool = False,
    retrain: bool = False,
) -> dict[str, Any]:
    """Train and evaluate ``folds`` (default: all) of a ``num_folds`` cross-validation, then summarise every
    evaluated fold and choose post-processing; see the module docstring.  Returns the summary
    (:func:`~monai_unet_bundle.crossval.summarise_folds`).  A fold's run that fails ends this with its exit status.

    Args:
        num_folds: K.
        bundle_root: where ``models/``, ``logs/`` and ``eval/`` go.
        bundle_args: settings for both commands, e.g. ``["--dataset_dir", "/data/xray"]``.
        train_configs: the training command's config files (``torchrun`` adds ``multi_gpu_train.json`` beside
            the first); evaluate_configs: the evaluation's.
        folds: only these folds (the summary still holds every fold evaluated before).
        torchrun: train each fold with ``torchrun --standalone --nproc_per_node torchrun``.
        skip_training: only evaluate and summarise; retrain: train folds whose training finished earlier anew.
    """
    root = Path(bundle_root).resolve()
    common = ["--bundle_root", str(root), "--num_folds", str(num_folds), *bundle_args]
    for k in range(num_folds) if folds is None else sorted(set(folds)):
        fold = ["--fold", str(k)]
        start = time.perf_counter()
        models = root / "models" / f"fold_{k}"
        if not skip_training and run_finished(models / "resume.pt") and not retrain:
            print(f"fold {k}: its training finished earlier ({models}); --retrain trains it again", flush=True)
        elif not skip_training:
            if torchrun:
                multi = Path(train_configs[0]).with_name("multi_gpu_train.json")
                train = ["torchrun", "--standalone", f"--nproc_per_node={torchrun}", "-m", "monai.bundle", "run",
                         "--config_file", config_argument([*train_configs, multi])]
            else:
                train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_argument(train_configs)]
            _run([*train, *common, *fold])
        _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", config_argument(evaluate_configs), *common, *fold])
        print(f"fold {k}: {'evaluated' if skip_training else 'trained and evaluated'} in {time.perf_counter() - start:.0f} s", flush=True)
    return summarise(root, num_folds)


def summarise(root: Path, num_folds: int) -> dict[str, Any]:
    """Summarise every fold evaluated under ``root`` so far, print the table, choose post-processing."""
    evaluated = {k: root / "eval" / f"fold_{k}" for k in range(num_folds) if (root / "eval" / f"fold_{k}" / "metrics_summary.json").is_file()}
    result = summarise_folds(evaluated, num_folds)
    paths = write_cross_validation(result, root / "eval")
    paths.append(write_cross_validation_html(result, root))
    if result["missing"]:
        print(f"folds {result['missing']} of {num_folds} are not evaluated yet: the summary holds the others", flush=True)
    mean, sd = result["mean"], result["sd"]
    for c, name in enumerate(result["class_names"]):
        cells = [f"{m} -" if mean[m][c] is None else f"{m} {mean[m][c]:.4f}" + ("" if sd[m][c] is None else f" ± {sd[m][c]:.4f}")
                 for m in ("dice", "iou", "precision", "recall")]
        print(f"{name:>16s}: " + ", ".join(cells))
    oof = result["out_of_fold"]
    dice = oof["mean_dice_over_images"]
    print(f"out of fold: {oof['images']} images, mean foreground Dice {'-' if dice is None else f'{dice:.4f}'} over images; "
          f"written to {', '.join(str(p) for p in paths)}")
    chosen = choose_for_cross_validation(root, num_folds)
    if chosen is not None:
        print(f"post-processing chosen out of fold: {chosen['description']} (mean foreground Dice "
              f"{chosen['mean_dice_before']:.4f} -> {chosen['mean_dice_after']:.4f}); written to "
              f"{root / 'eval' / 'postprocessing.json'} and every fold's plan.json, which inference applies", flush=True)
    return result


def run_all_folds(fold: Any, num_folds: Any, bundle_root: str | Path, train: bool = True, argv: Sequence[str] | None = None) -> None:
    """With ``fold`` "all": run the whole cross-validation from this ``monai.bundle run`` command line, then end
    the process (exit status 0, or the failing fold's); with any other ``fold``, nothing.

    Args:
        fold, num_folds: the settings (checked before: ``num_folds`` is set).
        bundle_root: where the folds go.
        train: ``False`` (``evaluate.json``): only evaluate and summarise the folds already trained.
        argv: the command line (default ``sys.argv``: ``<monai.bundle> run --config_file ... --fold all ...``).
    """
    if fold != "all":
        return
    argv = list(sys.argv if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BundleInputError(
            "fold all runs the folds one after another and cannot run under torchrun: start each fold with its own "
            "torchrun command (--fold 0, --fold 1, ...), or all of them with scripts/cross_validate.py --torchrun N."
        )
    if "run" not in argv[1:2]:
        raise BundleInputError(
            "fold all repeats the command line of python -m monai.bundle run for each fold; from Python, call "
            "monai_unet_bundle.cross_validate.cross_validate, or train each fold with its own fold number."
        )
    configs, rest = split_command_line(argv[2:])
    if not configs:
        raise BundleInputError("fold all needs --config_file on the command line (e.g. --config_file configs/train.json).")
    train_configs = [c for c in configs if Path(c).name != "evaluate.json"]
    if len(train_configs) < len(configs):  # evaluation given: its configs as they are
        evaluate_configs = configs
    else:  # evaluate.json beside train.json, right after it, so the user's own files still win
        base = next((i for i, c in enumerate(configs) if Path(c).name == "train.json"), 0)
        evaluate_configs = [*configs[: base + 1], str(Path(configs[base]).with_name("evaluate.json")), *configs[base + 1:]]
    print(f"fold all: {num_folds} folds, one after another, into {Path(bundle_root).resolve() / 'models'}/fold_k", flush=True)
    cross_validate(int(num_folds), bundle_root, rest, train_configs, evaluate_configs, skip_training=not train)
    raise SystemExit(0)
