"""The Triton rasterizer's counting bin (``binning="count"``) against its sort bin and the reference.

The counting bin replaces the sort + searchsorted of step 2 (module docstring of
:mod:`mvportrait.kernels.rasterize_triton`) by per-tile atomic counts, a cumsum and an atomic
scatter; its lists come out in an order the atomics decide, which the raster kernel must not see.
So everything here is bit for bit: the Fragments of both modes (and of ``rasterize_ref``), exact
and capacity (no-sync) paths, ``stat``, overflow reports, the kernel's lists as multisets. Without
CUDA the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported) at small sizes; ``gpu``-marked tests run the 4 x 512^2 head compiled. Outputs
are poisoned (tri_id -7, floats NaN, mask True) before the calls so unwritten elements fail. The
scene generators are the ones of test_rasterize_triton.py (imported: same folder).
"""
import importlib.util
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from test_rasterize_triton import _assert_same, _head_pix, _poisoned, _scene  # noqa: E402

from mvportrait.kernels import rasterize as rast  # noqa: E402
from mvportrait.kernels import rasterize_triton as RT  # noqa: E402
from mvportrait.kernels.rasterize import Fragments, rasterize_ref  # noqa: E402

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package"),
              pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]
DEV = "cuda" if CUDA else "cpu"
F64 = torch.float64
FIELDS = ("tri_id", "bary", "depth", "mask")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (full-size Triton rasterizer)")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def _run(pix, faces, h, w, binning, **kw) -> Fragments:
    """The exact path (no graph) of one binning mode into poisoned buffers, returned on the CPU."""
    out = _poisoned(pix.shape[0], h, w, pix.dtype)
    assert RT.rasterize_triton(pix.to(DEV), faces.to(DEV), h, w, out=out, graph=False, binning=binning, **kw) is out
    return Fragments(*(t.cpu() for t in (out.tri_id, out.bary, out.depth, out.mask)))


def _no_sync(pix, faces, h, w, capacity, binning, **kw):
    out = _poisoned(pix.shape[0], h, w, pix.dtype)
    got, stat = RT.rasterize_triton_no_sync(pix.to(DEV), faces.to(DEV), h, w, capacity, out=out, binning=binning,
                                            **kw)
    assert got is out and stat.dtype == torch.int64 and stat.shape == (2,) and stat.device == out.tri_id.device
    return Fragments(*(t.cpu() for t in (out.tri_id, out.bary, out.depth, out.mask))), stat.tolist()


def _assert_equal(a: Fragments, b: Fragments, msg=""):
    for name in FIELDS:  # bit-identical (NaN poison left anywhere fails too)
        assert torch.equal(getattr(a, name), getattr(b, name)), f"{name} differs {msg}"


# ------------------------------------------------------------------------- exact path, CPU sizes
@pytest.mark.parametrize("hw, n, cull, dtype, kw", [
    ((24, 40), 1, True, torch.float32, {}),
    ((33, 17), 3, False, torch.float32, {}),
    ((1, 1), 2, True, torch.float32, {}),
    ((21, 26), 2, False, F64, dict(tile=(8, 16), block_t=8)),  # lists end mid-step
    ((19, 23), 2, True, F64, dict(tile=8, block_t=1)),
])
def test_count_matches_sort_and_reference(gen, hw, n, cull, dtype, kw):
    """Random scenes (soup, shared-edge grid with snapped vertices, huge triangles, duplicated
    faces: exact depth ties), odd sizes, several images, culling on and off: bit-identical."""
    h, w = hw
    verts, faces = _scene(gen, n, h, w, n_tri=30, dtype=dtype)
    msg = f"(seed {gen.initial_seed()})"
    count = _run(verts, faces, h, w, "count", cull_backfaces=cull, **kw)
    _assert_equal(count, _run(verts, faces, h, w, "sort", cull_backfaces=cull, **kw), f"count vs sort {msg}")
    ref = rasterize_ref(verts, faces, h, w, cull_backfaces=cull)
    _assert_equal(count, ref, f"count vs rasterize_ref {msg}")
    assert h == 1 or ref.mask.any()


