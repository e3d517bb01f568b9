"""Restricted unpickling of FLAME model pickles and landmark-embedding files.

FLAME ships as Python-2 pickles (``generic_model.pkl``, protocol 2) whose arrays are numpy
arrays, chumpy ``Ch`` objects and a scipy sparse ``J_regressor``. Loading them with plain
``pickle.load`` would run whatever callables the file names, so this module unpickles through an
allow-list and never imports chumpy or scipy.

Two guards: the opcodes are first walked without running anything (``pickletools.genops``): every
``GLOBAL``/``INST`` must be on the allow-list, lengths must fit the data, memo indices stay small,
and out-of-band buffers, persistent ids and extension codes are refused. Then the pickle runs with
``find_class`` resolving names (also the ``STACK_GLOBAL`` ones) only from the allow-list. No numpy
object is created while it runs (numpy's ``__setstate__`` trusts its input, and a crafted dtype or
array state can corrupt memory): the file only builds inert specs, which are turned into arrays
afterwards through public numpy constructors with every size checked. What a file may reference:

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` with
  ``numpy.ndarray`` (an inert marker; subclasses such as ``recarray`` are refused), ``numpy.dtype``,
  ``numpy[._]core.multiarray.scalar`` and ``numpy[._]core.numeric._frombuffer`` (protocol 5):
  specs rebuilt as plain arrays / dtypes / scalars (object arrays only with dtype ``object``).
- ``chumpy.ch.Ch`` (or ``chumpy.Ch``): a placeholder, replaced by the ``x`` array in its state.
  Other classes of ``chumpy.ch``, ``chumpy.ch_ops``, ``chumpy.reordering``, ``chumpy.linalg`` and
  ``chumpy.logic`` (computed expressions): inert placeholders, replaced by :class:`Unresolved`
  markers; they are never evaluated.
- ``scipy.sparse.{csc,csr,coo}_{matrix,array}`` under ``scipy.sparse``, ``scipy.sparse.<fmt>``
  (old path) and ``scipy.sparse._<fmt>`` (new path): placeholders, rebuilt as dense
  ``np.ndarray`` from ``data``/``indices``/``indptr``/``_shape`` (``coords`` or ``row``/``col``
  for coo), with every index checked.
- ``copy_reg._reconstructor`` / ``copyreg._reconstructor`` (protocols 0 and 1): a checked wrapper
  that only creates the placeholder classes above on the plain ``object`` base.
- ``__builtin__`` / ``builtins``: ``set`` and ``frozenset`` (chumpy state holds sets); ``bytes``
  and ``bytearray`` as wrappers accepting only bytes or latin-1 text; ``object`` as an inert
  marker for ``_reconstructor``. ``_codecs.encode``: latin-1 text -> bytes only (how Python 3
  writes bytes at protocol 2).

Everything else (``os.system``, ``posix.system``, ``builtins.eval``/``getattr``/``__import__``,
``subprocess``, any other numpy function, dotted names) raises :class:`UnsafePickleError`; the
file is not executed. Truncated or corrupt data raises :class:`CorruptPickleError`. Both
subclass ``pickle.UnpicklingError``. Text is decoded as latin-1 (Python 2 ``str``).

After loading, placeholders are replaced recursively (through dicts, lists, tuples and object
arrays) so callers only ever see numpy arrays, Python builtins and :class:`Unresolved` markers.
"""
from __future__ import annotations

import io
import logging
import math
import os
import pickle
import pickletools
import re
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["UnsafePickleError", "CorruptPickleError", "Unresolved", "RestrictedUnpickler",
           "restricted_load", "restricted_loads", "load_npy_object"]

