"""C++ CPU kernels (pybind11 extension ``_rasterize_cpp``, built by ``pip install -e .``).

``rasterize`` / ``interpolate`` here are thin wrappers: they allocate the outputs with torch and
hand the extension zero-copy ``.numpy()`` views of the contiguous inputs and outputs. The
extension releases the GIL and runs on ``num_threads`` std::threads (default: the hardware
concurrency). Input validation belongs to the public entry points in
:mod:`mvportrait.kernels.rasterize`; the extension only re-checks shapes, dtypes, contiguity and
face indices (so a bad call raises instead of touching the wrong memory).

If the extension was not built (no pybind11 or no C++17 compiler at install time),
:func:`available` is False and a warning is logged once, when this module is imported.
"""
from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger(__name__)

try:
    _ext = importlib.import_module(f"{__name__}._rasterize_cpp")
except ImportError as exc:  # not built: the dispatcher falls back to the PyTorch reference
    _ext = None
    _IMPORT_ERROR = str(exc)
    logger.warning("C++ rasterizer not built; using the PyTorch reference (%s). %s", exc, "Build it with "
                   "`pip install -e .` (needs a C++17 compiler) or `python setup.py build_ext --inplace`.")
else:
    _IMPORT_ERROR = ""

__all__ = ["available", "build_hint", "rasterize", "interpolate", "normal_map", "hardware_threads"]

FLOAT_DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    """True when the compiled extension could be imported."""
    return _ext is not None


def build_hint() -> str:
    """Why the extension is missing and how to build it (for error messages)."""
    return (f"the C++ rasterizer extension mvportrait.kernels.cpu._rasterize_cpp is not built "
            f"({_IMPORT_ERROR or 'import failed'}); build it with `pip install -e .` from the repository root "
            f"(needs pybind11 and a C++17 compiler) or `python setup.py build_ext --inplace`")


def _require():
    if _ext is None:
        raise RuntimeError(build_hint())
    return _ext


def hardware_threads() -> int:
    """Threads used when ``num_threads`` is None: std::thread::hardware_concurrency()."""
    return _require().hardware_threads()


def rasterize(verts_pix: torch.Tensor, faces: torch.Tensor, height: int, width: int, *, cull_backfaces: bool = True,
              near: float = 1e-4, num_threads: int | None = None, block_rows: int | None = None, simd: bool = True,
              avx: bool = True):
    """C++ rasterizer: same arguments and :class:`~mvportrait.kernels.rasterize.Fragments` as
    ``rasterize_ref``. ``verts_pix`` CPU float32/float64 (other float dtypes run in float32 and
    are cast back), ``faces`` int64 in range. ``num_threads``: std::threads (default: hardware
    concurrency); ``block_rows``: image rows per task (default 32); ``simd=False``: the scalar row
    loop instead of the SSE2 one; ``avx=False``: no AVX / AVX2 paths even where the CPU has them
    (they are picked at run time; see ``has_avx`` / ``has_avx2`` of the extension). Every
    combination gives the same results; the switches are for tests."""
    from mvportrait.kernels.rasterize import Fragments  # noqa: PLC0415 -- avoid an import cycle

    ext = _require()
    dtype = verts_pix.dtype
    work = verts_pix if dtype in FLOAT_DTYPES else verts_pix.float()
    work = work.contiguous()
    faces = faces.to(torch.int64).contiguous()
    n = work.shape[0]
    tri_id = torch.empty((n, height, width), dtype=torch.int64)
    bary = torch.empty((n, height, width, 3), dtype=work.dtype)
    depth = torch.empty((n, height, width), dtype=work.dtype)
    mask = torch.empty((n, height, width), dtype=torch.bool)
    ext.rasterize(work.numpy(), faces.numpy(), height, width, bool(cull_backfaces), float(near), tri_id.numpy(),
                  bary.numpy(), depth.numpy(), mask.numpy(), int(num_threads or 0), int(block_rows or 0), bool(simd),
                  bool(avx))
    if dtype != work.dtype:
        bary, depth = bary.to(dtype), depth.to(dtype)
    return Fragments(tri_id=tri_id, bary=bary, depth=depth, mask=mask)


def interpolate(attrs: torch.Tensor, faces: torch.Tensor, frags, *, num_threads: int | None = None) -> torch.Tensor:
    """C++ attribute interpolation, same result as ``interpolate_ref``: (N, H, W, C), 0 where empty."""
    ext = _require()
    dtype = attrs.dtype
    work = (attrs if dtype in FLOAT_DTYPES else attrs.float()).contiguous()
    bary = frags.bary if frags.bary.dtype in FLOAT_DTYPES else frags.bary.float()
    n, h, w = frags.tri_id.shape
    out = torch.empty((n, h, w, work.shape[-1]), dtype=work.dtype)
    ext.interpolate(work.numpy(), faces.to(torch.int64).contiguous().numpy(), frags.tri_id.contiguous().numpy(),
                    bary.contiguous().numpy(), frags.mask.contiguous().numpy(), out.numpy(), int(num_threads or 0))
    return out if dtype == work.dtype else out.to(dtype)


def normal_map(normals: torch.Tensor, faces: torch.Tensor, frags, *, num_threads: int | None = None):
    """C++ fused normal map, same result as ``normal_map_ref``: (unit, rgb), each (N, H, W, 3)."""
    ext = _require()
    dtype = normals.dtype
    work = (normals if dtype in FLOAT_DTYPES else normals.float()).contiguous()
    bary = frags.bary if frags.bary.dtype in FLOAT_DTYPES else frags.bary.float()
    n, h, w = frags.tri_id.shape
    unit = torch.empty((n, h, w, 3), dtype=work.dtype)
    rgb = torch.empty((n, h, w, 3), dtype=work.dtype)
    ext.normal_map(work.numpy(), faces.to(torch.int64).contiguous().numpy(), frags.tri_id.contiguous().numpy(),
                   bary.contiguous().numpy(), frags.mask.contiguous().numpy(), unit.numpy(), rgb.numpy(),
                   int(num_threads or 0))
    return (unit, rgb) if dtype == work.dtype else (unit.to(dtype), rgb.to(dtype))
