"""GroupNorm (+ optional SiLU) of a channels-first activation, as the UNet's ResnetBlock uses it.

For ``x`` of shape (N, C, *spatial) with ``C = G * Cg`` channels in G groups of Cg consecutive
channels, and ``S = prod(spatial)`` (1 when there are no spatial dims)::

    mu[n, g]   = mean(x[n, g*Cg:(g+1)*Cg, ...])                     (M = Cg * S elements)
    var[n, g]  = mean((x[n, g*Cg:(g+1)*Cg, ...] - mu[n, g])^2)       (biased, as torch's GroupNorm)
    y[n, c, s] = (x[n, c, s] - mu[n, g(c)]) / sqrt(var[n, g(c)] + eps) * weight[c] + bias[c]
    silu=True:   y <- y * sigmoid(y)

Tensors: ``x`` (N, C, *spatial), any number of spatial dims including none ((N, C) or (N, C, F)),
float32/float16/bfloat16; ``weight`` / ``bias`` (C,) or None (1 / 0), any of those dtypes, on x's
device. Output: a fresh tensor of x's shape and dtype; from the Triton path contiguous (NCHW).
Statistics and arithmetic are float32 inside, the output is rounded once.

Implementations (``impl``): ``group_norm_ref`` -- ``torch.nn.functional.group_norm`` then
``F.silu``; the Triton path, two launches over a contiguous x (in NCHW every (n, g) group is one
contiguous run of M elements, row ``r = n * G + g``):

* ``_group_norm_stats_kernel``, grid (N*G, SPLIT): program (r, s) reads chunk s (``CHUNK``
  elements, the last one shorter) of row r in tiles of ``BLOCK``; every tile's mean and sum of
  squared deviations are computed exactly from registers (two-pass within the tile) and merged
  into the program's running (count, mean, M2) with Chan et al.'s parallel formula. All values
  are shifted by the row's first element before anything is summed, so an input of mean 100 and
  std 1 loses nothing to cancellation (fp32 sum / sum-of-squares would). Writes (mean, M2) of its
  chunk to a float32 (2, N*G, SPLIT) scratch. SPLIT > 1 only for long rows (> ``_SPLIT_MIN_CHUNK``
  elements) when N*G programs would not fill the GPU (fewer than ``_TARGET_PROGRAMS``).
* ``_group_norm_apply_kernel``, same grid: program (r, s) merges the SPLIT partials of row r
  (a vector merge, the same formula), computes rstd, then normalises chunk s tile by tile with the
  per-channel affine (channel ``g*Cg + offset // S``: a shift when S is a power of two, else an
  int32 division; weight / bias gathered per element, L1 hits) and SiLU, storing x's dtype.

Positions inside a group are int32 (groups of at most ``2**30`` elements; larger ones take the
reference under ``"auto"``), row bases int64.

``"auto"`` runs Triton when x is a CUDA tensor, triton is installed, x is contiguous and no
gradient is needed (the kernels have no backward); everything else -- CPU tensors, non-contiguous
(e.g. channels_last) CUDA inputs, autograd -- takes the reference (channels_last stays channels_last
there). ``"triton"`` copies a non-contiguous x to NCHW first; with CPU tensors it needs the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported), else a RuntimeError.

Cost, with ``E = N C S`` elements of ``s`` bytes: bytes moved ``3 E s`` (x read twice, y written
once; weight, bias and the (2, N*G, SPLIT) float32 scratch are negligible); FLOPs about ``7 E``
(shift, tile deviation, square-add in pass 1; shift, centre, scale-add in pass 2) plus ``4 E`` and
``E`` exponentials with SiLU. :func:`group_norm_cost` returns these numbers for benchmarks.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from mvportrait.kernels._triton import launcher, triton_available, triton_kernel

# Triton is imported on the first Triton call (TRITON_INTERPRET is read when triton itself is
# imported, so importing mvportrait must not import it; see _triton.py).
triton = None
tl = None

__all__ = ["group_norm_ref", "group_norm", "group_norm_cost"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = ("auto", "triton", "ref")
# Launch heuristics (module constants so tests can shrink them to exercise tiling and splitting at
# interpreter-friendly sizes).
_MAX_BLOCK = 4096  # elements per tile (fp32 in registers: 16 per thread at 8 warps)
_SPLIT_MIN_CHUNK = 4096  # never split a row into chunks shorter than this
_TARGET_PROGRAMS = 2048  # split rows until N*G*SPLIT reaches about this many programs
_MAX_SPLIT = 64
_MAX_ROW = 2**30  # elements per group (int32 positions in the kernels); larger groups: the reference


def group_norm_ref(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """``F.group_norm`` (+ ``F.silu``): the reference; math in the module docstring."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm_cost(shape, dtype: torch.dtype = torch.bfloat16, *, silu: bool = False) -> dict:
    """Bytes moved and FLOPs of one Triton call on an x of ``shape`` (module docstring)."""
    e = math.prod(shape)
    s = torch.empty((), dtype=dtype).element_size()
    return {"bytes": 3 * e * s, "flops": (11 if silu else 7) * e}


