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


def write_checkpoint(directory, state: dict, meta: dict, config_file: str, weights_file: str) -> Path:
    """Write a checkpoint folder: ``weights_file`` (safetensors of ``state``, tagged with ``meta["format"]``),
    then ``config_file`` (``meta`` as JSON), each atomically; the folder is created. Returns the folder.
    :func:`read_checkpoint_meta` reads it back."""
    import json

    from safetensors.torch import save_file

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / weights_file, lambda tmp: save_file(state, tmp, metadata={"format": str(meta["format"])}))
    atomic_write(folder / config_file, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    return folder


def read_checkpoint_meta(directory, config_file: str, weights_file: str, fmt: str, what: str):
    """The checked JSON metadata of a checkpoint folder: ``(meta, config path, weights path)``.

    Raises FileNotFoundError for a missing folder or file and ValueError for JSON that does not parse
    or names another ``format`` than ``fmt``; ``what`` names the checkpoint kind in the messages.
    """
    import json

    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"no {what} folder at {folder}")
    cfg_path, w_path = folder / config_file, folder / weights_file
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{what} file {p} is missing")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON (corrupt checkpoint?): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"{cfg_path} has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {fmt!r}")
    return meta, cfg_path, w_path
