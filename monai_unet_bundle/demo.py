"""The built-in demo data set, generated in code so nothing binary is committed.

Each image is an RGB picture of one to three smooth blobs ("cells") on a shaded, noisy background;
the mask marks the blobs.  Generation is deterministic for a given seed, so every machine trains on
the same pixels.  The set is written once, into a temporary folder that is renamed into place when
complete, so an interrupted run never leaves a half-written data set behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "CLASS_COLOURS",
    "demo_dir",
    "ensure_demo_dataset",
    "make_demo_pair",
    "make_multiclass_demo_pair",
    "write_demo_dataset",
]

logger = logging.getLogger(__name__)


def make_demo_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one demo image and its binary mask.

    Args:
        rng: the random generator to draw from.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        ``(image, mask)``: ``uint8`` arrays of shape ``(H, W, 3)`` and ``(H, W)`` with mask values 0/1.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.08, 0.22) * height, rng.uniform(0.08, 0.22) * width
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        wobble = 1.0 + 0.15 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
        mask |= (u / rx) ** 2 + (v / ry) ** 2 <= wobble
    # shaded background with a colour cast, then objects in another hue, then noise
    shade = 0.5 + 0.3 * np.sin(xx / width * rng.uniform(1, 4) + rng.uniform(0, 6)) * np.cos(yy / height * rng.uniform(1, 4))
    background = rng.uniform(0.25, 0.55, size=3).astype(np.float32)
    foreground = rng.uniform(0.45, 0.9, size=3).astype(np.float32)
    foreground[int(rng.integers(0, 3))] = rng.uniform(0.05, 0.2)  # one channel dark: a distinct hue
    image = shade[..., None] * background[None, None, :]
    image = np.where(mask[..., None], foreground[None, None, :] * (0.85 + 0.15 * shade[..., None]), image)
    image = image + rng.normal(0.0, 0.06, size=image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask.astype(np.uint8)


#: colour of each foreground class in the multiclass demo (class 1 first)
CLASS_COLOURS = np.array(
    [[0.85, 0.2, 0.2], [0.2, 0.75, 0.25], [0.25, 0.3, 0.9], [0.9, 0.8, 0.15], [0.8, 0.3, 0.85], [0.2, 0.8, 0.85]],
    dtype=np.float32,
)


def make_multiclass_demo_pair(
    rng: np.random.Generator, height: int, width: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one multiclass demo image and its class-index mask (about 95% background).

    Two to five small objects, each of a random foreground class; class ``c`` has its own colour
    (:data:`CLASS_COLOURS`) and shape (odd classes ellipses, even classes rotated rectangles).

    Returns:
        ``(image, mask)``: ``uint8`` arrays of shape ``(H, W, 3)`` and ``(H, W)``, mask values ``0..K-1``.
    """
    if not 3 <= num_classes <= len(CLASS_COLOURS) + 1:
        raise ValueError(f"the multiclass demo supports 3 to {len(CLASS_COLOURS) + 1} classes, got {num_classes}")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    mask = np.zeros((height, width), dtype=np.uint8)
    shade = 0.5 + 0.3 * np.sin(xx / width * rng.uniform(1, 4) + rng.uniform(0, 6)) * np.cos(yy / height * rng.uniform(1, 4))
    image = shade[..., None] * rng.uniform(0.25, 0.5, size=3).astype(np.float32)[None, None, :]
    classes = list(range(1, num_classes)) + [int(c) for c in rng.integers(1, num_classes, size=int(rng.integers(0, 3)))]
    for c in classes:  # every class appears in every image, some twice
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        ry, rx = rng.uniform(0.05, 0.10) * height, rng.uniform(0.05, 0.10) * width
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1 if c % 2 else (np.abs(u) <= rx) & (np.abs(v) <= ry * 0.7)
        mask[inside] = c
        colour = np.clip(CLASS_COLOURS[c - 1] + rng.uniform(-0.08, 0.08, size=3), 0, 1).astype(np.float32)
        image = np.where(inside[..., None], colour[None, None, :] * (0.85 + 0.15 * shade[..., None]), image)
    image = image + rng.normal(0.0, 0.06, size=image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def write_demo_dataset(
    out_dir: str | Path,
    n_images: int = 100,
    seed: int = 0,
    size_range: tuple[int, int] = (112, 176),
    num_classes: int = 2,
) -> Path:
    """Write ``n_images`` demo pairs as ``out_dir/images/demo_XXX.png`` and ``out_dir/masks/demo_XXX.png``.

    Image sizes vary in ``size_range`` (height and width drawn separately), so resizing is always
    exercised.  Binary masks are saved 0/255 so they are visible in any viewer; multiclass masks
    (``num_classes >= 3``) hold class indices.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        if num_classes == 2:
            image, mask = make_demo_pair(rng, h, w)
            mask = mask * 255
        else:
            image, mask = make_multiclass_demo_pair(rng, h, w, num_classes)
        Image.fromarray(image, mode="RGB").save(out / "images" / f"demo_{i:03d}.png")
        Image.fromarray(mask, mode="L").save(out / "masks" / f"demo_{i:03d}.png")
    return out


def _demo_classes(num_classes: int | str) -> int:
    """The demo's class count for the ``num_classes`` setting: ``auto`` (or anything but a whole number) is binary."""
    return num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) else 2


def demo_dir(bundle_root: str | Path, num_classes: int | str = 2) -> str:
    """Where the demo set for ``num_classes`` lives: ``data/demo`` (binary or ``auto``) or ``data/demo_<K>class``."""
    num_classes = _demo_classes(num_classes)
    name = "demo" if num_classes == 2 else f"demo_{num_classes}class"
    return str(Path(bundle_root) / "data" / name)


def ensure_demo_dataset(
    dataset_dir: str | Path, demo_dir: str | Path, n_images: int = 100, seed: int = 0, num_classes: int | str = 2
) -> str:
    """Create the demo set in ``demo_dir`` when ``dataset_dir`` points there and it is not there yet.

    A user's own ``dataset_dir`` is returned untouched.  The demo set is built in a temporary
    sibling folder and renamed into place, so a half-written set is never used.  A held-out
    ``test`` folder with 8 images of other sizes is written beside ``images/`` and ``masks/`` for
    trying inference.

    Returns:
        ``dataset_dir`` as a string, for use in config expressions.
    """
    dataset, demo = Path(dataset_dir), Path(demo_dir)
    num_classes = _demo_classes(num_classes)
    if dataset.resolve() != demo.resolve() or (demo / "images").is_dir():
        return str(dataset_dir)
    demo.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=demo.parent))
    try:
        logger.info("creating the demo data set (%d pairs, %d classes) in %s", n_images, num_classes, demo)
        write_demo_dataset(tmp, n_images=n_images, seed=seed, num_classes=num_classes)
        write_demo_dataset(tmp / "test", n_images=8, seed=seed + 1, size_range=(90, 220), num_classes=num_classes)
        os.replace(tmp, demo)
    except OSError:
        if not (demo / "images").is_dir():
            raise
        logger.info("the demo data set was created by another process")  # lost a race: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dataset_dir)
