"""C++ CPU rasterizer (mvportrait.kernels.cpu) against rasterize_ref, plus impl dispatch.

The C++ path promises the reference's exact semantics (same float64 operations, same edge rule,
same tie-break), so triangle ids and coverage must be identical; barycentrics and depth are
compared with float tolerances although they come out bit-identical on x86-64 today.
Outputs are poisoned (tri_id -7, floats NaN, mask True) before the call so unwritten elements fail.
"""
import importlib
import importlib.util
import logging
import random
import sys

import pytest
import torch

from mvportrait.kernels import cpu
from mvportrait.kernels import rasterize as rast
from mvportrait.kernels.rasterize import Fragments, interpolate, interpolate_ref, rasterize, rasterize_ref

needs_ext = pytest.mark.skipif(not cpu.available(), reason="C++ rasterizer extension not built "
                               "(`pip install -e .` or `python setup.py build_ext --inplace` builds it)")

F64 = torch.float64
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The reference is thousands of small torch ops: on a small machine shared with other jobs,
    intra-op threads mostly wait on each other (10-100x slower); one thread keeps these tests fast.
    The C++ path is unaffected (its own std::threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def _poisoned(n, h, w, dtype):
    return (torch.full((n, h, w), -7, dtype=torch.int64), torch.full((n, h, w, 3), float("nan"), dtype=dtype),
            torch.full((n, h, w), float("nan"), dtype=dtype), torch.ones((n, h, w), dtype=torch.bool))


def _cpp(pix, faces, h, w, *, cull=True, near=1e-4, threads=0, block_rows=0, simd=True, avx=True) -> Fragments:
    """The extension called directly on poisoned output buffers."""
    tri_id, bary, depth, mask = _poisoned(pix.shape[0], h, w, pix.dtype)
    cpu._ext.rasterize(pix.contiguous().numpy(), faces.contiguous().numpy(), h, w, cull, near, tri_id.numpy(),
                       bary.numpy(), depth.numpy(), mask.numpy(), threads, block_rows, simd, avx)
    return Fragments(tri_id, bary, depth, mask)


def _assert_same(out: Fragments, ref: Fragments, msg=""):
    covered = int(ref.mask.sum())
    bad = int((out.tri_id != ref.tri_id).sum())
    assert bad == 0, f"{bad} of {covered} covered pixels differ in tri_id {msg}"
    assert torch.equal(out.mask, ref.mask), msg
    tol = TOL[ref.depth.dtype]
    torch.testing.assert_close(out.depth, ref.depth, **tol, msg=lambda m: f"depth {msg}: {m}")
    torch.testing.assert_close(out.bary, ref.bary, **tol, msg=lambda m: f"bary {msg}: {m}")
    assert out.bary.dtype == ref.bary.dtype and out.tri_id.dtype == torch.int64 and out.mask.dtype == torch.bool


def _scene(gen, n, h, w, n_tri=60, dtype=torch.float32):
    """Random test scenes in pixel space: (N, Nv, 3) [u, v, z] and faces (F, 3).

    Per image: a triangle soup (sizes from sub-pixel to most of the image, some off-screen, some
    with a vertex behind the near plane), a jittered grid mesh with shared vertices snapped to
    pixel centres / pixel corners (edges through centres: the top-left rule decides), two huge
    triangles covering the whole image (both windings; behind the camera in odd images, so
    those have empty pixels), and exact duplicates of faces (same
    vertex ids, and rotated vertex order) for depth ties.
    """
    s = max(h, w)
    centre = torch.rand(n, n_tri, 1, 2, generator=gen, dtype=F64) * 1.4 - 0.2  # fraction of the image
    centre = centre * torch.tensor([w, h], dtype=F64)
    size = torch.exp(torch.rand(n, n_tri, 1, 1, generator=gen, dtype=F64) * 5 - 2) * s / 8  # log-uniform
    uv = centre + torch.randn(n, n_tri, 3, 2, generator=gen, dtype=F64) * size
    z = 0.5 + 3 * torch.rand(n, n_tri, 3, 1, generator=gen, dtype=F64)
    behind = torch.rand(n, n_tri, 3, 1, generator=gen, dtype=F64) < 0.03
    z = torch.where(behind, -z * 0.2, z)
    soup = torch.cat([uv, z], -1).reshape(n, -1, 3)  # (N, 3 * n_tri, 3)
    soup_faces = torch.arange(3 * n_tri).reshape(-1, 3)
    # grid mesh, (g x g) vertices; half of the faces wound the other way (back faces)
    g = 6
    t = torch.linspace(-0.1, 1.1, g, dtype=F64)
    gu, gv = torch.meshgrid(t * w, t * h, indexing="xy")
    grid_uv = torch.stack([gu, gv], -1).reshape(1, -1, 2) + torch.randn(n, g * g, 2, generator=gen, dtype=F64) * s / 40
    snap = torch.rand(n, g * g, 1, generator=gen) < 0.5
    grid_uv = torch.where(snap, torch.round(grid_uv * 2) / 2, grid_uv)  # pixel centres / corners
    grid_z = 1.0 + torch.rand(n, g * g, 1, generator=gen, dtype=F64)
    grid = torch.cat([grid_uv, grid_z], -1)
    gf = []
    for r in range(g - 1):
        for c in range(g - 1):
            a, b, cc, d = r * g + c, r * g + c + 1, (r + 1) * g + c + 1, (r + 1) * g + c
            gf += [[a, d, cc], [a, cc, b]] if (r + c) % 3 else [[a, cc, d], [a, b, cc]]
    grid_faces = torch.tensor(gf) + soup.shape[1]
    # two huge triangles covering everything, far away
    big = torch.tensor([[-3.0 * s, -3.0 * s, 6.0], [-3.0 * s, 5.0 * s, 6.5], [5.0 * s, -3.0 * s, 7.0]], dtype=F64)
    big = big.expand(n, 3, 3).clone()
    big[torch.arange(n) % 2 == 1, :, 2] = -1.0  # behind the camera in odd images: those keep empty pixels
    o = soup.shape[1] + grid.shape[1]
    big_faces = torch.tensor([[o, o + 1, o + 2], [o, o + 2, o + 1]])
    verts = torch.cat([soup, grid, big], 1)
    faces = torch.cat([soup_faces, grid_faces, big_faces])
    dup = faces[torch.randint(0, len(faces), (8,), generator=gen)]
    faces = torch.cat([faces, dup, dup[:, [1, 2, 0]]])  # exact ties: duplicates and rotated order
    faces = faces[torch.randperm(len(faces), generator=gen)]
    return verts.to(dtype).contiguous(), faces


SIZES = [(1, 1), (7, 13), (33, 65), (64, 31), (257, 255)]


@needs_ext
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("cull", [True, False])
def test_matches_reference_on_random_scenes(gen, hw, n, cull):
    h, w = hw
    for dtype in (torch.float32, torch.float64):
        verts, faces = _scene(gen, n, h, w, dtype=dtype)
        ref = rasterize_ref(verts, faces, h, w, cull_backfaces=cull)
        for simd, avx in ((True, True), (True, False), (False, False)):
            out = _cpp(verts, faces, h, w, cull=cull, simd=simd, avx=avx)
            _assert_same(out, ref, f"(seed {gen.initial_seed()}, {dtype}, simd={simd}, avx={avx})")
        assert ref.mask.any() or h * w == 1


@needs_ext
def test_near_plane_and_culling_flags(gen):
    h, w = 40, 52
    verts, faces = _scene(gen, 2, h, w)
    for near in (1e-4, 1.2, 2.5):
        for cull in (True, False):
            _assert_same(_cpp(verts, faces, h, w, cull=cull, near=near),
                         rasterize_ref(verts, faces, h, w, cull_backfaces=cull, near=near),
                         f"(near {near}, cull {cull}, seed {gen.initial_seed()})")


def _head_pix(size):
    """The FLAME-size synthetic head (5,023 vertices, 9,976 faces), one demo frame, ring of 4 views."""
    from mvportrait.flame.demo import demo_sequence
    from mvportrait.flame.synthetic import synthetic_head
    from mvportrait.render.cameras import view_rig

    m = synthetic_head(0, flame_size=True).model
    with torch.inference_mode():
        verts = m(demo_sequence(1 / 25.0, 25.0), with_landmarks=False).vertices[0, 0]  # (Nv, 3)
    rig = view_rig("ring-4", height=size, width=size)
    return rig.project(verts[None].expand(4, -1, -1)).contiguous(), m.faces


@needs_ext
def test_synthetic_head_four_views_256():
    """Full size: 4 views x 256^2 of the FLAME-size head, float32 as the renderer uses it."""
    pix, faces = _head_pix(256)
    ref = rasterize_ref(pix, faces, 256, 256)
    out = _cpp(pix, faces, 256, 256)
    covered = int(ref.mask.sum())
    mismatch = int((out.tri_id != ref.tri_id).sum()) / covered
    assert covered > 0.2 * 4 * 256 * 256
    # identical semantics, ties included: no mismatch at all (the bound is < 0.1%)
    assert mismatch == 0.0, f"tri_id mismatch on {100 * mismatch:.4f}% of covered pixels"
    _assert_same(out, ref)
    # the public entry point (auto) takes the C++ path and returns the same
    _assert_same(rasterize(pix, faces, 256, 256), ref, "public")


@needs_ext
def test_thread_counts_block_sizes_and_simd_agree(gen):
    h, w = 61, 47
    verts, faces = _scene(gen, 3, h, w, n_tri=80)
    base = _cpp(verts, faces, h, w, threads=1)
    for threads, block_rows, simd, avx in ((2, 0, True, True), (3, 5, True, True), (2, 1, False, True),
                                           (1, 1000, True, True), (7, 16, False, True), (2, 3, True, False),
                                           (1, 7, True, False)):
        out = _cpp(verts, faces, h, w, threads=threads, block_rows=block_rows, simd=simd, avx=avx)
        for name in ("tri_id", "bary", "depth", "mask"):
            assert torch.equal(getattr(out, name), getattr(base, name)), (threads, block_rows, simd, avx, name)


def _fine_grid(n, h, w, step, gen, jitter=0.3):
    """A jittered grid mesh of small triangles (cells ``step`` pixels wide) over the image: boxes of
    every width around the small-triangle path's limits (8 columns, 32 pixels), thousands of
    fragments per block (fragment-queue flushes), vertices on pixel centres for the edge rule."""
    ny, nx = int(h / step) + 3, int(w / step) + 3  # reaches past the image on every side
    gy, gx = torch.meshgrid(torch.arange(ny, dtype=F64) * step - step / 2,
                            torch.arange(nx, dtype=F64) * step - step / 2, indexing="ij")
    uv = torch.stack([gx, gy], -1).reshape(1, -1, 2).expand(n, -1, -1)
    uv = uv + (torch.rand(n, ny * nx, 2, generator=gen, dtype=F64) - 0.5) * jitter * step
    snap = torch.rand(n, ny * nx, 1, generator=gen) < 0.3
    uv = torch.where(snap, torch.floor(uv) + 0.5, uv)  # some vertices exactly on pixel centres
    z = 1.0 + torch.rand(n, ny * nx, 1, generator=gen, dtype=F64)
    f = []
    for r in range(ny - 1):
        for c in range(nx - 1):
            a, b, cc, d = r * nx + c, r * nx + c + 1, (r + 1) * nx + c + 1, (r + 1) * nx + c
            f += [[a, d, cc], [a, cc, b]]  # 2A < 0 (y-down image): front faces
    faces = torch.tensor(f)
    return torch.cat([uv, z], -1).contiguous(), torch.cat([faces, faces[:: 7]])  # + duplicates: depth ties


@needs_ext
@pytest.mark.parametrize("step", [1.3, 2.5, 4.0, 6.5, 9.0])
def test_small_triangle_paths_and_queue_flushes(gen, step):
    """Grids of small triangles (box widths 1..~12 columns, around the AVX2 path's limits) on odd
    image sizes, several views, small and default row blocks: every path agrees with the reference
    and with the others exactly."""
    h, w = 45, 71
    verts, faces = _fine_grid(5, h, w, step, gen)
    for dtype in (torch.float32, F64):
        v = verts.to(dtype)
        for cull in (True, False):
            ref = rasterize_ref(v, faces, h, w, cull_backfaces=cull)
            assert ref.mask.float().mean() > 0.9
            base = None
            for threads, block_rows, simd, avx in ((0, 0, True, True), (1, 3, True, True), (2, 7, True, False),
                                                   (1, 0, False, False)):
                out = _cpp(v, faces, h, w, cull=cull, threads=threads, block_rows=block_rows, simd=simd, avx=avx)
                _assert_same(out, ref, f"(step {step}, {dtype}, cull {cull}, {threads}, {block_rows}, {simd}, {avx})")
                if base is None:
                    base = out
                for name in ("tri_id", "bary", "depth", "mask"):
                    assert torch.equal(getattr(out, name), getattr(base, name)), (step, threads, block_rows, simd, name)


@needs_ext
def test_many_views_all_culled_and_off_screen(gen):
    h, w = 19, 33
    verts, faces = _fine_grid(11, h, w, 3.0, gen)  # 11 views
    _assert_same(_cpp(verts, faces, h, w, threads=3), rasterize_ref(verts, faces, h, w))
    empty = torch.zeros(0, 3, dtype=torch.int64)
    for v, f, cull in ((verts, faces[:, [0, 2, 1]], True),  # every face a back face
                       (verts + torch.tensor([5.0 * w, 0.0, 0.0], dtype=F64), faces, False),  # all off-screen
                       (verts * torch.tensor([1.0, 1.0, -1.0], dtype=F64), faces, False),  # all behind the camera
                       (verts, empty, True)):
        for simd, avx in ((True, True), (True, False), (False, False)):
            out = _cpp(v, f, h, w, cull=cull, simd=simd, avx=avx)
            assert (out.tri_id == -1).all() and not out.mask.any(), (cull, simd, avx)
            assert (out.depth == 0).all() and (out.bary == 0).all()


@pytest.mark.skipif(not cpu.available(), reason="the C++ extension is not built (no compiler at install time)")
def test_extension_reports_its_vector_paths():
    assert isinstance(cpu._ext.has_avx, bool) and isinstance(cpu._ext.has_avx2, bool)
    assert not cpu._ext.has_avx2 or cpu._ext.has_avx


@needs_ext
def test_wrapper_handles_strides_int32_faces_and_half(gen):
    h, w = 23, 29
    verts, faces = _scene(gen, 2, h, w, dtype=F64)
    ref = rasterize_ref(verts, faces, h, w)
    strided = torch.stack([verts, verts], 1).flatten(0, 1)[::2]  # non-contiguous view of the same values
    assert not strided.is_contiguous()
    _assert_same(rasterize(strided, faces.int(), h, w, impl="cpp"), ref)
    half = verts.half()
    ref_h, out_h = rasterize_ref(half, faces, h, w), rasterize(half, faces, h, w, impl="cpp")
    assert out_h.bary.dtype == torch.float16 and out_h.depth.dtype == torch.float16
    assert torch.equal(out_h.tri_id, ref_h.tri_id)
    torch.testing.assert_close(out_h.depth, ref_h.depth, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out_h.bary, ref_h.bary, rtol=0, atol=2e-3)


@needs_ext
def test_empty_inputs():
    pix = torch.rand(2, 5, 3) + 1
    out = _cpp(pix, torch.zeros(0, 3, dtype=torch.int64), 8, 9)
    assert (out.tri_id == -1).all() and not out.mask.any() and (out.depth == 0).all() and (out.bary == 0).all()
    out = rasterize(torch.zeros(0, 5, 3), torch.tensor([[0, 1, 2]]), 4, 4, impl="cpp")
    assert out.tri_id.shape == (0, 4, 4)


@needs_ext
@pytest.mark.parametrize("c", [1, 3, 7])
def test_interpolate_matches_reference(gen, c):
    h, w = 37, 44
    for vdtype, adtype in ((torch.float32, torch.float32), (F64, F64), (torch.float32, F64), (F64, torch.float32)):
        verts, faces = _scene(gen, 2, h, w, dtype=vdtype)
        frags = rasterize(verts, faces, h, w, impl="cpp")
        attrs = torch.randn(2, verts.shape[1], c, generator=gen, dtype=F64).to(adtype)
        ref = interpolate_ref(attrs, faces, frags)
        out = torch.full(ref.shape, float("nan"), dtype=adtype)
        cpu._ext.interpolate(attrs.numpy(), faces.numpy(), frags.tri_id.numpy(), frags.bary.numpy(),
                             frags.mask.numpy(), out.numpy(), 2)
        torch.testing.assert_close(out, ref, **TOL[adtype])
        torch.testing.assert_close(interpolate(attrs, faces, frags, impl="cpp"), ref, **TOL[adtype])
        assert (out[~frags.mask] == 0).all()


# ----------------------------------------------------------------------------------- dispatch
def _spy(monkeypatch):
    calls = []
    real_ref, real_cpp = rast.rasterize_ref, cpu.rasterize
    monkeypatch.setattr(rast, "rasterize_ref", lambda *a, **k: (calls.append("ref"), real_ref(*a, **k))[1])
    monkeypatch.setattr(cpu, "rasterize", lambda *a, **k: (calls.append("cpp"), real_cpp(*a, **k))[1])
    return calls


@needs_ext
@pytest.mark.parametrize("env, expect", [("ref", "ref"), ("cpp", "cpp"), ("auto", "cpp"), ("", "cpp")])
def test_mvp_kernels_env_picks_the_implementation(monkeypatch, env, expect):
    from mvportrait.render.cameras import view_rig
    from mvportrait.render.renderer import render

    calls = _spy(monkeypatch)
    monkeypatch.setenv("MVP_KERNELS", env)
    verts = torch.tensor([[-0.1, -0.1, 0.0], [0.1, -0.1, 0.0], [0.0, 0.1, 0.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 1]])
    out = render(verts, faces, view_rig("front", height=16, width=16), modes=("mask",))
    assert calls == [expect] and out.mask.sum() > 0
    # an explicit impl= wins over the environment
    calls.clear()
    other = "ref" if expect == "cpp" else "cpp"
    out2 = render(verts, faces, view_rig("front", height=16, width=16), modes=("mask",), impl=other)
    assert calls == [other] and torch.equal(out.mask, out2.mask)


def test_bad_impl_raises():
    pix, faces = torch.rand(1, 3, 3) + 1, torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="impl must be one of"):
        rasterize(pix, faces, 4, 4, impl="fast")


