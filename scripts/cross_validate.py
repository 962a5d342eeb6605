"""K-fold cross-validation through the bundle's own commands: train every fold, evaluate it out of fold, summarise.

The steps are :func:`monai_unet_bundle.cross_validate.cross_validate` (its module docstring says what each
writes), which ``--fold all`` on the bundle's own command line runs too; this script adds ``--folds`` (only
some folds), ``--torchrun N`` (each fold's training under ``torchrun --nproc_per_node N`` with
``configs/multi_gpu_train.json``), ``--skip_training`` and ``--retrain``.  Every argument after ``--`` goes to
both the training and the evaluation command, e.g.:

    python scripts/cross_validate.py --num_folds 5 --bundle_root runs/cv -- --dataset_dir /data/xray \\
        --group_pattern '^(P\\d+)_' --time_budget_minutes 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai_unet_bundle.cross_validate import cross_validate  # noqa: E402


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
    bad = [k for k in args.folds or [] if not 0 <= k < args.num_folds]
    if bad:
        parser.error(f"--folds {bad} are not folds of {args.num_folds} (0 to {args.num_folds - 1})")
    configs = REPO / "configs"
    cross_validate(
        args.num_folds, args.bundle_root, bundle_args, [configs / "train.json"], [configs / "train.json", configs / "evaluate.json"],
        folds=args.folds, torchrun=args.torchrun, skip_training=args.skip_training, retrain=args.retrain,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
