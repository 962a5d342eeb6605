#!/usr/bin/env bash
# Import the bundle into the real MONAI Label 0.8.5 and test it, in a virtual environment of its own
# where this project is NOT installed (the packaged bundle must carry monai_unet_bundle itself).
#
#   bash scripts/test_monailabel.sh [VENV_DIR]     # default VENV_DIR: .venv-label in the repository root
#
# The venv is created when missing and reused otherwise (pip then only checks the pins).
# The bundle's own packages are exactly what configs/metadata.json declares, installed the model zoo's way
# (monai, torch and numpy at monai_version, pytorch_version and numpy_version, plus every
# required_packages_version entry, pinned; scripts/package_bundle.py's bundle_requirements lists them), so a
# package the bundle needs but the metadata leaves out fails here; the extra_packages_version ones (curves.png,
# TensorBoard, progress bars, MLflow) are not installed for the bundle, which then runs without those outputs.
#   bash scripts/test_monailabel.sh --print-requirements   # only print that list
# Why monailabel goes in as it does: monailabel 0.8.5 accepts monai 1.6.1, but installing it
# with its dependencies pulls a CUDA torch and numpy<2; so monailabel (and pydicom-seg, which pins
# numpy<2 without needing it here) go in with --no-deps, followed by the modules it imports at
# run time. torch==2.13.0 (the metadata's pytorch_version) is named in every step so pip keeps the CPU build from local disk.
# No torchvision build works with torch 2.13.0 here: tests/monailabel/conftest.py provides a stand-in (also to
# the `monailabel start_server` the tests start, through PYTHONPATH).  The tests drive that server with requests,
# one of monailabel's own modules, and stop it by its process id.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
# what the model zoo installs for this bundle, read from configs/metadata.json (the script needs only the standard library)
requirements() {
    python3 -c 'import runpy; print("\n".join(runpy.run_path("scripts/package_bundle.py")["bundle_requirements"]()))'
}
if [ "${1:-}" = "--print-requirements" ]; then
    requirements
    exit 0
fi
VENV="${1:-.venv-label}"
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
PY="$VENV/bin/python"

start=$SECONDS
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    # keep the venv out of git without touching .gitignore (Python 3.13's venv does the same)
    printf '*\n' > "$VENV/.gitignore"
fi
# the bundle's packages: exactly what the metadata declares (the project itself is not installed), plus pytest
mapfile -t DEPS < <(requirements)
if [ "${#DEPS[@]}" -lt 4 ]; then
    echo "error: could not read the required packages from configs/metadata.json (got: ${DEPS[*]:-nothing})." >&2
    exit 2
fi
echo "installing what configs/metadata.json declares: ${DEPS[*]}"
"$PY" -m pip install --quiet --disable-pip-version-check "${DEPS[@]}" pytest
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "monailabel==0.8.5" "pydicom-seg==0.4.1"
# the declared pins again, so that resolving monailabel's modules can neither move nor replace them (pyyaml is
# monailabel's: the bundle does not need it)
"$PY" -m pip install --quiet --disable-pip-version-check "${DEPS[@]}" \
    expiring_dict expiringdict pydantic pydantic-settings python-dotenv itk pynrrd scikit-image shapely requests \
    requests-toolbelt schedule timeloop cachetools watchdog girder-client psutil fastapi uvicorn python-multipart \
    pyjwt passlib bcrypt "dicomweb-client[gcp]==0.59.1" "pydicom==2.4.4" "jsonschema<4" simpleitk pyyaml
echo "monailabel venv ready in $((SECONDS - start)) s: $VENV"
# the optional packages are not installed for the bundle, but monailabel's modules (or an older run of this
# script in the same venv) may have brought some: say which, since the bundle then writes those outputs too
"$PY" - <<'PY'
import json, importlib.metadata as md
extra = json.load(open("configs/metadata.json")).get("extra_packages_version", {})
present = []
for name in extra:
    try:
        present.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print("optional packages present in this venv:", ", ".join(present) or "none")
PY

# Run from tests/monailabel with it as rootdir and confcutdir and no ini file: the repository root is
# then not on sys.path, tests/conftest.py (which imports the installed project) is not loaded, and
# the test itself asserts that monai_unet_bundle cannot be imported before it packages the bundle.
cd "$REPO/tests/monailabel"
if env -u PYTHONPATH "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("monai_unet_bundle") is None)'; then
    echo "error: monai_unet_bundle is importable in $VENV; use a venv without the project installed." >&2
    exit 2
fi
start=$SECONDS
status=0
env -u PYTHONPATH MONAI_UNET_BUNDLE_REQUIRE_MONAILABEL=1 OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
    "$PY" -m pytest -p no:cacheprovider -c /dev/null --rootdir . --confcutdir . -m monailabel -ra \
    -W ignore::DeprecationWarning -W ignore::FutureWarning . || status=$?
echo "monailabel tests finished in $((SECONDS - start)) s (exit status $status)"
exit "$status"
