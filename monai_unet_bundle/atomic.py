"""Writing files so that readers only ever see the old content or the new, never a part.

Each write goes to a uniquely named temporary file in the target's folder (so several processes,
e.g. torchrun ranks, can write the same target at once), is flushed to disk, and is renamed over
the target.  A process killed mid-write leaves its temporary file behind (never the target half
written); :func:`remove_leftovers` deletes those when the next run starts.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_text", "remove_leftovers"]

logger = logging.getLogger(__name__)


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


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporary files that killed writes of ``path`` left behind; returns them.

    Call it only where no other process can be writing ``path`` at that moment (e.g. rank 0
    before training starts).
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    removed = []
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    if removed:
        logger.info("removed %d unfinished temporary file(s) of %s left by an interrupted run", len(removed), target)
    return removed
