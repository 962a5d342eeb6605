"""Set-up for the MONAI Label tests, which run in their own virtual environment (scripts/test_monailabel.sh).

* registers the ``monailabel`` marker (the project's pyproject.toml does not know it);
* when the real ``torchvision`` is missing (no build of it works with torch 2.13.0 on our CPU
  machines), puts a stand-in package on ``sys.path`` before monailabel is imported:
  ``monailabel.transform.post`` and ``monailabel.deepedit.handlers`` import
  ``torchvision.utils.make_grid``/``save_image`` at module level but only call them when
  drawing training previews, which no code path used here does; the stand-ins raise if called;
* with ``MONAI_UNET_BUNDLE_REQUIRE_MONAILABEL=1`` (set by scripts/test_monailabel.sh) a missing
  monailabel is an error, so the dedicated run can never pass by skipping everything.  In the
  project's main suite, where monailabel is not installed, the test module skips with its reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

#: set by scripts/test_monailabel.sh: the dedicated run must fail, not skip, without monailabel
REQUIRE_ENV = "MONAI_UNET_BUNDLE_REQUIRE_MONAILABEL"

_TORCHVISION_INIT = '''"""Stand-in for torchvision written by tests/monailabel/conftest.py (the real one is not installed)."""
__version__ = "0.0.0+stand-in"
'''

_TORCHVISION_UTILS = '''"""The two names monailabel imports from torchvision.utils; calling either is a test failure."""


def make_grid(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: make_grid was called; install a real torchvision")


def save_image(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: save_image was called; install a real torchvision")
'''

_stub_dir: str | None = None


def required() -> bool:
    """Whether this is the dedicated MONAI Label run, where nothing may be skipped."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def monailabel_installed() -> bool:
    """Whether the real monailabel package is importable.

    Where ``tests/`` is on ``sys.path`` (the main suite), this folder itself would import as an
    empty namespace package named ``monailabel``; only a regular package counts.
    """
    spec = importlib.util.find_spec("monailabel")
    return spec is not None and spec.origin not in (None, "namespace")


def _install_torchvision_stand_in() -> None:
    global _stub_dir
    if importlib.util.find_spec("torchvision") is not None:
        return
    _stub_dir = tempfile.mkdtemp(prefix="torchvision-stand-in-")
    package = Path(_stub_dir) / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(_TORCHVISION_INIT)
    (package / "utils.py").write_text(_TORCHVISION_UTILS)
    sys.path.append(_stub_dir)  # appended: a real torchvision found later on the path still wins


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, check monailabel in the dedicated run, and provide torchvision if needed."""
    config.addinivalue_line(
        "markers", "monailabel: imports the bundle into the real MONAI Label (separate venv: scripts/test_monailabel.sh)"
    )
    if not monailabel_installed():
        if required():
            raise pytest.UsageError(
                f"{REQUIRE_ENV} is set but monailabel is not installed in {sys.prefix}: run scripts/test_monailabel.sh."
            )
        return
    _install_torchvision_stand_in()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the stand-in package written by :func:`pytest_configure`."""
    if _stub_dir is not None:
        shutil.rmtree(_stub_dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In the dedicated run a skipped test counts as failed: that run exists to exercise MONAI Label."""
    outcome = yield
    report = outcome.get_result()
    if required() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in the dedicated MONAI Label run ({REQUIRE_ENV}=1), which must run every test: {report.longrepr}"


@pytest.fixture(scope="session")
def label_run_required() -> bool:
    """True in the dedicated MONAI Label run (scripts/test_monailabel.sh), where a skip would hide a failure."""
    return required()


@pytest.fixture(scope="session")
def stand_in_pythonpath() -> str:
    """``PYTHONPATH`` for a MONAI Label server started by a test: the torchvision stand-in, when one was written."""
    return _stub_dir or ""
