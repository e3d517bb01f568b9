"""Restricted unpickler: FLAME-style pickles load as plain arrays; anything else is refused."""
import importlib.util
import os
import pickle
import struct

import numpy as np
import pytest

from mvportrait.flame.unpickle import (CorruptPickleError, Unresolved, UnsafePickleError, load_npy_object,
                                       restricted_load, restricted_loads)


# ----------------------------------------------------------------------------- loading
def test_py2_chumpy_and_old_scipy_load_as_arrays(fake_modules):
    rng = np.random.default_rng(0)
    x, dense = rng.normal(size=(7, 3)), rng.random((3, 6)) * (rng.random((3, 6)) > 0.5)
    data = fake_modules.dumps({b"v": fake_modules.Ch(x), b"J": fake_modules.csc_matrix(dense), b"f": np.arange(6, dtype=np.uint32),
                      b"style": b"lbs", b"nested": [fake_modules.Ch(x[:2])]})
    assert b"cchumpy.ch\nCh\n" in data and b"cscipy.sparse.csc\ncsc_matrix\n" in data
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"c__builtin__\nset\n" in data
    out = restricted_loads(data)
    assert set(out) == {"v", "J", "f", "style", "nested"} and out["style"] == "lbs"
    assert type(out["v"]) is np.ndarray and np.array_equal(out["v"], x)
    assert type(out["J"]) is np.ndarray and np.array_equal(out["J"], dense)
    assert out["f"].dtype == np.uint32 and np.array_equal(out["f"], np.arange(6))
    assert np.array_equal(out["nested"][0], x[:2])


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocols_use_copyreg_reconstructor(fake_modules, protocol):
    x = np.arange(12.0).reshape(4, 3)
    data = pickle.dumps({"v": fake_modules.Ch(x), "J": fake_modules.csc_matrix(np.eye(3))}, protocol=protocol)
    assert b"_reconstructor" in data
    out = restricted_loads(data)
    assert np.array_equal(out["v"], x) and np.array_equal(out["J"], np.eye(3))


def test_chumpy_expression_becomes_unresolved_marker(fake_modules):
    out = restricted_loads(fake_modules.dumps({b"J": fake_modules.add(fake_modules.Ch(np.ones(3)), 1.0), b"ok": np.ones(2)}))
    assert isinstance(out["J"], Unresolved) and out["J"].qualname == "chumpy.ch_ops.add"
    assert np.array_equal(out["ok"], np.ones(2))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_numpy_and_builtins_every_protocol(protocol):
    obj = {"a": np.arange(10, dtype=np.float32).reshape(2, 5), "s": np.float64(2.5), "set": {1, 2},
           "b": b"\x00\xff", "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
           "rec": np.zeros(2, dtype=[("x", "<f4"), ("y", "<i2")]), "obj": np.array([{"k": 1}, None], dtype=object)}
    obj["alias"] = obj["a"]
    out = restricted_loads(pickle.dumps(obj, protocol=protocol))
    assert np.array_equal(out["a"], obj["a"]) and out["a"].dtype == np.float32 and out["alias"] is out["a"]
    assert out["s"] == 2.5 and out["set"] == {1, 2} and out["b"] == b"\x00\xff"
    assert np.array_equal(out["fortran"], obj["fortran"]) and out["rec"].dtype == obj["rec"].dtype
    assert out["obj"][0] == {"k": 1} and out["obj"][1] is None


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy not installed")
@pytest.mark.parametrize("protocol", [2, 4])
def test_real_scipy_sparse_formats(protocol):
    import scipy.sparse as sp

    dense = np.array([[0, 1.5, 0, 0], [2.0, 0, 0, 3.0], [0, 0, 0, 0]])
    mats = {"csc": sp.csc_matrix(dense), "csr": sp.csr_matrix(dense), "coo": sp.coo_matrix(dense)}
    if hasattr(sp, "csc_array"):
        mats["csc_array"] = sp.csc_array(dense)
    out = restricted_loads(pickle.dumps(mats, protocol=protocol))
    for key, value in out.items():
        assert type(value) is np.ndarray and np.array_equal(value, dense), key


def test_restricted_load_accepts_path_and_file(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"a": np.ones(3)}, protocol=2))
    assert np.array_equal(restricted_load(path)["a"], np.ones(3))
    assert np.array_equal(restricted_load(str(path))["a"], np.ones(3))
    with open(path, "rb") as f:
        assert np.array_equal(restricted_load(f)["a"], np.ones(3))
    with pytest.raises(TypeError, match="path or a binary file"):
        restricted_load(12)


# ----------------------------------------------------------------------------- refusal
class _SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_os_system_payload_is_refused_and_not_run(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    payload = pickle.dumps({"v": np.ones(2), "evil": _SystemCall(f"touch {marker}")}, protocol=2)
    # control: the same kind of payload really does run under plain pickle
    pickle.loads(pickle.dumps(_SystemCall(f"touch {control}"), protocol=2))
    assert control.exists()
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system.*not executed"):
        restricted_load(path)
    assert not marker.exists()


def _call_global(module: str, name: str, arg: str = "echo hi") -> bytes:
    """Protocol-2 pickle calling ``module.name(arg)``."""
    a = arg.encode()
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nX" + struct.pack("<I", len(a)) + a
            + b"\x85R.")


