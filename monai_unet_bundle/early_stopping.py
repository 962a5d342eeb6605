"""Early stopping on the validation score that survives a resume and stops every rank together.

MONAI's ``EarlyStopHandler`` wraps ignite's ``EarlyStopping`` but keeps no state of its own, so a
resumed run starts counting patience from zero again.  :class:`EarlyStopping` keeps its counter and
best score in ``state_dict``; under DistributedDataParallel the decision taken on rank 0 is
broadcast, so every rank stops after the same epoch and none waits forever in a collective.

``patience="auto"`` is 20 validations, except under a time budget, where it is 0 (never): a budgeted
run anneals its learning rate towards the deadline, so its best epochs come last, and a plateau in
the middle of the budget is not the end of learning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.settings import is_auto

__all__ = ["EarlyStopping", "resolve_patience"]

#: the patience ``auto`` means without a time budget
DEFAULT_PATIENCE = 20

logger = logging.getLogger(__name__)


def resolve_patience(patience: int | str, time_budget_minutes: float | None = None) -> int:
    """The patience in validations: ``auto`` is :data:`DEFAULT_PATIENCE`, or 0 (never stop) under a time budget.

    Raises:
        BundleInputError: for anything but ``auto`` or a whole number >= 0.
    """
    if is_auto(patience):
        return 0 if time_budget_minutes is not None else DEFAULT_PATIENCE
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise BundleInputError(
            f"early_stop_patience must be auto or a whole number >= 0 (0 disables it), got {patience!r}."
        )
    return patience


class EarlyStopping:
    """Stop training after ``patience`` validations without an improvement larger than ``min_delta``.

    Attach it to the evaluator and give it the trainer (in ``__init__`` or with :meth:`set_trainer`).

    Args:
        patience: validations without improvement before stopping; 0 disables early stopping;
            ``auto`` is 20, or 0 when ``time_budget_minutes`` is set (see :func:`resolve_patience`).
        metric_name: the evaluator metric to maximise.
        min_delta: an increase of at most this much does not count as an improvement.
        trainer: the engine to stop.
        time_budget_minutes: the run's wall-clock budget, if any (only read by ``patience="auto"``).

    Raises:
        BundleInputError: for a negative ``patience`` or ``min_delta``.
    """

    def __init__(
        self,
        patience: int | str,
        metric_name: str = "val_mean_dice",
        min_delta: float = 0.0,
        trainer: Engine | None = None,
        time_budget_minutes: float | None = None,
    ) -> None:
        patience = resolve_patience(patience, time_budget_minutes)
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise BundleInputError(f"early_stop_min_delta must be a number >= 0, got {min_delta!r}.")
        self.patience, self.metric_name, self.min_delta = patience, metric_name, float(min_delta)
        self.trainer = trainer
        self.counter = 0
        self.best_score = -math.inf

    def set_trainer(self, trainer: Engine) -> None:
        """Set the engine that is stopped."""
        self.trainer = trainer

    def attach(self, engine: Engine) -> None:
        """Check after every evaluation."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def step(self, score: float) -> bool:
        """Record one validation score; returns whether training should stop."""
        if not math.isnan(score) and score > self.best_score + self.min_delta:
            self.best_score, self.counter = score, 0
            return False
        self.counter += 1
        return self.patience > 0 and self.counter >= self.patience

    def __call__(self, engine: Engine) -> None:
        if self.trainer is None:
            raise RuntimeError("EarlyStopping has no trainer: call set_trainer(trainer) before running")
        stop = self.step(float(engine.state.metrics[self.metric_name]))
        if idist.get_world_size() > 1:  # every rank follows rank 0's decision
            flag = torch.tensor([int(stop)], device=idist.device())
            stop = bool(idist.broadcast(flag, src=0).item())
        if stop:
            logger.info(
                "early stopping: no %s improvement above %.4f for %d validations (best %.4f)",
                self.metric_name, self.min_delta, self.counter, self.best_score,
            )
            self.trainer.terminate()

    def state_dict(self) -> dict[str, float | int]:
        """The patience counter and the best score."""
        return {"counter": self.counter, "best_score": self.best_score}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the patience counter and the best score."""
        self.counter, self.best_score = int(state["counter"]), float(state["best_score"])
        logger.info("early stopping restored: counter %d of patience %d, best %.4f", self.counter, self.patience, self.best_score)
