"""Training augmentation behind one knob: ``augmentation: none | light | default | heavy``.

Every level is a list of MONAI's own random dictionary transforms, applied to ``image`` and
``label`` together where they move pixels (the label with nearest-neighbour interpolation, so it
stays a class-index map) and to ``image`` alone where they change intensities:

* ``none``: nothing random;
* ``light``: mirroring along both axes, and intensity scale and shift of up to 10% (the bundle's
  augmentation before this knob);
* ``default``: ``light``, plus rotation (up to 15 degrees) and zoom (0.85-1.15) together in one
  affine resampling for 30% of the images, and gamma, Gaussian noise, Gaussian blur and contrast,
  each for 15% of the images;
* ``heavy``: wider ranges (rotation 30 degrees, zoom 0.7-1.4), each applied more often, plus elastic
  deformation for 20% of the images (slow on a CPU).

``mirror: false`` turns the flips off for images where left and right (or up and down) matter,
such as chest X-rays with the heart on one side.
"""

from __future__ import annotations

import math
from typing import Any

from monai.transforms import (
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Rand2DElasticd,
)

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.settings import flag

__all__ = ["LEVELS", "augmentations", "flips"]

#: ``augmentation`` setting -> what it adds
LEVELS = {
    "none": "no random transforms",
    "light": "flips, intensity scale and shift (10%)",
    "default": "light + rotation 15 deg and zoom 0.85-1.15 (30%), gamma, noise, blur, contrast (15% each)",
    "heavy": "default with wider ranges, more often, and elastic deformation (20%)",
}

_BOTH = ["image", "label"]


def flips(level: str = "default", mirror: Any = True) -> bool:
    """Whether :func:`augmentations` of ``level`` mirrors the images: every level but ``none``, unless ``mirror`` is off.

    The plan keeps the answer (``mirrored``), so that inference's ``tta auto`` flips only for a model trained with flips.

    Raises:
        BundleInputError: for a ``mirror`` that is not true or false.
    """
    return level != "none" and flag(mirror, "mirror")


def augmentations(level: str = "default", mirror: Any = True) -> list[Any]:
    """The random transforms of ``level`` for ``image``/``label`` dictionaries (see the module docstring).

    Raises:
        BundleInputError: for an unknown level or a ``mirror`` that is not true or false.
    """
    if level not in LEVELS:
        raise BundleInputError(f"augmentation must be one of {', '.join(LEVELS)}, got {level!r}.")
    mirrored = flips(level, mirror)
    if level == "none":
        return []
    transforms: list[Any] = []
    if mirrored:
        transforms += [RandFlipd(_BOTH, prob=0.5, spatial_axis=0), RandFlipd(_BOTH, prob=0.5, spatial_axis=1)]
    if level in ("default", "heavy"):
        heavy = level == "heavy"
        angle = math.radians(30 if heavy else 15)
        zoom = (0.3, 0.4) if heavy else (0.15, 0.15)
        transforms.append(
            RandAffined(
                _BOTH, prob=0.5 if heavy else 0.3, rotate_range=angle, scale_range=[(-zoom[0], zoom[1])] * 2,
                mode=["bilinear", "nearest"], padding_mode="zeros",
            )
        )
        if heavy:
            transforms.append(
                Rand2DElasticd(_BOTH, spacing=(32, 32), magnitude_range=(1, 3), prob=0.2, mode=["bilinear", "nearest"], padding_mode="zeros")
            )
    transforms += [RandScaleIntensityd("image", factors=0.1, prob=0.5), RandShiftIntensityd("image", offsets=0.1, prob=0.5)]
    if level in ("default", "heavy"):
        p = 0.25 if level == "heavy" else 0.15
        transforms += [
            RandAdjustContrastd("image", prob=p, gamma=(0.7, 1.5)),
            RandGaussianNoised("image", prob=p, std=0.05),
            RandGaussianSmoothd("image", prob=p, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
            RandScaleIntensityd("image", factors=0.25, prob=p),
        ]
    return transforms
