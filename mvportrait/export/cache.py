"""Artifact cache for exported ONNX files and built engines, with a JSON manifest per artifact.

Layout (``root`` defaults to ``MVP_CACHE_DIR``, ``~/.cache/mvportrait``)::

    root/<kind>/<name>-<key[:24]>/          one entry: the artifact's files + manifest.json
    root/<kind>/.locks/<name>-<key[:24]>.lock
    root/<kind>/.tmp-*                      entries being built (renamed into place when complete)

Key. ``key = sha256(canonical JSON of the key fields)``. Callers put everything the artifact depends
on into the fields: graph content (a fingerprint of the weights and the code that traces them, or the
ONNX file's hash), input shapes / profiles, precision, builder options, library versions and the GPU's
compute capability (:func:`library_versions`, :func:`compute_capability`). Change any of them and the
key, hence the entry, changes: an artifact built for other conditions is never found.

Manifest (``manifest.json``, written last): format, kind, name, key, the key fields, and per file its
size and sha256, plus when / where / how long it was built. :meth:`ArtifactCache.verify` checks the
manifest parses, names this key, and every listed file exists with its size and hash (``verify="size"``
skips the hash for very large artifacts). A missing manifest, a key mismatch, a missing, truncated or
altered file makes the entry invalid: it is logged, moved aside and rebuilt, never returned.

Concurrency. Builders of one key serialise on an ``fcntl`` lock file (released by the OS if the process
dies); the winner builds into a private ``.tmp-*`` folder and renames it into place, so a reader sees
either no entry or a complete one. Waiters re-check the entry after taking the lock and reuse it.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

__all__ = ["ArtifactCache", "cache_key", "file_sha256", "library_versions", "compute_capability",
           "MANIFEST", "CacheError"]

MANIFEST = "manifest.json"
FORMAT = "mvportrait.artifact/1"
_CHUNK = 8 << 20


class CacheError(RuntimeError):
    """A cache entry could not be built or locked."""


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(fields: Mapping) -> str:
    """sha256 hex digest of the canonical JSON of ``fields`` (key order does not matter)."""
    if not isinstance(fields, Mapping):
        raise TypeError(f"key fields must be a mapping, got {type(fields).__name__}")
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def library_versions(*names: str) -> dict[str, str | None]:
    """Versions of the named packages (default torch, onnx, onnxruntime, tensorrt); None = not installed."""
    import importlib

    out = {}
    for name in names or ("torch", "onnx", "onnxruntime", "tensorrt"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            out[name] = None
    return out


def compute_capability(device=None) -> str | None:
    """``"9.0"`` for an H100 etc.; None without CUDA (CPU artifacts)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float | None):
    """Exclusive lock on ``path`` (created if needed); ``timeout`` None waits forever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # non-POSIX: no advisory locks; the atomic rename still protects readers
            fcntl = None
        if fcntl is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise CacheError(f"timed out after {timeout} s waiting for the build lock {path}") from None
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class ArtifactCache:
    """See the module docstring. ``verify``: ``"full"`` (size and sha256 of every file, default) or
    ``"size"`` (sizes only: for multi-GB artifacts where hashing each load costs seconds)."""

    def __init__(self, root=None, *, verify: str = "full", lock_timeout: float | None = None):
        if root is None:
            from mvportrait import envs

            root = envs.cache_dir()
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        self.root = Path(root).expanduser()
        self.verify_mode = verify
        self.lock_timeout = lock_timeout

    # ------------------------------------------------------------------------------ paths
    @staticmethod
    def _check_name(label: str, value: str) -> str:
        if not isinstance(value, str) or not value or any(c in value for c in "/\\") or value.startswith("."):
            raise ValueError(f"cache {label} must be a plain non-empty name, got {value!r}")
        return value

    def entry_dir(self, kind: str, name: str, key: str) -> Path:
        self._check_name("kind", kind)
        self._check_name("name", name)
        return self.root / kind / f"{name}-{key[:24]}"

    # ------------------------------------------------------------------------------ verify
    def verify(self, entry: Path, key: str) -> tuple[bool, str]:
        """(valid, reason) of an entry folder for ``key``; see the module docstring."""
        entry = Path(entry)
        mpath = entry / MANIFEST
        if not entry.is_dir():
            return False, "no entry"
        if not mpath.is_file():
            return False, "manifest missing (interrupted build?)"
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            return False, f"manifest unreadable: {e}"
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return False, "manifest has an unknown format"
        if manifest.get("key") != key:
            return False, f"manifest key {str(manifest.get('key'))[:16]}... is not {key[:16]}... (stale entry)"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return False, "manifest lists no files"
        for rel, meta in files.items():
            p = entry / rel
            if not p.is_file():
                return False, f"{rel} is missing"
            size = p.stat().st_size
            if size != meta.get("size"):
                return False, f"{rel} has {size} bytes, the manifest says {meta.get('size')} (truncated?)"
            if self.verify_mode == "full" and file_sha256(p) != meta.get("sha256"):
                return False, f"{rel} does not match its sha256 (corrupt)"
        return True, "ok"

    def manifest(self, entry: Path) -> dict:
        return json.loads((Path(entry) / MANIFEST).read_text())

    def lookup(self, kind: str, name: str, fields: Mapping) -> Path | None:
        """The valid entry for these key fields, or None (absent, stale or corrupt)."""
        key = cache_key(fields)
        entry = self.entry_dir(kind, name, key)
        ok, _ = self.verify(entry, key)
        return entry if ok else None

    # ------------------------------------------------------------------------------ build
    def get_or_build(self, kind: str, name: str, fields: Mapping,
                     build: Callable[[Path], Iterable[str] | None]) -> Path:
        """Folder of the valid entry for ``fields``; built with ``build(tmp_folder)`` when absent or
        invalid. ``build`` writes its files into the folder (and may return the relative paths to
        record; default: every file it wrote)."""
        key = cache_key(fields)
        entry = self.entry_dir(kind, name, key)
        ok, reason = self.verify(entry, key)
        if ok:
            log.debug("cache hit %s/%s", kind, entry.name)
            return entry
        lock = entry.parent / ".locks" / f"{entry.name}.lock"
        with _file_lock(lock, self.lock_timeout):
            ok, reason = self.verify(entry, key)  # another builder may have finished meanwhile
            if ok:
                log.debug("cache hit after waiting for the build lock: %s/%s", kind, entry.name)
                return entry
            if entry.exists():
                log.warning("cache entry %s is invalid (%s): rebuilding it", entry, reason)
                self._discard(entry)
            tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:12]}"
            tmp.mkdir(parents=True)
            try:
                t0 = time.perf_counter()
                listed = build(tmp)
                rels = sorted(listed) if listed else sorted(
                    str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
                if not rels:
                    raise CacheError(f"building {kind}/{name} wrote no files")
                files = {}
                for rel in rels:
                    p = tmp / rel
                    if not p.is_file():
                        raise CacheError(f"building {kind}/{name}: listed file {rel} was not written")
                    files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
                manifest = {"format": FORMAT, "kind": kind, "name": name, "key": key, "fields": fields,
                            "files": files, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                            "host": socket.gethostname(), "platform": platform.platform(),
                            "build_s": round(time.perf_counter() - t0, 3)}
                mtmp = tmp / f".{MANIFEST}.tmp"
                mtmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
                os.replace(mtmp, tmp / MANIFEST)
                os.rename(tmp, entry)  # atomic: readers see no entry or a complete one
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("cached %s/%s (%d files)", kind, entry.name, len(files))
        return entry

    def _discard(self, entry: Path) -> None:
        trash = entry.parent / f".trash-{entry.name}-{uuid.uuid4().hex[:12]}"
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------------------ housekeeping
    def entries(self, kind: str | None = None) -> list[Path]:
        if kind:
            kinds = [self.root / kind]
        else:
            kinds = [p for p in self.root.iterdir() if p.is_dir()] if self.root.is_dir() else []
        return sorted(e for k in kinds if k.is_dir() for e in k.iterdir() if e.is_dir() and not e.name.startswith("."))

    def remove(self, entry: Path) -> None:
        entry = Path(entry)
        if self.root.resolve() not in entry.resolve().parents:
            raise ValueError(f"{entry} is not inside the cache {self.root}")
        self._discard(entry)
