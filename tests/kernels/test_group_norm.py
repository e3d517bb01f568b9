"""Triton GroupNorm (+ SiLU) vs F.group_norm and a float64 reference; the UNet's norm helper.

Without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET is set at collection
time, before anything imports triton (triton reads it once, at its own import; the kernel modules
import triton lazily). With CUDA the same tests run compiled on the GPU, and the ``gpu``-marked
tests add the sd15 shapes and a UNet block forward.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from mvportrait.kernels import group_norm as gn  # noqa: E402
from mvportrait.kernels.group_norm import group_norm, group_norm_cost, group_norm_ref  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}  # the interpreter truncates f32 -> bf16: 1 ulp


def _inputs(shape, dtype=torch.float32, affine="both", mean=0.0, std=1.0):
    """Fresh random x (N, C, *spatial) and (C,) weight / bias (None where ``affine`` says)."""
    x = (torch.randn(shape, device=DEV) * std + mean).to(dtype)
    c = shape[1]
    w = (torch.randn(c, device=DEV) * 0.5 + 1).to(dtype) if affine in ("both", "weight") else None
    b = torch.randn(c, device=DEV).to(dtype) if affine == "both" else None
    return x, w, b


def _ref64(x, groups, w, b, eps, silu):
    d = None if w is None else w.double()
    return group_norm_ref(x.double(), groups, d, None if b is None else b.double(), eps, silu)


def _check(got, x, groups, w, b, eps, silu, dtype):
    assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    assert bool(torch.isfinite(got).all()), "unwritten or non-finite outputs"
    assert got.data_ptr() != x.data_ptr()
    torch.testing.assert_close(got.double(), _ref64(x, groups, w, b, eps, silu), **TOL[dtype])


# (N, C, spatial, groups): batch 1, odd channel counts and spatial sizes, 1-D and spatial-less
CASES = [(1, 6, (5, 7), 3), (2, 40, (9,), 8), (3, 8, (), 4), (2, 12, (3, 5, 2), 4), (1, 5, (4, 4), 1)]


@needs_triton
@pytest.mark.parametrize("affine", ["both", "none", "weight"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("n,c,sp,groups", CASES)
def test_triton_matches_reference_fp32(n, c, sp, groups, silu, affine):
    x, w, b = _inputs((n, c, *sp), affine=affine)
    got = group_norm(x, groups, w, b, 1e-5, silu=silu, impl="triton")
    _check(got, x, groups, w, b, 1e-5, silu, torch.float32)
    torch.testing.assert_close(got, group_norm_ref(x, groups, w, b, 1e-5, silu), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c,sp,groups", [(1, 6, (5, 7), 3), (2, 40, (9,), 8), (2, 16, (3,), 4)])
def test_triton_half_precision(n, c, sp, groups, dtype):
    x, w, b = _inputs((n, c, *sp), dtype)
    got = group_norm(x, groups, w, b, 1e-6, silu=True, impl="triton")
    _check(got, x, groups, w, b, 1e-6, True, dtype)
    torch.testing.assert_close(got.float(), group_norm_ref(x.float(), groups, w.float(), b.float(), 1e-6, True),
                               **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("silu", [False, True])
def test_large_mean_is_not_lost_to_cancellation(silu):
    """mean 100, std 1: the shifted, per-tile merged statistics stay at float32 accuracy (no worse
    than torch's own float32 GroupNorm); a plain sum / sum-of-squares would lose ~4 digits."""
    x, w, b = _inputs((2, 8, 9, 11), mean=100.0)
    got = group_norm(x, 4, w, b, 1e-5, silu=silu, impl="triton")
    want = _ref64(x, 4, w, b, 1e-5, silu)
    err = (got.double() - want).abs().max().item()
    torch_err = (group_norm_ref(x, 4, w, b, 1e-5, silu).double() - want).abs().max().item()
    assert err <= max(torch_err, 1e-5), (err, torch_err)
    assert bool(torch.isfinite(got).all())


@needs_triton
@pytest.mark.parametrize("mean", [0.0, 100.0])
@pytest.mark.parametrize("n,c,sp,groups", [(1, 6, (11, 13), 2), (2, 4, (37,), 2), (3, 2, (), 1)])
def test_tiles_and_split_rows(monkeypatch, n, c, sp, groups, mean):
    """Tiny tiles and chunks so rows span several tiles and several programs (the merge paths),
    with a last chunk and a last tile that are partial."""
    monkeypatch.setattr(gn, "_MAX_BLOCK", 16)
    monkeypatch.setattr(gn, "_SPLIT_MIN_CHUNK", 24)
    x, w, b = _inputs((n, c, *sp), mean=mean)
    got = group_norm(x, groups, w, b, 1e-5, silu=True, impl="triton")
    assert bool(torch.isfinite(got).all())
    tol = dict(atol=2e-5, rtol=1e-5) if mean else TOL[torch.float32]
    torch.testing.assert_close(got.double(), _ref64(x, groups, w, b, 1e-5, True), **tol)


@needs_triton
def test_constant_groups_and_non_contiguous_input():
    """A constant group (var 0: y = bias), and a channels_last x: impl="triton" copies it to NCHW."""
    x, w, b = _inputs((2, 6, 5, 3))
    x[0, 2:4] = 3.25
    got = group_norm(x, 3, w, b, 1e-5, impl="triton")
    _check(got, x, 3, w, b, 1e-5, False, torch.float32)
    torch.testing.assert_close(got[0, 2:4], b[2:4, None, None].expand(2, 5, 3), atol=1e-6, rtol=0)
    xc = x.to(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    got = group_norm(xc, 3, w, b, 1e-5, silu=True, impl="triton")
    _check(got, x, 3, w, b, 1e-5, True, torch.float32)


@needs_triton
def test_empty_batch_and_grad_guard():
    x = torch.randn(0, 4, 3, 3, device=DEV)
    assert group_norm(x, 2, impl="triton").shape == (0, 4, 3, 3)
    x, w, b = _inputs((1, 4, 3, 3))
    w.requires_grad_(True)
    with pytest.raises(ValueError, match="no backward"):
        group_norm(x, 2, w, b, impl="triton")
    got = group_norm(x, 2, w, b)  # auto: the reference, which has a backward
    got.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        _check(group_norm(x, 2, w, b, impl="triton"), x, 2, w, b, 1e-5, False, torch.float32)


def test_too_large_groups(monkeypatch):
    monkeypatch.setattr(gn, "_MAX_ROW", 16)
    x, w, b = _inputs((1, 4, 3, 3))
    with pytest.raises(ValueError, match="at most 16"):
        group_norm(x, 2, w, b, impl="triton")
    torch.testing.assert_close(group_norm(x, 2, w, b), group_norm_ref(x, 2, w, b), atol=0, rtol=0)  # auto: ref


def test_reference_is_groupnorm_math():
    """Independent check of the reference against the formula, in float64."""
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    g = x.view(2, 3, -1)
    mu, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
    y = ((g - mu) / torch.sqrt(var + 1e-5)).view_as(x) * w[:, None, None] + b[:, None, None]
    torch.testing.assert_close(group_norm_ref(x, 3, w, b, 1e-5), y)
    torch.testing.assert_close(group_norm_ref(x, 3, w, b, 1e-5, silu=True), y * torch.sigmoid(y))


def test_cost():
    c = group_norm_cost((32, 320, 64, 64), torch.bfloat16)
    assert c["bytes"] == 3 * 32 * 320 * 64 * 64 * 2
    assert group_norm_cost((2, 4), torch.float32, silu=True)["flops"] > group_norm_cost((2, 4), torch.float32)["flops"]


@pytest.mark.skipif(CUDA, reason="auto runs Triton on CUDA tensors (tested by the Triton tests above)")
def test_auto_on_cpu_is_the_reference():
    x, w, b = _inputs((2, 8, 5, 5), torch.bfloat16)
    for silu in (False, True):
        torch.testing.assert_close(group_norm(x, 4, w, b, 1e-6, silu=silu), group_norm_ref(x, 4, w, b, 1e-6, silu),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("case,err,match", [
    ("rank", ValueError, "N, C"),
    ("groups", ValueError, "dividing"),
    ("groups_zero", ValueError, "groups"),
    ("groups_type", ValueError, "groups"),
    ("weight_shape", ValueError, "weight must have shape"),
    ("bias_shape", ValueError, "bias must have shape"),
    ("weight_type", TypeError, "weight"),
    ("weight_dtype", ValueError, "weight must have dtype"),
    ("dtype", ValueError, "dtype"),
    ("eps_zero", ValueError, "eps"),
    ("eps_nan", ValueError, "eps"),
    ("eps_bool", ValueError, "eps"),
    ("impl", ValueError, "impl"),
    ("silu", ValueError, "silu"),
    ("type", TypeError, "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(case, err, match):
    x = torch.randn(2, 6, 3, 3)
    kw = dict(groups=3, weight=torch.ones(6), bias=torch.zeros(6), eps=1e-5)
    if case == "rank":
        x = x[0, 0, 0]
    elif case == "groups":
        kw["groups"] = 4
    elif case == "groups_zero":
        kw["groups"] = 0
    elif case == "groups_type":
        kw["groups"] = 3.0
    elif case == "weight_shape":
        kw["weight"] = torch.ones(3)
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(6, 1)
    elif case == "weight_type":
        kw["weight"] = [1.0] * 6
    elif case == "weight_dtype":
        kw["weight"] = torch.ones(6, dtype=torch.float64)
    elif case == "dtype":
        x = x.long()
    elif case == "eps_zero":
        kw["eps"] = 0.0
    elif case == "eps_nan":
        kw["eps"] = float("nan")
    elif case == "eps_bool":
        kw["eps"] = True
    elif case == "impl":
        kw["impl"] = "cpp"
    elif case == "silu":
        kw["silu"] = 1
    elif case == "type":
        x = x.numpy()
    with pytest.raises(err, match=match):
        group_norm(x, **kw)


# ------------------------------------------------------------------------- the UNet's helper
@pytest.mark.parametrize("kernels", ["auto", "triton", "ref"])
def test_unet_helper_on_cpu_is_the_module_calls_exactly(monkeypatch, kernels):
    from mvportrait.models.unet_blocks import ResnetBlock, _norm_act

    monkeypatch.setenv("MVP_KERNELS", kernels)
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 12, 5, 7)
    with torch.inference_mode():
        torch.testing.assert_close(_norm_act(norm, x), F.silu(norm(x)), atol=0, rtol=0)
        torch.testing.assert_close(_norm_act(norm, x, silu=False), norm(x), atol=0, rtol=0)
    blk = ResnetBlock(12, 8, 16, 4, 1e-5)
    temb = torch.randn(2, 16)
    with torch.no_grad():
        h = blk.conv1(F.silu(blk.norm1(x))) + blk.time_emb_proj(F.silu(temb))[:, :, None, None]
        want = blk.conv2(F.silu(blk.norm2(h))) + blk.conv_shortcut(x)
        torch.testing.assert_close(blk(x, temb), want, atol=0, rtol=0)


def test_auto_picks_the_fused_kernel_from_64x64_spatial():
    """MVP_KERNELS=auto: the fused kernel only where it measured faster on an H200 (64^2, not 16^2)."""
    from mvportrait.models.unet_blocks import NORM_TRITON_MIN_HW, _norm_triton_pays

    assert NORM_TRITON_MIN_HW == 64 * 64
    assert _norm_triton_pays(torch.empty(32, 320, 64, 64, device="meta"))
    assert not _norm_triton_pays(torch.empty(32, 1280, 16, 16, device="meta"))
    assert not _norm_triton_pays(torch.empty(32, 640, 32, 32, device="meta"))  # unmeasured: torch's kernels
    assert _norm_triton_pays(torch.empty(2, 8, 4, 32, 32, device="meta"))  # 4 x 32 x 32 spatial: 4096


# --------------------------------------------------------------------------- full size, GPU
@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("shape", [(32, 320, 64, 64), (32, 1280, 8, 8), (32, 640, 32, 32), (2, 1280, 16, 16)])
@pytest.mark.parametrize("silu", [False, True])
def test_gpu_sd15_shapes(shape, silu):
    x, w, b = _inputs(shape, torch.bfloat16)
    got = group_norm(x, 32, w, b, 1e-5, silu=silu, impl="triton")
    assert got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
    want = group_norm_ref(x.float(), 32, w.float(), b.float(), 1e-5, silu)
    torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])
    torch.testing.assert_close(group_norm(x, 32, w, b, 1e-5, silu=silu), got, atol=0, rtol=0)  # auto = triton
    x32 = x.float() + 100.0  # float32, large mean
    got = group_norm(x32, 32, w.float(), b.float(), 1e-5, silu=silu, impl="triton")
    torch.testing.assert_close(got.double(), _ref64(x32, 32, w, b, 1e-5, silu), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@gpu_only
def test_gpu_auto_falls_back_for_channels_last_and_grad():
    x, w, b = _inputs((4, 64, 16, 16), torch.bfloat16)
    xc = x.to(memory_format=torch.channels_last)
    got = group_norm(xc, 32, w, b, silu=True)
    torch.testing.assert_close(got, group_norm_ref(xc, 32, w, b, 1e-5, True), atol=0, rtol=0)
    w.requires_grad_(True)
    assert group_norm(x, 32, w, b).grad_fn is not None


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_unet_blocks_triton_vs_ref(monkeypatch, dtype):
    from mvportrait.models.unet_blocks import AxisTransformer, ResnetBlock, SpatialTransformer

    torch.manual_seed(0)
    res = ResnetBlock(64, 128, 256, 32, 1e-5).to("cuda", dtype)
    st = SpatialTransformer(128, 4, 32, 32).to("cuda", dtype)
    ax = AxisTransformer(128, 4, "frame", 1, 32, positions=True).to("cuda", dtype)
    torch.nn.init.normal_(ax.proj_out.weight, std=0.02)  # not the identity
    x = torch.randn(8, 64, 16, 16, device="cuda", dtype=dtype)
    temb = torch.randn(8, 256, device="cuda", dtype=dtype)
    ctx = torch.randn(8, 7, 32, device="cuda", dtype=dtype)

    def run():
        h = res(x, temb)
        return ax(st(h, ctx), 2, 4)

    if dtype == torch.float32:  # TF32 convolutions would round the two paths' tiny differences apart (~1e-3;
        # seen on an H200: 5.5e-4 absolute): compare in true float32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with torch.inference_mode():
        monkeypatch.setenv("MVP_KERNELS", "ref")
        want = run()
        monkeypatch.setenv("MVP_KERNELS", "triton")
        got = run()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
