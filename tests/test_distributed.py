"""monai_unet_bundle.distributed and the multi_gpu_* mixins: helpers, config structure, and real gloo process groups."""

from __future__ import annotations

import csv
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from monai.bundle import ConfigParser

from monai_unet_bundle import distributed as mdist

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NOT_MAIN = "$not monai_unet_bundle.distributed.is_main_process()"
#: handlers that log or write files and must run on rank 0 only (our file writers check the rank themselves)
RANK0_ONLY = {"StatsHandler", "TensorBoardStatsHandler", "monai_unet_bundle.progress.TrainingProgress"}


# --------------------------------------------------------------------------------------------- helpers


def test_backend_follows_the_device():
    assert mdist.backend_for("cpu") == "gloo"
    assert mdist.backend_for(torch.device("cpu")) == "gloo"
    assert mdist.backend_for("cuda") == "nccl"
    assert mdist.backend_for(torch.device("cuda:1")) == "nccl"


def test_local_device_is_the_local_rank_s_gpu_or_the_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mdist.local_device() == torch.device("cuda:3")
    monkeypatch.delenv("LOCAL_RANK")
    assert mdist.local_device() == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert mdist.local_device() == torch.device("cpu")


def test_ddp_device_ids():
    assert mdist.ddp_device_ids("cpu") is None
    assert mdist.ddp_device_ids(torch.device("cuda:2")) == [2]


def test_is_main_process_reads_torchrun_s_rank_before_the_group_exists(monkeypatch: pytest.MonkeyPatch):
    assert not torch.distributed.is_initialized()
    monkeypatch.delenv("RANK", raising=False)
    assert mdist.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert mdist.is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not mdist.is_main_process()


@pytest.mark.parametrize("n, world", [(5, 2), (4, 2), (7, 3), (1, 2), (3, 4)])
def test_evaluation_sampler_covers_every_image_and_never_leaves_a_rank_empty(n: int, world: int):
    shards = [list(mdist.evaluation_sampler(list(range(n)), num_replicas=world, rank=r)) for r in range(world)]
    assert all(shards), f"a rank got no data: {shards}"
    seen = [i for s in shards for i in s]
    assert sorted(set(seen)) == list(range(n))
    if n >= world:  # nothing repeated: the metrics see every image once
        assert sorted(seen) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --------------------------------------------------------------------------------------------- configs


def _merged(*names: str) -> dict:
    return ConfigParser.load_config_files([str(CONFIGS / n) for n in names])


def _load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def _check_rank0_only(handlers: list) -> None:
    for h in handlers:
        if not isinstance(h, dict):
            continue  # a reference such as "@validate#best_model": our own handlers check the rank
        if h.get("_target_") in RANK0_ONLY:
            assert h.get("_disabled_") == "@is_not_rank0", f"{h['_target_']} would log/write on every rank"
        else:
            assert "_disabled_" not in h, f"{h.get('_target_')} is disabled on ranks > 0"


def _no_list_positions(mixin: dict) -> None:
    """Mixins override by id, never by list position (``handlers#3``), and extend lists with ``+``."""
    for key in mixin:
        assert not any(part.isdigit() for part in key.split("#")), f"{key} reaches into a list by position"
    assert "initialize" not in mixin and "imports" not in mixin, "lists are extended with +initialize / +imports"