def test_device_and_missing_extension_rules(monkeypatch):
    expected = "triton" if importlib.util.find_spec("triton") is not None else "ref"
    assert rast._pick_impl("auto", torch.device("cuda"), "rasterizer") == expected
    with pytest.raises(ValueError, match="CPU tensors"):
        rast._pick_impl("cpp", torch.device("cuda"), "rasterizer")
    monkeypatch.setattr(cpu, "_ext", None)
    assert rast._pick_impl("auto", torch.device("cpu"), "rasterizer") == "ref"
    with pytest.raises(RuntimeError, match="pip install -e"):
        rasterize(torch.rand(1, 3, 3) + 1, torch.tensor([[0, 1, 2]]), 4, 4, impl="cpp")
    # auto still works (reference)
    assert rasterize(torch.rand(1, 3, 3) + 1, torch.tensor([[0, 1, 2]]), 4, 4).tri_id.shape == (1, 4, 4)


def test_warning_logged_when_extension_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mvportrait.kernels.cpu._rasterize_cpp", None)  # import -> ImportError
    if hasattr(cpu, "_rasterize_cpp"):
        monkeypatch.delattr(cpu, "_rasterize_cpp")  # else `from . import` finds the loaded submodule
    try:
        with caplog.at_level(logging.WARNING, logger="mvportrait.kernels.cpu"):
            importlib.reload(cpu)
        assert not cpu.available()
        assert "C++ rasterizer not built; using the PyTorch reference" in caplog.text
    finally:
        monkeypatch.undo()
        importlib.reload(cpu)


