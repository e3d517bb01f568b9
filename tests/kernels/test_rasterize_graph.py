"""The Triton rasterizer's no-sync capacity pipeline and its CUDA-graph path (``graph=...``).

On the CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported) at tiny sizes: the capacity pipeline against the exact one (bit for
bit), its overflow and check reports, and the graph path's logic (capacity learning, overflow
rerun, errors, no aliasing) with a stand-in for ``GraphCache`` that keeps fixed output buffers
like a graph. ``gpu``-marked tests replay real CUDA graphs. Outputs are poisoned (tri_id -7,
floats NaN, mask True) before the calls so unwritten elements fail.
"""
import importlib.util
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from mvportrait.kernels import _graphs  # noqa: E402
from mvportrait.kernels import rasterize as rast  # noqa: E402
from mvportrait.kernels import rasterize_triton as RT  # noqa: E402
from mvportrait.kernels.rasterize import Fragments, rasterize_ref  # noqa: E402

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package"),
              pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]
DEV = "cuda" if CUDA else "cpu"
F64 = torch.float64
FIELDS = ("tri_id", "bary", "depth", "mask")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graph replay)")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


@pytest.fixture
def fresh(monkeypatch):
    """Empty capacity table and graph cache for the test (the module's own ones untouched)."""
    monkeypatch.setattr(RT, "_CAPACITY", {})
    monkeypatch.setattr(RT, "GRAPHS", _graphs.GraphCache("rasterize-test"))


def _poisoned(n, h, w, dtype=torch.float32) -> Fragments:
    return Fragments(torch.full((n, h, w), -7, dtype=torch.int64, device=DEV),
                     torch.full((n, h, w, 3), float("nan"), dtype=dtype, device=DEV),
                     torch.full((n, h, w), float("nan"), dtype=dtype, device=DEV),
                     torch.ones((n, h, w), dtype=torch.bool, device=DEV))


def _scene(gen, n, h, w, n_tri=30, behind=False):
    """Random triangle soups (N, Nv, 3) [u, v, z] (sub-pixel to image-sized, some off-screen,
    some behind the camera or at ``near``) and faces with exact duplicates (depth ties)."""
    s = max(h, w)
    centre = (torch.rand(n, n_tri, 1, 2, generator=gen, dtype=F64) * 1.6 - 0.3) * torch.tensor([w, h], dtype=F64)
    size = torch.exp(torch.rand(n, n_tri, 1, 1, generator=gen, dtype=F64) * 5 - 3) * s / 3
    uv = centre + torch.randn(n, n_tri, 3, 2, generator=gen, dtype=F64) * size
    z = 0.5 + 3 * torch.rand(n, n_tri, 3, 1, generator=gen, dtype=F64)
    roll = torch.rand(n, n_tri, 3, 1, generator=gen, dtype=F64)
    z = torch.where(roll < 0.05, -z, torch.where(roll > 0.97, torch.full_like(z, 1e-4), z))
    if behind:
        z = -z.abs()
    verts = torch.cat([uv, z], -1).reshape(n, -1, 3)
    faces = torch.arange(3 * n_tri).reshape(-1, 3)
    dup = faces[torch.randint(0, n_tri, (6,), generator=gen)]
    faces = torch.cat([faces, dup, dup[:, [1, 2, 0]]])
    faces = faces[torch.randperm(len(faces), generator=gen)]
    return verts.float().contiguous().to(DEV), faces.to(DEV)


def _exact(pix, faces, h, w, **kw) -> Fragments:
    out = _poisoned(pix.shape[0], h, w, pix.dtype)
    assert RT.rasterize_triton(pix, faces, h, w, out=out, graph=False, **kw) is out
    return out


def _no_sync(pix, faces, h, w, capacity, **kw):
    out = _poisoned(pix.shape[0], h, w, pix.dtype)
    got, stat = RT.rasterize_triton_no_sync(pix, faces, h, w, capacity, out=out, **kw)
    assert got is out and stat.dtype == torch.int64 and stat.shape == (2,) and stat.device == pix.device
    return out, stat.tolist()


def _assert_equal(a: Fragments, b: Fragments, msg=""):
    for name in FIELDS:  # bit-identical (NaN poison left anywhere fails too)
        assert torch.equal(getattr(a, name), getattr(b, name)), f"{name} differs {msg}"


def _pairs(pix, faces, h, w, **kw) -> int:
    return _no_sync(pix, faces, h, w, 1 << 20, **kw)[1][0]


# ----------------------------------------------------------------------- capacity pipeline (CPU)
@pytest.mark.parametrize("hw, n, cull", [((24, 40), 1, True), ((33, 17), 3, False), ((1, 1), 2, False)])
def test_no_sync_matches_exact_path(gen, hw, n, cull):
    """capacity >= E: bit-identical Fragments (padding sorts last, never read), stat = [E, 0]."""
    h, w = hw
    pix, faces = _scene(gen, n, h, w)
    exact = _exact(pix, faces, h, w, cull_backfaces=cull)
    ref = rasterize_ref(pix.cpu(), faces.cpu(), h, w, cull_backfaces=cull)
    assert torch.equal(exact.tri_id.cpu(), ref.tri_id)
    e = _pairs(pix, faces, h, w, cull_backfaces=cull)
    assert e > 0 or h == 1
    for cap in {max(e, 1), e + 37, 4 * e + 5}:
        got, stat = _no_sync(pix, faces, h, w, cap, cull_backfaces=cull)
        assert stat == [e, 0]
        _assert_equal(got, exact, f"(capacity {cap}, E {e}, seed {gen.initial_seed()})")


