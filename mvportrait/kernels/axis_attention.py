"""Attention along one short axis (views or frames) of a (B, V, F, N, C) activation.

The view module of the FLAME2Video UNet lets every (frame, pixel) position attend over its V
views; the temporal (motion) module lets every (view, pixel) position attend over its F frames.
Both are softmax attention over a sequence of L <= 32 tokens, one sequence per position and head::

    axis="view":   o[b, :, f, n, h] = softmax(q[b, :, f, n, h] k[b, :, f, n, h]^T * scale) v[b, :, f, n, h]
    axis="frame":  o[b, v, :, n, h] = softmax(q[b, v, :, n, h] k[b, v, :, n, h]^T * scale) v[b, v, :, n, h]

with channels ``C = H * D`` split into H heads of D channels (head h = channels
``h*D .. h*D + D - 1``), ``scale = 1/sqrt(D)`` by default, no mask, no dropout.

Tensors: ``q``, ``k``, ``v`` (B, V, F, N, C) float32/float16/bfloat16, one dtype and device, any
strides (e.g. slices of a fused qkv projection ``qkv[..., :C]``; the kernel takes every stride,
nothing is copied). Output (B, V, F, N, C) contiguous, dtype of the inputs.

Implementations (``impl``): ``axis_attention_ref`` -- permute the axis next to the channels,
split heads, ``torch.nn.functional.scaled_dot_product_attention``, permute back (the permutes
are real copies); ``_axis_attention_kernel`` -- Triton, one program per block of ``BLOCK_R``
(position, head) rows, heads fastest (so a block reads whole channel rows of its positions: coalesced
even when q, k, v are slices of a fused projection), every tile ``(BLOCK_R, BLOCK_D)`` in one register
layout: for each query i an online softmax over the L keys in float32 (``exp2`` with the scale folded
into ``log2 e``; each key's score is a reduction over D, broadcast back without a layout change), the
weighted sum of V, row i written once; K and V rows are re-read per query from the cache. (The first
version kept K and V of the whole axis in 3-D registers tiles, one program per (positions, head):
1.2 ms on an H200 for 1x4x8x4096x320 bf16, 14x its bandwidth floor, layout conversions per query.)
``axis_attention_bmm`` -- the CPU path: one permute copy of each input (to float32) into
(positions * H, L, D) rows, ``torch.bmm`` for the scores, the softmax in float32, ``torch.bmm`` for
the weighted sum, one permute copy back. With bfloat16 / float16 inputs SDPA's CPU kernel pays a
per-(row, head) overhead that dominates at L <= 32: there the bmm path is 1.1-2x faster (the tiny
UNet's shapes and sd15's, ``benchmarks/bench_kernels.py``, ``kernels_cpu.json``), at float32 accuracy
inside; with float32 inputs SDPA is as fast or faster. ``"auto"`` runs Triton on CUDA tensors when
triton is installed, the bmm path on half-precision CPU tensors, the reference elsewhere; ``"triton"`` on CPU tensors needs
the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), else a
RuntimeError. Limits of the kernel: L <= 32, D <= 256. The kernel is compiled per (L, D) pair
(``SPECIALIZE``; the UNet has a handful): with both known at compile time the channel masks' constancy
is known, so the loads vectorise, and the query / key loops have fixed trip counts.

Cost, with ``E = B V F N C`` elements per tensor and ``s`` bytes per element: bytes moved
``4 E s`` (q, k, v read once, o written once); FLOPs ``4 E L`` (``2 L D`` for the scores and
``2 L D`` for the weighted sum per query and head), plus ``E L / D`` exponentials.
:func:`axis_attention_cost` returns these numbers for benchmarks.

Not here (yet): the full multi-view attention with views folded into the token sequence
(MVDream style, sequence V*N); that needs a flash-attention style kernel and is left to SDPA.
"""
from __future__ import annotations

import math

import torch

from mvportrait.kernels._triton import launcher, triton_available, triton_kernel

# Triton is imported on the first Triton call (see lbs.py: TRITON_INTERPRET is read when triton
# itself is imported, so importing mvportrait must not import it).
triton = None
tl = None

__all__ = ["axis_attention_ref", "axis_attention_bmm", "axis_attention", "axis_attention_cost", "AXES",
           "MAX_AXIS_LEN"]

AXES = {"view": 1, "frame": 2}  # axis name -> dimension of the (B, V, F, N, C) layout
MAX_AXIS_LEN = 32
# Compile the kernel per (axis length, head dim) (True) or take both at run time (False: one compile per
# block shape). Benchmarks flip it to time both (benchmarks/bench_kernels.py, ``triton-generic`` rows).
SPECIALIZE = True
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = ("auto", "triton", "bmm", "ref")


