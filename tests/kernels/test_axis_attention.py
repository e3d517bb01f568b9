"""Triton axis attention vs the permute + SDPA + permute reference.

Without CUDA the kernel runs under the Triton interpreter: TRITON_INTERPRET is set at
collection time, before anything imports triton (triton reads it once, at its own import; the
kernel modules import triton lazily). With CUDA the same tests run compiled on the GPU, and the
``gpu``-marked tests add the benchmark shape.
"""
import importlib.util
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from mvportrait.kernels.axis_attention import (MAX_AXIS_LEN, axis_attention, axis_attention_bmm,  # noqa: E402
                                               axis_attention_ref)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}  # the interpreter truncates f32 -> bf16: 1 ulp
LAYOUTS = ("fused_qkv", "heads_fused", "frames_major", "channel_stride")


def _qkv(shape, heads, layout, dtype=torch.float32):
    """q, k, v of ``shape`` (B, V, F, N, C) as non-contiguous views of one bigger tensor."""
    b, nv, nf, n, c = shape
    if layout == "fused_qkv":  # one (.., 3C) projection, sliced on the channels
        t = torch.randn(b, nv, nf, n, 3 * c, device=DEV, dtype=dtype)
        return t.split(c, dim=-1)
    if layout == "heads_fused":  # (.., 3, H, D) projection
        t = torch.randn(b, nv, nf, n, 3, heads, c // heads, device=DEV, dtype=dtype)
        return tuple(t[..., i, :, :].flatten(-2) for i in range(3))
    if layout == "frames_major":  # stored (B, F, V, N, C), seen transposed
        t = torch.randn(3, b, nf, nv, n, c, device=DEV, dtype=dtype)
        return tuple(x.transpose(1, 2) for x in t)
    t = torch.randn(3, b, nv, nf, n, c, 2, device=DEV, dtype=dtype)  # channel stride 2
    return tuple(x[..., 0] for x in t)


def _shape(axis, length, n=5, heads=2, d=32, b=1, other=2):
    return (b, length, other, n, heads * d) if axis == "view" else (b, other, length, n, heads * d)


@needs_triton
@pytest.mark.parametrize("d", [32, 40, 64])
@pytest.mark.parametrize("length", [1, 3, 5])
@pytest.mark.parametrize("axis", ["view", "frame"])
def test_triton_matches_reference_fp32(axis, length, d):
    layout = LAYOUTS[(length + d) % len(LAYOUTS)]
    q, k, v = _qkv(_shape(axis, length, d=d), 2, layout)
    assert not q.is_contiguous()
    out = torch.full(q.shape, float("nan"), device=DEV)
    got = axis_attention(q, k, v, 2, axis, out=out, impl="triton")
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, axis_attention_ref(q, k, v, 2, axis), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("axis,length,d", [("view", 4, 40), ("frame", 3, 32)])
def test_triton_generic_compile_matches_reference(monkeypatch, axis, length, d):
    """The kernel with the axis length and head dim as run-time values (SPECIALIZE off: what the
    benchmark's ``triton-generic`` rows time) gives the same attention."""
    from mvportrait.kernels import axis_attention as aa

    monkeypatch.setattr(aa, "SPECIALIZE", False)
    q, k, v = _qkv(_shape(axis, length, d=d), 2, "fused_qkv")
    out = torch.full(q.shape, float("nan"), device=DEV)
    got = axis_attention(q, k, v, 2, axis, out=out, impl="triton")
    torch.testing.assert_close(got, axis_attention_ref(q, k, v, 2, axis), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", ["view", "frame"])
def test_every_layout_and_batch(axis, layout):
    q, k, v = _qkv(_shape(axis, 4, n=3, heads=1, d=32, b=2, other=3), 1, layout)
    got = axis_attention(q, k, v, 1, axis, impl="triton")
    assert got.is_contiguous() and got.shape == q.shape
    torch.testing.assert_close(got, axis_attention_ref(q, k, v, 1, axis), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length,d", [(3, 64), (5, 40)])
@pytest.mark.parametrize("axis", ["view", "frame"])
def test_triton_half_precision_against_fp32_reference(axis, length, d, dtype):
    q, k, v = _qkv(_shape(axis, length, n=7, d=d), 2, "fused_qkv", dtype)
    out = torch.full(q.shape, float("nan"), device=DEV, dtype=dtype)
    got = axis_attention(q, k, v, 2, axis, out=out, impl="triton")
    assert got.dtype == dtype
    want = axis_attention_ref(q.float(), k.float(), v.float(), 2, axis)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@needs_triton
def test_custom_scale_and_longest_axis():
    q, k, v = _qkv(_shape("frame", MAX_AXIS_LEN, n=3, heads=1, d=32, other=1), 1, "fused_qkv")
    got = axis_attention(q, k, v, 1, "frame", scale=0.3, impl="triton")
    torch.testing.assert_close(got, axis_attention_ref(q, k, v, 1, "frame", scale=0.3), **TOL[torch.float32])


def test_reference_is_attention_along_the_axis():
    """Independent check of the reference: explicit softmax over views at one position and head."""
    q, k, v = (torch.randn(1, 3, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    o = axis_attention_ref(q, k, v, 2, "view")
    f, n, h = 1, 4, 1
    qs, ks, vs = (x[0, :, f, n, 4 * h:4 * h + 4] for x in (q, k, v))  # (V, D)
    want = torch.softmax(qs @ ks.T / math.sqrt(4), -1) @ vs
    torch.testing.assert_close(o[0, :, f, n, 4 * h:4 * h + 4], want)
    o2 = axis_attention_ref(q, k, v, 2, "frame")
    qs, ks, vs = (x[0, 2, :, n, :4] for x in (q, k, v))  # (F, D), view 2, head 0
    torch.testing.assert_close(o2[0, 2, :, n, :4], torch.softmax(qs @ ks.T / 2, -1) @ vs)


@pytest.mark.skipif(CUDA, reason="auto runs Triton on CUDA tensors (tested by the Triton tests above)")
def test_auto_on_cpu_is_bmm_for_half_inputs_and_sdpa_for_float32():
    q, k, v = _qkv(_shape("view", 3), 2, "fused_qkv", torch.bfloat16)
    torch.testing.assert_close(axis_attention(q, k, v, 2, "view"), axis_attention_bmm(q, k, v, 2, "view"),
                               atol=0, rtol=0)
    q, k, v = _qkv(_shape("frame", 5), 2, "fused_qkv")
    torch.testing.assert_close(axis_attention(q, k, v, 2, "frame"), axis_attention_ref(q, k, v, 2, "frame"),
                               atol=0, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length,d,heads,n,b", [(1, 32, 2, 5, 1), (3, 40, 3, 7, 2), (4, 32, 2, 64, 1), (8, 64, 1, 3, 1),
                                                (MAX_AXIS_LEN, 16, 2, 3, 1), (5, 128, 2, 1, 3)])
@pytest.mark.parametrize("axis", ["view", "frame"])
def test_bmm_path_matches_reference(axis, length, d, heads, n, b, layout):
    """The CPU fast path against permute + SDPA in float64 (tight) and float32, any input layout."""
    torch.manual_seed(length * 31 + d + n)
    q, k, v = _qkv(_shape(axis, length, n=n, heads=heads, d=d, b=b, other=2 + b), heads, layout)
    out = torch.full(q.shape, float("nan"), device=DEV)
    got = axis_attention(q, k, v, heads, axis, out=out, impl="bmm")
    assert got.data_ptr() == out.data_ptr() and got.is_contiguous()
    want = axis_attention_ref(q.double(), k.double(), v.double(), heads, axis)
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
    torch.testing.assert_close(axis_attention_bmm(q.double(), k.double(), v.double(), heads, axis), want,
                               atol=1e-12, rtol=1e-12)
    assert axis_attention_bmm(q.double(), k.double(), v.double(), heads, axis).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["view", "frame"])
def test_bmm_path_half_precision(axis, dtype):
    """Half inputs: float32 scores and softmax inside, output rounded once (no worse than SDPA's)."""
    q, k, v = _qkv(_shape(axis, 6, n=9, heads=2, d=32), 2, "heads_fused", dtype)
    got = axis_attention(q, k, v, 2, axis, impl="bmm")
    assert got.dtype == dtype and got.shape == q.shape
    want = axis_attention_ref(q.double(), k.double(), v.double(), 2, axis)
    err = (got.double() - want).abs().max().item()
    sdpa_err = (axis_attention_ref(q, k, v, 2, axis).double() - want).abs().max().item()
    assert err <= max(sdpa_err, float(torch.finfo(dtype).eps)) * 1.01 + 1e-6, (err, sdpa_err)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_bmm_path_custom_scale_and_model_use(monkeypatch):
    """Custom scale; and the UNet's axis module gives the same output on the bmm path and the reference."""
    q, k, v = _qkv(_shape("frame", 7, n=4, heads=2, d=32), 2, "frames_major")
    torch.testing.assert_close(axis_attention(q, k, v, 2, "frame", scale=0.3, impl="bmm"),
                               axis_attention_ref(q, k, v, 2, "frame", scale=0.3), **TOL[torch.float32])
    from mvportrait.models.unet_blocks import AxisAttention

    torch.manual_seed(0)
    mod = AxisAttention(64, 2, "frame", positions=True).to(DEV)
    x = torch.randn(1, 2, 7, 4, 64, device=DEV)
    with torch.inference_mode():
        monkeypatch.setenv("MVP_KERNELS", "ref")
        want = mod(x)
        monkeypatch.setenv("MVP_KERNELS", "auto")
        got = mod(x)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("case,err,match", [
    ("rank", ValueError, "B, V, F, N, C"),
    ("shapes", ValueError, "one shape"),
    ("heads", ValueError, "dividing"),
    ("heads_type", ValueError, "heads"),
    ("axis_name", ValueError, "axis must be"),
    ("too_long", ValueError, "at most 32"),
    ("dtype", ValueError, "dtype"),
    ("int_dtype", ValueError, "dtype"),
    ("impl", ValueError, "impl"),
    ("impl_bmm_too_long", ValueError, "at most 32"),
    ("scale", ValueError, "scale"),
    ("out", ValueError, "out"),
    ("type", TypeError, "torch.Tensor"),
    ("head_dim", ValueError, "head dim"),
])
def test_bad_inputs_raise_clear_errors(case, err, match):
    q = torch.randn(1, 3, 2, 5, 64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    kw = dict(heads=2, axis="view")
    if case == "rank":
        q = q[0]
    elif case == "shapes":
        k = k[:, :, :, :4]
    elif case == "heads":
        kw["heads"] = 3
    elif case == "heads_type":
        kw["heads"] = 2.0
    elif case == "axis_name":
        kw["axis"] = "pixel"
    elif case == "too_long":
        q = k = v = torch.randn(1, 2, MAX_AXIS_LEN + 1, 3, 64)
        kw["axis"] = "frame"
    elif case == "impl_bmm_too_long":
        q = k = v = torch.randn(1, MAX_AXIS_LEN + 1, 2, 3, 64)
        kw["impl"] = "bmm"
    elif case == "dtype":
        k = k.half()
    elif case == "int_dtype":
        q, k, v = (x.long() for x in (q, k, v))
    elif case == "impl":
        kw["impl"] = "cpp"
    elif case == "scale":
        kw["scale"] = -1.0
    elif case == "out":
        kw["out"] = torch.empty(1, 3, 2, 5, 32)
    elif case == "type":
        q = q.numpy()
    elif case == "head_dim":
        q, k, v = (torch.randn(1, 3, 2, 5, 512) for _ in range(3))
        kw["heads"] = 1
    with pytest.raises(err, match=match):
        axis_attention(q, k, v, **kw)


# --------------------------------------------------------------------------- full size, GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["view", "frame"])
def test_gpu_benchmark_shape(axis, dtype):
    shape = (1, 4, 8, 32 * 32, 320)
    q, k, v = _qkv(shape, 8, "fused_qkv", dtype)
    out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    got = axis_attention(q, k, v, 8, axis, out=out, impl="triton")
    want = axis_attention_ref(q.float(), k.float(), v.float(), 8, axis)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(got.float(), want, **tol)
