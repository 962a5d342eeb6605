"""Learning-rate schedules chosen by name, and the handler that steps them.

``cosine`` decays to 1% of the learning rate over ``max_epochs``; ``plateau`` divides it
by ten at the ``patience``-th validation in a row without a better score (5 by default: the 5th),
then counts again from zero; ``step`` halves it every ``max(1, max_epochs // 4)`` epochs;
``constant`` keeps it; ``poly`` follows ``(1 - epoch / max_epochs) ** 0.9`` (nnU-Net's decay);
``flat_cosine`` (default) keeps the rate for the first :data:`FLAT_SHARE` of the run and follows a cosine
to 1% over the rest (fastai's "flat cos"): a run cut short, as a CPU time budget cuts most runs, then
spends most of its time at the full rate and still ends annealed.

:func:`build_optimizer` builds the optimizer by name: ``adam`` (the default) or ``sgd`` (Nesterov
momentum 0.99, as nnU-Net trains; give it a higher ``learning_rate`` such as 0.01).
"""

from __future__ import annotations

import logging
import math

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.settings import is_auto

__all__ = ["OPTIMIZERS", "SCHEDULES", "LrScheduleStepper", "build_optimizer", "build_scheduler", "curve_factor", "poly_factor"]

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "plateau", "step", "constant", "poly", "flat_cosine")
OPTIMIZERS = ("adam", "sgd")
#: the exponent of the polynomial decay
POLY_POWER = 0.9
#: the share of a ``flat_cosine`` run spent at the full rate
FLAT_SHARE = 0.75
#: the schedules that follow a curve of the run's progress (by epoch, or by time under a budget)
CURVES = ("cosine", "poly", "flat_cosine")


def poly_factor(progress: float) -> float:
    """The polynomial decay's factor at ``progress`` (0 at the start, 1 at the end): ``(1 - progress) ** 0.9``."""
    return max(0.0, 1.0 - min(1.0, max(0.0, progress))) ** POLY_POWER


def curve_factor(shape: str, progress: float, final_fraction: float = 0.01) -> float:
    """The rate's factor at ``progress`` (0 at the start, 1 at the end) for a schedule of :data:`CURVES`:
    1 at the start, ``final_fraction`` at the end.

    Example:
        >>> [round(curve_factor("flat_cosine", p), 3) for p in (0.0, 0.75, 0.875, 1.0)]
        [1.0, 1.0, 0.505, 0.01]
    """
    progress = min(1.0, max(0.0, progress))
    if shape == "poly":
        return final_fraction + (1.0 - final_fraction) * poly_factor(progress)
    if shape == "flat_cosine":
        progress = max(0.0, progress - FLAT_SHARE) / (1.0 - FLAT_SHARE)
    elif shape != "cosine":
        raise BundleInputError(f"a learning-rate curve must be one of {', '.join(CURVES)}, got {shape!r}.")
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


#: the learning rate ``learning_rate: auto`` gives each optimizer
DEFAULT_RATES = {"adam": 1e-3, "sgd": 1e-2}


def build_optimizer(name: str, params, lr: float | str, weight_decay: float = 3e-5) -> torch.optim.Optimizer:
    """``adam`` (Adam) or ``sgd`` (SGD with Nesterov momentum 0.99 and weight decay 3e-5, nnU-Net's choice).

    ``lr="auto"`` is 0.001 for Adam and 0.01 for SGD (:data:`DEFAULT_RATES`).

    Raises:
        BundleInputError: for a name not in :data:`OPTIMIZERS`.
    """
    if is_auto(lr) and name in DEFAULT_RATES:
        lr = DEFAULT_RATES[name]
        logger.info("learning rate (auto for %s): %g", name, lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    raise BundleInputError(f"optimizer_name {name!r} is not supported: use one of {', '.join(OPTIMIZERS)}.")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, max_epochs: int, patience: int = 5):
    """Build the schedule called ``name`` for ``optimizer``.

    ``patience`` (``plateau`` only) is the number of validations in a row without a better score
    (any gain counts) after which the rate is divided by ten: with 5, the 5th such validation cuts
    it.  PyTorch's ``ReduceLROnPlateau`` cuts only when the count *exceeds* its ``patience``, so it
    is given ``patience - 1``.

    Raises:
        BundleInputError: for a name not in :data:`SCHEDULES`, or a ``patience`` below 1.
    """
    if name == "cosine":
        lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(max_epochs)), eta_min=lr * 0.01)
    if name == "plateau":
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise BundleInputError(f"the plateau schedule's patience must be a whole number >= 1, got {patience!r}.")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.1, patience=patience - 1, threshold=0.0, threshold_mode="abs"
        )
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(max_epochs) // 4), gamma=0.5)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    if name == "poly":
        total = max(1, int(max_epochs))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: max(poly_factor(epoch / total), 0.01))
    if name == "flat_cosine":
        total = max(1, int(max_epochs))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: curve_factor("flat_cosine", epoch / total))
    raise BundleInputError(f"lr_schedule {name!r} is not supported: use one of {', '.join(SCHEDULES)}.")


class LrScheduleStepper:
    """Step a schedule once per epoch; a plateau schedule steps with the validation score instead.

    Attach it to the trainer.

    Args:
        scheduler: from :func:`build_scheduler`.
        evaluator: the validation engine a plateau schedule listens to.
        metric_name: the evaluator metric a plateau schedule watches.
        budget: the run's :class:`~monai_unet_bundle.budget.TimeBudget` (``time_budget_minutes``), attached
            with the schedule: it stops training at the deadline and, when it anneals the rate by time,
            the epoch schedule is not stepped.
    """

    def __init__(self, scheduler, evaluator: Engine | None = None, metric_name: str = "val_mean_dice", budget=None) -> None:
        self.scheduler = scheduler
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.on_metric = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.budget = budget

    def attach(self, trainer: Engine) -> None:
        """Epoch schedules step on the trainer, plateau schedules after each evaluation; a time budget drives its own."""
        if self.budget is not None:
            self.budget.attach(trainer)
            if getattr(self.budget, "anneal", False):
                return
        if self.on_metric:
            if self.evaluator is None:
                raise RuntimeError("a plateau schedule needs the evaluator")
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._step_on_metric)
        else:
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._step)

    def _log(self) -> None:
        if idist.get_rank() == 0:
            logger.info("learning rate %.3g", self.scheduler.optimizer.param_groups[0]["lr"])

    def _step(self, engine: Engine) -> None:
        self.scheduler.step()
        self._log()

    def _step_on_metric(self, engine: Engine) -> None:
        self.scheduler.step(float(engine.state.metrics[self.metric_name]))
        self._log()
