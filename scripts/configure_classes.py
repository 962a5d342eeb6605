"""Set the bundle's classes in every place that names them: metadata and the two stand-alone configs.

MONAI Label and the model zoo read the label names from ``configs/metadata.json``
(``network_data_format.outputs.pred.channel_def``), which a command-line override cannot change.
This script writes the class names there and makes them the defaults of ``train.json`` and
``inference.json`` (``num_classes`` and ``class_names``), so the bundle describes the model it trains:

    python scripts/configure_classes.py background liver tumour
    python scripts/configure_classes.py background foreground --in_channels 1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any


def _load(path: Path) -> Any:
    return json.loads(path.read_text(), object_pairs_hook=OrderedDict)


def _save(path: Path, content: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=4) + "\n")
    tmp.replace(path)


def configure(bundle_root: Path, class_names: list[str], in_channels: int | None = None) -> None:
    """Write ``class_names`` (background first) and optionally ``in_channels`` into the bundle's configs."""
    configs = bundle_root / "configs"
    meta = _load(configs / "metadata.json")
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["num_channels"] = len(class_names)
    pred["channel_def"] = OrderedDict((str(i), name) for i, name in enumerate(class_names))
    described = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
    meta["label_classes"] = f"single-channel class-index mask: {described}"
    meta["pred_classes"] = f"single-channel class-index map at the input's original size: {described}"
    if in_channels is not None:
        image = meta["network_data_format"]["inputs"]["image"]
        image["num_channels"] = in_channels
        image["modality"] = "RGB" if in_channels == 3 else "grayscale"
        image["channel_def"] = OrderedDict([("0", "R"), ("1", "G"), ("2", "B")]) if in_channels == 3 else OrderedDict([("0", "intensity")])
    _save(configs / "metadata.json", meta)
    for name in ("train.json", "inference.json"):
        config = _load(configs / name)
        config["num_classes"] = len(class_names)
        config["class_names"] = list(class_names)
        if in_channels is not None:
            config["in_channels"] = in_channels
        _save(configs / name, config)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and rewrite the configs; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("class_names", nargs="+", help="one name per class, background first")
    parser.add_argument("--in_channels", type=int, choices=(1, 3), help="also set the input channels")
    parser.add_argument("--bundle_root", type=Path, default=Path("."), help="bundle folder (default: .)")
    args = parser.parse_args(argv)
    lowered = [name.strip().lower() for name in args.class_names]
    if len(args.class_names) < 2 or len(set(lowered)) != len(lowered) or not all(lowered):
        # MONAI Label lower-cases label names, so names that differ only in case would become one label
        parser.error("give at least two class names, background first, that differ in more than capitals (e.g. background foreground)")
    if "background" in lowered[1:]:
        parser.error("'background' must be the first class (class 0), which MONAI Label never offers as a label")
    if not (args.bundle_root / "configs" / "metadata.json").is_file():
        parser.error(f"{args.bundle_root / 'configs' / 'metadata.json'} not found: pass --bundle_root")
    configure(args.bundle_root, args.class_names, args.in_channels)
    print(f"configured {len(args.class_names)} classes: {', '.join(args.class_names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
