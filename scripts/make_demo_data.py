"""Write the built-in demo data set (or a variant of it) to any folder.

Training creates the demo set by itself when no ``--dataset_dir`` is given; this script is for
trying the bundle on a folder of your choosing, e.g. to rehearse ``--dataset_dir`` or a datalist:

    python scripts/make_demo_data.py /tmp/cells --n_images 40 --seed 3
    python -m monai.bundle run --config_file configs/train.json --dataset_dir /tmp/cells --spatial_size "[128,128]"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monai_unet_bundle.demo import write_demo_dataset


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the data set; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to create; it gets images/ and masks/")
    parser.add_argument("--n_images", type=int, default=100, help="number of image/mask pairs (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--min_size", type=int, default=112, help="smallest image side in pixels (default 112)")
    parser.add_argument("--max_size", type=int, default=176, help="largest image side in pixels (default 176)")
    args = parser.parse_args(argv)
    if args.n_images < 1 or not 8 <= args.min_size <= args.max_size:
        parser.error("need --n_images >= 1 and 8 <= --min_size <= --max_size")
    if (args.out_dir / "images").exists() and any((args.out_dir / "images").iterdir()):
        parser.error(f"{args.out_dir / 'images'} is not empty; choose a new folder so nothing is overwritten")
    write_demo_dataset(args.out_dir, n_images=args.n_images, seed=args.seed, size_range=(args.min_size, args.max_size))
    print(f"wrote {args.n_images} pairs to {args.out_dir}/images and {args.out_dir}/masks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