_MAX_DENSE = 1 << 27  # largest sparse matrix (elements) densified; FLAME's J_regressor is 25k
_MAX_DEPTH = 200  # nesting depth of containers resolved after loading
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something outside the allow-list; it was refused, not executed."""


class CorruptPickleError(pickle.UnpicklingError):
    """The data is empty, truncated or otherwise not a readable pickle."""


class Unresolved:
    """Stands in for an object that cannot be turned into plain data (e.g. a chumpy expression)."""

    def __init__(self, qualname: str, reason: str):
        self.qualname, self.reason = qualname, reason

    def __repr__(self):
        return f"<unresolved {self.qualname}: {self.reason}>"


# ------------------------------------------------------------------------ placeholders
class _Placeholder:
    """Inert stand-in for a class named by the file: keeps constructor args and state, runs nothing."""

    __slots__ = ("args", "state")
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict state, slot state)
        if isinstance(state, dict):  # keys may arrive as bytes from Python-3 protocol 0/1 writers
            state = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in state.items()}
        self.state = state

    def __repr__(self):
        return f"<placeholder {self.qualname}>"


class _ChArray(_Placeholder):
    __slots__ = ()
    qualname = "chumpy.ch.Ch"


class _ChumpyNode(_Placeholder):
    __slots__ = ()


class _Sparse(_Placeholder):
    __slots__ = ()
    fmt = "?"


class _Csc(_Sparse):
    __slots__ = ()
    fmt, qualname = "csc", "scipy.sparse.csc_matrix"


class _Csr(_Sparse):
    __slots__ = ()
    fmt, qualname = "csr", "scipy.sparse.csr_matrix"


class _Coo(_Sparse):
    __slots__ = ()
    fmt, qualname = "coo", "scipy.sparse.coo_matrix"


class _Marker:
    """A non-callable token returned for ``numpy.ndarray`` and ``object``."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<marker {self.name}>"


_NDARRAY = _Marker("numpy.ndarray")
_OBJECT = _Marker("builtins.object")


# ----------------------------------------------------------------------- safe wrappers
def _refuse(what: str, why: str):
    raise UnsafePickleError(f"refused {what}: {why}; the file was not executed")


def _as_bytes(value, what):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # Python 2 str read as latin-1
        return value.encode("latin1")
    raise CorruptPickleError(f"{what}: expected bytes or text, got {type(value).__name__}")


# numpy objects are never created while the pickle runs (numpy's own __setstate__ trusts its
# input: a crafted dtype or array state can corrupt memory). The pickle only builds these inert
# specs; the resolver turns them into dtypes / arrays / scalars with validated public numpy calls.
class _DtypeSpec(_Placeholder):
    """``numpy.dtype(spec, align, copy)`` plus its pickled state."""

    __slots__ = ()
    qualname = "numpy.dtype"

    def __setstate__(self, state):
        self.state = state


class _ArraySpec(_Placeholder):
    """``numpy.ndarray`` from ``_reconstruct``; state = (version, shape, dtype, fortran, raw)."""

    __slots__ = ()
    qualname = "numpy.ndarray"

    def __setstate__(self, state):
        self.state = state


class _ScalarSpec(_Placeholder):
    """A numpy scalar: args = (dtype spec, raw bytes or the object)."""

    __slots__ = ()
    qualname = "numpy scalar"

    def __setstate__(self, state):
        raise CorruptPickleError("numpy scalars take no state")


class _BufferSpec(_Placeholder):
    """``_frombuffer(buf, dtype, shape, order)`` (protocol-5 arrays)."""

    __slots__ = ()
    qualname = "numpy._frombuffer"

    def __setstate__(self, state):
        raise CorruptPickleError("arrays from _frombuffer take no state")


def _safe_reconstruct(cls, shape=(0,), typecode=b"b"):
    if cls is not _NDARRAY:
        _refuse("numpy _reconstruct", f"only plain numpy.ndarray may be rebuilt, got {cls!r}")
    return _ArraySpec()


_TYPESTR = re.compile(r"[|<>=]?[a-zA-Z]\d{0,9}\Z")


