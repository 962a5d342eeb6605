"""User-facing errors and how they are shown on the command line.

Every problem caused by the user's data or settings is raised as a :class:`BundleInputError` whose
message is one sentence naming the file or setting and what to do about it (the data check, which
reports every problem it finds at once, raises one error holding one such sentence per line).
``monai.bundle`` wraps exceptions raised while a config component is built (``RuntimeError: Failed
to instantiate ...``), so :func:`install_excepthook` walks the exception chain and, when a
:class:`BundleInputError` is found anywhere in it, prints each sentence on a line of its own,
``error: <sentence>``, and exits with status 2 instead of dumping a traceback.  Every other
exception keeps Python's normal report.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["BundleInputError", "find_input_error", "install_excepthook", "message_lines", "one_line", "short_reason"]

EXIT_CODE = 2


class BundleInputError(ValueError):
    """A problem with the user's data or configuration, explained in one sentence."""


def find_input_error(exc: BaseException | None) -> BundleInputError | None:
    """Return the first :class:`BundleInputError` in ``exc``'s cause/context chain, if any.

    Args:
        exc: the exception to inspect (may be ``None``).

    Returns:
        The input error, or ``None`` when the chain holds none.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BundleInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(error: BundleInputError) -> str:
    """Return the error's sentence, also when a DataLoader worker re-raised it with a traceback inside."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Traceback" in text:  # re-raised by a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(f"{BundleInputError.__name__}: ", 1)[-1]
    return text


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """``"Type: first line of the message"`` of an exception, cut to ``limit`` characters, for one-line reports."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def message_lines(error: BundleInputError) -> list[str]:
    """The error's sentences, one per line as printed (an error listing several problems has several)."""
    return [line.strip() for line in one_line(error).splitlines() if line.strip()]


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    found = find_input_error(exc)
    if found is None:
        _previous_hook(exc_type, exc, tb)
        return
    sys.stdout.flush()
    # the process's own stderr: under torchrun, torch.distributed's hook has pointed sys.stderr at a buffer by now
    stream = sys.__stderr__ or sys.stderr
    stream.write("".join(f"error: {line}\n" for line in message_lines(found)))
    stream.flush()
    # sys.excepthook cannot change the exit status, so end the process here.
    import os

    os._exit(EXIT_CODE)


_previous_hook = sys.excepthook


def install_excepthook() -> None:
    """Show :class:`BundleInputError` as a single line and exit with status 2 (idempotent)."""
    global _previous_hook
    if sys.excepthook is not _hook:
        _previous_hook = sys.excepthook
        sys.excepthook = _hook
