from __future__ import annotations

import io
import logging
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


def test_plateau_schedule_steps_on_the_validation_score():
    opt = _optimizer()
    scheduler = build_scheduler("plateau", opt, max_epochs=10, patience=1)
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=0.5))
    trainer = Engine(lambda e, b: None)
    LrScheduleStepper(scheduler, evaluator).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=e.state.epoch))
    trainer.run([0], max_epochs=3)  # 0.5, then two validations without improvement
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


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
import resource, sys, torch
from monai_unet_bundle.runtime import tune_allocator
tuned = tune_allocator(sys.argv[1], "cpu")
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB, every page written
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
warm = [torch.ones(16 * 2**20) for _ in range(2)]  # the heap grows once ...
del warm
print(tuned, max(faults() for _ in range(3)))  # ... and later blocks reuse its pages
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator tuning is for glibc on Linux")
def test_tuned_allocator_reuses_freed_memory_without_new_page_faults():
    # in child processes: the tuning is process-wide and permanent
    runs = {}
    for setting in ("auto", "false"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, setting], capture_output=True, text=True, check=True, cwd=REPO)
        tuned, faults = out.stdout.split()
        runs[setting] = (tuned == "True", int(faults))
    assert runs["auto"][0] and not runs["false"][0]
    pages = 64 * 2**20 // 4096
    assert runs["false"][1] > pages // 2  # glibc maps a fresh 64 MiB block: a fault per page
    assert runs["auto"][1] < pages // 10  # the tuned heap hands back the pages already touched
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
