from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.progress import TrainingProgress
from monai_unet_bundle.networks import build_network
from monai_unet_bundle.runtime import configure_determinism, in_channels_last, place_network, resolve_amp, tune_allocator, use_channels_last
from monai_unet_bundle.schedules import LrScheduleStepper, build_scheduler
from tests.conftest import REPO


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def test_schedules_by_name():
    opt = _optimizer()
    cosine = build_scheduler("cosine", opt, max_epochs=4)
    for _ in range(4):
        opt.step()
        cosine.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    opt = _optimizer()
    step = build_scheduler("step", opt, max_epochs=8)
    for _ in range(4):
        opt.step()
        step.step()
    assert opt.param_groups[0]["lr"] == 0.25  # halved every 8 // 4 = 2 epochs
    with pytest.raises(BundleInputError, match="lr_schedule 'linear' is not supported: use one of cosine, plateau"):
        build_scheduler("linear", _optimizer(), 10)


def _plateau_run(scores: list[float], **kwargs) -> list[float]:
    """Train with a plateau schedule and a validation after every epoch that scores ``scores`` in turn;
    returns the learning rate after each validation."""
    opt = _optimizer()
    scheduler = build_scheduler("plateau", opt, max_epochs=len(scores), **kwargs)
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=scores[trainer.state.epoch - 1])
    )
    LrScheduleStepper(scheduler, evaluator).attach(trainer)
    rates: list[float] = []
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: rates.append(opt.param_groups[0]["lr"]))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    trainer.run([0], max_epochs=len(scores))
    assert len(rates) == len(scores)
    return rates


def _drops(rates: list[float], start: float = 1.0) -> list[int]:
    """The 1-based validations after which the learning rate was lower than before."""
    return [i + 1 for i, (before, after) in enumerate(zip([start, *rates], rates)) if after < before]


def test_plateau_schedule_cuts_the_rate_at_the_5th_validation_without_improvement():
    # the README: "/10 after 5 validations without improvement" (the default patience)
    scores = [
        0.50, 0.60,                    # 1-2: better each time
        0.60, 0.55, 0.59, 0.60, 0.58,  # 3-7: five without a better score (equal is not better) -> cut at 7
        0.58,                          # 8: one more (the count restarted after the cut)
        0.6000001,                     # 9: better, if only just: any gain resets the count
        0.59, 0.59, 0.59, 0.59,        # 10-13: four without -> no cut yet
        0.59,                          # 14: the fifth -> cut again
        0.70,                          # 15: better
    ]
    rates = _plateau_run(scores)
    assert _drops(rates) == [7, 14]
    assert rates == pytest.approx([1.0] * 6 + [0.1] * 7 + [0.01] * 2)


def test_plateau_patience_counts_validations_without_improvement():
    # patience n: the n-th validation in a row without a better score cuts the rate
    assert _drops(_plateau_run([0.5, 0.4, 0.4, 0.6, 0.6], patience=1)) == [2, 3, 5]
    assert _drops(_plateau_run([0.5, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6], patience=3)) == [7]  # two, a gain, three
    assert _drops(_plateau_run([0.5, float("nan"), float("nan"), 0.4], patience=2)) == [3]  # NaN never improves
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BundleInputError, match="plateau schedule's patience must be a whole number >= 1"):
            build_scheduler("plateau", _optimizer(), 10, patience=bad)


def test_amp_resolution(recwarn):
    assert resolve_amp("auto", "cpu") is False
    assert resolve_amp("auto", "cuda") is True and resolve_amp(False, "cuda:0") is False
    assert resolve_amp(True, "cpu") is False
    assert "no effect on the CPU" in str(recwarn.pop(UserWarning).message)
    with pytest.raises(BundleInputError, match="amp must be auto, true or false"):
        resolve_amp("fast", "cpu")


def test_channels_last_resolution():
    assert use_channels_last("auto", "cpu") is True
    assert use_channels_last("auto", "cuda:0") is False and use_channels_last(True, "cuda") is True
    assert use_channels_last("false", "cpu") is False
    with pytest.raises(BundleInputError, match="channels_last must be auto, true or false"):
        use_channels_last("nhwc", "cpu")