def test_multi_gpu_train_mixin_structure():
    train, mixin, merged = _load("train.json"), _load("multi_gpu_train.json"), _merged("train.json", "multi_gpu_train.json")
    _no_list_positions(mixin)
    assert train["is_not_rank0"] is False and merged["is_not_rank0"] == NOT_MAIN
    assert merged["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert merged["network"]["module"]["network"] == "@network_def"
    assert merged["train"]["sampler"]["_target_"] == "monai.data.DistributedSampler" and train["train"]["sampler"] is None
    assert merged["train"]["sampler"]["shuffle"] is True and merged["train"]["dataloader"]["shuffle"] == "$@train#sampler is None"
    assert merged["train"]["dataloader"]["sampler"] == "@train#sampler"
    assert merged["train"]["dataloader"]["drop_last"] == "$len(@train#sampler) > @plan['batch_size'] // @plan.get('patches_per_image', 1)"  # per-rank length, in loader batches
    assert merged["validate"]["dataloader"]["sampler"] == "@validate#sampler"
    assert merged["validate"]["sampler"]["_target_"].endswith("evaluation_sampler")
    assert "local_device()" in merged["device"]
    _check_rank0_only(merged["train"]["handlers"])
    _check_rank0_only(merged["validate"]["handlers"])
    resume = [h for h in merged["train"]["handlers"] if isinstance(h, dict) and h.get("_target_", "").endswith("ResumeCheckpoint")]
    assert len(resume) == 1 and resume[0]["objects"]["network"] == "@network_def"  # resume.pt without "module."
    # train.json's steps, then the process group
    assert merged["initialize"] == [*train["initialize"], "$@process_group"]
    assert merged["process_group"]["_target_"] == "monai_unet_bundle.distributed.init_process_group"
    assert merged["finalize"] == ["$monai_unet_bundle.distributed.destroy_process_group()"]


def test_multi_gpu_evaluate_mixin_structure():
    evaluate, mixin = _load("evaluate.json"), _load("multi_gpu_evaluate.json")
    _no_list_positions(mixin)
    _no_list_positions(evaluate)
    merged = _merged("train.json", "evaluate.json", "multi_gpu_evaluate.json")
    handlers = merged["validate"]["handlers"]
    assert "@validate#report" in handlers and "@validate#model_loader" in handlers
    assert merged["validate"]["report"]["_target_"] == "monai_unet_bundle.distributed.DistributedSegmentationReport"
    assert merged["validate"]["report"]["sampler"] == "@validate#sampler"
    assert _merged("train.json", "evaluate.json")["validate"]["report"]["_target_"] == "monai_unet_bundle.metrics.SegmentationReport"
    _check_rank0_only(handlers)
    assert merged["network"] == _load("train.json")["network"], "evaluation needs no DistributedDataParallel"
    assert merged["initialize"][-1] == "$@process_group" and merged["initialize"][0] == "$@settings"
    assert merged["finalize"] == ["$monai_unet_bundle.distributed.destroy_process_group()"]


# ------------------------------------------------------------------------------ two real gloo processes
# (slow: two spawned processes import torch and MONAI, about 10 s on 2 cores; the work itself takes 0.1 s)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _report_case(rank: int, n: int, out: Path) -> dict[str, Any]:
    """Every rank collects the rows of its shard of ``n`` images; rank 0 must write all ``n`` in order."""
    from ignite.engine import Engine
    from monai.data import MetaTensor

    sampler = mdist.evaluation_sampler(list(range(n)))
    report = mdist.DistributedSegmentationReport(out / f"rank{rank}", num_classes=2, sampler=sampler)
    engine = Engine(lambda e, b: None)
    truth = torch.zeros(2, 4, 4)
    truth[1, :2] = 1
    truth[0, 2:] = 1
    for i in sampler:  # even images predicted perfectly, odd ones exactly wrong
        pred = truth.clone() if i % 2 == 0 else truth.flip(0)
        image = MetaTensor(torch.zeros(3, 4, 4), meta={"filename_or_obj": f"img_{i}.png"})
        engine.state.output = [{"image": image, "pred": pred, "label": truth}]
        report.collect(engine)
    summary = report.write(engine)
    return {"images": summary["images"], "wrote": (out / f"rank{rank}" / "metrics_per_image.csv").is_file()}


def _worker(rank: int, store: str, out: str) -> None:
    from ignite import distributed as idist
    from ignite.engine import Engine

    from monai_unet_bundle.early_stopping import EarlyStopping

    os.environ["LOCAL_RANK"] = str(rank)
    result: dict[str, Any] = {}

    def record(name: str, fn) -> None:
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result[name] = f"error: {type(exc).__name__}: {exc}"

    mdist.init_process_group(
        backend="gloo", device="cpu", init_method=f"file://{store}", world_size=2, rank=rank, timeout=timedelta(seconds=20)
    )

    def asymmetric() -> float:
        # ignite's first look at a group it did not create runs a collective (new_group + all_reduce):
        # here only rank 0 asks, which deadlocks unless init_process_group already synced ignite
        if rank == 0:
            idist.get_rank()
        t = torch.tensor([float(rank + 1)])
        torch.distributed.all_reduce(t)
        return float(t.item())

    record("asymmetric", asymmetric)
    record("ignite", lambda: [idist.get_rank(), idist.get_world_size(), idist.backend(), str(idist.device())])

    def early_stop(scores: list[float]) -> bool:
        trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
        stopper = EarlyStopping(patience=1, trainer=trainer)
        stopper.best_score = 0.5
        evaluator.state.metrics = {"val_mean_dice": scores[rank]}
        stopper(evaluator)
        return bool(trainer.should_terminate)

    record("stop_when_rank0_stops", lambda: early_stop([0.4, 0.9]))  # rank 0: no gain -> stop; rank 1: gain
    record("go_on_when_rank0_goes_on", lambda: early_stop([0.9, 0.4]))
    record("report_5", lambda: _report_case(rank, 5, Path(out) / "r5"))
    record("report_1", lambda: _report_case(rank, 1, Path(out) / "r1"))

    mdist.destroy_process_group()
    record("after_destroy", lambda: [torch.distributed.is_initialized(), idist.get_world_size(), idist.model_name()])
    (Path(out) / f"result{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Run :func:`_worker` on two processes joined by a gloo group; return each rank's results."""
    out = tmp_path_factory.mktemp("gloo")
    ctx = mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo processes did not finish within 180 s (a collective waits forever)")
    return out, [json.loads((out / f"result{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_init_process_group_hands_the_group_to_ignite(gloo_results):
    _, results = gloo_results
    assert [r["ignite"] for r in results] == [[0, 2, "gloo", "cpu"], [1, 2, "gloo", "cpu"]]
    # a first idist call on one rank only runs no hidden collective (that would deadlock)
    assert [r["asymmetric"] for r in results] == [3.0, 3.0]


@pytest.mark.slow
def test_early_stopping_follows_rank_0_on_every_rank_under_gloo(gloo_results):
    _, results = gloo_results
    assert [r["stop_when_rank0_stops"] for r in results] == [True, True]
    assert [r["go_on_when_rank0_goes_on"] for r in results] == [False, False]


@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 1])
def test_report_gathers_every_rank_and_rank_0_writes_once_in_data_set_order(gloo_results, n: int):
    out, results = gloo_results
    assert [r[f"report_{n}"] for r in results] == [{"images": n, "wrote": True}, {"images": n, "wrote": False}]
    assert not (out / f"r{n}" / "rank1").exists()
    rows = _rows(out / f"r{n}" / "rank0" / "metrics_per_image.csv")
    assert [r["filename"] for r in rows] == [f"img_{i}.png" for i in range(n)]  # 1 image on 2 ranks: kept once
    assert [float(r["dice_foreground"]) for r in rows] == [1.0 if i % 2 == 0 else 0.0 for i in range(n)]


@pytest.mark.slow
def test_destroy_process_group_leaves_ignite_serial(gloo_results):
    _, results = gloo_results
    assert [r["after_destroy"] for r in results] == [[False, 1, "serial"], [False, 1, "serial"]]
