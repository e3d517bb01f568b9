"""Shared fixtures for the FLAME file tests: Python-2 style pickles with FLAME's globals."""
import importlib.util
import io
import pickle
import struct
import sys
import types

import numpy as np
import pytest


# ----------------------------------------------------------------- Python-2 style pickles
class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes bytes as Python 2 ``str`` (BINSTRING), like the FLAME files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the FLAME files were written by numpy 1.x.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.fixture
def fake_modules(monkeypatch):
    """Fake ``chumpy.ch.Ch``, ``chumpy.ch_ops.add`` and old-path ``scipy.sparse.csc.csc_matrix`` so the
    GLOBALs match FLAME's files; ``.dumps`` writes a Python-2 style protocol-2 pickle."""

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x, dtype=np.float64)
            self._dirty_vars = {b"x"}
            self._itr = None
            self._depends_on_deps = {}
            self._make_dense = False
            self._make_sparse = False

        def __getstate__(self):
            return {k.encode(): v for k, v in self.__dict__.items()}

    class add:  # noqa: N801 - chumpy's name
        def __init__(self, a, b):
            self.a, self.b = a, b

        def __getstate__(self):
            return {b"a": self.a, b"b": self.b}

    class csc_matrix:  # noqa: N801 - scipy's name
        def __init__(self, dense):
            dense = np.asarray(dense, dtype=np.float64)
            rows, cols = np.nonzero(dense.T)  # column-major order
            self.data = dense.T[rows, cols]
            self.indices = cols.astype(np.int32)
            self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=dense.shape[1]))]).astype(np.int32)
            self._shape = dense.shape
            self.maxprint = 50
            self.format = "csc"

        def __getstate__(self):
            return {k.encode(): v for k, v in self.__dict__.items()}

    mods = {}
    for name in ("chumpy", "chumpy.ch", "chumpy.ch_ops", "scipy.sparse.csc"):
        mods[name] = types.ModuleType(name)
    if importlib.util.find_spec("scipy") is None:  # parents must be importable for the pickler
        mods["scipy"], mods["scipy.sparse"] = types.ModuleType("scipy"), types.ModuleType("scipy.sparse")
    for cls, mod in ((Ch, "chumpy.ch"), (add, "chumpy.ch_ops"), (csc_matrix, "scipy.sparse.csc")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(Ch=Ch, add=add, csc_matrix=csc_matrix, dumps=py2_dumps)
