"""Accuracy at equal wall time: the bundle against a plain hand-written U-Net loop, on labelled data sets.

For each data set (a folder with ``images/`` and ``masks/``; ``demo`` and ``demo_multiclass`` are the
built-in demo sets, made in code: synthetic, so they check the script rather than give evidence):

* a seeded split, which keeps groups (patients) together, holds out ``--test_fraction`` of the pairs
  as the test set;
* **auto**: ``configs/train.json`` through ``python -m monai.bundle run`` given nothing but the data
  (``--dataset_dir``, the datalist of the split) and ``--time_budget_minutes M``: every other setting
  is planned from the data (see ``monai_unet_bundle/plan.py``); then ``configs/evaluate.json`` on the
  test pairs at their original size;
* **explicit**: the same, with the plain loop's classes, channels, square input size, batch size and
  width given explicitly and the settings' defaults before plans (per-image min-max, no class weights);
* **plain**: a hand-written loop as a research group writes it: a 5-level U-Net (two 3x3 conv + batch
  norm + ReLU per level, max-pool, transposed conv, skip concatenation), Adam at 1e-3, cross-entropy,
  every image resized to the input size, random flips; it trains on all training pairs for as much
  wall time as the bundle's whole training process took (its start-up, data check and caching
  included; the plain loop's reading of the data counts too) and keeps its last weights; its test
  predictions are resized back and scored at original size with the bundle's own metric code.

With the plain side run, each bundle side also gets the seconds it needed to reach the plain loop's final test Dice,
read off its validation curve (``logs/curves.csv``: mean foreground Dice on its validation pairs after each epoch,
against the training process's wall time with all its start-up counted first); the plain loop needs all its time.

The explicit side and the plain loop get the same classes, channels, input size, batch size and network
width, taken from the data (mask values and image modes) and the options.  The sides run one after the
other, each alone on the machine; the plain loop gets the wall time of the first bundle side.  It prints a table (test Dice per class and mean foreground Dice, averaged over test
images) and writes JSON.  Real data sets are not part of the repository; pass their folders.

    python scripts/benchmark_accuracy.py --minutes 2 --sets demo
    python scripts/benchmark_accuracy.py --minutes 20 --sets /data/xray /data/polyps --input_size 256
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the OpenMP runtime's start

import argparse
import csv
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.transforms import LoadImage  # noqa: E402

from monai_unet_bundle.data import find_pairs, split_pairs  # noqa: E402
from monai_unet_bundle.demo import write_demo_dataset  # noqa: E402
from monai_unet_bundle.metrics import confusion_matrix, scores  # noqa: E402
from monai_unet_bundle.readers import Auto2DReader, inspect_image  # noqa: E402
from monai_unet_bundle.transforms import EnsureChannelsd, MaskToIndex, mask_loader, mode_channels  # noqa: E402


# ------------------------------------------------------------------------------------------------ data


#: the bundle's readers, built once (building a LoadImage registers every MONAI reader, which takes time
#: the plain side's budget would pay for each image)
_LOAD_IMAGE = LoadImage(reader=Auto2DReader(kind="image"), image_only=True, ensure_channel_first=True)
_LOAD_MASK = mask_loader()


def data_settings(pairs: list[dict[str, str]]) -> tuple[int, int]:
    """(num_classes, in_channels) a user would pass for these pairs: binary 0/1 or 0/255 masks are 2
    classes, index masks max + 1; colour images anywhere make 3 channels."""
    values: set[int] = set()
    for pair in pairs:
        values.update(int(v) for v in np.unique(np.asarray(_LOAD_MASK(pair["label"]))[:1]))
    num_classes = 2 if values <= {0, 1} or values <= {0, 255} else max(values) + 1
    channels = 3 if any(mode_channels(inspect_image(p["image"])[1]) == 3 for p in pairs) else 1
    return num_classes, channels


def load_pair(pair: dict[str, str], channels: int, to_index: MaskToIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (C, W, H) scaled to [0, 1] and mask (W, H) class indices, as the bundle's readers load them."""
    image = EnsureChannelsd("image", channels).convert(_LOAD_IMAGE(pair["image"])).float()
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else image * 0
    mask = to_index(_LOAD_MASK(pair["label"]))
    return torch.as_tensor(np.asarray(image)), torch.as_tensor(np.asarray(mask))[0].long()


# ------------------------------------------------------------------------------------------------ the plain side


