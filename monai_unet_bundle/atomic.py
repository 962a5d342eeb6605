"""Writing files so that readers only ever see the old content or the new, never a part.

Each write goes to a uniquely named temporary file in the target's folder (so several processes,
e.g. torchrun ranks, can write the same target at once), is flushed to disk, and is renamed over
the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_text"]


def _atomic(target: Path, write, mode: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` through a temporary file and an atomic rename."""
    _atomic(Path(path), lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    _atomic(Path(path), lambda f: f.write(text), "w")
