"""Reading and writing FLAME models, landmark embeddings and FLAME parameter sequences.

Models
------
:func:`load_flame` reads either a FLAME pickle (FLAME 2020 ``generic_model.pkl``, FLAME 2023
``flame2023*.pkl``; unpickled through :mod:`mvportrait.flame.unpickle`, never executed) or our
``.npz`` (written by :func:`save_npz`, read with ``allow_pickle=False``). The format is detected
from the file's first bytes, not from its name. :func:`convert` turns a pickle into an ``.npz``.

Pickle keys used: ``v_template`` (V,3), ``f`` (F,3), ``shapedirs`` (V,3,K) = ``n_shape`` identity
components followed by K - n_shape expression components, ``posedirs`` (V,3,9(J-1)),
``J_regressor`` (J,V) (scipy sparse or dense), ``weights`` (V,J), ``kintree_table`` (2,J) (root
parent stored as 0xFFFFFFFF or -1). Other keys (``J``, ``bs_style``, ``bs_type``...) are ignored.

Our ``.npz`` holds the :data:`~mvportrait.flame.model.ARRAY_SHAPES` arrays (``lmk_*`` optional),
``expr_names`` (str array), ``name`` (0-d str) and ``format_version`` (0-d int, currently 1).

Sequences
---------
:func:`save_sequence` / :func:`load_sequence` use ``.npz`` files with these canonical keys
(T frames; every per-frame key may also be batched as (B, T, D), and ``shape`` then as (B, S),
(B, T, S) or (S,)):

===============  ==============  ==========================================================
key              shape           meaning
===============  ==============  ==========================================================
``format``       0-d str         ``"mvportrait-flame-seq-v1"`` (optional for tracker files)
``fps``          scalar          frames per second (optional; default 25)
``shape``        (S,) or (T, S)  identity coefficients beta (optional; default none)
``expression``   (T, E)          expression coefficients psi (required)
``global_pose``  (T, 3)          root (head) rotation, axis-angle
``neck_pose``    (T, 3)          neck rotation, axis-angle
``jaw_pose``     (T, 3)          jaw rotation, axis-angle
``eye_pose``     (T, 6)          left eye then right eye, axis-angle
``translation``  (T, 3)          global translation (model units, metres for FLAME)
===============  ==============  ==========================================================

Missing pose keys are zeros. Files of outside trackers are read through these aliases:

=================  ===========================================================================
canonical          accepted aliases
=================  ===========================================================================
``shape``          ``shapecode``, ``shape_params`` (SMIRK), ``betas``
``expression``     ``exp``, ``expcode`` (DECA/EMOCA), ``expr``, ``expression_params`` (SMIRK)
``global_pose``    ``rotation``, ``global_rotation``, ``global_orient``, ``pose_params`` (SMIRK)
``jaw_pose``       ``jaw_params`` (SMIRK)
``eye_pose``       ``eyes``, ``eyes_pose``
``translation``    ``trans``, ``transl``
(T, 6) split       ``pose`` / ``posecode`` (DECA/EMOCA) = global (3) + jaw (3)
(T, 15) split      ``full_pose`` = global, neck, jaw, left eye, right eye
=================  ===========================================================================

Known keys that are read and dropped (with a log message): ``cam`` / ``camcode`` (DECA, EMOCA,
SMIRK weak-perspective image camera: scale and 2-D shift, not a 3-D head translation), ``tex`` /
``texcode``, ``light`` / ``lightcode``, ``detail`` / ``detailcode`` (appearance, not geometry) and
``eyelid_params`` (SMIRK's two eyelid blendshapes are not part of the FLAME basis; blinks they
carry are lost, a warning says so). Any other key is an error naming it. Two keys giving the same
field (e.g. ``exp`` and ``expression``) are an error. ``n_shape`` / ``n_expr`` pad with zeros or
truncate (warning if non-zero values are dropped) to the model's component counts. Values are
loaded as float32; rotation matrices are not accepted (axis-angle only).
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from mvportrait.fileio import atomic_write
from mvportrait.flame.model import ARRAY_SHAPES, FlameModel
from mvportrait.flame.params import FlameParams
from mvportrait.flame.unpickle import Unresolved, load_npy_object, restricted_load

logger = logging.getLogger(__name__)

__all__ = ["load_flame", "load_landmark_embedding", "save_npz", "convert", "save_sequence",
           "load_sequence", "NPZ_FORMAT_VERSION", "SEQUENCE_FORMAT"]

NPZ_FORMAT_VERSION = 1
SEQUENCE_FORMAT = "mvportrait-flame-seq-v1"
_PKL_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")


# ------------------------------------------------------------------------------ helpers
def _sniff(path: Path) -> str:
    """'npz', 'npy', 'pickle' or 'unknown' from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path} is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "npz"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if (head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5) or head[:1] in (b"(", b"}", b"]"):
        return "pickle"
    return "unknown"