def _check_shape(shape, what):
    if not (isinstance(shape, tuple) and len(shape) <= 32
            and all(isinstance(s, (int, np.integer)) and 0 <= s < 1 << 40 for s in shape)):
        raise CorruptPickleError(f"{what}: invalid shape {shape!r}")
    return tuple(int(s) for s in shape)


def _build_dtype(spec, depth=0) -> np.dtype:
    """A numpy dtype from a pickled ``numpy.dtype`` spec, built through the public constructor."""
    if depth > 16:
        raise CorruptPickleError("numpy dtype nested too deeply")
    if not isinstance(spec, _DtypeSpec):
        raise CorruptPickleError(f"expected a numpy dtype, got {type(spec).__name__}")
    if not spec.args:
        raise CorruptPickleError("numpy.dtype without a type string")
    typestr = spec.args[0].decode("latin1") if isinstance(spec.args[0], bytes) else spec.args[0]
    if not isinstance(typestr, str) or not _TYPESTR.match(typestr):
        raise CorruptPickleError(f"unsupported numpy type string {typestr!r}")
    state = spec.state
    if state is None:
        return np.dtype(typestr)
    if not isinstance(state, tuple) or len(state) not in (8, 9):
        raise CorruptPickleError(f"unsupported numpy dtype state {state!r:.80}")
    endian, subarray, names, fields, elsize = state[1:6]
    try:
        if subarray is not None:
            if not (isinstance(subarray, tuple) and len(subarray) == 2):
                raise CorruptPickleError("invalid numpy subarray dtype")
            base = _build_dtype(subarray[0], depth + 1)
            return np.dtype((base, _check_shape(subarray[1], "numpy subarray dtype")))
        if names is not None or fields is not None:
            if not (isinstance(names, tuple) and isinstance(fields, dict) and set(names) == set(fields)
                    and all(isinstance(n, str) for n in names) and isinstance(elsize, int) and elsize >= 0):
                raise CorruptPickleError("invalid numpy structured dtype")
            formats, offsets, titles = [], [], []
            for n in names:
                entry = fields[n]
                if not (isinstance(entry, tuple) and len(entry) in (2, 3) and isinstance(entry[1], int)):
                    raise CorruptPickleError(f"invalid field {n!r} of a numpy structured dtype")
                formats.append(_build_dtype(entry[0], depth + 1))
                offsets.append(entry[1])
                titles.append(entry[2] if len(entry) == 3 and isinstance(entry[2], str) else None)
            desc = {"names": list(names), "formats": formats, "offsets": offsets, "itemsize": elsize}
            if any(t is not None for t in titles):
                desc["titles"] = titles
            return np.dtype(desc)
        dt = np.dtype(typestr)
        if dt.kind in "Mm" and len(state) == 9:  # datetime unit sits in the metadata
            meta = state[8]
            if isinstance(meta, tuple) and len(meta) == 2 and isinstance(meta[1], tuple) and len(meta[1]) >= 2:
                unit = meta[1][0].decode("latin1") if isinstance(meta[1][0], bytes) else meta[1][0]
                if not (isinstance(unit, str) and unit.isalpha() and isinstance(meta[1][1], int)):
                    raise CorruptPickleError("invalid numpy datetime unit")
                dt = np.dtype(f"{typestr}[{meta[1][1]}{unit}]")
        if dt.kind in "US" and isinstance(elsize, int) and elsize > 0 and dt.itemsize != elsize:
            dt = np.dtype(f"{dt.kind}{elsize // (4 if dt.kind == 'U' else 1)}")
        if endian in ("<", ">") and dt.byteorder != "|":
            dt = dt.newbyteorder(endian)
        return dt
    except (TypeError, ValueError) as exc:
        raise CorruptPickleError(f"invalid numpy dtype {typestr!r}: {exc}") from exc