# -------------------------------------------------------------------------------- bad inputs
@needs_ext
def test_extension_rejects_bad_buffers():
    pix = (torch.rand(1, 4, 3) + 1).numpy()
    faces = torch.tensor([[0, 1, 2]]).numpy()
    good = [t.numpy() for t in _poisoned(1, 5, 6, torch.float32)]

    def call(**kw):
        args = dict(verts=pix, faces=faces, height=5, width=6, cull_backfaces=True, near=1e-4, tri_id=good[0],
                    bary=good[1], depth=good[2], mask=good[3])
        args.update(kw)
        cpu._ext.rasterize(**args)

    call()
    with pytest.raises(ValueError, match="tri_id must have shape"):
        call(tri_id=torch.zeros(1, 5, 7, dtype=torch.int64).numpy())
    with pytest.raises(ValueError, match="dtype of verts"):
        call(bary=torch.zeros(1, 5, 6, 3, dtype=F64).numpy())
    with pytest.raises(ValueError, match="C-contiguous"):
        call(depth=torch.zeros(1, 6, 5).numpy().transpose(0, 2, 1))
    with pytest.raises(ValueError, match=r"faces index vertices in \[0, 4\], but there are 4 vertices"):
        call(faces=torch.tensor([[0, 1, 4]]).numpy())
    with pytest.raises(ValueError, match="int64"):
        call(faces=torch.tensor([[0, 1, 2]], dtype=torch.int32).numpy())
    with pytest.raises(ValueError, match="float32 or float64"):
        call(verts=torch.ones(1, 4, 3, dtype=torch.float16).numpy())
    with pytest.raises(ValueError, match="mask must be bool"):
        call(mask=torch.zeros(1, 5, 6, dtype=torch.uint8).numpy())
    with pytest.raises(ValueError, match="writeable"):
        ro = torch.zeros(1, 5, 6).numpy()
        ro.flags.writeable = False
        call(depth=ro)
    with pytest.raises(TypeError):  # no silent conversion (copy) of non-numpy buffers
        call(depth=torch.zeros(1, 5, 6))