def test_count_many_triangles_in_one_tile(gen):
    """300 small triangles in one 16x16 tile at three depths (many exact ties, duplicated faces in
    both vertex orders): a long list, its order set by the atomics, 2 and 64 triangles per step."""
    m = 300
    c = torch.rand(m, 1, 2, generator=gen, dtype=F64) * 12 + 2
    uv = torch.round((c + torch.randn(m, 3, 2, generator=gen, dtype=F64) * 3) * 2) / 2
    z = (torch.randint(1, 4, (m, 1, 1), generator=gen).to(F64) * 0.5).expand(m, 3, 1)
    verts = torch.cat([uv, z], -1).reshape(1, -1, 3)
    faces = torch.arange(3 * m).reshape(-1, 3)
    faces = torch.cat([faces, faces[::3], faces[1::5, [2, 0, 1]]])
    for cull in (True, False):
        ref = rasterize_ref(verts, faces, 16, 16, cull_backfaces=cull)
        assert ref.mask.sum() > 50
        for block_t in (2, 64):
            msg = f"(cull {cull}, block_t {block_t}, seed {gen.initial_seed()})"
            count = _run(verts, faces, 16, 16, "count", cull_backfaces=cull, tile=16, block_t=block_t)
            _assert_equal(count, ref, msg)
            _assert_equal(count, _run(verts, faces, 16, 16, "sort", cull_backfaces=cull, tile=16, block_t=block_t),
                          msg)


def test_count_nothing_visible_and_empty_inputs():
    """No pair at all (E = 0), no face (F = 0), no image (N = 0): every element written, empty."""
    pix = torch.tensor([[[5.0, 5.0, 1.0], [5.0, 5.0, 1.0], [9.0, 2.0, 1.0],  # zero area
                         [-9.0, 1.0, 1.0], [-2.0, 1.0, 1.0], [-5.0, 6.0, 1.0],  # left of the image
                         [1.0, 1.0, -1.0], [8.0, 1.0, 2.0], [1.0, 8.0, 2.0],  # a vertex behind
                         [0.2, 0.2, 1.0], [0.4, 0.2, 1.0], [0.3, 0.4, 1.0]]])  # between pixel centres
    pix = pix.expand(2, -1, -1).contiguous()
    faces = torch.arange(12).reshape(-1, 3)
    ref = rasterize_ref(pix, faces, 9, 11, cull_backfaces=False)
    assert not ref.mask.any()
    _assert_equal(_run(pix, faces, 9, 11, "count", cull_backfaces=False), ref)
    for cap in (1, 7):
        got, stat = _no_sync(pix, faces, 9, 11, cap, "count", cull_backfaces=False)
        assert stat == [0, 0]
        _assert_equal(got, ref, f"(capacity {cap})")
    none = torch.zeros(0, 3, dtype=torch.int64)
    got = _run(torch.rand(2, 5, 3) + 1, none, 8, 9, "count")
    assert (got.tri_id == -1).all() and not got.mask.any() and (got.depth == 0).all() and (got.bary == 0).all()
    got = RT.rasterize_triton(torch.zeros(0, 5, 3, device=DEV), faces.to(DEV), 4, 4, binning="count")
    assert got.tri_id.shape == (0, 4, 4)


