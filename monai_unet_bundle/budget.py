"""Training for a wall-clock budget: ``time_budget_minutes``.

:class:`TimeBudget` is a trainer handler (attached by the schedule stepper,
:class:`~monai_unet_bundle.schedules.LrScheduleStepper`, whose rate it takes over).  It stops training once the budget is spent (checked after
every iteration, so a long epoch does not overrun it), validates the weights it stopped at (so the
best model saved is the best the budget allowed), and with the ``cosine``, ``poly`` and ``flat_cosine``
schedules anneals the learning rate by *time* instead of by epoch: the rate follows the same curve from
the configured value down to 1% of it, reaching the bottom exactly when the budget runs out, however many epochs
that turns out to be.  ``max_epochs`` and early stopping still end a run earlier when they come first.

The time spent is part of the resume checkpoint, so a resumed run spends only what is left.  Under
torchrun every rank takes rank 0's clock (one tiny all-reduce per iteration), so all ranks use the
same learning rate and stop at the same iteration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.schedules import CURVES, curve_factor

__all__ = ["TimeBudget"]

logger = logging.getLogger(__name__)


class TimeBudget:
    """Stop training when ``minutes`` of wall-clock time are spent; anneal the learning rate by time.

    Args:
        minutes: the budget, or ``None`` for none (the handler then does nothing).
        optimizer: the optimizer whose learning rate is annealed (with ``anneal``).
        anneal: follow the schedule's curve (``shape``) from each group's initial rate to ``final_fraction``
            of it over the budget, when ``shape`` is one of the curves
            (:data:`~monai_unet_bundle.schedules.CURVES`); otherwise the schedule is left alone.
        validator: the validation engine, run once on the weights the budget stopped at.
        final_fraction: the rate at the end of the budget, as a fraction of the initial one.
        shape: ``cosine`` (half a cosine), ``poly`` (``(1 - t) ** 0.9``, nnU-Net's decay) or ``flat_cosine`` (the
            full rate for 75% of the budget, then half a cosine), over elapsed time (see
            :func:`~monai_unet_bundle.schedules.curve_factor`).
        clock: seconds from some fixed point (``time.monotonic``; tests pass their own).

    Raises:
        BundleInputError: for a budget that is not a positive number.
    """

    def __init__(
        self,
        minutes: float | None,
        optimizer: torch.optim.Optimizer | None = None,
        anneal: bool = True,
        validator: Engine | None = None,
        final_fraction: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        shape: str = "cosine",
    ) -> None:
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0):
            raise BundleInputError(f"time_budget_minutes must be a number above 0 (or null for none), got {minutes!r}.")
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.optimizer = optimizer
        self.anneal = bool(anneal) and optimizer is not None and shape in CURVES
        self.validator = validator
        self.final_fraction = float(final_fraction)
        self.clock = clock
        self.shape = shape
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups] if optimizer is not None else []
        self.spent_before = 0.0  # seconds spent by earlier runs of this training (from the resume checkpoint)
        self._start: float | None = None
        self.stopped = False

    # ---------------------------------------------------------------------------------------------- state

    def spent(self) -> float:
        """Seconds of the budget this process has seen spent, earlier runs included."""
        return self.spent_before + (self.clock() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        """What the resume checkpoint keeps: the seconds spent."""
        return {"spent_seconds": float(self.spent())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a resumed run's budget: what it spent counts."""
        self.spent_before = float(state.get("spent_seconds", 0.0))
        if self._start is not None:  # loaded at STARTED, after our own start: count from now
            self._start = self.clock()
            if idist.get_rank() == 0:
                self._log_left()

    # ---------------------------------------------------------------------------------------------- events

    def attach(self, trainer: Engine) -> None:
        """Start the clock, set the rate before and check the budget after every iteration."""
        if self.seconds is None:
            return
        trainer.add_event_handler(Events.STARTED, self._started)
        if self.anneal:
            trainer.add_event_handler(Events.ITERATION_STARTED, self._set_lr)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._check)
        trainer.add_event_handler(Events.TERMINATE, self._validate_last)

    def _started(self, engine: Engine) -> None:
        self._start = self.clock()
        if idist.get_rank() == 0:
            self._log_left()

    def _log_left(self) -> None:
        left = max(0.0, self.seconds - self.spent_before)
        if left > 0:
            logger.info("time budget: %.3g of %.3g minutes left", left / 60, self.seconds / 60)
        else:
            logger.warning("time budget: all %.3g minutes were spent by the run being resumed; pass a larger "
                           "--time_budget_minutes to train on", self.seconds / 60)

    def _shared_spent(self) -> float:
        """Rank 0's view of the time spent, on every rank (so all ranks anneal and stop alike)."""
        spent = self.spent()
        if idist.get_world_size() > 1:
            spent = float(idist.broadcast(torch.tensor([spent], dtype=torch.float64), src=0)[0])
        return spent

    def learning_rate_factor(self, spent: float) -> float:
        """The curve's factor after ``spent`` seconds: 1 at the start, ``final_fraction`` at the end of the budget."""
        return curve_factor(self.shape, spent / self.seconds, self.final_fraction)

    def _set_lr(self, engine: Engine) -> None:
        factor = self.learning_rate_factor(self._shared_spent())
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def _check(self, engine: Engine) -> None:
        if self._shared_spent() < self.seconds:
            return
        self.stopped = True
        if idist.get_rank() == 0:
            logger.info(
                "time budget of %.3g minutes spent at epoch %d, iteration %d: stopping", self.seconds / 60,
                engine.state.epoch, engine.state.iteration,
            )
        engine.terminate()

    def _validate_last(self, engine: Engine) -> None:
        """Validate the weights the budget stopped at, so the best model saved counts them too."""
        if self.stopped and self.validator is not None:
            self.validator.run(engine.state.epoch)
