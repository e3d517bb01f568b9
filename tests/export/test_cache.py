"""Artifact cache: keys, manifest, reuse, corrupt / truncated / stale entries rebuilt, concurrent builders."""
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from mvportrait.export.cache import MANIFEST, ArtifactCache, CacheError, cache_key, file_sha256

FIELDS = {"stage": "onnx", "graph": "abc", "shapes": {"x": [1, 2]}, "precision": "fp32",
          "versions": {"torch": "2.13"}, "compute_capability": None}


def _builder(log: Path, payload: bytes = b"x" * 5000, delay: float = 0.0):
    def build(folder: Path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (folder / "model.bin").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "extra.txt").write_text("hello")
    return build


def _builds(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def test_key_is_canonical():
    a = cache_key(FIELDS)
    assert a == cache_key(dict(reversed(list(FIELDS.items()))))
    assert len(a) == 64
    for k, v in (("precision", "fp16"), ("compute_capability", "9.0"), ("versions", {"torch": "2.14"}),
                 ("shapes", {"x": [1, 3]})):
        assert cache_key({**FIELDS, k: v}) != a
    with pytest.raises(TypeError):
        cache_key([1, 2])


def test_build_once_then_reuse_with_manifest(tmp_path):
    cache, log = ArtifactCache(tmp_path / "c"), tmp_path / "log"
    e1 = cache.get_or_build("onnx", "unet", FIELDS, _builder(log))
    e2 = cache.get_or_build("onnx", "unet", FIELDS, _builder(log))
    assert e1 == e2 and _builds(log) == 1
    m = json.loads((e1 / MANIFEST).read_text())
    assert m["key"] == cache_key(FIELDS) and m["fields"] == json.loads(json.dumps(FIELDS))
    assert m["files"]["model.bin"] == {"size": 5000, "sha256": file_sha256(e1 / "model.bin")}
    assert "sub/extra.txt" in m["files"] and m["kind"] == "onnx" and m["name"] == "unet"
    assert cache.lookup("onnx", "unet", FIELDS) == e1
    assert cache.lookup("onnx", "unet", {**FIELDS, "precision": "fp16"}) is None
    e3 = cache.get_or_build("onnx", "unet", {**FIELDS, "precision": "fp16"}, _builder(log))
    assert e3 != e1 and _builds(log) == 2 and cache.entries("onnx") == sorted([e1, e3])
    assert not [p for p in (tmp_path / "c" / "onnx").iterdir() if p.name.startswith((".tmp", ".trash"))]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "no_manifest", "garbage_manifest",
                                    "stale_key", "empty_file_list"])
def test_damaged_entries_are_rebuilt_never_returned(tmp_path, damage):
    cache, log = ArtifactCache(tmp_path), tmp_path / "log"
    entry = cache.get_or_build("tensorrt", "unet", FIELDS, _builder(log))
    f, mpath = entry / "model.bin", entry / MANIFEST
    if damage == "flip_byte":
        data = bytearray(f.read_bytes())
        data[100] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:4096])
    elif damage == "delete_file":
        (entry / "sub" / "extra.txt").unlink()
    elif damage == "no_manifest":
        mpath.unlink()
    elif damage == "garbage_manifest":
        mpath.write_text("{not json")
    elif damage == "stale_key":
        m = json.loads(mpath.read_text())
        m["key"] = "0" * 64
        mpath.write_text(json.dumps(m))
    else:
        m = json.loads(mpath.read_text())
        m["files"] = {}
        mpath.write_text(json.dumps(m))
    ok, reason = cache.verify(entry, cache_key(FIELDS))
    assert not ok and reason
    assert cache.lookup("tensorrt", "unet", FIELDS) is None
    again = cache.get_or_build("tensorrt", "unet", FIELDS, _builder(log))
    assert again == entry and _builds(log) == 2
    assert cache.verify(again, cache_key(FIELDS)) == (True, "ok")
    assert f.read_bytes() == b"x" * 5000


def test_size_mode_skips_the_hash_but_catches_truncation(tmp_path):
    cache = ArtifactCache(tmp_path, verify="size")
    entry = cache.get_or_build("onnx", "n", FIELDS, _builder(tmp_path / "log"))
    data = bytearray((entry / "model.bin").read_bytes())
    data[0] ^= 1
    (entry / "model.bin").write_bytes(bytes(data))
    assert cache.verify(entry, cache_key(FIELDS))[0]  # same size: accepted in size mode
    (entry / "model.bin").write_bytes(bytes(data[:-1]))
    assert not cache.verify(entry, cache_key(FIELDS))[0]
    with pytest.raises(ValueError):
        ArtifactCache(tmp_path, verify="none")


def test_failed_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)

    def bad(folder):
        (folder / "half.bin").write_bytes(b"12")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cache.get_or_build("onnx", "n", FIELDS, bad)
    with pytest.raises(CacheError, match="no files"):
        cache.get_or_build("onnx", "n", FIELDS, lambda folder: None)
    with pytest.raises(CacheError, match="not written"):
        cache.get_or_build("onnx", "n", FIELDS, lambda folder: ["missing.bin"])
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [".locks"]
    with pytest.raises(ValueError):
        cache.entry_dir("onnx", "../escape", "k")
    with pytest.raises(ValueError, match="not inside"):
        cache.remove(tmp_path.parent)


def _race(root, log, barrier):
    barrier.wait()
    entry = ArtifactCache(root).get_or_build("onnx", "race", FIELDS, _builder(Path(log), delay=0.3))
    ok, _ = ArtifactCache(root).verify(entry, cache_key(FIELDS))
    return str(entry), ok


def test_concurrent_builders_build_once(tmp_path):
    ctx = mp.get_context("fork")
    n = 4
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        results = pool.starmap(_race, [(str(tmp_path), str(tmp_path / "log"), barrier)] * n)
    assert len({r[0] for r in results}) == 1 and all(r[1] for r in results)
    assert _builds(tmp_path / "log") == 1
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_lock_timeout(tmp_path):
    import fcntl

    cache = ArtifactCache(tmp_path, lock_timeout=0.2)
    entry = cache.entry_dir("onnx", "n", cache_key(FIELDS))
    lock = entry.parent / ".locks" / f"{entry.name}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:  # another process: flock is per open file description
            with pytest.raises(CacheError, match="timed out"):
                pool.apply(_build_with_timeout, (str(tmp_path),))


def _build_with_timeout(root):
    ArtifactCache(root, lock_timeout=0.2).get_or_build("onnx", "n", FIELDS, _builder(Path(root) / "log"))
