"""Atomic file writes: a failed or interrupted write leaves nothing half-written."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` with a fresh hidden name beside ``path``, then rename it over ``path``.

    ``os.replace`` is atomic within one directory; on any failure the temp file is removed and the
    exception propagates. The folder must exist (FileNotFoundError otherwise).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