def test_channels_last_network_gives_the_same_outputs_and_a_portable_state_dict():
    torch.manual_seed(0)
    plain = build_network("basic_unet", 3, 2, 4).eval()
    nhwc = place_network(build_network("basic_unet", 3, 2, 4), "cpu", "auto").eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = nhwc(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, plain(x), atol=1e-4, rtol=1e-4)
    # a state dict written from the NHWC network loads into a default-layout one with equal outputs
    back = build_network("basic_unet", 3, 2, 4).eval()
    back.load_state_dict(nhwc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(x), out, atol=1e-4, rtol=1e-4)
    kept = place_network(build_network("basic_unet", 3, 2, 4), "cpu", False)
    assert next(m for m in kept.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous()
    assert in_channels_last(nhwc) and not in_channels_last(kept)


_FAULTS = """
import ctypes, json, resource, sys
# before anything is allocated: no transparent huge pages in this process (prctl PR_SET_THP_DISABLE),
# so a fresh block takes one fault per 4 KiB page whatever /sys/kernel/mm/transparent_hugepage says
thp_off = ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) == 0
import torch
from monai_unet_bundle.runtime import tune_allocator
tuned = tune_allocator(sys.argv[1], "cpu")
page = resource.getpagesize()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def cycle():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB, every page written
    held = resident()
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, held - resident()
warm = [torch.ones(16 * 2**20) for _ in range(2)]  # the heap grows once ...
del warm
runs = [cycle() for _ in range(3)]  # ... and later blocks reuse its pages
print(json.dumps({"tuned": tuned, "thp_off": thp_off, "faults": max(f for f, _ in runs), "returned": min(r for _, r in runs)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator tuning is for glibc on Linux")
def test_tuned_allocator_reuses_freed_memory_without_new_page_faults():
    # in child processes: the tuning is process-wide and permanent.  Two measures: page faults per
    # 64 MiB block (with huge pages off in the child: with transparent huge pages on, a fresh block
    # takes one fault per 2 MiB, not per 4 KiB) and resident memory handed back on free (the same
    # with or without huge pages).  THP_MEM_ALLOC_ENABLE=1 makes PyTorch ask for huge pages
    # (madvise), as transparent_hugepage=always would for every block: the child must still count
    # 4 KiB faults.
    runs = {}
    for setting, env in (("auto", {}), ("false", {}), ("false", {"THP_MEM_ALLOC_ENABLE": "1"})):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, setting], capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}
        )
        assert out.returncode == 0 and out.stdout.strip(), f"{setting} {env}: exit status {out.returncode}\n{out.stderr[-3000:]}"
        runs[setting, bool(env)] = json.loads(out.stdout.strip().splitlines()[-1])
    tuned, untuned, untuned_thp = runs["auto", False], runs["false", False], runs["false", True]
    assert tuned["tuned"] and not untuned["tuned"] and not untuned_thp["tuned"]
    pages, mib = 64 * 2**20 // 4096, 2**20
    # the tuned heap hands back the pages already touched: no new faults, nothing returned to the system
    assert tuned["faults"] < pages // 10, runs
    assert tuned["returned"] < 4 * mib, runs
    # glibc maps a fresh 64 MiB block for every tensor and unmaps it on free
    for run in (untuned, untuned_thp):
        assert run["returned"] > 48 * mib, runs
        if run["thp_off"]:  # (where a sandbox refuses the prctl, the resident-memory check stands alone)
            assert run["faults"] > pages // 2, runs  # a fault per 4 KiB page
    assert tune_allocator("auto", "cuda:0") is False and tune_allocator(False, "cpu") is False
    with pytest.raises(BundleInputError, match="fast_allocator must be auto, true or false"):
        tune_allocator("always", "cpu")


def test_deterministic_mode_is_switchable():
    configure_determinism(3, True)
    assert torch.are_deterministic_algorithms_enabled()
    a = torch.rand(3)
    configure_determinism(3, "false")
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(a, torch.rand(3))


def test_progress_logs_plain_lines_when_not_on_a_terminal(caplog):
    trainer = Engine(lambda e, b: {"loss": 1.0})
    TrainingProgress(lines_per_epoch=2, stream=io.StringIO()).attach(trainer)
    with caplog.at_level(logging.INFO, logger="monai_unet_bundle.progress"):
        trainer.run(list(range(8)), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "monai_unet_bundle.progress"]
    assert lines.count("epoch 1/2, iteration 4/8, mean loss 1.0000") == 1
    assert sum("done in" in line for line in lines) == 2 and len(lines) == 4
