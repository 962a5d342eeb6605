"""Early stopping on the validation score that survives a resume and stops every rank together.

MONAI's ``EarlyStopHandler`` wraps ignite's ``EarlyStopping`` but keeps no state of its own, so a
resumed run starts counting patience from zero again.  :class:`EarlyStopping` keeps its counter and
best score in ``state_dict``; under DistributedDataParallel the decision taken on rank 0 is
broadcast, so every rank stops after the same epoch and none waits forever in a collective.
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

__all__ = ["EarlyStopping"]

logger = logging.getLogger(__name__)


class EarlyStopping:
    """Stop training after ``patience`` validations without an improvement larger than ``min_delta``.

    Attach it to the evaluator and give it the trainer (in ``__init__`` or with :meth:`set_trainer`).

    Args:
        patience: validations without improvement before stopping; 0 disables early stopping.
        metric_name: the evaluator metric to maximise.
        min_delta: an increase of at most this much does not count as an improvement.
        trainer: the engine to stop.

    Raises:
        BundleInputError: for a negative ``patience`` or ``min_delta``.
    """

    def __init__(
        self, patience: int, metric_name: str = "val_mean_dice", min_delta: float = 0.0, trainer: Engine | None = None
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise BundleInputError(f"early_stop_patience must be a whole number >= 0 (0 disables it), got {patience!r}.")
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
