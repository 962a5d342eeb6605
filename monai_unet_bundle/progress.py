"""Training progress: a progress bar on a terminal, a few plain log lines per epoch elsewhere."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ignite.engine import Engine, Events

from monai_unet_bundle import optional

__all__ = ["TrainingProgress", "loss_value"]

logger = logging.getLogger(__name__)


def loss_value(output: Any) -> float:
    """The loss in an engine output: a dict, a decollated list of dicts, or the loss itself."""
    if isinstance(output, list):
        output = output[0]
    loss = output["loss"] if isinstance(output, Mapping) else output
    return float(loss.detach()) if hasattr(loss, "detach") else float(loss)


class TrainingProgress:
    """Show training progress in the form that suits where the output goes.

    On a terminal, a tqdm progress bar per epoch with the running loss; otherwise (CI logs,
    files), or when tqdm is not installed (one warning, see :mod:`monai_unet_bundle.optional`),
    one log line every ``lines_per_epoch``-th part of an epoch and one at its end, so logs stay
    short and readable.

    Args:
        lines_per_epoch: log lines per epoch when not on a terminal.
        stream: where to check for a terminal (default ``sys.stdout``).
    """

    def __init__(self, lines_per_epoch: int = 4, stream: TextIO | None = None) -> None:
        self.lines_per_epoch = max(1, int(lines_per_epoch))
        self.stream = stream if stream is not None else sys.stdout
        self._loss_sum, self._count = 0.0, 0

    def attach(self, engine: Engine) -> None:
        """Attach a progress bar (terminal, tqdm installed) or periodic log lines (otherwise)."""
        # checked on every stream: without tqdm MONAI's caching bar is gone too, which the warning says
        has_tqdm = optional.available("tqdm")
        if has_tqdm and self.stream.isatty():
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": loss_value(out)})
        else:
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._log_iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)

    def _reset(self, engine: Engine) -> None:
        self._loss_sum, self._count = 0.0, 0

    def _log_iteration(self, engine: Engine) -> None:
        self._loss_sum += loss_value(engine.state.output)
        self._count += 1
        length = engine.state.epoch_length or 1
        step = max(1, length // self.lines_per_epoch)
        if self._count % step == 0 and self._count < length:
            logger.info(
                "epoch %d/%d, iteration %d/%d, mean loss %.4f",
                engine.state.epoch, engine.state.max_epochs, self._count, length, self._loss_sum / self._count,
            )

    def _log_epoch(self, engine: Engine) -> None:
        mean = f", mean loss {self._loss_sum / self._count:.4f}" if self._count else f", last loss {loss_value(engine.state.output):.4f}"
        seconds = engine.state.times.get("EPOCH_COMPLETED") or 0.0
        logger.info("epoch %d/%d done in %.1f s%s", engine.state.epoch, engine.state.max_epochs, seconds, mean)
