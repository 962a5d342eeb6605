"""``time_budget_minutes``: stop when spent, anneal the rate by time, validate the last weights, resume what is left."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from monai_unet_bundle.budget import TimeBudget
from monai_unet_bundle.errors import BundleInputError
from tests.conftest import TINY, config, run_bundle, write_pairs


class Clock:
    """A clock the test moves: one second per training iteration."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _train(budget: TimeBudget, clock: Clock, max_epochs: int = 100, per_epoch: int = 10) -> tuple[Engine, list[float]]:
    rates: list[float] = []

    def step(engine, batch):
        rates.append(budget.optimizer.param_groups[0]["lr"])
        clock.now += 1.0

    trainer = Engine(step)
    budget.attach(trainer)
    trainer.run(range(per_epoch), max_epochs=max_epochs)
    return trainer, rates


def _budget(minutes: float, clock: Clock, anneal: bool = True, validator: Engine | None = None) -> TimeBudget:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return TimeBudget(minutes, optimizer, anneal=anneal, validator=validator, clock=clock)


def test_training_stops_when_the_budget_is_spent_and_the_rate_anneals_by_time():
    clock = Clock()
    validations = []
    validator = Engine(lambda engine, batch: None)
    validator.run = lambda epoch: validations.append(epoch)
    budget = _budget(0.5, clock, validator=validator)  # 30 s: 30 iterations of 1 s
    trainer, rates = _train(budget, clock)
    assert trainer.state.iteration == 30 and trainer.state.epoch == 3 and budget.stopped
    assert validations == [3], "the weights the budget stopped at are validated once"
    # the rate before iteration k (k-1 seconds spent) is the cosine of the time spent
    expected = [0.1 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * k / 30))) for k in range(30)]
    assert rates == pytest.approx(expected)
    assert rates[0] == pytest.approx(0.1) and rates[15] == pytest.approx(0.1 * 0.505)


def test_a_resumed_run_spends_only_what_is_left():
    clock = Clock()
    first = _budget(0.5, clock)
    first._start = clock()  # as if started; 20 s spent, then the process was killed
    clock.now += 20
    state = first.state_dict()
    assert state == {"spent_seconds": pytest.approx(20.0)}
    second = _budget(0.5, clock)
    second.load_state_dict(state)
    trainer, rates = _train(second, clock)
    assert trainer.state.iteration == 10, "30 s budget, 20 s spent before: 10 more iterations"
    assert rates[0] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 20 / 30))))


def test_without_a_budget_or_annealing_nothing_changes():
    clock = Clock()
    trainer, rates = _train(_budget(0.5, clock, anneal=False), clock)
    assert trainer.state.iteration == 30 and set(rates) == {0.1}, "no annealing: the schedule is left alone"
    none = TimeBudget(None, clock=clock)
    trainer = Engine(lambda engine, batch: None)
    none.attach(trainer)
    trainer.run(range(3), max_epochs=4)
    assert trainer.state.epoch == 4 and not none.stopped
    for bad in (0, -1, "20", True):
        with pytest.raises(BundleInputError, match="time_budget_minutes must be a number above 0"):
            TimeBudget(bad)


@pytest.mark.slow
def test_a_time_budget_ends_training_with_the_rate_annealed_and_resume_spends_only_what_is_left(tmp_path: Path):
    data = write_pairs(tmp_path / "data", n=8)
    common = ["--config_file", config("train.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(data), *TINY]
    proc = run_bundle(*common, "--max_epochs", "10000", "--time_budget_minutes", "0.1")
    assert "time budget of 0.1 minutes spent at epoch" in proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "logs" / "curves.csv")))
    rates = [float(r["learning_rate"]) for r in rows]
    assert 2 <= len(rows) < 10000 and (tmp_path / "models" / "model.pt").is_file()
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.2 * 0.001, "the cosine reaches its bottom with the budget"
    # the run finished with its budget spent: continuing it with the same budget trains one more iteration at most
    proc = run_bundle(*common, "--max_epochs", "10000", "--time_budget_minutes", "0.1", "--resume", "true")
    assert "all 0.1 minutes were spent by the run being resumed" in proc.stdout + proc.stderr
    assert len(list(csv.DictReader(open(tmp_path / "logs" / "curves.csv")))) <= len(rows) + 1
