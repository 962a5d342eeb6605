"""K-fold cross-validation through the bundle's own commands: train every fold, evaluate it out of fold, summarise.

For each fold k (all of them, or ``--folds``), one after another:

1. ``python -m monai.bundle run --config_file configs/train.json --num_folds K --fold k ...`` trains into
   ``models/fold_k`` (``logs/fold_k``); when the script is run again, an interrupted fold resumes where it
   stopped (``resume auto``) and a finished one is not trained again (``--retrain`` trains it anew);
2. ``configs/evaluate.json`` with the same settings scores the fold's held-out pairs at original size into
   ``eval/fold_k``;

then ``eval/cross_validation.json``, ``.csv`` and ``.html`` (a page with the curves, the confusion matrix and the worst
out-of-fold images) hold every fold's Dice, IoU, precision and recall per class,
their mean ± sd, and the pooled out-of-fold scores (:mod:`monai_unet_bundle.crossval`); and post-processing is
chosen per class on the out-of-fold predictions (:mod:`monai_unet_bundle.postprocess_search`), written to
``eval/postprocessing.json`` and into every fold's ``plan.json``, which inference applies.  Every argument after
``--`` goes to both commands, e.g.:

    python scripts/cross_validate.py --num_folds 5 --bundle_root runs/cv -- --dataset_dir /data/xray \\
        --group_pattern '^(P\\d+)_' --time_budget_minutes 10

``--torchrun N`` trains each fold with ``torchrun --nproc_per_node N`` and ``configs/multi_gpu_train.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai_unet_bundle.checkpoints import run_finished  # noqa: E402
from monai_unet_bundle.crossval import summarise_folds, write_cross_validation, write_cross_validation_html  # noqa: E402
from monai_unet_bundle.postprocess_search import choose_for_cross_validation  # noqa: E402


def _configs(*names: str) -> str:
    paths = [str(REPO / "configs" / n) for n in names]
    return paths[0] if len(paths) == 1 else "[" + ",".join(f"'{p}'" for p in paths) + "]"


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=os.getcwd()).returncode
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bundle_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to the bundle.")
    parser.add_argument("--num_folds", type=int, default=5, help="K (default 5)")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="train and evaluate only these folds (default: all)")
    parser.add_argument("--bundle_root", default=".", help="where models/, logs/ and eval/ go (default: here)")
    parser.add_argument("--torchrun", type=int, default=0, help="train each fold with torchrun on this many processes")
    parser.add_argument("--skip_training", action="store_true", help="only evaluate and summarise the folds already trained")
    parser.add_argument("--retrain", action="store_true", help="train folds whose training finished earlier again (a new run)")
    args = parser.parse_args(own)
    if args.num_folds < 2:
        parser.error(f"--num_folds must be at least 2, got {args.num_folds}")
    folds = sorted(set(args.folds)) if args.folds is not None else list(range(args.num_folds))
    bad = [k for k in folds if not 0 <= k < args.num_folds]
    if bad:
        parser.error(f"--folds {bad} are not folds of {args.num_folds} (0 to {args.num_folds - 1})")
    root = Path(args.bundle_root).resolve()
    common = ["--bundle_root", str(root), "--num_folds", str(args.num_folds), *bundle_args]
    for k in folds:
        fold = ["--fold", str(k)]
        start = time.perf_counter()
        finished = run_finished(root / "models" / f"fold_{k}" / "resume.pt")
        if finished and not args.retrain and not args.skip_training:
            print(f"fold {k}: its training finished earlier ({root / 'models' / f'fold_{k}'}); --retrain trains it again", flush=True)
        elif not args.skip_training:
            if args.torchrun:
                train = ["torchrun", "--standalone", f"--nproc_per_node={args.torchrun}", "-m", "monai.bundle", "run",
                         "--config_file", _configs("train.json", "multi_gpu_train.json")]
            else:
                train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs("train.json")]
            _run([*train, *common, *fold])
        _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs("train.json", "evaluate.json"), *common, *fold])
        print(f"fold {k}: trained and evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    # every fold evaluated so far (this run's and earlier runs'), so a run of a few folds completes the summary
    evaluated = {k: root / "eval" / f"fold_{k}" for k in range(args.num_folds)
                 if (root / "eval" / f"fold_{k}" / "metrics_summary.json").is_file()}
    result = summarise_folds(evaluated, args.num_folds)
    paths = write_cross_validation(result, root / "eval")
    paths.append(write_cross_validation_html(result, root))
    if result["missing"]:
        print(f"folds {result['missing']} of {args.num_folds} are not evaluated yet: the summary holds the others", flush=True)
    mean, sd = result["mean"], result["sd"]
    for c, name in enumerate(result["class_names"]):
        cells = [f"{m} -" if mean[m][c] is None else f"{m} {mean[m][c]:.4f}" + ("" if sd[m][c] is None else f" ± {sd[m][c]:.4f}")
                 for m in ("dice", "iou", "precision", "recall")]
        print(f"{name:>16s}: " + ", ".join(cells))
    oof = result["out_of_fold"]
    dice = oof["mean_dice_over_images"]
    print(f"out of fold: {oof['images']} images, mean foreground Dice {'-' if dice is None else f'{dice:.4f}'} over images; "
          f"written to {', '.join(str(p) for p in paths)}")
    chosen = choose_for_cross_validation(root, args.num_folds)
    if chosen is not None:
        print(f"post-processing chosen out of fold: {chosen['description']} (mean foreground Dice "
              f"{chosen['mean_dice_before']:.4f} -> {chosen['mean_dice_after']:.4f}); written to "
              f"{root / 'eval' / 'postprocessing.json'} and every fold's plan.json, which inference applies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
