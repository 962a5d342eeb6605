"""monai-unet-bundle: the Python package behind the bundle's configs.

Every workflow's first step, :func:`monai_unet_bundle.settings.check_settings`, checks the
settings and installs the hook that prints input errors as one line each with exit status 2
instead of a traceback (see :mod:`monai_unet_bundle.errors`); importing the package changes nothing.
"""

from __future__ import annotations

from monai_unet_bundle.errors import BundleInputError

__version__ = "0.3.0"
__all__ = ["BundleInputError", "__version__"]