# ----------------------------------------------------------------------------- Triton kernels
@triton_kernel
def _group_norm_stats_kernel(x_ptr, part_ptr, M, CHUNK, SPLIT, R, BLOCK: tl.constexpr):
    # Row r = n * G + g is the contiguous run x[r*M : (r+1)*M]; this program reduces elements
    # [s*CHUNK, s*CHUNK + length) of it, shifted by the row's first element.
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)  # positions inside a row are int32 (rows are < 2**30 elements)
    base = x_ptr + r * M
    shift = tl.load(base).to(tl.float32)
    lo = s * CHUNK
    length = tl.minimum(M - lo, CHUNK)
    offs0 = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    cnt = zero
    mean = zero
    m2 = zero
    for start in range(0, CHUNK, BLOCK):
        offs = start + offs0
        mask = offs < length
        v = tl.load(base + lo + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - shift, 0.0)
        n_t = tl.minimum(tl.maximum(length - start, 0), BLOCK).to(tl.float32)
        m_t = tl.sum(v, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, v - m_t, 0.0)
        q_t = tl.sum(d * d, axis=0)
        tot = cnt + n_t
        frac = n_t / tl.maximum(tot, 1.0)
        delta = m_t - mean
        mean = mean + delta * frac
        m2 = m2 + q_t + delta * delta * cnt * frac
        cnt = tot
    tl.store(part_ptr + r * SPLIT + s, mean)
    tl.store(part_ptr + (R + r) * SPLIT + s, m2)


