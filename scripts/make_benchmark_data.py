"""Build the real labelled 2D sets of ``scripts/benchmark_accuracy.py`` from archives on the package index.

No package ships a real 2D segmentation set, but three archives on PyPI carry real labelled volumes; this
script slices them into the bundle's folder layout (``images/`` and ``masks/``, one file per slice or
tile, file names ``<volume>_z<k>.nii.gz`` so that a ``--group_pattern '^([a-z]+\\d*)_'`` keeps a volume's
slices together).  Nothing is downloaded here: fetch the archives first (their addresses are below),
then pass their paths.

* ``radiomics``: every axial slice with a label of pyradiomics 3.1.0's five test volumes (brain MR,
  breast MR, lung CT; int16; 120x45 to 512x512): 27 binary pairs, tumours covering 0.06-1.5% of the
  pixels.  Needs ``pynrrd`` (the volumes are NRRD files)::

      curl -sSLO https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/pyradiomics-3.1.0.tar.gz
      pip install pynrrd
      python scripts/make_benchmark_data.py radiomics pyradiomics-3.1.0.tar.gz /data/radiomics

* ``mni152``: every axial slice of the MNI152 2009 template in the nilearn 0.14.1 wheel where grey or
  white matter probability exceeds 0.5 somewhere: 152 pairs of 233x197, classes 0 (other), 1 (grey
  matter), 2 (white matter).  One template, so slices are alike and masks are thresholded maps, not
  hand-drawn::

      pip download --no-deps --only-binary :all: nilearn==0.14.1
      python scripts/make_benchmark_data.py mni152 nilearn-0.14.1-py3-none-any.whl /data/mni152

* ``nuclei``: the hand-annotated fluorescence image of cell nuclei in the stardist 0.9.2 wheel (512x512,
  from the 2018 Data Science Bowl, 126 nuclei) cut into a 5x5 grid of 102x102 tiles: 25 pairs of 16-bit
  grayscale PNG images with 0/255 PNG masks (nuclei against background), 20% foreground.  Tiles of one
  image, named ``nuclei_r<row>c<col>``::

      pip download --no-deps --only-binary :all: stardist==0.9.2
      python scripts/make_benchmark_data.py nuclei stardist-0.9.2-*.whl /data/nuclei
"""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

RADIOMICS_VOLUMES = ("brain1", "brain2", "breast1", "lung1", "lung2")
MNI_PREFIX = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def _write_pair(out: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Write one 2D image and its mask as NIfTI files under ``out/images`` and ``out/masks``."""
    for folder, array in (("images", image), ("masks", mask)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), np.eye(4)), str(out / folder / f"{name}.nii.gz"))


def make_radiomics(archive: Path, out: Path) -> int:
    """Slice pyradiomics' labelled test volumes (from its source archive) into 2D pairs; return the count."""
    try:
        import nrrd
    except ImportError:
        raise SystemExit("the radiomics set needs pynrrd to read NRRD volumes: pip install pynrrd") from None
    count = 0
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/data/" in m.name}
        for volume in RADIOMICS_VOLUMES:
            arrays = {}
            for part in ("image", "label"):
                member = members.get(f"{volume}_{part}.nrrd")
                if member is None:
                    raise SystemExit(f"{archive} has no data/{volume}_{part}.nrrd: is it pyradiomics 3.1.0's source archive?")
                handle = io.BytesIO(tar.extractfile(member).read())
                header = nrrd.read_header(handle)  # leaves the handle at the start of the data
                arrays[part] = nrrd.read_data(header, handle, filename=None)
            image, label = arrays["image"], arrays["label"]
            for z in range(image.shape[2]):
                mask = (label[:, :, z] > 0).astype(np.uint8)
                if mask.any():
                    _write_pair(out, f"{volume}_z{z:03d}", image[:, :, z].astype(np.int16), mask)
                    count += 1
    return count


def make_mni152(wheel: Path, out: Path) -> int:
    """Slice the MNI152 template of nilearn's wheel into 2D pairs with grey/white matter classes."""
    volumes = {}
    with zipfile.ZipFile(wheel) as archive:
        for part in ("t1", "gm", "wm"):
            raw = gzip.decompress(archive.read(MNI_PREFIX.format(part)))
            volumes[part] = np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj, dtype=np.float32)
    count = 0
    for z in range(volumes["t1"].shape[2]):
        gm, wm = volumes["gm"][:, :, z] > 0.5, volumes["wm"][:, :, z] > 0.5
        if gm.any() or wm.any():
            mask = np.where(wm, 2, np.where(gm, 1, 0)).astype(np.uint8)
            _write_pair(out, f"mni_z{z:03d}", volumes["t1"][:, :, z], mask)
            count += 1
    return count


def make_nuclei(wheel: Path, out: Path, grid: int = 5, tile: int = 102) -> int:
    """Cut stardist's annotated nuclei image into a grid of tiles: 16-bit PNG images, 0/255 PNG masks."""
    from PIL import Image

    with zipfile.ZipFile(wheel) as archive:
        image, labels = (
            np.asarray(Image.open(io.BytesIO(archive.read(f"stardist/data/images/{name}.tif"))))
            for name in ("img2d", "mask2d")
        )
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for row in range(grid):
        for col in range(grid):
            window = np.s_[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile]
            name = f"nuclei_r{row}c{col}.png"
            Image.fromarray(image[window].astype(np.uint16)).save(out / "images" / name)
            Image.fromarray(((labels[window] > 0) * 255).astype(np.uint8)).save(out / "masks" / name)
    return grid * grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=("radiomics", "mni152", "nuclei"))
    parser.add_argument("archive", type=Path, help="pyradiomics-3.1.0.tar.gz, nilearn-0.14.1-py3-none-any.whl or stardist-0.9.2-*.whl")
    parser.add_argument("out", type=Path, help="folder to write images/ and masks/ into (must not hold images yet)")
    args = parser.parse_args()
    if not args.archive.is_file():
        raise SystemExit(f"{args.archive} is not a file: download it first (see --help).")
    if (args.out / "images").exists() and any((args.out / "images").iterdir()):
        raise SystemExit(f"{args.out / 'images'} already holds files: pass an empty or new folder.")
    make = {"radiomics": make_radiomics, "mni152": make_mni152, "nuclei": make_nuclei}[args.set]
    count = make(args.archive, args.out)
    print(f"wrote {count} image/mask pairs to {args.out}")


if __name__ == "__main__":
    main()
