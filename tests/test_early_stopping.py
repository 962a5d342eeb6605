from __future__ import annotations

import pytest
from ignite.engine import Engine, Events

from monai_unet_bundle.early_stopping import DEFAULT_PATIENCE, EarlyStopping, resolve_patience
from monai_unet_bundle.errors import BundleInputError


def test_counts_validations_without_improvement():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert [stop.step(s) for s in (0.5, 0.505, 0.52, 0.52, 0.53)] == [False, False, False, False, True]
    assert stop.state_dict() == {"counter": 2, "best_score": 0.52}


def test_state_survives_a_resume():
    first = EarlyStopping(patience=3)
    for s in (0.6, 0.5, 0.5):
        first.step(s)
    second = EarlyStopping(patience=3)
    second.load_state_dict(first.state_dict())
    assert second.step(0.55) is True  # the third validation without improvement, counted across the resume


def test_patience_zero_never_stops_and_bad_settings_are_named():
    stop = EarlyStopping(patience=0)
    assert not any(stop.step(0.1) for _ in range(50))
    with pytest.raises(BundleInputError, match="early_stop_patience must be auto or a whole number >= 0"):
        EarlyStopping(patience=-1)
    with pytest.raises(BundleInputError, match="early_stop_min_delta must be a number >= 0"):
        EarlyStopping(patience=1, min_delta=-0.1)


def test_terminates_the_trainer_from_the_evaluator():
    scores = iter([0.5, 0.4, 0.4, 0.9, 0.9])
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=next(scores)))
    trainer = Engine(lambda e, b: None)
    stop = EarlyStopping(patience=2)
    stop.set_trainer(trainer)
    stop.attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=1))
    trainer.run([0], max_epochs=5)
    assert trainer.state.epoch == 3
    with pytest.raises(RuntimeError, match="EarlyStopping has no trainer"):
        EarlyStopping(patience=1)(evaluator)


def test_auto_patience_never_stops_a_time_budgeted_run():
    assert resolve_patience("auto") == DEFAULT_PATIENCE == 20
    assert resolve_patience("AUTO", time_budget_minutes=5) == 0
    assert resolve_patience(3, time_budget_minutes=5) == 3  # an explicit patience still applies under a budget
    budgeted = EarlyStopping(patience="auto", time_budget_minutes=0.5)
    assert not any(budgeted.step(0.1) for _ in range(100))
    unbudgeted = EarlyStopping(patience="auto")
    assert [unbudgeted.step(0.1) for _ in range(21)].index(True) == 20  # the 20th validation without a gain
    with pytest.raises(BundleInputError, match="early_stop_patience must be auto or a whole number >= 0"):
        resolve_patience("often")
