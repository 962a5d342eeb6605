from __future__ import annotations

import os

import pytest
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, Lambdad

from monai_unet_bundle.datasets import cached_size, choose_cache, loader_workers, make_dataset
from monai_unet_bundle.errors import BundleInputError


def test_auto_cache_follows_the_memory_budget():
    # 100 pairs at 512x512 RGB + mask, float32: 400 MiB
    assert choose_cache("auto", 100, [512, 512], 3, memory=4 * 2**30) == "memory"
    assert choose_cache("auto", 100, [512, 512], 3, memory=1 * 2**30) == "disk"
    assert choose_cache("none", 10**6, [512, 512], 3) == "none"
    with pytest.raises(BundleInputError, match="cache must be one of auto, memory, disk, none"):
        choose_cache("ram", 1, [8, 8], 1)


def test_patch_training_caches_images_at_their_own_size():
    plan = {"spatial_size": [256, 256], "data": {"median_height_width": [2400.0, 1900.5]}}
    assert cached_size(plan) == [256, 256]
    assert cached_size({**plan, "patch_training": True}) == [2400, 1900]  # 32 pairs of these: 1.1 GiB, not 32 MiB
    assert choose_cache("auto", 32, cached_size({**plan, "patch_training": True}), 1, memory=2 * 2**30) == "disk"
    assert choose_cache("auto", 32, cached_size(plan), 1, memory=2 * 2**30) == "memory"


def test_loader_workers():
    assert loader_workers(3) == 3 and loader_workers(0) == 0
    assert 0 <= loader_workers("auto", "memory") <= 2
    assert loader_workers("auto", "disk") >= 1 and loader_workers("auto", "none", "cuda:0") >= 1
    cpus = len(os.sched_getaffinity(0))
    assert loader_workers("auto", "none", "cpu") == (0 if cpus <= 4 else min(8, cpus // 4))
    with pytest.raises(BundleInputError, match='num_workers must be a whole number >= 0 or "auto"'):
        loader_workers("many")


def test_each_mode_builds_its_dataset_and_gives_the_same_items(tmp_path):
    data = [{"x": i} for i in range(3)]
    transform = Compose([Lambdad("x", lambda v: v * 2)])
    kinds = {"memory": CacheDataset, "disk": PersistentDataset, "none": Dataset}
    for mode, kind in kinds.items():
        ds = make_dataset(data, transform, cache=mode, cache_dir=tmp_path / "c", spatial_size=[8, 8])
        assert type(ds) is kind and [ds[i]["x"] for i in range(3)] == [0, 2, 4]
    assert list((tmp_path / "c").glob("*.pt"))  # the disk cache was written
