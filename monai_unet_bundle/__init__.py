"""monai-unet-bundle: the Python package behind the bundle's configs.

Importing it (every config does, through its ``imports`` list) makes input errors print as one
sentence with exit status 2 instead of a traceback; see :mod:`monai_unet_bundle.errors`.
"""

from __future__ import annotations

from monai_unet_bundle.errors import BundleInputError, install_excepthook

__version__ = "0.1.0"
__all__ = ["BundleInputError", "__version__"]

install_excepthook()