def _array_from_bytes(raw, dtype, shape, order, what):
    if dtype.hasobject or dtype.subdtype is not None:
        raise CorruptPickleError(f"{what}: dtype {dtype} cannot be read from raw bytes")
    raw = _as_bytes(raw, what)
    size = math.prod(shape)
    if len(raw) != size * dtype.itemsize:
        raise CorruptPickleError(f"{what}: {len(raw)} bytes of data for a {shape} {dtype} array "
                                 f"({size * dtype.itemsize} needed)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order).copy(order="K")


def _build_array(spec: _ArraySpec) -> np.ndarray:
    """ndarray from its pickled state; object arrays keep their (unresolved) elements."""
    state = spec.state
    if isinstance(state, tuple) and len(state) == 4:
        state = (0, *state)
    if not (isinstance(state, tuple) and len(state) == 5):
        raise CorruptPickleError("numpy array without a valid (version, shape, dtype, order, data) state")
    _version, shape, dtype, fortran, raw = state
    shape = _check_shape(shape, "numpy array")
    dtype = _build_dtype(dtype)
    if dtype.hasobject:
        if dtype != np.dtype(object) or not isinstance(raw, list):
            raise CorruptPickleError(f"numpy object array with dtype {dtype} is not supported")
        size = math.prod(shape)
        if len(raw) != size:
            raise CorruptPickleError(f"numpy object array {shape} holds {len(raw)} items")
        flat = np.empty(size, dtype=object)
        for i, item in enumerate(raw):
            flat[i] = item
        arr = flat.reshape(shape)  # numpy pickles object items in C order
        return np.asfortranarray(arr) if fortran else arr
    return _array_from_bytes(raw, dtype, shape, "F" if fortran else "C", "numpy array")


def _build_scalar(spec: _ScalarSpec):
    if len(spec.args) not in (1, 2):
        raise CorruptPickleError("numpy scalar needs (dtype, data)")
    dtype = _build_dtype(spec.args[0])
    obj = spec.args[1] if len(spec.args) == 2 else None
    if dtype == np.dtype(object):
        return obj
    return _array_from_bytes(obj, dtype, (), "C", "numpy scalar")[()]


def _build_buffer(spec: _BufferSpec):
    if len(spec.args) != 4 or spec.args[3] not in ("C", "F"):
        raise CorruptPickleError("numpy _frombuffer needs (buffer, dtype, shape, order)")
    buf, dtype, shape, order = spec.args
    return _array_from_bytes(buf, _build_dtype(dtype), _check_shape(shape, "numpy _frombuffer"), order,
                             "numpy _frombuffer")


def _safe_codecs_encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        _refuse("_codecs.encode", f"only latin-1 text may be encoded, got encoding {encoding!r}")
    return text.encode("latin1")


def _safe_bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) == 2:
        return _safe_codecs_encode(*args)
    _refuse("builtins.bytes", "only bytes or (text, 'latin1') arguments are accepted")


def _safe_bytearray(*args):
    return bytearray(_safe_bytes(*args))


def _safe_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, _Placeholder)):
        _refuse("copyreg._reconstructor", f"it may only rebuild allowed placeholder classes, got {cls!r}")
    if base is not _OBJECT or state is not None:
        _refuse("copyreg._reconstructor", "only the plain object base without state is accepted")
    return cls.__new__(cls)


def _build_allow_list():
    table = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[mod, "_reconstruct"] = _safe_reconstruct
        table[mod, "scalar"] = _ScalarSpec
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[mod, "_frombuffer"] = _BufferSpec
    table["numpy", "ndarray"] = _NDARRAY
    table["numpy", "dtype"] = _DtypeSpec
    for mod in ("chumpy", "chumpy.ch"):
        table[mod, "Ch"] = _ChArray
    for fmt, cls in (("csc", _Csc), ("csr", _Csr), ("coo", _Coo)):
        for mod in ("scipy.sparse", f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}"):
            for kind in ("matrix", "array"):
                table[mod, f"{fmt}_{kind}"] = cls
    for mod in ("copyreg", "copy_reg"):
        table[mod, "_reconstructor"] = _safe_reconstructor
    for mod in ("builtins", "__builtin__"):
        table[mod, "set"] = set
        table[mod, "frozenset"] = frozenset
        table[mod, "bytes"] = _safe_bytes
        table[mod, "bytearray"] = _safe_bytearray
        table[mod, "object"] = _OBJECT
    table["_codecs", "encode"] = _safe_codecs_encode
    return table