class PlainUNet(nn.Module):
    """The U-Net a research group writes by hand: 5 levels, (conv-BN-ReLU) x2, max-pool, transposed conv."""

    def __init__(self, in_channels: int, num_classes: int, features: int = 16) -> None:
        super().__init__()
        widths = [features * 2**i for i in range(5)]

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.down = nn.ModuleList([block(in_channels, widths[0])] + [block(widths[i - 1], widths[i]) for i in range(1, 5)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2) for i in range(4, 0, -1)])
        self.merge = nn.ModuleList([block(widths[i - 1] * 2, widths[i - 1]) for i in range(4, 0, -1)])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def plain_side(train, test, num_classes: int, channels: int, size: int, batch: int, features: int, minutes: float, seed: int) -> dict:
    """Train the plain loop for ``minutes`` of wall time (reading the data included); score the test pairs."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    start = time.perf_counter()
    to_index = MaskToIndex(num_classes)
    images, masks = [], []
    for pair in train:
        image, mask = load_pair(pair, channels, to_index)
        images.append(F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0])
        masks.append(F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long())
    x_all, y_all = torch.stack(images), torch.stack(masks)
    model = PlainUNet(channels, num_classes, features)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs = 0
    deadline = start + minutes * 60
    while time.perf_counter() < deadline:
        order = list(range(len(x_all)))
        rng.shuffle(order)
        model.train()
        for i in range(0, len(order) - (len(order) % batch if len(order) > batch else 0), batch):
            idx = order[i : i + batch]
            x, y = x_all[idx], y_all[idx]
            if rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            if rng.random() < 0.5:
                x, y = x.flip(-2), y.flip(-2)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.perf_counter() >= deadline:
                break
        epochs += 1
    trained = time.perf_counter() - start
    model.eval()
    matrices = []
    with torch.no_grad():
        for pair in test:
            image, mask = load_pair(pair, channels, to_index)
            logits = model(F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False))
            probs = F.interpolate(logits.softmax(1), size=tuple(mask.shape), mode="bilinear", align_corners=False)
            matrices.append(confusion_matrix(probs.argmax(1)[0], mask, num_classes))
    return {"epochs": epochs, "train_seconds": round(trained, 1), **summarise(matrices)}


def summarise(matrices: list[np.ndarray]) -> dict:
    """Dice per class and mean foreground Dice, averaged over images (the bundle's evaluation report does the same)."""
    per_image = [scores(cm) for cm in matrices]
    k = len(per_image[0]["dice"])
    dice = [float(np.nanmean([s["dice"][c] for s in per_image])) for c in range(k)]
    return {"mean_dice": float(np.nanmean([s["mean_dice"] for s in per_image])), "dice": dice}


# ------------------------------------------------------------------------------------------------ the bundle side


def bundle_side(root: Path, datalist: Path, dataset: Path, settings: list[str], minutes: float) -> dict:
    """Train through ``monai.bundle`` with the budget, evaluate on the test list; read its report (and its plan)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    common = ["--bundle_root", str(root), "--dataset_dir", str(dataset), "--datalist", str(datalist), *settings]
    train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO / "configs" / "train.json"), *common,
             "--time_budget_minutes", str(minutes), "--max_epochs", "100000"]
    start = time.perf_counter()
    subprocess.run(train, check=True, cwd=REPO, env=env, capture_output=True, text=True)
    trained = time.perf_counter() - start
    configs = f"['{REPO / 'configs' / 'train.json'}','{REPO / 'configs' / 'evaluate.json'}']"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *common],
                   check=True, cwd=REPO, env=env, capture_output=True, text=True)
    report = json.loads((root / "eval" / "metrics_summary.json").read_text())
    with open(root / "logs" / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    # the validation curve against the process's wall time: all the process's time outside training (start-up, data
    # check, caching, the final save) is counted as if spent before the first epoch, so reach times are not flattered
    outside = trained - float(rows[-1]["train_seconds"])
    curve = [[round(outside + float(r["train_seconds"]), 1), float(r["val_mean_dice"])] for r in rows]
    means = report["mean_over_images"]
    plan = json.loads((root / "models" / "plan.json").read_text())
    planned = {k: plan[k] for k in ("spatial_size", "batch_size", "normalization", "class_weights", "in_channels", "num_classes")}
    return {"epochs": len(rows), "train_seconds": round(trained, 1), "mean_dice": means["mean_dice"], "dice": means["dice"],
            "plan": planned, "val_curve": curve}


def time_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Seconds (of the training process's wall time) until the validation mean Dice first reached ``target``."""
    return next((seconds for seconds, dice in curve if dice >= target), None)


# ------------------------------------------------------------------------------------------------ main

#: the data sets made in code: name -> classes (synthetic: they check the script, they are not evidence)
DEMOS = {"demo": 2, "demo_multiclass": 3}


#: the sides, in the order they run: the bundle given only the data and the budget, the bundle given the plain loop's
#: settings explicitly, and the plain loop
SIDES = ("auto", "explicit", "plain")


def run_set(name: str, folder: Path, args: argparse.Namespace, work: Path) -> dict:
    pairs, missing, _ = find_pairs(folder)
    if missing:
        raise SystemExit(f"error: {len(missing)} image(s) in {folder} have no mask (e.g. {missing[0]}).")
    train, test = split_pairs(pairs, args.test_fraction, args.seed)
    num_classes, channels = data_settings(pairs)
    datalist = work / f"{name}.json"
    datalist.write_text(json.dumps({"training": train, "test": test}))
    size = args.input_size
    explicit = ["--num_classes", str(num_classes), "--in_channels", str(channels), "--spatial_size", f"[{size},{size}]",
                "--batch_size", str(args.batch_size), "--base_features", str(args.features), "--seed", str(args.seed),
                "--normalization", "minmax", "--class_weights", "None"]
    result = {"set": name, "folder": str(folder), "pairs": len(pairs), "test_pairs": len(test), "num_classes": num_classes,
              "in_channels": channels, "input_size": size, "minutes": args.minutes}
    print(f"{name}: {len(train)} training and {len(test)} test pairs, {num_classes} classes, {channels} channel(s)", flush=True)
    wall = None
    for side in args.sides:
        if side == "plain":
            # equal wall time: the plain loop gets all the seconds the bundle's training process took (start-up, data
            # check and caching included), not only its budget
            minutes = (wall or args.minutes * 60) / 60
            result[side] = plain_side(train, test, num_classes, channels, size, args.batch_size, args.features, minutes, args.seed)
        else:
            settings = ["--seed", str(args.seed), *args.bundle_args] if side == "auto" else [*explicit, *args.bundle_args]
            result[side] = bundle_side(work / f"{name}_{side}", datalist, folder, settings, args.minutes)
            wall = wall or result[side]["train_seconds"]
        print(f"  {side:8s}: test mean Dice {result[side]['mean_dice']:.4f} after {result[side]['epochs']} epochs", flush=True)
    if "plain" in result:
        # the time each bundle side needs to reach the plain loop's final test Dice, read off its validation curve (the
        # bundle's validation pairs, at the network's input size: an estimate, as the plain loop has no validation)
        for side in (s for s in ("auto", "explicit") if s in result):
            result[side]["reach_plain_seconds"] = time_to_reach(result[side]["val_curve"], result["plain"]["mean_dice"])
        result["plain"]["reach_plain_seconds"] = result["plain"]["train_seconds"]
    return result


def table(results: list[dict]) -> str:
    lines = ["| set | classes | side | wall s | epochs | test mean Dice | Dice per class (background first) | reaches plain's Dice at s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for side in (s for s in SIDES if s in r):
            s = r[side]
            per_class = ", ".join(f"{d:.3f}" for d in s["dice"])
            reach = s.get("reach_plain_seconds", "")
            reach = "not reached" if reach is None and "reach_plain_seconds" in s else (f"{reach:.0f}" if reach != "" else "")
            lines.append(f"| {r['set']} | {r['num_classes']} | {side} | {s['train_seconds']:.0f} | {s['epochs']} | {s['mean_dice']:.4f} | {per_class} | {reach} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["demo"], help="data set folders (images/ and masks/), or demo / demo_multiclass")
    parser.add_argument("--minutes", type=float, default=2.0, help="training wall time of each side")
    parser.add_argument("--input_size", type=int, default=128, help="both sides resize to this square (a multiple of 16)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--features", type=int, default=16, help="width of the first level on both sides")
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--demo_images", type=int, default=100, help="pairs in each demo set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="which sides to run (default: all three)")
    parser.add_argument("--bundle_args", type=shlex.split, default=[],
                        help="extra command-line settings for both bundle sides, as one string, e.g. --bundle_args='--lr_schedule poly'")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = []
    with tempfile.TemporaryDirectory(prefix="accuracy_") as tmp:
        work = Path(tmp)
        for entry in args.sets:
            if entry in DEMOS:
                folder = write_demo_dataset(work / entry, n_images=args.demo_images, seed=args.seed, num_classes=DEMOS[entry])
                results.append(run_set(entry, folder, args, work))
            else:
                results.append(run_set(Path(entry).name, Path(entry), args, work))
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