def axis_attention_ref(q, k, v, heads: int, axis: str, *, scale: float | None = None) -> torch.Tensor:
    """Permute + SDPA + permute reference; shapes and math in the module docstring."""
    b, nv, nf, n, c = q.shape
    d = c // heads
    dim = AXES[axis]
    other = 3 - dim  # the other of dims 1 and 2

    def split(x):  # (B, V, F, N, C) -> (B * other * N, H, L, D)
        x = x.permute(0, other, 3, dim, 4)  # (B, O, N, L, C)
        return x.reshape(-1, x.shape[3], heads, d).transpose(1, 2)

    o = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    o = o.transpose(1, 2).reshape(b, q.shape[other], n, q.shape[dim], c)  # (B, O, N, L, C)
    inv = [0, 0, 0, 0, 0]
    for i, src in enumerate((0, other, 3, dim, 4)):
        inv[src] = i
    return o.permute(*inv).contiguous()


def axis_attention_bmm(q, k, v, heads: int, axis: str, *, scale: float | None = None) -> torch.Tensor:
    """CPU path: float32 rows (positions * H, L, D), bmm, float32 softmax, bmm (module docstring)."""
    b, nv, nf, n, c = q.shape
    d = c // heads
    dim = AXES[axis]
    other = 3 - dim
    length, no = q.shape[dim], q.shape[other]
    work = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 stays float64)

    def rows(x):  # (B, V, F, N, C) -> (B * O * N * H, L, D) in `work`, one copy
        x = x.reshape(b, nv, nf, n, heads, d).permute(0, other, 3, 4, dim, 5)  # (B, O, N, H, L, D)
        return x.to(work, memory_format=torch.contiguous_format).reshape(-1, length, d)

    qr, kr, vr = rows(q), rows(k), rows(v)
    s = torch.bmm(qr, kr.transpose(1, 2)).mul_(1.0 / math.sqrt(d) if scale is None else float(scale))
    o = torch.bmm(torch.softmax(s, dim=-1), vr).view(b, no, n, heads, length, d)
    o = o.permute(0, 4, 1, 2, 3, 5) if dim == 1 else o.permute(0, 1, 4, 2, 3, 5)  # (B, V, F, N, H, D)
    return o.to(q.dtype, memory_format=torch.contiguous_format).reshape(b, nv, nf, n, c)


def axis_attention_cost(shape, axis: str, dtype: torch.dtype = torch.float16) -> dict:
    """Bytes moved and FLOPs of one call on (B, V, F, N, C) tensors (module docstring)."""
    e = math.prod(shape)
    s = torch.empty((), dtype=dtype).element_size()
    return {"bytes": 4 * e * s, "flops": 4 * e * shape[AXES[axis]]}