@pytest.mark.parametrize("module,name", [
    ("builtins", "eval"), ("__builtin__", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("builtins", "open"), ("subprocess", "Popen"), ("posix", "system"),
    ("nt", "system"), ("os", "system"), ("numpy", "load"), ("numpy.core.multiarray", "frombuffer"),
    ("numpy.testing._private.utils", "runstring"), ("scipy.sparse", "load_npz"), ("chumpy.ch", "__class__"),
    ("torch._utils", "_rebuild_tensor_v2"), ("copyreg", "__newobj__"),
])
def test_refused_globals_are_named(module, name):
    with pytest.raises(UnsafePickleError, match=rf"{module}\.{name}.*not executed"):
        restricted_loads(_call_global(module, name))


def test_dotted_name_via_stack_global_is_refused():
    def short(s):
        return b"\x8c" + bytes([len(s)]) + s.encode()

    data = b"\x80\x04" + short("builtins") + short("object.__subclasses__") + b"\x93)R."
    with pytest.raises(UnsafePickleError, match="object.__subclasses__"):
        restricted_loads(data)


def test_reconstructor_refuses_non_placeholder_classes():
    data = b"ccopy_reg\n_reconstructor\n(c__builtin__\nset\nc__builtin__\nobject\nNtR."
    with pytest.raises(UnsafePickleError, match="_reconstructor"):
        restricted_loads(data)


def test_ndarray_subclass_is_refused():
    data = pickle.dumps(np.rec.array([(1.0, 2)], dtype=[("x", "<f8"), ("y", "<i4")]), protocol=2)
    with pytest.raises(UnsafePickleError, match="recarray"):
        restricted_loads(data)


def test_persistent_ids_are_refused():
    with pytest.raises(UnsafePickleError, match="BINPERSID"):
        restricted_loads(b"\x80\x02X\x03\x00\x00\x00abcQ.")


def test_truncated_file_gives_clear_error(tmp_path):
    data = pickle.dumps({"a": np.arange(100.0), "b": np.ones((10, 3))}, protocol=2)
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptPickleError, match=r"cut\.pkl.*truncated or corrupt"):
        restricted_load(path)


def test_empty_and_random_bytes(tmp_path):
    with pytest.raises(CorruptPickleError, match="empty"):
        restricted_loads(b"")
    rng = np.random.default_rng(1234)
    for i in range(20):
        path = tmp_path / f"noise{i}.pkl"
        path.write_bytes(rng.integers(0, 256, size=512, dtype=np.uint8).tobytes())
        with pytest.raises(pickle.UnpicklingError, match=f"noise{i}"):
            restricted_load(path)


# -------------------------------------------------------------------------------- .npy
def test_npy_object_dict(tmp_path):
    d = {"full_lmk_faces_idx": np.arange(68, dtype=np.int64)[None], "static_lmk_bary_coords": np.full((51, 3), 1 / 3)}
    np.save(tmp_path / "emb.npy", d, allow_pickle=True)
    out = load_npy_object(tmp_path / "emb.npy")
    assert isinstance(out, dict) and set(out) == set(d)
    assert np.array_equal(out["full_lmk_faces_idx"], d["full_lmk_faces_idx"])


def test_npy_plain_array_and_not_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(5))
    assert np.array_equal(load_npy_object(tmp_path / "a.npy"), np.arange(5))
    (tmp_path / "b.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="not a .npy"):
        load_npy_object(tmp_path / "b.npy")


def test_npy_with_malicious_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "evil.npy", np.array([_SystemCall(f"touch {marker}")], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="system"):
        load_npy_object(tmp_path / "evil.npy")
    assert not marker.exists()


# ---------------------------------------------------------------------- opcode pre-scan
def test_global_refused_before_anything_runs(monkeypatch):
    def never(self):
        raise AssertionError("the unpickler must not run")

    monkeypatch.setattr("mvportrait.flame.unpickle.RestrictedUnpickler.load", never)
    data = pickle.dumps([np.ones(3), _SystemCall("true")], protocol=2)  # os.system comes after the array
    with pytest.raises(UnsafePickleError, match="system"):
        restricted_loads(data)


@pytest.mark.parametrize("data,error,match", [
    (b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"abc", CorruptPickleError, "truncated or corrupt"),  # BYTEARRAY8
    (b"\x80\x02K\x01r" + struct.pack("<I", 0xFFFFFFF0) + b".", CorruptPickleError, "memo index"),  # LONG_BINPUT
    (b"\x80\x05\x97.", UnsafePickleError, "NEXT_BUFFER"),
    (b"\x80\x02\x82\x01.", UnsafePickleError, "EXT1"),
])
def test_prescan_rejects_dangerous_opcodes(data, error, match):
    with pytest.raises(error, match=match):
        restricted_loads(data)


def test_numpy_state_is_validated_not_trusted():
    arr = pickle.dumps(np.arange(4, dtype=np.float64), protocol=2)
    short = arr.replace(b"K\x01K\x04\x85", b"K\x01K\x09\x85")  # shape says 9 items, data holds 4
    assert short != arr
    with pytest.raises(CorruptPickleError, match="bytes of data"):
        restricted_loads(short)
    flags = pickle.dumps(np.dtype("<i4"), protocol=2).replace(b"J\xff\xff\xff\xffK\x00t", b"J\xff\xff\xff\xffK?t")
    assert restricted_loads(flags) == np.dtype("<i4")  # object-ref flags in the state are ignored
    assert np.dtype("<i4").hasobject is False and np.dtype("f8").byteorder == "="


def test_mutated_pickles_raise_only_unpickling_errors():
    rng = np.random.default_rng(7)
    obj = {"a": np.arange(12.0).reshape(3, 4), "o": np.array([{"k": 1}], dtype=object), "s": {1}, "n": np.int16(3)}
    for protocol in (2, 4, 5):
        data = pickle.dumps(obj, protocol=protocol)
        for _ in range(150):
            b = bytearray(data)
            for _ in range(rng.integers(1, 4)):
                b[rng.integers(len(b))] = rng.integers(256)
            try:
                restricted_loads(bytes(b))
            except pickle.UnpicklingError:
                pass