@needs_ext
@pytest.mark.parametrize("case, exc, match", [
    (dict(verts_pix=torch.rand(4, 3)), ValueError, "shape"),
    (dict(verts_pix=torch.ones(1, 4, 3, dtype=torch.int64)), ValueError, "floating"),
    (dict(verts_pix=torch.tensor([[[1.0, 1.0, 1.0], [2.0, float("nan"), 1.0], [3.0, 1.0, 1.0], [1.0, 3.0, 1.0]]])),
     ValueError, "NaN or infinite"),
    (dict(verts_pix=torch.tensor([[[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [3.0, 1.0, 1.0], [1.0, 3.0, float("inf")]]])),
     ValueError, "NaN or infinite"),  # an unused vertex counts too, as in the reference check
    (dict(faces=torch.tensor([[0, 1, 4]])), ValueError, r"in \[0, 4\], but there are 4 vertices"),
    (dict(faces=torch.tensor([[0, -1, 2]])), ValueError, r"in \[-1, 2\]"),
    (dict(faces=torch.tensor([[0.0, 1.0, 2.0]])), ValueError, "int64"),
    (dict(height=0), ValueError, "height"),
    (dict(near=-1.0), ValueError, "near"),
])
def test_public_entry_validates_before_cpp(case, exc, match):
    args = dict(verts_pix=torch.rand(1, 4, 3) + 1, faces=torch.tensor([[0, 1, 2]]), height=8, width=8, near=1e-4)
    args.update(case)
    with pytest.raises(exc, match=match):
        rasterize(args["verts_pix"], args["faces"], args["height"], args["width"], near=args["near"], impl="cpp")


@pytest.mark.parametrize("impl", ["ref", pytest.param("cpp", marks=needs_ext)])
def test_interpolate_rejects_bad_attrs_and_fragments(impl):
    pix = torch.tensor([[[1.0, 1.0, 1.0], [7.0, 1.0, 1.0], [1.0, 7.0, 1.0]]])
    faces = torch.tensor([[0, 1, 2]])
    frags = rasterize(pix, faces, 8, 8, cull_backfaces=False, impl=impl)
    assert frags.mask.any()
    attrs = torch.rand(1, 3, 2)
    bad = attrs.clone()
    bad[0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="attrs contains NaN or infinite values"):
        interpolate(bad, faces, frags, impl=impl)
    broken = Fragments(torch.where(frags.mask, 5, -1), frags.bary, frags.depth, frags.mask)
    with pytest.raises(ValueError, match="fragments reference face 5, but faces has 1 rows"):
        interpolate(attrs, faces, broken, impl=impl)
    with pytest.raises(ValueError, match=r"faces index vertices in \[0, 3\]"):
        interpolate(attrs, torch.tensor([[0, 1, 3]]), frags, impl=impl)


@needs_ext
def test_normal_map_matches_reference(gen):
    h, w = 41, 38
    for vdtype, ndtype in ((torch.float32, torch.float32), (F64, F64), (torch.float32, F64)):
        verts, faces = _scene(gen, 2, h, w, dtype=vdtype)
        frags = rasterize(verts, faces, h, w, impl="cpp")
        normals = torch.randn(2, verts.shape[1], 3, generator=gen, dtype=F64).to(ndtype)
        normals[0, :5] = 0  # zero-length normals: |n| clamped, unit 0 at such corners
        ref_unit, ref_rgb = rast.normal_map_ref(normals, faces, frags)
        unit = torch.full(ref_unit.shape, float("nan"), dtype=ndtype)
        rgb = torch.full(ref_rgb.shape, float("nan"), dtype=ndtype)
        cpu._ext.normal_map(normals.numpy(), faces.numpy(), frags.tri_id.numpy(), frags.bary.numpy(),
                            frags.mask.numpy(), unit.numpy(), rgb.numpy(), 2)
        tol = dict(rtol=1e-5, atol=1e-5) if ndtype == torch.float32 else TOL[F64]
        torch.testing.assert_close(unit, ref_unit, **tol)
        torch.testing.assert_close(rgb, ref_rgb, **tol)
        assert (rgb[~frags.mask] == 0).all() and (unit[~frags.mask] == 0).all()
        for impl in ("cpp", "ref"):
            u2, r2 = rast.normal_map(normals, faces, frags, impl=impl)
            torch.testing.assert_close(u2, ref_unit, **tol)
            torch.testing.assert_close(r2, ref_rgb, **tol)


@pytest.mark.parametrize("impl", ["ref", pytest.param("cpp", marks=needs_ext)])
def test_normal_map_rejects_bad_inputs(impl):
    pix = torch.tensor([[[1.0, 1.0, 1.0], [7.0, 1.0, 1.0], [1.0, 7.0, 1.0]]])
    faces = torch.tensor([[0, 1, 2]])
    frags = rasterize(pix, faces, 8, 8, cull_backfaces=False, impl=impl)
    with pytest.raises(ValueError, match=r"\(N, Nv, 3\)"):
        rast.normal_map(torch.rand(1, 3, 2), faces, frags, impl=impl)
    with pytest.raises(ValueError, match="N=1"):
        rast.normal_map(torch.rand(2, 3, 3), faces, frags, impl=impl)
    bad = torch.rand(1, 3, 3)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="normals contain NaN"):
        rast.normal_map(bad, faces, frags, impl=impl)
    broken = Fragments(torch.where(frags.mask, 3, -1), frags.bary, frags.depth, frags.mask)
    with pytest.raises(ValueError, match="fragments reference face 3"):
        rast.normal_map(torch.rand(1, 3, 3), faces, broken, impl=impl)


@needs_ext
def test_render_cpp_matches_render_ref():
    from mvportrait.flame.synthetic import synthetic_head
    from mvportrait.render.cameras import view_rig
    from mvportrait.render.renderer import render

    m = synthetic_head(0, flame_size=True).model
    verts = torch.as_tensor(m.v_template, dtype=torch.float32)  # (Nv, 3) rest pose
    rig = view_rig("ring-4", height=64, width=48)
    a = render(verts, m.faces, rig, impl="cpp")
    b = render(verts, m.faces, rig, impl="ref")
    for mode, x in a.items():
        torch.testing.assert_close(x, b[mode], rtol=1e-5, atol=1e-5, msg=lambda s, mode=mode: f"{mode}: {s}")