def test_no_sync_tiles_and_nothing_visible(gen):
    """Other tile shapes / triangle steps; a scene with no pair at all (E = 0: only padding)."""
    h, w = 21, 30
    pix, faces = _scene(gen, 2, h, w, n_tri=20)
    for tile, block_t in (((8, 16), 2), (8, 1)):
        e = _pairs(pix, faces, h, w, tile=tile, block_t=block_t)
        got, stat = _no_sync(pix, faces, h, w, e + 3, tile=tile, block_t=block_t)
        assert stat == [e, 0]
        _assert_equal(got, _exact(pix, faces, h, w, tile=tile, block_t=block_t), f"(tile {tile})")
    pix, faces = _scene(gen, 2, h, w, n_tri=10, behind=True)
    got, stat = _no_sync(pix, faces, h, w, 5)
    assert stat == [0, 0] and not got.mask.any() and (got.tri_id == -1).all()
    _assert_equal(got, _exact(pix, faces, h, w))


def test_no_sync_reports_overflow(gen):
    """capacity < E: stat says E > capacity (the caller reruns the exact path); nothing crashes."""
    h, w = 26, 31
    pix, faces = _scene(gen, 3, h, w, n_tri=40)
    e = _pairs(pix, faces, h, w)
    assert e > 8
    for cap in (1, e // 3, e - 1):
        _, stat = _no_sync(pix, faces, h, w, cap)
        assert stat == [e, 0] and stat[0] > cap


def test_bin_kernel_never_writes_past_capacity():
    """The binning kernel drops the pairs at positions >= CAP and writes every one below it."""
    cnt = torch.tensor([3, 0, 5, 2, 4], dtype=torch.int32)
    rect = torch.tensor([[1, 0, 3], [0, 0, 1], [0, 1, 2], [2, 2, 1], [0, 0, 2]], dtype=torch.int32)
    nf, tx, tpi = 5, 4, 16  # one image, 4 x 4 tiles
    ends = cnt.long().cumsum(0)
    keys, tris = [], []
    for t in range(nf):
        tx0, ty0, tw = rect[t].tolist()
        for k in range(int(cnt[t])):
            keys.append((ty0 + k // tw) * tx + tx0 + k % tw)
            tris.append(t)
    for cap in (14, 9, 1):
        key = torch.full((cap + 8,), -5, dtype=torch.int32, device=DEV)
        tri = torch.full((cap + 8,), -5, dtype=torch.int32, device=DEV)
        RT.launcher(RT._raster_bin_kernel, torch.device(DEV), "test")[(1,)](
            cnt.to(DEV), ends.to(DEV), rect.to(DEV), key, tri, nf, nf, tx, tpi, cap, BLOCK=8)
        m = min(cap, len(keys))
        assert key[:m].tolist() == keys[:m] and tri[:m].tolist() == tris[:m], cap
        assert (key[m:] == -5).all() and (tri[m:] == -5).all(), f"wrote past capacity {cap}"


def test_no_sync_flags_bad_input(gen):
    """Non-finite vertices (used or not) and out-of-range faces are counted in stat[1]."""
    h, w = 12, 14
    pix, faces = _scene(gen, 2, h, w, n_tri=12)
    assert _no_sync(pix, faces, h, w, 1 << 12)[1][1] == 0
    for value, where in ((float("nan"), (1, 4, 2)), (float("inf"), (0, 0, 0)), (float("-inf"), (1, -1, 1))):
        bad = pix.clone()
        bad[where] = value
        assert _no_sync(bad, faces, h, w, 1 << 12)[1][1] > 0, (value, where)
    extra = torch.cat([pix, torch.full((2, 1, 3), float("nan"), device=DEV)], 1)  # an unused vertex
    assert _no_sync(extra, faces, h, w, 1 << 12)[1][1] > 0
    for idx in (pix.shape[1], -1):
        bad_faces = faces.clone()
        bad_faces[3, 1] = idx
        assert _no_sync(pix, bad_faces, h, w, 1 << 12)[1][1] > 0, idx


def test_no_sync_argument_checks(gen):
    pix, faces = _scene(gen, 1, 8, 8, n_tri=4)
    for cap in (0, -3, True, 2.0, 2**31):
        with pytest.raises(ValueError, match="capacity must be an int"):
            RT.rasterize_triton_no_sync(pix, faces, 8, 8, cap)
    with pytest.raises(ValueError, match="at least one image and one face"):
        RT.rasterize_triton_no_sync(pix, faces[:0], 8, 8, 16)
    with pytest.raises(ValueError, match="at least one image and one face"):
        RT.rasterize_triton_no_sync(pix[:0], faces, 8, 8, 16)


def test_capacity_rule_and_fragment_buffer():
    lo = RT.MIN_CAPACITY
    assert RT._capacity_for(0) == lo and RT._capacity_for(10) == lo
    for e in (3000, 64_000, 65_536, 100_001):
        c = RT._capacity_for(e)
        assert c >= 1.25 * e and c % 4096 == 0 and c < 1.25 * e + 4096
    assert RT._capacity_for(64_000) == 81_920 and RT._capacity_for(3276) == 4096 and RT._capacity_for(3277) == 8192
    buf, fr = RT._fragments(3, 5, 7, torch.float16, torch.device("cpu"))
    assert buf.dtype == torch.uint8 and all(getattr(fr, k).is_contiguous() for k in FIELDS)
    assert [getattr(fr, k).dtype for k in FIELDS] == [torch.int64, torch.float16, torch.float16, torch.bool]
    assert fr.bary.shape == (3, 5, 7, 3) and fr.mask.shape == (3, 5, 7)
    assert all((getattr(fr, k).data_ptr() - buf.data_ptr()) % 256 == 0 for k in FIELDS)
    buf.zero_()
    fr.bary.fill_(1.0)  # the parts do not overlap
    assert (fr.tri_id == 0).all() and (fr.depth == 0).all() and not fr.mask.any()
    _, again = RT._fragments(3, 5, 7, torch.float16, torch.device("cpu"), buf)
    assert torch.equal(again.bary, fr.bary) and again.bary.data_ptr() == fr.bary.data_ptr()


# --------------------------------------------------------------- graph path logic (CPU stand-in)
class _FakeGraphs:
    """``GraphCache`` stand-in for the CPU: 'captures' once per key (inputs cloned to static
    buffers) and 'replays' by rerunning ``fn`` on the static inputs and copying into the captured
    outputs, so ``finish`` always sees the same buffers, as with a real graph."""

    def __init__(self):
        self.entries, self.captures, self.replays = {}, 0, 0

    def run(self, key, fn, inputs, *, keep=(), finish=None):
        full = (key, tuple(t.data_ptr() for t in keep),
                tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs))
        if full not in self.entries:
            static = [None if t is None else t.clone() for t in inputs]
            self.entries[full] = (static, tuple(fn(*static)))
            self.captures += 1
        else:
            static, outs = self.entries[full]
            for d, s in zip(static, inputs):
                if d is not None:
                    d.copy_(s)
            for d, s in zip(outs, fn(*static)):
                d.copy_(s)
            self.replays += 1
        return finish(self.entries[full][1])


@pytest.fixture
def fake_graphs(monkeypatch, fresh):
    fake = _FakeGraphs()
    monkeypatch.setattr(RT, "GRAPHS", fake)
    monkeypatch.setattr(_graphs, "usable", lambda device, tensors=(): True)
    return fake


def _frames(gen, n, h, w, count, **kw):
    """``count`` different vertex sets of one topology (the first scene's faces)."""
    pix, faces = _scene(gen, n, h, w, **kw)
    out = [pix]
    for _ in range(count - 1):
        out.append((pix + torch.randn(pix.shape, generator=gen).to(DEV) * torch.tensor([1.5, 1.5, 0.2], device=DEV)))
    return out, faces


def test_graph_path_logic_with_stand_in(gen, fake_graphs):
    """First call exact (learns E), then 'replays' of a fixed capacity: equal to the exact path
    for different vertices every call, results never alias the static buffers, ``out`` is honoured."""
    h, w = 19, 23
    frames, faces = _frames(gen, 2, h, w, 4, n_tri=25)
    results, prev = [], None
    for i, pix in enumerate(frames):
        got = rast.rasterize(pix, faces, h, w, impl="triton")
        _assert_equal(got, _exact(pix, faces, h, w), f"(frame {i}, seed {gen.initial_seed()})")
        results.append(Fragments(*(getattr(got, k).clone() for k in FIELDS)))
        if prev is not None:
            assert not torch.equal(got.bary, prev.bary)  # the frames differ
            _assert_equal(results[i - 1], prev, f"(frame {i - 1} changed by call {i})")
        prev = got
    assert fake_graphs.captures == 1 and fake_graphs.replays == 2
    (cap,) = RT._CAPACITY.values()
    assert cap == RT._capacity_for(_pairs(frames[0], faces, h, w))
    out = _poisoned(2, h, w)
    assert RT.rasterize_triton(frames[1], faces, h, w, out=out) is out
    _assert_equal(out, _exact(frames[1], faces, h, w))
    # int32 faces and non-contiguous faces: their own graphs (faces read in place / copied in)
    f32 = faces.int()
    fnc = faces.t().contiguous().t()
    assert not fnc.is_contiguous()
    for f in (f32, fnc, f32, fnc):
        _assert_equal(rast.rasterize(frames[2], f, h, w, impl="triton"), _exact(frames[2], faces, h, w))
    assert fake_graphs.captures == 3


def test_graph_path_overflow_reruns_exact_and_grows(gen, fake_graphs, monkeypatch):
    """A capacity learned from an empty frame overflows on the next one: the exact result is
    returned and the capacity grows; the next call uses a graph of the new size."""
    monkeypatch.setattr(RT, "MIN_CAPACITY", 4)
    h, w = 22, 25
    pix, faces = _scene(gen, 2, h, w, n_tri=30)
    hidden = pix.clone()
    hidden[..., 2] = -1.0  # every triangle behind the camera: E = 0
    assert rast.rasterize(hidden, faces, h, w, impl="triton").mask.sum() == 0
    assert list(RT._CAPACITY.values()) == [4]
    e = _pairs(pix, faces, h, w)
    assert e > 4
    _assert_equal(rast.rasterize(pix, faces, h, w, impl="triton"), _exact(pix, faces, h, w), "(overflow)")
    assert list(RT._CAPACITY.values()) == [RT._capacity_for(e)] and fake_graphs.captures == 1
    _assert_equal(rast.rasterize(pix, faces, h, w, impl="triton"), _exact(pix, faces, h, w), "(grown)")
    assert fake_graphs.captures == 2


def test_graph_path_bad_input_raises_reference_messages(gen, fake_graphs):
    h, w = 10, 12
    pix, faces = _scene(gen, 1, h, w, n_tri=8)
    rast.rasterize(pix, faces, h, w, impl="triton")  # learns the capacity
    bad = pix.clone()
    bad[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="verts_pix contains NaN or infinite values"):
        rast.rasterize(bad, faces, h, w, impl="triton")
    assert fake_graphs.captures == 1  # the graph ran and flagged it; the exact path raised
    bad_faces = faces.clone()
    bad_faces[0, 0] = pix.shape[1]
    lo = int(bad_faces.min())  # random scene: its smallest index need not be 0
    with pytest.raises(ValueError, match=rf"faces index vertices in \[{lo}, {pix.shape[1]}\]"):
        rast.rasterize(pix, bad_faces, h, w, impl="triton")
    _assert_equal(rast.rasterize(pix, faces, h, w, impl="triton"), _exact(pix, faces, h, w))


def test_graph_argument_rules(gen):
    pix, faces = _scene(gen, 1, 9, 9, n_tri=5)
    with pytest.raises(ValueError, match="graph must be None, True or False"):
        rast.rasterize(pix, faces, 9, 9, impl="triton", graph="yes")
    with pytest.raises(ValueError, match="graph must be None, True or False"):
        RT.rasterize_triton(pix, faces, 9, 9, graph=2)
    if not CUDA:
        with pytest.raises(ValueError, match="graph=True needs CUDA tensors"):
            rast.rasterize(pix, faces, 9, 9, impl="triton", graph=True)
    with pytest.raises(ValueError, match="graph=True needs the Triton path"):
        rast.rasterize(pix, faces, 9, 9, impl="ref", graph=True)
    with pytest.raises(ValueError, match="graph=True needs CUDA tensors"):
        RT.rasterize_triton(pix, faces[:0], 9, 9, graph=True)  # no face: nothing to graph
    _assert_equal(rast.rasterize(pix, faces, 9, 9, impl="triton", graph=False), _exact(pix, faces, 9, 9))


# ------------------------------------------------- fused rasterize + normal map (CPU stand-in)
def _normals(gen, pix, dtype=torch.float32):
    """Random per-vertex normals (some zero, so the renormalisation clamp is hit)."""
    nrm = torch.randn(pix.shape, generator=gen, dtype=F64)
    nrm[:, ::7] = 0.0
    return nrm.to(dtype).to(DEV)


def _two_calls(pix, nrm, faces, h, w, impl="triton", **kw):
    frags = rast.rasterize(pix, faces, h, w, impl=impl, graph=False if impl == "triton" else None, **kw)
    return (frags, *rast.normal_map(nrm, faces, frags, impl=impl))


def _assert_fused_equal(got, want, msg=""):
    _assert_equal(got[0], want[0], msg)
    for name, a, b in zip(("unit", "rgb"), got[1:], want[1:]):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs {msg}"


def _copy(res):
    return (Fragments(*(getattr(res[0], k).clone() for k in FIELDS)), res[1].clone(), res[2].clone())


def test_fused_graph_path_with_stand_in(gen, fake_graphs):
    """rasterize_normal_map: first call exact (learns E), then replays of one graph running both
    passes; equal to rasterize + normal_map bit for bit with different vertices AND normals every
    call; all outputs in one fresh buffer per call (no aliasing with the graph or earlier calls)."""
    h, w = 19, 23
    frames, faces = _frames(gen, 2, h, w, 5, n_tri=25)
    kept, prev = [], None
    for i, pix in enumerate(frames):
        nrm = _normals(gen, pix)
        got = rast.rasterize_normal_map(pix, nrm, faces, h, w, impl="triton")
        _assert_fused_equal(got, _two_calls(pix, nrm, faces, h, w), f"(frame {i}, seed {gen.initial_seed()})")
        assert got[1].shape == got[2].shape == (2, h, w, 3) and got[1].dtype == torch.float32
        if i:  # replays: one buffer holds every output
            base = got[0].tri_id.untyped_storage().data_ptr()
            assert all(t.untyped_storage().data_ptr() == base for t in (got[0].bary, got[0].mask, got[1], got[2]))
        if prev is not None:
            assert not torch.equal(got[1], prev[1]) and not torch.equal(got[0].bary, prev[0].bary)
        kept.append((got, _copy(got)))
        prev = got
    for i, (got, copy) in enumerate(kept):
        _assert_fused_equal(got, copy, f"(frame {i} changed by later calls)")
    assert fake_graphs.captures == 1 and fake_graphs.replays == 3
    assert list(RT._CAPACITY.values()) == [RT._capacity_for(_pairs(frames[0], faces, h, w))]
    rast.rasterize(frames[1], faces, h, w, impl="triton")  # rasterize alone: its own graph, same capacity
    assert fake_graphs.captures == 2 and len(RT._CAPACITY) == 1
    # float64 normals, int32 and non-contiguous faces: their own graphs, still equal
    f32, fnc = faces.int(), faces.t().contiguous().t()
    for f, dt in ((f32, torch.float32), (fnc, torch.float64), (f32, torch.float64), (fnc, torch.float64)):
        nrm = _normals(gen, frames[2], dt)
        got = rast.rasterize_normal_map(frames[2], nrm, f, h, w, impl="triton")
        assert got[1].dtype == dt and got[0].bary.dtype == torch.float32
        _assert_fused_equal(got, _two_calls(frames[2], nrm, faces, h, w))
    assert fake_graphs.captures == 5


def test_fused_without_graphs_and_other_impls(gen, fake_graphs):
    """graph=False (and the ref / cpp impls): the two calls as they are, equal results, no graph."""
    from mvportrait.kernels import cpu

    h, w = 14, 17
    pix, faces = _scene(gen, 2, h, w, n_tri=15)
    nrm = _normals(gen, pix)
    for _ in range(2):
        got = rast.rasterize_normal_map(pix, nrm, faces, h, w, impl="triton", graph=False, cull_backfaces=False)
        _assert_fused_equal(got, _two_calls(pix, nrm, faces, h, w, cull_backfaces=False))
    assert fake_graphs.captures == 0 and not RT._CAPACITY
    for impl in ("ref", "cpp") if cpu.available() else ("ref",):
        want = _two_calls(pix.cpu(), nrm.cpu(), faces.cpu(), h, w, impl=impl)
        _assert_fused_equal(rast.rasterize_normal_map(pix.cpu(), nrm.cpu(), faces.cpu(), h, w, impl=impl), want, impl)
        with pytest.raises(ValueError, match="graph=True needs the Triton path"):
            rast.rasterize_normal_map(pix.cpu(), nrm.cpu(), faces.cpu(), h, w, impl=impl, graph=True)


def test_fused_overflow_reruns_exact_and_grows(gen, fake_graphs, monkeypatch):
    monkeypatch.setattr(RT, "MIN_CAPACITY", 4)
    h, w = 22, 25
    pix, faces = _scene(gen, 2, h, w, n_tri=30)
    nrm = _normals(gen, pix)
    hidden = pix.clone()
    hidden[..., 2] = -1.0  # E = 0: capacity 4
    _assert_fused_equal(rast.rasterize_normal_map(hidden, nrm, faces, h, w, impl="triton"),
                        _two_calls(hidden, nrm, faces, h, w))
    assert list(RT._CAPACITY.values()) == [4]
    e = _pairs(pix, faces, h, w)
    assert e > 4
    for i in range(3):  # overflow (exact rerun, capacity grows), then a graph of the new size, replayed
        _assert_fused_equal(rast.rasterize_normal_map(pix, nrm, faces, h, w, impl="triton"),
                            _two_calls(pix, nrm, faces, h, w), f"(call {i})")
        assert list(RT._CAPACITY.values()) == [RT._capacity_for(e)]
        assert fake_graphs.captures == min(i + 1, 2)
    assert fake_graphs.replays == 1


def test_fused_bad_input_raises_the_two_calls_messages(gen, fake_graphs):
    """Through the graph (flags in stat) and on the first, exact call: rasterize's messages for bad
    vertices / faces (first, as rasterize runs first), normal_map's for bad normals."""
    h, w = 10, 12
    pix, faces = _scene(gen, 1, h, w, n_tri=8)
    nrm = _normals(gen, pix)
    bad_nrm = nrm.clone()
    bad_nrm[0, 5, 1] = float("inf")
    with pytest.raises(ValueError, match="normals contain NaN or infinite values"):
        rast.rasterize_normal_map(pix, bad_nrm, faces, h, w, impl="triton")  # first call: exact path
    rast.rasterize_normal_map(pix, nrm, faces, h, w, impl="triton")  # captures
    assert fake_graphs.captures == 1
    bad_nrm[0, 5, 1] = float("nan")
    with pytest.raises(ValueError, match="normals contain NaN or infinite values"):
        rast.rasterize_normal_map(pix, bad_nrm, faces, h, w, impl="triton")
    bad = pix.clone()
    bad[0, 2, 1] = float("nan")
    for normals in (nrm, bad_nrm):
        with pytest.raises(ValueError, match="verts_pix contains NaN or infinite values"):
            rast.rasterize_normal_map(bad, normals, faces, h, w, impl="triton")
    assert fake_graphs.captures == 1 and fake_graphs.replays == 3  # the graph ran and flagged them
    bad_faces = faces.clone()
    bad_faces[0, 0] = pix.shape[1]
    lo = int(bad_faces.min())  # random scene: its smallest index need not be 0
    with pytest.raises(ValueError, match=rf"faces index vertices in \[{lo}, {pix.shape[1]}\]"):
        rast.rasterize_normal_map(pix, nrm, bad_faces, h, w, impl="triton")
    short = nrm[:, :-3]  # fewer normals than vertices: faces index past them (normal_map's check)
    with pytest.raises(ValueError, match=rf"but there are {pix.shape[1] - 3} vertices"):
        rast.rasterize_normal_map(pix, short, faces, h, w, impl="triton")
    # argument errors: the message of the call that checks them, in the two calls' order
    with pytest.raises(ValueError, match="verts_pix must have shape"):
        rast.rasterize_normal_map(pix[0], nrm[:, :, :2], faces, h, w, impl="triton")
    for normals, msg in ((nrm[:, :, :2], r"normals must have shape \(N, Nv, 3\)"), (nrm.repeat(2, 1, 1), "N=1"),
                         (nrm.int(), "normals must be a floating tensor"), (nrm.tolist(), "normals must be a torch")):
        with pytest.raises((ValueError, TypeError), match=msg):
            rast.rasterize_normal_map(pix, normals, faces, h, w, impl="triton")
    _assert_fused_equal(rast.rasterize_normal_map(pix, nrm, faces, h, w, impl="triton"),
                        _two_calls(pix, nrm, faces, h, w))
    with pytest.raises(ValueError, match="graph must be None, True or False"):
        rast.rasterize_normal_map(pix, nrm, faces, h, w, impl="triton", graph="yes")
    with pytest.raises(ValueError, match="normals contain NaN or infinite values"):
        rast.rasterize_normal_map(pix.cpu(), bad_nrm.cpu(), faces.cpu(), h, w, impl="ref")


def test_count_binning_graph_path_with_stand_in(gen, fake_graphs, monkeypatch):
    """binning="count" through the graph path: its own capacity and graphs (the key holds the
    mode), equal to the exact sort path with different vertices every call; a capacity learned
    from an empty frame overflows (exact rerun, the capacity grows, a graph of the new size);
    the fused normal map; ``BINNING = "count"`` sends the public calls to the same graphs."""
    monkeypatch.setattr(RT, "MIN_CAPACITY", 4)
    h, w = 19, 23
    frames, faces = _frames(gen, 2, h, w, 3, n_tri=25)
    hidden = frames[0].clone()
    hidden[..., 2] = -1.0  # E = 0: capacity 4
    assert not RT.rasterize_triton(hidden, faces, h, w, binning="count").mask.any()
    ((key, cap),) = RT._CAPACITY.items()
    assert "count" in key and cap == 4
    e = _pairs(frames[0], faces, h, w)
    assert e > 4
    for i, pix in enumerate(frames):  # overflow (capture, exact rerun), capture of the new size, replay
        got = RT.rasterize_triton(pix, faces, h, w, binning="count")
        _assert_equal(got, _exact(pix, faces, h, w, binning="sort"), f"(frame {i}, seed {gen.initial_seed()})")
        assert RT._CAPACITY[key] == RT._capacity_for(e)
    assert fake_graphs.captures == 2 and fake_graphs.replays == 1
    for pix in frames[:2]:  # the sort mode: another key, capacity and graph
        _assert_equal(RT.rasterize_triton(pix, faces, h, w, binning="sort"), _exact(pix, faces, h, w))
    assert len(RT._CAPACITY) == 2 and fake_graphs.captures == 3
    for i, pix in enumerate(frames):
        nrm = _normals(gen, pix)
        got = RT.rasterize_normal_map_triton(pix, nrm, faces, h, w, binning="count")
        _assert_fused_equal(got, _two_calls(pix, nrm, faces, h, w), f"(fused frame {i})")
    assert fake_graphs.captures == 4 and len(RT._CAPACITY) == 2  # the count key's capacity, its own graph
    monkeypatch.setattr(RT, "BINNING", "count")
    replays = fake_graphs.replays
    pix, nrm = frames[1], _normals(gen, frames[1])
    _assert_fused_equal(rast.rasterize_normal_map(pix, nrm, faces, h, w, impl="triton"),
                        _two_calls(pix, nrm, faces, h, w))
    _assert_equal(rast.rasterize(pix, faces, h, w, impl="triton"), _exact(pix, faces, h, w, binning="sort"))
    assert fake_graphs.captures == 4 and fake_graphs.replays == replays + 2
    with pytest.raises(ValueError, match="binning must be one of"):
        RT.rasterize_triton(pix, faces, h, w, binning="radix")


def test_count_binning_graph_bad_input_raises(gen, fake_graphs):
    """Failed checks flagged in the count mode's stat: the exact path reruns and raises."""
    h, w = 10, 12
    pix, faces = _scene(gen, 1, h, w, n_tri=8)
    RT.rasterize_triton(pix, faces, h, w, binning="count")  # learns the capacity
    bad = pix.clone()
    bad[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="verts_pix contains NaN or infinite values"):
        RT.rasterize_triton(bad, faces, h, w, binning="count")
    nrm = _normals(gen, pix)
    RT.rasterize_normal_map_triton(pix, nrm, faces, h, w, binning="count")
    with pytest.raises(ValueError, match="verts_pix contains NaN or infinite values"):
        RT.rasterize_normal_map_triton(bad, nrm, faces, h, w, binning="count")
    assert fake_graphs.captures == 2 and fake_graphs.replays == 1  # the graphs ran and flagged them


# ------------------------------------------------------------------------------ real graphs (GPU)
def _head_frames(h, w, count, seed=0):
    """The FLAME-size synthetic head seen by 4 views, ``count`` frames of jittered vertices."""
    from mvportrait.flame.demo import demo_sequence
    from mvportrait.flame.synthetic import synthetic_head
    from mvportrait.render.cameras import view_rig

    m = synthetic_head(0, flame_size=True).model
    with torch.inference_mode():
        verts = m(demo_sequence(1 / 25.0, 25.0), with_landmarks=False).vertices[0, 0]
    rig = view_rig("ring-4", height=h, width=w)
    g = torch.Generator().manual_seed(seed)
    frames = []
    for i in range(count):
        v = verts + torch.randn(verts.shape, generator=g) * 2e-4 * (i > 0)
        frames.append(rig.project(v[None].expand(4, -1, -1)).contiguous().cuda())
    return frames, m.faces.cuda()


@gpu
@needs_cuda
@pytest.mark.usefixtures("fresh")
def test_gpu_graphed_equals_exact_over_frames():
    """Different vertices every call: the graphed public calls equal the direct ones bit for bit
    (rasterize and the normal map on its fragments), earlier results are never overwritten."""
    h, w = 512, 384
    frames, faces = _head_frames(h, w, 6)
    normals = torch.nn.functional.normalize(torch.randn(4, frames[0].shape[1], 3), dim=-1).cuda()
    kept = []
    for i, pix in enumerate(frames):
        ctx = torch.inference_mode() if i == 3 else torch.no_grad()
        with ctx:
            got = rast.rasterize(pix, faces, h, w)
            ref = rast.rasterize(pix, faces, h, w, graph=False)
            _assert_equal(got, ref, f"(frame {i})")
            for a, b in zip(rast.normal_map(normals, faces, got), rast.normal_map(normals, faces, ref)):
                assert torch.equal(a, b)
        if kept:
            assert not torch.equal(got.bary, kept[-1][0].bary), "frames must differ for this test to mean anything"
        kept.append((got, Fragments(*(getattr(got, k).clone() for k in FIELDS))))
    for i, (got, copy) in enumerate(kept):
        _assert_equal(got, copy, f"(frame {i} changed by later calls)")
    assert RT.GRAPHS.captures == 1 and RT.GRAPHS.replays >= len(frames) - 1
    e = RT._raster(frames[-1], faces, h, w, True, 1e-4, None, None, None, None)[1]
    (cap,) = RT._CAPACITY.values()
    assert e <= cap and cap >= RT.MIN_CAPACITY
    out = _poisoned(4, h, w)
    assert RT.rasterize_triton(frames[1], faces, h, w, out=out) is out
    _assert_equal(out, rast.rasterize(frames[1], faces, h, w, graph=False))
    assert RT.GRAPHS.captures == 1
    f32 = faces.int()  # int32 faces: one more graph, reused
    for pix in frames[:3]:
        _assert_equal(rast.rasterize(pix, f32, h, w, graph=True), rast.rasterize(pix, faces, h, w, graph=False))
    assert RT.GRAPHS.captures == 2


@gpu
@needs_cuda
@pytest.mark.usefixtures("fresh")
def test_gpu_overflow_reruns_exact_and_grows(monkeypatch):
    monkeypatch.setattr(RT, "MIN_CAPACITY", 16)
    h = w = 256
    frames, faces = _head_frames(h, w, 3, seed=1)
    hidden = frames[0].clone()
    hidden[..., 2] = -1.0
    rast.rasterize(hidden, faces, h, w)  # E = 0 -> capacity 16
    assert list(RT._CAPACITY.values()) == [16]
    _assert_equal(rast.rasterize(frames[1], faces, h, w), rast.rasterize(frames[1], faces, h, w, graph=False))
    (cap,) = RT._CAPACITY.values()
    assert cap > 1000 and RT.GRAPHS.captures == 1
    for pix in frames[1:]:
        _assert_equal(rast.rasterize(pix, faces, h, w), rast.rasterize(pix, faces, h, w, graph=False))
    assert RT.GRAPHS.captures == 2 and list(RT._CAPACITY.values()) == [cap]


@gpu
@needs_cuda
@pytest.mark.usefixtures("fresh")
def test_gpu_bad_input_raises_reference_messages():
    h = w = 128
    frames, faces = _head_frames(h, w, 2, seed=2)
    for pix in frames:
        rast.rasterize(pix, faces, h, w)
    bad = frames[1].clone()
    bad[2, 100, 0] = float("nan")
    with pytest.raises(ValueError, match="verts_pix contains NaN or infinite values"):
        rast.rasterize(bad, faces, h, w)
    bad_faces = faces.clone()
    bad_faces[5, 2] = -1
    with pytest.raises(ValueError, match=r"faces index vertices in \[-1, "):
        rast.rasterize(frames[0], bad_faces, h, w)
    _assert_equal(rast.rasterize(frames[0], faces, h, w), rast.rasterize(frames[0], faces, h, w, graph=False))


@gpu
@needs_cuda
@pytest.mark.usefixtures("fresh")
def test_gpu_graphs_off_by_env_and_argument(monkeypatch):
    h = w = 96
    frames, faces = _head_frames(h, w, 3, seed=3)
    for pix in frames:
        rast.rasterize(pix, faces, h, w, graph=False)
    assert RT.GRAPHS.captures == 0 and RT.GRAPHS.replays == 0
    monkeypatch.setenv("MVP_CUDA_GRAPHS", "0")
    for pix in frames:
        rast.rasterize(pix, faces, h, w)
    assert RT.GRAPHS.captures == 0 and RT.GRAPHS.replays == 0
    with pytest.raises(ValueError, match="graph=True needs CUDA tensors, MVP_CUDA_GRAPHS=1"):
        rast.rasterize(frames[0], faces, h, w, graph=True)
    monkeypatch.setenv("MVP_CUDA_GRAPHS", "1")
    for pix in frames:
        rast.rasterize(pix, faces, h, w)
    assert RT.GRAPHS.captures == 1 and RT.GRAPHS.replays == 2


def _head_normals(pix, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(pix.shape, generator=g), dim=-1).to(pix.device)


@gpu
@needs_cuda
@pytest.mark.usefixtures("fresh")
def test_gpu_fused_graph_equals_two_calls():
    """rasterize_normal_map through one real graph: equal to the direct rasterize + normal_map bit
    for bit with different vertices and normals every call, one capture for repeated calls,
    earlier results never overwritten, one host sync per call."""
    import warnings

    h, w = 512, 384
    frames, faces = _head_frames(h, w, 6)
    kept = []
    for i, pix in enumerate(frames):
        nrm = _head_normals(pix, i)
        with torch.inference_mode() if i == 3 else torch.no_grad():
            got = rast.rasterize_normal_map(pix, nrm, faces, h, w)
            _assert_fused_equal(got, _two_calls(pix, nrm, faces, h, w), f"(frame {i})")
        if kept:
            assert not torch.equal(got[1], kept[-1][1][1])
        kept.append((got, _copy(got)))
    for _ in range(3):
        rast.rasterize_normal_map(frames[0], nrm, faces, h, w, graph=True)
    for i, (got, copy) in enumerate(kept):
        _assert_fused_equal(got, copy, f"(frame {i} changed by later calls)")
    assert RT.GRAPHS.captures == 1 and RT.GRAPHS.replays >= len(frames) + 2
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            rast.rasterize_normal_map(frames[1], nrm, faces, h, w)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(r.message) for r in rec if "called a synchronizing" in str(r.message)]  # not the prototype note
    assert len(syncs) == 1, syncs  # the read of stat
    f32 = faces.int()  # int32 faces, float64 normals: one more graph each, reused
    for pix in frames[:3]:
        nrm = _head_normals(pix, 7).double()
        got = rast.rasterize_normal_map(pix, nrm, f32, h, w)
        assert got[1].dtype == torch.float64
        _assert_fused_equal(got, _two_calls(pix, nrm, faces, h, w))
    assert RT.GRAPHS.captures == 2


@gpu
@needs_cuda
@pytest.mark.usefixtures("fresh")
def test_gpu_fused_overflow_and_bad_input(monkeypatch):
    monkeypatch.setattr(RT, "MIN_CAPACITY", 16)
    h = w = 256
    frames, faces = _head_frames(h, w, 3, seed=1)
    nrm = _head_normals(frames[0], 1)
    hidden = frames[0].clone()
    hidden[..., 2] = -1.0
    rast.rasterize_normal_map(hidden, nrm, faces, h, w)  # E = 0 -> capacity 16
    assert list(RT._CAPACITY.values()) == [16]
    _assert_fused_equal(rast.rasterize_normal_map(frames[1], nrm, faces, h, w), _two_calls(frames[1], nrm, faces, h, w))
    (cap,) = RT._CAPACITY.values()
    assert cap > 1000 and RT.GRAPHS.captures == 1
    for pix in frames[1:]:
        _assert_fused_equal(rast.rasterize_normal_map(pix, nrm, faces, h, w), _two_calls(pix, nrm, faces, h, w))
    assert RT.GRAPHS.captures == 2 and list(RT._CAPACITY.values()) == [cap]
    bad_nrm = nrm.clone()
    bad_nrm[1, 50, 2] = float("nan")
    with pytest.raises(ValueError, match="normals contain NaN or infinite values"):
        rast.rasterize_normal_map(frames[1], bad_nrm, faces, h, w)
    bad = frames[1].clone()
    bad[2, 100, 0] = float("inf")
    with pytest.raises(ValueError, match="verts_pix contains NaN or infinite values"):
        rast.rasterize_normal_map(bad, bad_nrm, faces, h, w)
    bad_faces = faces.clone()
    bad_faces[5, 2] = -1
    with pytest.raises(ValueError, match=r"faces index vertices in \[-1, "):
        rast.rasterize_normal_map(frames[0], nrm, bad_faces, h, w)
    _assert_fused_equal(rast.rasterize_normal_map(frames[2], nrm, faces, h, w), _two_calls(frames[2], nrm, faces, h, w))
    assert RT.GRAPHS.captures == 3  # bad_faces: its own graph (another address)


@gpu
@needs_cuda
@pytest.mark.usefixtures("fresh")
def test_gpu_count_binning_graphed_equals_sort(monkeypatch):
    """binning="count" through real graphs at 4 x 512^2 of the head: rasterize and the fused
    normal map equal the direct sort path bit for bit with different vertices every call, one
    graph each, one host sync per call; a too-small capacity overflows, reruns exact and grows."""
    import warnings

    h = w = 512
    frames, faces = _head_frames(h, w, 5, seed=4)
    for i, pix in enumerate(frames):
        nrm = _head_normals(pix, i)
        _assert_equal(RT.rasterize_triton(pix, faces, h, w, binning="count"),
                      RT.rasterize_triton(pix, faces, h, w, graph=False, binning="sort"), f"(frame {i})")
        _assert_fused_equal(RT.rasterize_normal_map_triton(pix, nrm, faces, h, w, binning="count"),
                            _two_calls(pix, nrm, faces, h, w), f"(fused frame {i})")
    assert RT.GRAPHS.captures == 2 and RT.GRAPHS.replays >= 2 * len(frames) - 4
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            RT.rasterize_normal_map_triton(frames[1], nrm, faces, h, w, binning="count")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(r.message) for r in rec if "called a synchronizing" in str(r.message)]
    assert len(syncs) == 1, syncs  # the read of stat
    monkeypatch.setattr(RT, "_CAPACITY", {})
    monkeypatch.setattr(RT, "GRAPHS", _graphs.GraphCache("rasterize-test-count"))
    monkeypatch.setattr(RT, "MIN_CAPACITY", 16)
    hidden = frames[0].clone()
    hidden[..., 2] = -1.0
    RT.rasterize_triton(hidden, faces, h, w, binning="count")  # E = 0 -> capacity 16
    assert list(RT._CAPACITY.values()) == [16]
    for pix in frames[1:]:
        _assert_equal(RT.rasterize_triton(pix, faces, h, w, binning="count"),
                      RT.rasterize_triton(pix, faces, h, w, graph=False, binning="sort"))
    (cap,) = RT._CAPACITY.values()
    assert cap > 1000 and RT.GRAPHS.captures == 2  # capacity 16 (overflowed), then the grown one