_ALLOWED = _build_allow_list()
_CHUMPY_NODE_MODULES = frozenset({"chumpy.ch", "chumpy.ch_ops", "chumpy.reordering", "chumpy.linalg",
                                  "chumpy.logic"})


# ------------------------------------------------------------------------- unpickler
class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals only from the allow-list (latin-1 text).

    Use :func:`restricted_load` / :func:`restricted_loads`, which also pre-scan the opcodes and
    turn the placeholders into plain data; this class alone returns placeholders.
    """

    def __init__(self, file, *, source: str = "<bytes>"):
        super().__init__(file, encoding="latin1")
        self.source = source
        self._nodes: dict[str, type] = {}

    def find_class(self, module, name):
        found = _lookup(module, name, self._nodes)
        if found is None:
            raise UnsafePickleError(_refusal(module, name, self.source))
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refused persistent id {pid!r} in {self.source}: persistent ids are "
                                f"not supported; the file was not executed")


def _lookup(module, name, nodes):
    """The allowed stand-in for ``module.name``, or None."""
    if not (isinstance(module, str) and isinstance(name, str)):
        return None
    if (module, name) in _ALLOWED:
        return _ALLOWED[module, name]
    if module in _CHUMPY_NODE_MODULES and _IDENT.match(name):
        qualname = f"{module}.{name}"
        if qualname not in nodes:
            nodes[qualname] = type(name, (_ChumpyNode,), {"__slots__": (), "qualname": qualname})
        return nodes[qualname]
    return None


def _refusal(module, name, source):
    return (f"refused to load global {module}.{name} from {source}: it is not on the allow-list "
            f"(numpy arrays, chumpy Ch arrays, scipy sparse matrices); the file was not executed")


# Opcodes that need machinery we do not offer (out-of-band buffers, persistent ids, the copyreg
# extension registry) and the memo writes whose index we bound.
_REFUSED_OPS = {"NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _scan(data: bytes, source: str):
    """Walk the opcodes without running them: framing and lengths must be intact, every GLOBAL
    and INST must be on the allow-list, memo indices stay small (the C unpickler would allocate
    the memo up to the index) and no opcode outside our feature set appears."""
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                if _lookup(module, name, {}) is None:
                    raise UnsafePickleError(_refusal(module, name, source))
            elif op.name in _REFUSED_OPS:
                raise UnsafePickleError(f"refused opcode {op.name} at byte {pos} of {source}: not "
                                        f"supported; the file was not executed")
            elif op.name in _PUT_OPS and not (isinstance(arg, int) and 0 <= arg < len(data)):
                raise CorruptPickleError(f"could not unpickle {source}: memo index {arg!r} at byte {pos} "
                                         f"is out of range")
    except (UnsafePickleError, CorruptPickleError):
        raise
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and friends
        raise CorruptPickleError(f"could not unpickle {source}: the data is truncated or corrupt "
                                 f"({type(exc).__name__}: {exc})") from exc


def _load(data: bytes, source: str):
    if not data:
        raise CorruptPickleError(f"could not unpickle {source}: the data is empty")
    _scan(data, source)
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except CorruptPickleError as exc:
        raise CorruptPickleError(f"could not unpickle {source}: {exc}") from exc
    except RecursionError as exc:
        raise CorruptPickleError(f"could not unpickle {source}: data nested too deeply") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the unpickler means corrupt data
        raise CorruptPickleError(f"could not unpickle {source}: the data is truncated or corrupt "
                                 f"({type(exc).__name__}: {exc})") from exc
    try:
        out = _Resolver().resolve(obj)
    except UnsafePickleError:
        raise
    except RecursionError as exc:
        raise CorruptPickleError(f"could not unpickle {source}: data nested too deeply") from exc
    except Exception as exc:  # noqa: BLE001 - invalid array/matrix/dtype states
        raise CorruptPickleError(f"could not unpickle {source}: {exc}") from exc
    logger.debug("unpickled %s through the allow-list", source)
    return out


def restricted_loads(data: bytes, *, source: str = "<bytes>"):
    """Unpickle ``data`` through the allow-list; placeholders come back as plain numpy arrays."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"restricted_loads expects bytes, got {type(data).__name__}")
    return _load(bytes(data), source)


