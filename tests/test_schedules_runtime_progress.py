from __future__ import annotations

import io
import logging

import pytest
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.progress import TrainingProgress
from monai_unet_bundle.runtime import configure_determinism, resolve_amp
from monai_unet_bundle.schedules import LrScheduleStepper, build_scheduler


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