def test_raster_kernel_ignores_list_order(gen, monkeypatch):
    """What the counting bin relies on: the raster kernel's result does not depend on the order of
    a tile's list. Every list is reversed, then shuffled, before the kernel runs: same bits."""
    real = RT.launcher
    order = {"how": None, "runs": 0, "long": 0}

    class _Shuffled:
        def __init__(self, launch):
            self.launch = launch

        def __getitem__(self, grid):
            def run(rec, lists, perm, starts, *rest, **kw):
                assert kw["PERM"] is False
                ends = starts.cpu().tolist()
                src = lists.clone()
                order["runs"] += 1
                order["long"] += sum(hi - lo > 2 for lo, hi in zip(ends[:-1], ends[1:]))
                for lo, hi in zip(ends[:-1], ends[1:]):
                    idx = (torch.arange(hi - 1, lo - 1, -1) if order["how"] == "reverse"
                           else lo + torch.randperm(hi - lo, generator=gen))
                    lists[lo:hi] = src[idx.to(lists.device)]
                return self.launch[grid](rec, lists, perm, starts, *rest, **kw)
            return run

    def spy(kernel, *a):
        launch = real(kernel, *a)
        return _Shuffled(launch) if kernel is RT._raster_tiles_kernel and order["how"] else launch

    monkeypatch.setattr(RT, "launcher", spy)
    h, w = 21, 26
    verts, faces = _scene(gen, 2, h, w, n_tri=40)
    for cull in (True, False):
        want = rasterize_ref(verts, faces, h, w, cull_backfaces=cull)
        for how in ("reverse", "shuffle"):
            order["how"] = how
            got = _run(verts, faces, h, w, "count", cull_backfaces=cull, tile=8, block_t=4)
            _assert_equal(got, want, f"({how}, cull {cull}, seed {gen.initial_seed()})")
    assert order["runs"] == 4 and order["long"] > 20  # the lists were there to reorder