def _atomic_savez(path, arrays: dict):
    """np.savez into a temp file beside ``path``, then rename: no half-written file on failure."""

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def _numeric(key, value, where, kinds="biuf"):
    if isinstance(value, Unresolved):
        raise ValueError(f"{where}: key {key!r} is a {value.qualname} object that cannot be read "
                         f"without running code ({value.reason})")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{where}: key {key!r} is not an array ({type(value).__name__})") from exc
    if arr.dtype.kind not in kinds:
        raise ValueError(f"{where}: key {key!r} has dtype {arr.dtype}, expected a numeric array")
    return arr


def _expect(key, arr, shape, where):
    """Check ``arr.shape`` against ``shape`` (None = any size)."""
    if arr.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, arr.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{where}: key {key!r} has shape {arr.shape}, expected {want}")


# ------------------------------------------------------------------------------- models
def load_flame(path, *, n_shape: int = 300, landmarks=None, dtype=torch.float32, device=None) -> FlameModel:
    """Load a FLAME model from a FLAME ``.pkl`` or our ``.npz`` (detected from content).

    ``n_shape``: for pickles, how many leading ``shapedirs`` components are identity (FLAME 2020
    and 2023: 300; the remaining ones are expression). It splits the basis, it does not truncate;
    use fewer shape parameters at run time instead. Ignored for ``.npz`` files (already split).
    ``landmarks``: optional path to a landmark embedding (see :func:`load_landmark_embedding`);
    it replaces any embedding stored in an ``.npz``.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "pickle":
        arrays, expr_names, name = _read_flame_pickle(path, n_shape), (), path.stem
    elif kind == "npz":
        arrays, expr_names, name = _read_flame_npz(path)
    else:
        raise ValueError(f"{path} is neither a FLAME pickle nor an mvportrait .npz model "
                         f"(it looks like {'a .npy array' if kind == 'npy' else 'something else'})")
    if landmarks is not None:
        arrays["lmk_faces_idx"], arrays["lmk_bary_coords"] = load_landmark_embedding(landmarks)
    model = FlameModel(**arrays, expr_names=expr_names, name=name, dtype=dtype, device=device)
    logger.info("loaded %r from %s", model, path)
    return model


def _read_flame_pickle(path: Path, n_shape: int) -> dict:
    where = f"FLAME pickle {path}"
    d = restricted_load(path)
    if not isinstance(d, dict):
        raise ValueError(f"{where} holds a {type(d).__name__}, expected a dict of FLAME arrays")
    missing = [k for k in _PKL_KEYS if k not in d]
    if missing:
        raise ValueError(f"{where} lacks key(s) {', '.join(map(repr, missing))}; a FLAME model has "
                         f"{', '.join(_PKL_KEYS)}")
    a = {k: _numeric(k, d[k], where) for k in _PKL_KEYS}
    _expect("v_template", a["v_template"], (None, 3), where)
    nv = a["v_template"].shape[0]
    _expect("kintree_table", a["kintree_table"], (2, None), where)
    nj = a["kintree_table"].shape[1]
    _expect("f", a["f"], (None, 3), where)
    _expect("shapedirs", a["shapedirs"], (nv, 3, None), where)
    _expect("posedirs", a["posedirs"], (nv, 3, 9 * (nj - 1)), where)
    _expect("J_regressor", a["J_regressor"], (nj, nv), where)
    _expect("weights", a["weights"], (nv, nj), where)
    if a["f"].dtype.kind not in "iu":
        raise ValueError(f"{where}: key 'f' must hold integer vertex indices, got {a['f'].dtype}")
    k = a["shapedirs"].shape[2]
    if isinstance(n_shape, bool) or not (isinstance(n_shape, int) and 0 < n_shape <= k):
        raise ValueError(f"n_shape={n_shape!r} must be an int in [1, {k}] (shapedirs has {k} components)")
    if k == 400 and n_shape != 300:
        logger.warning("%s: n_shape=%d splits a 400-component FLAME basis whose expression part starts at "
                       "300; to use fewer shape parameters, pass fewer at run time instead", path, n_shape)
    if n_shape == k:
        logger.warning("%s: n_shape=%d uses every shapedirs component; the model has no expression basis",
                       path, n_shape)
    return {"v_template": a["v_template"], "shapedirs": a["shapedirs"][..., :n_shape],
            "exprdirs": a["shapedirs"][..., n_shape:], "posedirs": a["posedirs"],
            "j_regressor": a["J_regressor"], "weights": a["weights"],
            "parents": _parents(a["kintree_table"], where), "faces": a["f"].astype(np.int64)}


def _parents(kintree: np.ndarray, where: str) -> np.ndarray:
    if kintree.dtype.kind not in "iu":
        raise ValueError(f"{where}: kintree_table must be integer, got {kintree.dtype}")
    tree = kintree.astype(np.int64)
    nj = tree.shape[1]
    if not np.array_equal(tree[1], np.arange(nj)):
        raise ValueError(f"{where}: kintree_table row 1 must list joints 0..{nj - 1}, got {tree[1].tolist()}")
    parents = tree[0].copy()
    if parents[0] not in (-1, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
        raise ValueError(f"{where}: kintree_table root parent must be 0xFFFFFFFF or -1, got {parents[0]}")
    parents[0] = -1
    return parents


def _read_flame_npz(path: Path):
    where = f"model file {path}"
    required = [k for k in ARRAY_SHAPES if not k.startswith("lmk_")] + ["expr_names", "name", "format_version"]
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{where} is not a readable .npz archive ({exc})") from exc
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where} lacks key(s) {', '.join(map(repr, missing))}; expected "
                         f"{', '.join(required)} (and optionally lmk_faces_idx, lmk_bary_coords)")
    version = d["format_version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) > NPZ_FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {version!r}; this reader knows up to {NPZ_FORMAT_VERSION}")
    extra = sorted(set(d) - set(required) - {"lmk_faces_idx", "lmk_bary_coords"})
    if extra:
        logger.warning("%s: ignoring unknown key(s) %s", where, ", ".join(extra))
    arrays = {}
    for key, spec in ARRAY_SHAPES.items():
        if key not in d:
            continue
        arr = _numeric(key, d[key], where, kinds="iuf")
        _expect(key, arr, tuple(s if isinstance(s, int) else None for s in spec), where)
        if key in ("parents", "faces", "lmk_faces_idx") and arr.dtype.kind not in "iu":
            raise ValueError(f"{where}: key {key!r} must be an integer array, got {arr.dtype}")
        arrays[key] = arr
    if d["expr_names"].ndim != 1 or d["expr_names"].dtype.kind != "U":
        raise ValueError(f"{where}: key 'expr_names' must be a 1-D string array")
    if d["name"].shape != () or d["name"].dtype.kind != "U":
        raise ValueError(f"{where}: key 'name' must be a 0-d string array")
    return arrays, tuple(str(s) for s in d["expr_names"]), str(d["name"][()])


def save_npz(model: FlameModel, path) -> None:
    """Write ``model`` to ``path`` as an mvportrait ``.npz`` (atomic; the path is used verbatim)."""
    if not isinstance(model, FlameModel):
        raise TypeError(f"save_npz expects a FlameModel, got {type(model).__name__}")
    arrays = {k: _np(v) for k, v in model.arrays().items()}
    arrays["expr_names"] = np.array(list(model.expr_names), dtype=np.str_)
    arrays["name"] = np.array(str(model.name), dtype=np.str_)
    arrays["format_version"] = np.array(NPZ_FORMAT_VERSION, dtype=np.int64)
    _atomic_savez(path, arrays)
    logger.info("saved %r to %s", model, path)


def convert(src, dst, *, n_shape: int = 300, landmarks=None, dtype=torch.float32) -> FlameModel:
    """FLAME ``.pkl`` (or ``.npz``) -> mvportrait ``.npz``; returns the loaded model.

    Arrays are stored in ``dtype`` (float32 by default: half the size, what the engine runs in).
    """
    model = load_flame(src, n_shape=n_shape, landmarks=landmarks, dtype=dtype)
    save_npz(model, dst)
    return model


# --------------------------------------------------------------------------- landmarks
def load_landmark_embedding(path) -> tuple[np.ndarray, np.ndarray]:
    """``(lmk_faces_idx (L,) int64, lmk_bary_coords (L, 3) float64)`` from a landmark file.

    Layouts (detected from content):

    - FLAME's ``flame_static_embedding.pkl``: a pickled dict with ``lmk_face_idx`` (51,) and
      ``lmk_b_coords`` (51, 3), the 51 inner iBUG landmarks (unpickled with the allow-list).
    - DECA's ``landmark_embedding.npy``: a dict saved with ``np.save(allow_pickle=True)``; the full
      68 (``full_lmk_faces_idx`` (1, 68), ``full_lmk_bary_coords`` (1, 68, 3)) are used when
      present, else ``static_lmk_faces_idx`` / ``static_lmk_bary_coords`` (51). The payload goes
      through the restricted unpickler; dynamic (contour) embeddings are ignored.
    - A plain ``.npz`` with ``lmk_faces_idx`` / ``lmk_bary_coords`` (or ``lmk_face_idx`` /
      ``lmk_b_coords``), e.g. a model ``.npz`` written by :func:`save_npz`.
    """
    path = Path(path)
    where = f"landmark embedding {path}"
    kind = _sniff(path)
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files if k.startswith("lmk_")}
        except (ValueError, zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{where} is not a readable .npz archive ({exc})") from exc
    elif kind == "npy":
        d = load_npy_object(path)
    elif kind == "pickle":
        d = restricted_load(path)
    else:
        raise ValueError(f"{where}: not a pickle, .npy or .npz file")
    if not isinstance(d, dict):
        raise ValueError(f"{where} holds a {type(d).__name__}, expected a dict of landmark arrays")
    for faces_key, bary_key in (("full_lmk_faces_idx", "full_lmk_bary_coords"),
                                ("lmk_faces_idx", "lmk_bary_coords"),
                                ("lmk_face_idx", "lmk_b_coords"),
                                ("static_lmk_faces_idx", "static_lmk_bary_coords")):
        if faces_key in d and bary_key in d:
            break
    else:
        raise ValueError(f"{where} has keys {sorted(map(str, d))}; expected lmk_face_idx + lmk_b_coords "
                         f"(FLAME), full_/static_lmk_faces_idx + ..._lmk_bary_coords (DECA) or "
                         f"lmk_faces_idx + lmk_bary_coords")
    faces = _numeric(faces_key, d[faces_key], where, kinds="iu")
    bary = _numeric(bary_key, d[bary_key], where, kinds="iuf")
    if faces.ndim == 2 and faces.shape[0] == 1:  # DECA stores a leading batch axis of 1
        faces = faces[0]
    if bary.ndim == 3 and bary.shape[0] == 1:
        bary = bary[0]
    _expect(faces_key, faces, (None,), where)
    _expect(bary_key, bary, (faces.shape[0], 3), where)
    if faces.size and faces.min() < 0:
        raise ValueError(f"{where}: {faces_key!r} has negative face indices")
    if not np.isfinite(bary).all():
        raise ValueError(f"{where}: {bary_key!r} contains NaN or Inf")
    if bary.size and np.abs(bary.sum(-1) - 1).max() > 1e-3:
        logger.warning("%s: barycentric coordinates do not sum to 1 (max error %.3g)",
                       where, np.abs(bary.sum(-1) - 1).max())
    logger.debug("%s: %d landmarks from %s/%s", where, faces.shape[0], faces_key, bary_key)
    return faces.astype(np.int64), bary.astype(np.float64)


# --------------------------------------------------------------------------- sequences
_POSE_WIDTH = {"global_pose": 3, "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6, "translation": 3}
_ALIASES = {
    "shape": ("shape", "shapecode", "shape_params", "betas"),
    "expression": ("expression", "exp", "expcode", "expr", "expression_params"),
    "global_pose": ("global_pose", "rotation", "global_rotation", "global_orient", "pose_params"),
    "neck_pose": ("neck_pose",),
    "jaw_pose": ("jaw_pose", "jaw_params"),
    "eye_pose": ("eye_pose", "eyes", "eyes_pose"),
    "translation": ("translation", "trans", "transl"),
}
_SPLIT = {  # one key holding several canonical fields side by side
    "pose": (("global_pose", 3), ("jaw_pose", 3)),
    "posecode": (("global_pose", 3), ("jaw_pose", 3)),
    "full_pose": (("global_pose", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6)),
}
_DROPPED = {
    "cam": "weak-perspective image camera, not a 3-D head translation",
    "camcode": "weak-perspective image camera, not a 3-D head translation",
    "tex": "texture (appearance) code", "texcode": "texture (appearance) code",
    "light": "lighting code", "lightcode": "lighting code",
    "detail": "detail displacement code", "detailcode": "detail displacement code",
    "eyelid_params": "SMIRK eyelid blendshapes are not part of FLAME; blinks they carry are lost",
}
_META = ("format", "fps")
_ALIAS_OF = {alias: field for field, names in _ALIASES.items() for alias in names}


def save_sequence(path, params: FlameParams) -> None:
    """Write ``params`` as a canonical sequence ``.npz`` (atomic).

    B = 1 is written unbatched ((T, D) per key), B > 1 as (B, T, D). ``shape`` is written once
    ((S,) or (B, S)) when it is constant over the frames.
    """
    if not isinstance(params, FlameParams):
        raise TypeError(f"save_sequence expects FlameParams, got {type(params).__name__}")
    squeeze = params.batch_size == 1
    out = {"format": np.array(SEQUENCE_FORMAT, dtype=np.str_), "fps": np.array(params.fps, dtype=np.float64)}
    shape = params.shape
    if shape.shape[1] > 0 and torch.equal(shape, shape[:, :1].expand_as(shape)):
        shape = shape[:, 0]
    out["shape"] = _np(shape[0] if squeeze else shape)
    for key in ("expression", *_POSE_WIDTH):
        t = getattr(params, key)
        out[key] = _np(t[0] if squeeze else t)
    _atomic_savez(path, out)


def load_sequence(path, *, n_shape: int | None = None, n_expr: int | None = None,
                  fps: float | None = None) -> FlameParams:
    """Read a FLAME parameter sequence ``.npz`` (canonical or tracker keys, see the module doc).

    ``n_shape`` / ``n_expr``: pad with zeros or truncate shape / expression to these counts.
    A file without expression is accepted only when ``n_expr`` is given and a pose key sets the
    frame count (zeros are filled in). ``fps`` overrides the file's value (no resampling); without
    either, 25 is used. Returns float32 CPU tensors, (B, T, D) with B = 1 for unbatched files.
    """
    for arg, value in (("n_shape", n_shape), ("n_expr", n_expr)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{arg} must be a non-negative int or None, got {value!r}")
    path = Path(path)
    where = f"sequence file {path}"
    if _sniff(path) != "npz":
        raise ValueError(f"{where} is not an .npz archive (pickles and other formats are not read)")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{where} is not a readable .npz archive of numeric arrays ({exc})") from exc
    fields, source, file_fps = _gather(raw, where)
    if "expression" not in fields:
        have_pose = any(k in fields for k in _POSE_WIDTH)
        if n_expr is None or not have_pose:
            raise ValueError(f"{where} has no expression (keys {', '.join(_ALIASES['expression'])}); "
                             f"a pose-only file needs n_expr= and at least one pose key")
    per_frame = {k: v for k, v in fields.items() if k != "shape"}
    ndims = {k: v.ndim for k, v in per_frame.items()}
    if set(ndims.values()) - {2, 3} or len(set(ndims.values())) > 1:
        low = min(ndims.values())
        mats = [k for k, v in per_frame.items() if v.ndim > max(low, 2) and v.shape[-2:] == (3, 3)]
        hint = "".join(f"; {source[k]!r} looks like rotation matrices, give axis-angle vectors" for k in mats)
        raise ValueError(f"{where}: per-frame keys must all be (T, D) or all (B, T, D), got "
                         + ", ".join(f"{source[k]} {per_frame[k].shape}" for k in per_frame) + hint)
    batched = next(iter(ndims.values())) == 3
    lead = {k: v.shape[:-1] if batched else (1, v.shape[0]) for k, v in per_frame.items()}
    if len(set(lead.values())) > 1:
        raise ValueError(f"{where}: keys disagree on {'(batch, frames)' if batched else 'frame count'}: "
                         + ", ".join(f"{source[k]} {v if batched else v[1]}" for k, v in lead.items()))
    b, t = next(iter(lead.values()))
    seq = {k: torch.from_numpy(np.ascontiguousarray(v).reshape(b, t, v.shape[-1])) for k, v in per_frame.items()}
    if "expression" not in seq:
        seq["expression"] = torch.zeros(b, t, n_expr)
    seq["shape"] = torch.from_numpy(_shape_field(fields.get("shape"), b, t, batched, where))
    for key, count in (("shape", n_shape), ("expression", n_expr)):
        if count is not None:
            seq[key] = _resize(seq[key], count, key, where)
    if fps is None:
        fps = 25.0 if file_fps is None else file_fps
    elif file_fps is not None and fps != file_fps:
        logger.info("%s: using fps=%g instead of the stored %g (no resampling)", where, fps, file_fps)
    return FlameParams(**seq, fps=float(fps))


def _gather(raw: dict, where: str):
    """Map file keys to canonical fields (float32 arrays); returns (fields, source key per field, fps)."""
    unknown = [k for k in raw if k not in _ALIAS_OF and k not in _SPLIT and k not in _DROPPED and k not in _META]
    if unknown:
        accepted = sorted([*_ALIAS_OF, *_SPLIT, *_DROPPED, *_META])
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; accepted keys are "
                         f"{', '.join(accepted)}")
    if "format" in raw:
        fmt = raw["format"]
        if fmt.shape != () or fmt.dtype.kind != "U" or str(fmt[()]) != SEQUENCE_FORMAT:
            raise ValueError(f"{where}: format {fmt!r} is not {SEQUENCE_FORMAT!r}")
    file_fps = None
    if "fps" in raw:
        v = raw["fps"]
        if v.size != 1 or v.dtype.kind not in "iuf" or not np.isfinite(v).all() or not 0 < float(v.ravel()[0]) < 1e4:
            raise ValueError(f"{where}: 'fps' must be one positive number, got {v!r}")
        file_fps = float(v.ravel()[0])
    fields, source = {}, {}

    def put(field, key, arr):
        if field in fields:
            raise ValueError(f"{where}: keys {source[field]!r} and {key!r} both give {field}; keep one")
        fields[field], source[field] = arr, key

    for key, value in raw.items():
        if key in _META:
            continue
        if key in _DROPPED:
            level = logging.WARNING if key == "eyelid_params" else logging.INFO
            logger.log(level, "%s: ignoring %r (%s)", where, key, _DROPPED[key])
            continue
        arr = _numeric(key, value, where, kinds="iuf").astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: key {key!r} contains NaN or Inf")
        if key in _SPLIT:
            parts = _SPLIT[key]
            width = sum(w for _, w in parts)
            if arr.ndim < 2 or arr.shape[-1] != width:
                raise ValueError(f"{where}: key {key!r} must be (T, {width}) = "
                                 f"{' + '.join(f'{f} ({w})' for f, w in parts)}, got {arr.shape}")
            start = 0
            for field, w in parts:
                put(field, key, np.ascontiguousarray(arr[..., start:start + w]))
                start += w
            continue
        field = _ALIAS_OF[key]
        if field in _POSE_WIDTH and (arr.ndim < 2 or arr.shape[-1] != _POSE_WIDTH[field]):
            raise ValueError(f"{where}: key {key!r} ({field}) must be (T, {_POSE_WIDTH[field]}), got {arr.shape}")
        if field == "expression" and arr.ndim < 2:
            raise ValueError(f"{where}: key {key!r} (expression) must be (T, E), got {arr.shape}")
        put(field, key, arr)
    return fields, source, file_fps


def _shape_field(shape, b, t, batched, where):
    """Shape coefficients as (B, S) or (B, T, S) float32."""
    if shape is None:
        return np.zeros((b, 0), dtype=np.float32)
    if shape.ndim == 1:
        return np.broadcast_to(shape, (b, shape.shape[0])).copy()
    if not batched and shape.ndim == 2 and shape.shape[0] == t:
        return shape[None]
    if batched and shape.ndim == 2 and shape.shape[0] == b:
        return shape
    if batched and shape.ndim == 3 and shape.shape[:2] == (b, t):
        return shape
    want = "(S,), (B, S) or (B, T, S)" if batched else "(S,) or (T, S)"
    raise ValueError(f"{where}: shape has shape {shape.shape}, expected {want} with B={b}, T={t}")


def _resize(x: torch.Tensor, count: int, key: str, where: str) -> torch.Tensor:
    have = x.shape[-1]
    if have > count:
        if x[..., count:].abs().max() > 0:
            logger.warning("%s: dropping %s components %d..%d (non-zero) to fit %d", where, key, count,
                           have - 1, count)
        return x[..., :count].contiguous()
    if have < count:
        return torch.cat([x, x.new_zeros(*x.shape[:-1], count - have)], -1)
    return x