def restricted_load(path_or_file):
    """Unpickle a file (path or binary file object, read to its end) through the allow-list."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            return _load(f.read(), os.fspath(path_or_file))
    if not hasattr(path_or_file, "read"):
        raise TypeError(f"restricted_load expects a path or a binary file object, got "
                        f"{type(path_or_file).__name__}")
    data = path_or_file.read()
    if not isinstance(data, bytes):
        raise TypeError(f"restricted_load needs a binary file, its read() returned {type(data).__name__}")
    return _load(data, str(getattr(path_or_file, "name", "<file>")))


def load_npy_object(path):
    """Load a ``.npy`` file, running a pickled payload through the restricted unpickler.

    For object arrays written by ``np.save(..., allow_pickle=True)`` (e.g. DECA's
    ``landmark_embedding.npy``, a dict) the header is parsed with ``numpy.lib.format`` and the
    payload unpickled with the allow-list; a 0-d object array is unwrapped (the dict comes back).
    Plain numeric ``.npy`` files are read with ``allow_pickle=False``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not a .npy file ({exc})") from exc
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: unsupported .npy format version {version}")
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        arr = _load(f.read(), os.fspath(path))
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
        raise CorruptPickleError(f"{path}: payload is not the {tuple(shape)} array its header announces")
    return arr[()] if arr.ndim == 0 else arr


# -------------------------------------------------------------------------- resolver
class _Resolver:
    """Replaces placeholders by plain data, keeping shared references and cycles intact."""

    def __init__(self):
        self.memo: dict[int, object] = {}

    def resolve(self, obj, depth=0):
        if depth > _MAX_DEPTH:
            raise CorruptPickleError(f"objects nested more than {_MAX_DEPTH} levels deep")
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
            return obj
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if isinstance(obj, dict):
            out = self.memo[key] = {}
            out.update((k, self.resolve(v, depth + 1)) for k, v in obj.items())
        elif isinstance(obj, list):
            out = self.memo[key] = []
            out.extend(self.resolve(v, depth + 1) for v in obj)
        elif isinstance(obj, tuple):
            out = self.memo[key] = tuple(self.resolve(v, depth + 1) for v in obj)
        elif isinstance(obj, (set, frozenset)):
            try:
                out = self.memo[key] = type(obj)(self.resolve(v, depth + 1) for v in obj)
            except TypeError as exc:
                raise CorruptPickleError(f"set holds unhashable data ({exc})") from exc
        elif isinstance(obj, _ArraySpec):
            out = self.memo[key] = _build_array(obj)
            if out.dtype.hasobject:  # items may be placeholders themselves
                for idx in np.ndindex(out.shape):
                    out[idx] = self.resolve(out[idx], depth + 1)
        elif isinstance(obj, _DtypeSpec):
            out = self.memo[key] = _build_dtype(obj)
        elif isinstance(obj, _ScalarSpec):
            out = self.memo[key] = self.resolve(_build_scalar(obj), depth + 1)
        elif isinstance(obj, _BufferSpec):
            out = self.memo[key] = _build_buffer(obj)
        elif isinstance(obj, _ChArray):
            out = self.memo[key] = self._ch(obj, depth)
        elif isinstance(obj, _Sparse):
            state = self.resolve(obj.state, depth + 1)
            out = self.memo[key] = _densify(obj.qualname, obj.fmt, state)
        elif isinstance(obj, _Placeholder):
            out = self.memo[key] = Unresolved(obj.qualname, "chumpy expression; evaluating it needs chumpy")
        elif isinstance(obj, _Marker):
            raise CorruptPickleError(f"stray reference to {obj.name}")
        else:
            out = obj  # bytearray, Unresolved: plain data already
        return out

    def _ch(self, obj, depth):
        state = obj.state
        if not isinstance(state, dict) or "x" not in state:
            raise CorruptPickleError("chumpy Ch object has no 'x' array in its state")
        x = self.resolve(state["x"], depth + 1)
        if isinstance(x, Unresolved):
            return x
        if isinstance(x, (bool, int, float)):
            x = np.asarray(x)
        if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
            raise CorruptPickleError(f"chumpy Ch 'x' is not a numeric array ({type(x).__name__})")
        return x