# ----------------------------------------------------------------------------- Triton kernel
@triton_kernel
def _axis_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, R, HEADS, O, NPOS, L, D, qk_scale,
                           sq_b, sq_o, sq_n, sq_l, sq_c,
                           sk_b, sk_o, sk_n, sk_l, sk_c,
                           sv_b, sv_o, sv_n, sv_l, sv_c,
                           so_b, so_o, so_n, so_l, so_c,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, L_C: tl.constexpr, D_C: tl.constexpr):
    # Rows r = ((b * O + o) * NPOS + n) * HEADS + h: one (position, head) pair each, heads fastest, so
    # a block of rows reads whole channel rows of its positions. l runs along the attended axis;
    # head h owns channels h*D .. h*D + D - 1. qk_scale = scale * log2(e). Every tile is (BLOCK_R,
    # BLOCK_D) in one layout: the per-row scores are reductions over D and broadcast back for free.
    # L_C / D_C > 0: the axis length / head dim as compile-time constants (SPECIALIZE: one compile per
    # pair; the masks' constancy is then known, so the loads vectorise, and the loops have fixed trips)
    if L_C > 0:
        L = L_C
    if D_C > 0:
        D = D_C
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # int32: R < 2**31 (checked)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_r < R)[:, None] & (offs_d < D)[None, :]
    h = offs_r % HEADS
    pos = offs_r // HEADS
    n = (pos % NPOS).to(tl.int64)
    bo = pos // NPOS
    o = (bo % O).to(tl.int64)
    b = (bo // O).to(tl.int64)
    chan = (h * D).to(tl.int64)[:, None] + offs_d[None, :]  # (BLOCK_R, BLOCK_D)
    q_ptrs = q_ptr + (b * sq_b + o * sq_o + n * sq_n)[:, None] + chan * sq_c
    k_ptrs = k_ptr + (b * sk_b + o * sk_o + n * sk_n)[:, None] + chan * sk_c
    v_ptrs = v_ptr + (b * sv_b + o * sv_o + n * sv_n)[:, None] + chan * sv_c
    o_ptrs = o_ptr + (b * so_b + o * so_o + n * so_n)[:, None] + chan * so_c
    for i in range(0, L):  # query i: an online softmax over the L keys (rereads of K / V hit the cache)
        qi = (tl.load(q_ptrs + i * sq_l, mask=mask, other=0.0).to(tl.float32) * qk_scale).to(tl.float32)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for j in range(0, L):
            kj = tl.load(k_ptrs + j * sk_l, mask=mask, other=0.0).to(tl.float32)
            s = tl.sum(qi * kj, axis=1)  # (BLOCK_R,) scores in log2 units
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp2(m_i - m_new)  # 0 at the first key (m_i = -inf)
            pj = tl.exp2(s - m_new)
            vj = tl.load(v_ptrs + j * sv_l, mask=mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + pj[:, None] * vj
            l_i = l_i * alpha + pj
            m_i = m_new
        tl.store(o_ptrs + i * so_l, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ dispatch


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _check_inputs(q, k, v, heads, axis, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name} must have shape (B, V, F, N, C), got {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype of float32/float16/bfloat16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    c = q.shape[4]
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or c % heads:
        raise ValueError(f"heads must be a positive integer dividing the {c} channels, got {heads!r}")
    if c // heads > MAX_HEAD_DIM:
        raise ValueError(f"head dim {c // heads} is larger than {MAX_HEAD_DIM}")
    length = q.shape[AXES[axis]]
    if length > MAX_AXIS_LEN:
        raise ValueError(f"axis {axis!r} has length {length}; axis attention keeps the whole axis in registers "
                         f"and takes at most {MAX_AXIS_LEN} (use full-sequence attention for longer axes)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def axis_attention(q, k, v, heads: int, axis: str, *, scale: float | None = None, out=None,
                   impl: str = "auto") -> torch.Tensor:
    """Attention along ``axis`` ("view" or "frame") of (B, V, F, N, C) q, k, v -> (B, V, F, N, C).

    ``heads`` must divide C; ``scale`` defaults to ``1/sqrt(C/heads)``; ``out`` is an optional
    contiguous (B, V, F, N, C) buffer of the input dtype. Math, cost and ``impl`` in the module
    docstring.
    """
    _check_inputs(q, k, v, heads, axis, scale)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype \
                or out.device != q.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    if impl not in _IMPLS:
        raise ValueError(f"axis_attention: impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    use_triton = impl == "triton" or (impl == "auto" and q.device.type == "cuda" and triton_available())
    if not use_triton:
        fast = impl == "bmm" or (impl == "auto" and q.device.type == "cpu" and q.dtype in (torch.bfloat16,
                                                                                            torch.float16))
        res = (axis_attention_bmm if fast else axis_attention_ref)(q, k, v, heads, axis, scale=scale)
        return res if out is None else out.copy_(res)
    kernel = launcher(_axis_attention_kernel, q.device, "axis_attention")
    b, nv, nf, n, c = q.shape
    d = c // heads
    dim = AXES[axis]
    other = 3 - dim
    length, no = q.shape[dim], q.shape[other]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rows = b * no * n * heads
    if out.numel() == 0:
        return out
    if rows >= 2**31:
        raise ValueError(f"axis_attention: {rows} (position, head) rows; the Triton kernel takes fewer than 2**31")
    block_d = max(2, _next_pow2(d))
    block_r = max(2, 2048 // block_d)  # (BLOCK_R, BLOCK_D) fp32 tiles of 2048: q, k, v, acc ~64 registers
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * math.log2(math.e)
    strides = []
    for t in (q, k, v, out):
        st = t.stride()
        strides += [st[0], st[other], st[3], st[dim], st[4]]
    grid = (-(-rows // block_r),)
    kernel[grid](q, k, v, out, rows, heads, no, n, length, d, qk_scale, *strides,
                 BLOCK_R=block_r, BLOCK_D=block_d, L_C=length if SPECIALIZE else 0, D_C=d if SPECIALIZE else 0,
                 num_warps=4)
    return out