@triton_kernel
def _group_norm_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, M, S, S_LOG2, CG, G, CHUNK, SPLIT, R, eps,
                             HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, POW2: tl.constexpr,
                             BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    # channel of row position p: g*CG + p // S; a shift when S = 2**S_LOG2 (POW2: every sd15 level),
    # else an int32 division (per element; the affine gathers hit L1)
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)  # positions inside a row are int32 (rows are < 2**30 elements)
    base = r * M
    shift = tl.load(x_ptr + base).to(tl.float32)
    # merge the row's SPLIT partials: chunk i holds min(CHUNK, M - i*CHUNK) elements
    idx = tl.arange(0, BLOCK_S).to(tl.int64)
    pmask = idx < SPLIT
    p_mean = tl.load(part_ptr + r * SPLIT + idx, mask=pmask, other=0.0)
    p_m2 = tl.load(part_ptr + (R + r) * SPLIT + idx, mask=pmask, other=0.0)
    p_cnt = tl.where(pmask, tl.minimum(M - idx * CHUNK, CHUNK), 0).to(tl.float32)
    total = tl.sum(p_cnt, axis=0)
    mean = tl.sum(p_cnt * p_mean, axis=0) / total
    dev = p_mean - mean
    m2 = tl.sum(p_m2, axis=0) + tl.sum(p_cnt * dev * dev, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    c0 = (tl.program_id(0) % G) * CG
    lo = s * CHUNK
    length = tl.minimum(M - lo, CHUNK)
    offs0 = tl.arange(0, BLOCK)
    for start in range(0, CHUNK, BLOCK):
        offs = start + offs0
        mask = offs < length
        x = tl.load(x_ptr + base + lo + offs, mask=mask, other=0.0).to(tl.float32)
        if POW2:
            ch = c0 + ((lo + offs) >> S_LOG2)
        else:
            ch = c0 + (lo + offs) // S
        y = (x - shift - mean) * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + ch, mask=mask, other=1.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        if SILU:  # y * sigmoid(y), from exp(-|y|) so nothing overflows
            z = tl.exp(-tl.abs(y))
            y = y * tl.where(y >= 0, 1.0, z) / (1.0 + z)
        tl.store(y_ptr + base + lo + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ dispatch


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_inputs(x, groups, weight, bias, eps, silu, impl):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *spatial), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must have dtype float32/float16/bfloat16, got {x.dtype}")
    c = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1 or c % groups:
        raise ValueError(f"groups must be a positive integer dividing the {c} channels, got {groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must have dtype float32/float16/bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not isinstance(silu, bool):
        raise ValueError(f"silu must be a bool, got {silu!r}")
    if impl not in _IMPLS:
        raise ValueError(f"group_norm: impl must be one of {', '.join(_IMPLS)}, got {impl!r}")


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, *, silu: bool = False, impl: str = "auto") -> torch.Tensor:
    """GroupNorm of (N, C, *spatial) ``x`` over ``groups`` channel groups, then SiLU if ``silu``.

    ``weight`` / ``bias``: (C,) or None. Returns a fresh tensor of x's shape and dtype. Math, cost
    and ``impl`` in the module docstring.
    """
    _check_inputs(x, groups, weight, bias, eps, silu, impl)
    groups = int(groups)
    m = x.shape[1] // groups * math.prod(x.shape[2:])  # elements per group
    if impl == "auto":
        use_triton = (x.device.type == "cuda" and triton_available() and x.is_contiguous() and m <= _MAX_ROW
                      and not _needs_grad(x, weight, bias))
    else:
        use_triton = impl == "triton"
    if not use_triton:
        return group_norm_ref(x, groups, weight, bias, float(eps), silu)
    if m > _MAX_ROW:
        raise ValueError(f"group_norm: impl='triton' takes groups of at most {_MAX_ROW} elements (int32 "
                         f"positions), got {m}; use impl='ref'/'auto'")
    if _needs_grad(x, weight, bias):
        raise ValueError("group_norm: impl='triton' has no backward; call it under torch.no_grad() / "
                         "torch.inference_mode() or use impl='ref'/'auto'")
    apply_k = launcher(_group_norm_apply_kernel, x.device, "group_norm")
    stats_k = launcher(_group_norm_stats_kernel, x.device, "group_norm")
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    n, c = x.shape[0], x.shape[1]
    sp = m // (c // groups)  # spatial size S
    rows = n * groups
    split = 1
    if m > _SPLIT_MIN_CHUNK and rows < _TARGET_PROGRAMS:
        split = max(1, min(_cdiv(m, _SPLIT_MIN_CHUNK), _cdiv(_TARGET_PROGRAMS, rows), _MAX_SPLIT))
    block = min(_MAX_BLOCK, max(16, _next_pow2(_cdiv(m, split))))
    chunk = _cdiv(_cdiv(m, split), block) * block  # a multiple of the tile
    split = _cdiv(m, chunk)
    part = torch.empty((2, rows, split), dtype=torch.float32, device=x.device)
    warps = 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
    grid = (rows, split)
    stats_k[grid](x, part, m, chunk, split, rows, BLOCK=block, num_warps=warps)
    pow2 = sp & (sp - 1) == 0
    apply_k[grid](x, y, x if weight is None else weight, x if bias is None else bias, part, m, sp,
                  sp.bit_length() - 1, c // groups, groups, chunk, split, rows, float(eps),
                  HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, POW2=pow2, BLOCK=block,
                  BLOCK_S=max(2, _next_pow2(split)), num_warps=warps)
    return y
