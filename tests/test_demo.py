from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from monai_unet_bundle.demo import ensure_demo_dataset, make_demo_pair, write_demo_dataset


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_pairs_are_deterministic_and_binary():
    a_img, a_mask = make_demo_pair(np.random.default_rng(5), 40, 30)
    b_img, b_mask = make_demo_pair(np.random.default_rng(5), 40, 30)
    assert a_img.shape == (40, 30, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert set(np.unique(a_mask)) <= {0, 1} and 0 < a_mask.mean() < 0.9


def test_written_set_is_reproducible_and_viewable(tmp_path):
    write_demo_dataset(tmp_path / "a", n_images=3, size_range=(20, 30))
    write_demo_dataset(tmp_path / "b", n_images=3, size_range=(20, 30))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    mask = np.array(Image.open(tmp_path / "a" / "masks" / "demo_000.png"))
    assert set(np.unique(mask)) == {0, 255}
    assert Image.open(tmp_path / "a" / "images" / "demo_000.png").mode == "RGB"


def test_ensure_creates_only_the_demo_folder_once(tmp_path):
    demo = tmp_path / "data" / "demo"
    user = tmp_path / "mine"
    assert ensure_demo_dataset(user, demo) == str(user)
    assert not demo.exists() and not user.exists()  # a user's folder is never created or touched
    ensure_demo_dataset(demo, demo, n_images=4)
    assert len(list((demo / "images").glob("*.png"))) == 4
    assert len(list((demo / "test" / "images").glob("*.png"))) == 8
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["demo"]  # no temporary folder left
    stamp = (demo / "images" / "demo_000.png").stat().st_mtime_ns
    ensure_demo_dataset(demo, demo, n_images=4)
    assert (demo / "images" / "demo_000.png").stat().st_mtime_ns == stamp