def _int_vector(state, key, where):
    v = state.get(key)
    if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype.kind not in "iu":
        raise CorruptPickleError(f"{where}: sparse matrix field {key!r} must be a 1-D integer array")
    return v.astype(np.int64)


def _densify(where: str, fmt: str, state) -> np.ndarray:
    """Dense numpy array from the pickled state of a scipy csc/csr/coo matrix (no scipy needed)."""
    if not isinstance(state, dict):
        raise CorruptPickleError(f"{where}: sparse matrix state is not a dict")
    shape = state.get("_shape", state.get("shape"))
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(s, (int, np.integer)) and s >= 0 for s in shape)):
        raise CorruptPickleError(f"{where}: sparse matrix needs a 2-D '_shape', got {shape!r}")
    shape = (int(shape[0]), int(shape[1]))
    if shape[0] * shape[1] > _MAX_DENSE:
        raise CorruptPickleError(f"{where}: sparse matrix {shape} is too large to densify")
    data = state.get("data")
    if not isinstance(data, np.ndarray) or data.ndim != 1 or data.dtype.kind not in "biufc":
        raise CorruptPickleError(f"{where}: sparse matrix 'data' must be a 1-D numeric array")
    if fmt == "coo":
        coords = state.get("coords")
        if coords is None:
            coords = (state.get("row"), state.get("col"))
        if not (isinstance(coords, tuple) and len(coords) == 2):
            raise CorruptPickleError(f"{where}: coo matrix needs 2 coordinate arrays")
        rows = _int_vector({"row": coords[0]}, "row", where)
        cols = _int_vector({"col": coords[1]}, "col", where)
        if not (len(rows) == len(cols) == len(data)):
            raise CorruptPickleError(f"{where}: coo row/col/data lengths differ")
    else:
        indices, indptr = _int_vector(state, "indices", where), _int_vector(state, "indptr", where)
        n_major, n_minor = (shape[1], shape[0]) if fmt == "csc" else shape
        if len(indptr) != n_major + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
            raise CorruptPickleError(f"{where}: 'indptr' must be {n_major + 1} non-decreasing offsets from 0")
        nnz = int(indptr[-1])
        if nnz > len(indices) or nnz > len(data):
            raise CorruptPickleError(f"{where}: 'indptr' points past 'indices'/'data'")
        major = np.repeat(np.arange(n_major), np.diff(indptr))
        indices, data = indices[:nnz], data[:nnz]
        rows, cols = (indices, major) if fmt == "csc" else (major, indices)
    if len(rows) and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1]):
        raise CorruptPickleError(f"{where}: sparse indices outside the matrix shape {shape}")
    dense = np.zeros(shape, dtype=data.dtype)
    np.add.at(dense, (rows, cols), data)  # duplicates sum, as in scipy
    return dense