# --------------------------------------------------------------------- capacity (no-sync) path
@pytest.mark.parametrize("hw, n, cull", [((26, 31), 3, False), ((17, 40), 1, True)])
def test_count_no_sync_matches_exact_and_reports_overflow(gen, hw, n, cull):
    """capacity >= E: stat = [E, 0] (as the sort bin's) and bit-identical to both exact paths;
    capacity < E: stat still says E (the caller reruns the exact path), nothing crashes, every
    pixel is written with an id of a real face (the lists are clamped to the buffer)."""
    h, w = hw
    verts, faces = _scene(gen, n, h, w, n_tri=30)
    msg = f"(seed {gen.initial_seed()})"
    exact = _run(verts, faces, h, w, "count", cull_backfaces=cull)
    _assert_equal(exact, _run(verts, faces, h, w, "sort", cull_backfaces=cull), msg)
    _, sort_stat = _no_sync(verts, faces, h, w, 1 << 16, "sort", cull_backfaces=cull)
    e = sort_stat[0]
    assert e > 8 and sort_stat == [e, 0]
    for cap in (e, e + 37, 4 * e + 5):
        got, stat = _no_sync(verts, faces, h, w, cap, "count", cull_backfaces=cull)
        assert stat == [e, 0], (cap, stat)
        _assert_equal(got, exact, f"(capacity {cap}, E {e}) {msg}")
    for cap in (1, e // 3, e - 1):
        got, stat = _no_sync(verts, faces, h, w, cap, "count", cull_backfaces=cull)
        assert stat == [e, 0] and stat[0] > cap
        assert ((got.tri_id >= -1) & (got.tri_id < faces.shape[0])).all(), f"(capacity {cap}) {msg}"
        assert torch.equal(got.mask, got.tri_id >= 0) and not got.depth.isnan().any() and not got.bary.isnan().any()


def test_count_kernel_lists_and_capacity():
    """``_raster_count_kernel`` on hand-made rectangles (2 images x 3 faces, 4 x 4 tiles): pass 1
    counts every tile's pairs; pass 2 gives each slot below the capacity a triangle of the tile
    that owns it (each tile's list the right multiset), never writes at or past the capacity, and
    counts the counters back to zero."""
    cnt = torch.tensor([3, 0, 5, 2, 4, 6], dtype=torch.int32)  # per triangle t = image * 3 + face
    rect = torch.tensor([[1, 0, 3], [0, 0, 1], [0, 1, 2], [2, 2, 1], [0, 0, 2], [1, 1, 3]], dtype=torch.int32)
    nf, f, tx, tpi = 6, 3, 4, 16
    want = [[] for _ in range(2 * tpi)]
    for t in range(nf):
        tx0, ty0, tw = rect[t].tolist()
        for k in range(int(cnt[t])):
            want[(t // f) * tpi + (ty0 + k // tw) * tx + tx0 + k % tw].append(t)
    e = sum(map(len, want))
    dev = torch.device(DEV)
    kern = RT.launcher(RT._raster_count_kernel, dev, "test")
    for cap in (e + 5, e, e - 3, 7, 1):
        tc = torch.zeros(2 * tpi + 1, dtype=torch.int32, device=dev)
        kern[(1,)](cnt.to(dev), rect.to(dev), tc, tc, tc, nf, f, tx, tpi, 0, SCATTER=False, BLOCK=8)
        assert tc.tolist() == [0] + [len(x) for x in want]
        ends = tc.cumsum(0)
        lists = torch.full((cap + 8,), -5, dtype=torch.int32, device=dev)
        kern[(1,)](cnt.to(dev), rect.to(dev), tc, ends, lists, nf, f, tx, tpi, cap, SCATTER=True, BLOCK=8)
        assert (tc == 0).all(), cap
        got, ends = lists.cpu().tolist(), ends.cpu().tolist()
        m = min(cap, e)
        assert all(x == -5 for x in got[m:]), f"wrote at or past capacity {cap}"
        for k in range(2 * tpi):
            lo, hi = ends[k], ends[k + 1]
            if hi <= m:
                assert sorted(got[lo:hi]) == sorted(want[k]), (cap, k)
            else:
                assert all(x in want[k] for x in got[lo:m]), (cap, k)


def test_count_flags_bad_input_like_sort(gen):
    """Non-finite vertices (used or not) and out-of-range faces: stat[1] as the sort bin's (> 0),
    and the exact path raises the reference's messages."""
    h, w = 12, 14
    verts, faces = _scene(gen, 2, h, w, n_tri=12)
    cases = []
    for value, where in ((float("nan"), (1, 4, 2)), (float("inf"), (0, 0, 0)), (float("-inf"), (1, -1, 1))):
        bad = verts.clone()
        bad[where] = value
        cases.append((bad, faces, "NaN or infinite"))
    for idx in (verts.shape[1], -1):
        bad_faces = faces.clone()
        bad_faces[3, 1] = idx
        cases.append((verts, bad_faces, "faces index vertices in"))
    assert _no_sync(verts, faces, h, w, 1 << 12, "count")[1][1] == 0
    for pix, fc, match in cases:
        stat = _no_sync(pix, fc, h, w, 1 << 12, "count")[1]
        assert stat[1] > 0 and stat == _no_sync(pix, fc, h, w, 1 << 12, "sort")[1], match
        with pytest.raises(ValueError, match=match):
            RT.rasterize_triton(pix.to(DEV), fc.to(DEV), h, w, graph=False, binning="count")


# ------------------------------------------------------------------------------ the option
def test_binning_option_and_default(gen, monkeypatch):
    """Bad values raise a ValueError naming the choices; ``None`` takes ``BINNING`` (read per
    call, "count" as shipped: faster on an H200), which the public ``rasterize`` follows too."""
    assert RT.BINNING == "count" and RT.BINNINGS == ("sort", "count")
    h, w = 9, 10
    verts, faces = _scene(gen, 1, h, w, n_tri=4)
    pix, fc = verts.to(DEV), faces.to(DEV)
    nrm = torch.randn(pix.shape, device=DEV)
    for bad in ("radix", "Count", "", 1, True, ("count",)):
        with pytest.raises(ValueError, match=r"binning must be one of 'sort', 'count'"):
            RT.rasterize_triton(pix, fc, h, w, binning=bad)
        with pytest.raises(ValueError, match=r"binning must be one of 'sort', 'count'"):
            RT.rasterize_triton_no_sync(pix, fc, h, w, 64, binning=bad)
        with pytest.raises(ValueError, match=r"binning must be one of 'sort', 'count'"):
            RT.rasterize_normal_map_triton(pix, nrm, fc, h, w, binning=bad)
    launched = []
    real = RT.launcher
    monkeypatch.setattr(RT, "launcher", lambda kernel, *a: (launched.append(kernel.__name__), real(kernel, *a))[1])

    def kernels(fn):
        launched.clear()
        fn()
        return set(launched)

    sort_k, count_k = "_raster_bin_kernel", "_raster_count_kernel"
    for fn in (lambda: RT.rasterize_triton(pix, fc, h, w, graph=False),
               lambda: RT.rasterize_triton_no_sync(pix, fc, h, w, 64),
               lambda: rast.rasterize(pix, fc, h, w, impl="triton", graph=False)):
        ks = kernels(fn)
        assert count_k in ks and sort_k not in ks
    assert sort_k in kernels(lambda: RT.rasterize_triton(pix, fc, h, w, graph=False, binning="sort"))
    monkeypatch.setattr(RT, "BINNING", "sort")
    for fn in (lambda: RT.rasterize_triton(pix, fc, h, w, graph=False),
               lambda: rast.rasterize(pix, fc, h, w, impl="triton", graph=False)):
        ks = kernels(fn)
        assert sort_k in ks and count_k not in ks
    monkeypatch.setattr(RT, "BINNING", "bogus")
    with pytest.raises(ValueError, match=r"rasterize_triton.BINNING must be one of"):
        RT.rasterize_triton(pix, fc, h, w)


# ------------------------------------------------------------------------------ full size, GPU
@gpu
@needs_cuda
def test_gpu_count_head_four_views_512():
    """4 views x 512^2 of the 9,976-face head: the counting bin bit for bit equal to the sort bin
    (exact and capacity paths, two runs: the atomics' order must not show) and to the reference's
    ids; no host sync in the capacity path; overflow reported."""
    import warnings

    h = w = 512
    pix, faces = _head_pix(h, w)
    ref = rasterize_ref(pix, faces, h, w)
    sort = _run(pix, faces, h, w, "sort")
    count = _run(pix, faces, h, w, "count")
    _assert_equal(count, sort, "(head 4x512^2)")
    _assert_equal(_run(pix, faces, h, w, "count"), count, "(second run)")
    assert int(ref.mask.sum()) > 0.15 * 4 * h * w
    _assert_same(count, ref, "head 4x512^2 count", tol=dict(rtol=0, atol=1e-4))
    _, (e, bad) = _no_sync(pix, faces, h, w, 1 << 20, "sort")
    assert bad == 0 and e > 10_000
    cap = RT._capacity_for(e)
    got, stat = _no_sync(pix, faces, h, w, cap, "count")
    assert stat == [e, 0]
    _assert_equal(got, count, f"(capacity {cap})")
    assert _no_sync(pix, faces, h, w, e - 1, "count")[1] == [e, 0]
    pd, fd = pix.cuda(), faces.cuda()
    RT.rasterize_triton_no_sync(pd, fd, h, w, cap, binning="count")  # compiled already: no first-call work
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _, stat = RT.rasterize_triton_no_sync(pd, fd, h, w, cap, binning="count")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(r.message) for r in rec if "called a synchronizing" in str(r.message)]
    assert not syncs, syncs
    assert stat.tolist() == [e, 0]


@gpu
@needs_cuda
@pytest.mark.parametrize("hw, n", [((257, 255), 3), ((1, 1), 1)])
def test_gpu_count_random_scenes_large(hw, n):
    g = torch.Generator().manual_seed(random.randrange(2**31))
    h, w = hw
    verts, faces = _scene(g, n, h, w, n_tri=300)
    for cull in (True, False):
        count = _run(verts, faces, h, w, "count", cull_backfaces=cull)
        _assert_equal(count, _run(verts, faces, h, w, "sort", cull_backfaces=cull), f"(seed {g.initial_seed()})")
        _assert_same(count, rasterize_ref(verts, faces, h, w, cull_backfaces=cull), f"(seed {g.initial_seed()})")
