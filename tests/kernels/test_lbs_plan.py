"""Prepared LBS calls (``lbs_plan`` -> ``LBSPlan``): equal to ``lbs`` on every path, input checks, copies.

On the CPU: the reference path (bit-identical to ``lbs``), the Triton path under the interpreter at
small sizes, and the graph path's logic with a stand-in for ``_graphs.capture`` that keeps fixed
static buffers like a graph (a 'replay' reruns the captured function on the static inputs and copies
into the captured outputs). Uninitialised memory is NaN during these tests (deterministic mode), so
output elements a path forgets to write fail the comparisons. ``gpu``-marked tests replay real CUDA
graphs, with the static outputs poisoned before each replay.
"""
import importlib.util
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from mvportrait import envs  # noqa: E402
from mvportrait.kernels import _graphs  # noqa: E402
from mvportrait.kernels import lbs as K  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
DEV = "cuda" if CUDA else "cpu"
MODEL_KEYS = ("v_template", "dirs", "posedirs", "j_regressor", "parents", "weights")


@pytest.fixture(autouse=True)
def _nan_empty(nan_empty):
    """Unwritten outputs read NaN (tests/conftest.py: nan_empty)."""


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def _model(gen, nv, k, dev="cpu", dtype=torch.float32, nj=5, n_faces=0):
    w = torch.rand(nv, nj, generator=gen)
    w /= w.sum(1, keepdim=True)
    jr = torch.rand(nj, nv, generator=gen)
    jr /= jr.sum(1, keepdim=True)
    m = dict(v_template=torch.randn(nv, 3, generator=gen) * 0.1, dirs=torch.randn(nv, 3, k, generator=gen) * 0.01,
             posedirs=torch.randn(nv, 3, 9 * (nj - 1), generator=gen) * 0.01, j_regressor=jr, weights=w)
    m = {key: val.to(dev, dtype) for key, val in m.items()}
    m["parents"] = torch.tensor([-1, 0, 1, 1, 1][:nj], device=dev)
    faces = torch.randint(0, nv, (n_faces, 3), generator=gen).to(dev) if n_faces else None
    return m, faces


def _inputs(gen, m, n, translation=True):
    dev, dt = m["v_template"].device, m["v_template"].dtype
    k, nj = m["dirs"].shape[2], m["j_regressor"].shape[0]
    c = torch.randn(n, k, generator=gen).to(dev, dt)
    p = (torch.randn(n, 3 * nj, generator=gen) * 0.5).to(dev, dt)
    t = (torch.randn(n, 3, generator=gen) * 0.1).to(dev, dt) if translation else None
    return c, p, t


def _plan(m, n, **kw):
    return K.lbs_plan(*(m[key] for key in MODEL_KEYS), batch=n, **kw)


def _lbs(m, inp, **kw):
    c, p, t = inp
    return K.lbs(c, p, *(m[key] for key in MODEL_KEYS), t, **kw)


def _assert_equal(got, want, msg=""):
    assert isinstance(got, tuple) and len(got) == len(want), msg
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device, msg
        assert torch.equal(g, w), msg  # bit for bit; NaN anywhere fails


# ------------------------------------------------------------------------- reference path (CPU)
@pytest.mark.parametrize("nv, k, n, n_faces, translation, dtype", [
    (37, 6, 1, 0, True, torch.float32), (37, 6, 3, 51, True, torch.float32), (1, 1, 2, 1, False, torch.float32),
    (23, 7, 5, 0, False, torch.float64), (23, 7, 1, 40, True, torch.float64)])
def test_reference_plan_equals_lbs(gen, nv, k, n, n_faces, translation, dtype):
    m, faces = _model(gen, nv, k, dtype=dtype, n_faces=n_faces)
    for impl in ("ref", "auto"):  # auto on CPU tensors is the reference
        plan = _plan(m, n, faces=faces, translation=translation, impl=impl)
        for _ in range(3):  # fresh inputs every call
            inp = _inputs(gen, m, n, translation)
            want = _lbs(m, inp, faces=faces, impl="ref")
            _assert_equal(plan(*inp), want, f"seed {gen.initial_seed()}")
            _assert_equal(plan(*inp, copy=False), want)  # no static buffers here: fresh tensors too
        assert plan.captures == plan.replays == 0


def test_reference_plan_follows_in_place_model_updates(gen):
    m, faces = _model(gen, 19, 4, n_faces=20)
    plan = _plan(m, 2, faces=faces, impl="ref")
    inp = _inputs(gen, m, 2)
    m["v_template"].add_(0.25)
    m["posedirs"].mul_(2)
    _assert_equal(plan(*inp), _lbs(m, inp, faces=faces, impl="ref"))


# ------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("path", ["ref", pytest.param("graph", marks=needs_triton)])
def test_call_rejects_bad_inputs_with_clear_errors(gen, request, path):
    """The plan's own checks (on the graph path nothing behind them would catch a wrong shape)."""
    if path == "graph":
        request.getfixturevalue("fake_graphs")
    m, _ = _model(gen, 11, 4, DEV)
    plan = _plan(m, 3, impl="ref" if path == "ref" else "triton")
    assert plan.captures == (path == "graph")
    c, p, t = _inputs(gen, m, 3)
    with pytest.raises(ValueError, match=r"coeffs has shape \(2, 4\), expected \(3, 4\)"):
        plan(c[:2], p[:2], t[:2])  # wrong batch
    with pytest.raises(ValueError, match=r"coeffs has shape \(3, 5\), expected \(3, 4\)"):
        plan(torch.zeros(3, 5, device=DEV), p, t)  # wrong coefficient count
    with pytest.raises(ValueError, match=r"pose has shape \(3, 12\), expected \(3, 15\)"):
        plan(c, p[:, :12], t)
    with pytest.raises(ValueError, match="pose has dtype torch.float64, expected torch.float32"):
        plan(c, p.double(), t)
    with pytest.raises(ValueError, match=f"translation is on meta, expected {c.device}"):
        plan(c, p, torch.zeros(3, 3, device="meta"))
    with pytest.raises(TypeError, match="coeffs must be a torch.Tensor, got ndarray"):
        plan(c.cpu().numpy(), p, t)
    with pytest.raises(ValueError, match=r"translation=True: pass translation of shape \(3, 3\)"):
        plan(c, p)
    with pytest.raises(ValueError, match="batch=3"):
        plan(c, p, t[:, :2])
    no_t = _plan(m, 3, translation=False, impl=plan.impl)
    with pytest.raises(ValueError, match="made with translation=False"):
        no_t(c, p, t)
    _assert_equal(no_t(c, p), _lbs(m, (c, p, None), impl=plan.impl, graph=False))


def test_creation_validates_everything(gen):
    m, _ = _model(gen, 11, 4)
    with pytest.raises(ValueError, match="batch"):
        _plan(m, -1)
    with pytest.raises(ValueError, match="batch"):
        _plan(m, 2.0)
    with pytest.raises(ValueError, match="translation must be"):
        _plan(m, 2, translation="yes")
    with pytest.raises(ValueError, match="graph must be"):
        _plan(m, 2, graph="yes")
    with pytest.raises(ValueError, match="impl"):
        _plan(m, 2, impl="cpp")
    with pytest.raises(ValueError, match="graph=True needs"):
        _plan(m, 2, impl="ref", graph=True)
    with pytest.raises(ValueError, match="posedirs"):
        _plan(dict(m, posedirs=m["posedirs"][..., :9]), 2)
    with pytest.raises(ValueError, match="dtype"):
        _plan(dict(m, weights=m["weights"].double()), 2)
    with pytest.raises(ValueError, match="topologically sorted"):
        _plan(dict(m, parents=torch.tensor([-1, 0, 3, 1, 1])), 2)
    with pytest.raises(ValueError, match="outside"):
        _plan(m, 2, faces=torch.tensor([[0, 1, 11]]))
    with pytest.raises(TypeError, match="faces"):
        _plan(m, 2, faces=[[0, 1, 2]])


# ------------------------------------------------------------------ Triton (interpreter on CPU)
@needs_triton
@pytest.mark.parametrize("n, n_faces, translation", [(1, 0, True), (3, 30, True), (2, 30, False)])
def test_triton_plan_equals_lbs_triton(gen, n, n_faces, translation):
    """Without a graph (CPU, or graph=False on CUDA) the plan is lbs(impl='triton', graph=False)."""
    m, faces = _model(gen, 29, 5, DEV, n_faces=n_faces)
    plan = _plan(m, n, faces=faces, translation=translation, impl="triton", graph=False)
    for _ in range(2):
        inp = _inputs(gen, m, n, translation)
        _assert_equal(plan(*inp), _lbs(m, inp, faces=faces, impl="triton", graph=False))
    assert plan.captures == 0


class _FakeGraph:
    """``_graphs.StaticGraph`` stand-in: inputs cloned to static buffers and outputs kept at 'capture';
    a 'replay' copies the inputs in, reruns ``fn`` on the static inputs and copies into the outputs."""

    def __init__(self, fn, inputs):
        self.fn = fn
        self.inputs = [None if t is None else t.clone() for t in inputs]
        self.outputs = tuple(fn(*self.inputs))

    def replay(self, inputs):
        for d, s in zip(self.inputs, inputs):
            if d is not None:
                d.copy_(s)
        for d, s in zip(self.outputs, self.fn(*self.inputs)):
            d.copy_(s)
        return self.outputs


def _usable_anywhere(device, tensors=()):
    """_graphs.usable without the device and capture rules (the CPU has neither)."""
    if not envs.cuda_graphs():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


@pytest.fixture
def fake_graphs(monkeypatch):
    monkeypatch.setattr(_graphs, "capture", lambda fn, inputs, keep=(), warmup=2: _FakeGraph(fn, inputs))
    monkeypatch.setattr(_graphs, "usable", _usable_anywhere)


@needs_triton
@pytest.mark.parametrize("n, n_faces, translation", [(1, 30, True), (3, 0, False)])
def test_graph_path_logic_with_stand_in(gen, fake_graphs, n, n_faces, translation):
    m, faces = _model(gen, 29, 5, DEV, n_faces=n_faces)
    plan = _plan(m, n, faces=faces, translation=translation, impl="triton")
    assert plan.captures == 1  # captured at creation
    kept, views = [], None
    for i in range(3):
        inp = _inputs(gen, m, n, translation)
        want = _lbs(m, inp, faces=faces, impl="triton", graph=False)
        got = plan(*inp)
        _assert_equal(got, want)
        kept.append((got, want))
        static = plan(*inp, copy=False)
        _assert_equal(static, want)
        if views is not None:  # the same static buffers every call
            assert [v.data_ptr() for v in static] == [v.data_ptr() for v in views]
        views = static
    assert plan.captures == 1 and plan.replays == 1 + 6
    for got, want in kept:  # copy=True results are not overwritten by later calls
        _assert_equal(got, want)
    assert not torch.equal(kept[0][0][0], kept[1][0][0])
    inp = _inputs(gen, m, n, translation)
    plan(*inp, copy=False)  # ... while copy=False views are
    _assert_equal(views, _lbs(m, inp, faces=faces, impl="triton", graph=False))


@needs_triton
def test_graph_path_falls_back_and_follows_model_updates(gen, fake_graphs, monkeypatch):
    m, faces = _model(gen, 21, 4, DEV, n_faces=12)
    plan = _plan(m, 2, faces=faces, impl="triton")
    inp = _inputs(gen, m, 2)
    want = _lbs(m, inp, faces=faces, impl="triton", graph=False)
    _assert_equal(plan(*inp), want)
    assert plan.replays == 2
    monkeypatch.setenv("MVP_CUDA_GRAPHS", "0")  # graphs off: lbs without a graph, same results
    _assert_equal(plan(*inp), want)
    monkeypatch.setenv("MVP_CUDA_GRAPHS", "1")
    c = inp[0].clone().requires_grad_(True)  # autograd input: no graph
    _assert_equal(tuple(x.detach() for x in plan(c, *inp[1:])), want)
    assert plan.replays == 2 and plan.captures == 1
    m["v_template"].add_(0.05)  # in place: joint basis recomputed, graph captured again
    m["dirs"].mul_(1.5)
    _assert_equal(plan(*inp), _lbs(m, inp, faces=faces, impl="triton", graph=False))
    assert plan.captures == 2
    m["posedirs"].mul_(0.5)  # read by the graph through its address: no new capture needed
    _assert_equal(plan(*inp), _lbs(m, inp, faces=faces, impl="triton", graph=False))
    assert plan.captures == 2
    m["parents"][2] = 3  # a bad in-place update raises on every call
    for _ in range(2):
        with pytest.raises(ValueError, match="topologically sorted"):
            plan(*inp)


@needs_triton
def test_failed_capture_warns_and_runs_without_graph(gen, monkeypatch):
    def fail(fn, inputs, keep=(), warmup=2):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_graphs, "capture", fail)
    monkeypatch.setattr(_graphs, "usable", _usable_anywhere)
    m, _ = _model(gen, 13, 3, DEV)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        plan = _plan(m, 2, impl="triton")
    inp = _inputs(gen, m, 2)
    _assert_equal(plan(*inp), _lbs(m, inp, impl="triton", graph=False))
    assert plan.captures == 0


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_triton
@pytest.mark.parametrize("with_faces", [False, True])
@pytest.mark.parametrize("n", [1, 7])
def test_cuda_graph_plan_matches_eager(gen, n, with_faces):
    m, faces = _model(gen, 301, 20, "cuda", n_faces=500 if with_faces else 0)
    plan = _plan(m, n, faces=faces, impl="triton", graph=True)
    graph, views = plan._static
    kept = []
    for _ in range(4):
        inp = _inputs(gen, m, n)
        graph.outputs[0].fill_(float("nan"))  # unwritten output elements fail below
        got = plan(*inp)
        want = _lbs(m, inp, faces=faces, impl="triton", graph=False)
        _assert_equal(got, want)
        kept.append((got, want))
        graph.outputs[0].fill_(float("nan"))
        _assert_equal(plan(*inp, copy=False), want)
    assert plan.captures == 1 and plan.replays == 1 + 8
    for got, want in kept:
        _assert_equal(got, want)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(plan(*inp, copy=False), views))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_triton
def test_cuda_plan_follows_in_place_updates_and_falls_back_for_grad(gen):
    m, _ = _model(gen, 97, 8, "cuda")
    plan = _plan(m, 3, impl="triton")
    inp = _inputs(gen, m, 3)
    m["v_template"].add_(0.05)
    ref = K.lbs_ref(*inp[:2], *(m[key] for key in MODEL_KEYS), inp[2])
    for got, want in zip(plan(*inp), ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert plan.captures == 2
    c = inp[0].clone().requires_grad_(True)
    _assert_equal(tuple(x.detach() for x in plan(c, *inp[1:])), _lbs(m, inp, impl="triton", graph=False))
    assert plan.captures == 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_triton
def test_flame_model_forward_on_gpu_uses_a_plan(gen):
    from mvportrait.flame.params import FlameParams
    from mvportrait.flame.synthetic import synthetic_head

    mdl = synthetic_head(0, flame_size=True).model.to(device="cuda")
    for _ in range(3):
        p = FlameParams.zeros(1, 8, n_shape=300, n_expr=100)
        p.expression.copy_(torch.randn(p.expression.shape, generator=gen))
        p.jaw_pose.copy_(torch.rand(p.jaw_pose.shape, generator=gen) * 0.2)
        out = mdl(p, with_landmarks=False)
        pc = p.to(device="cuda")
        coeffs = torch.cat([pc.shape, pc.expression], -1).reshape(8, 400)
        want = K.lbs(coeffs, pc.full_pose().reshape(8, -1), mdl.v_template, mdl.blend_dirs(300, 100), mdl.posedirs,
                     mdl.j_regressor, mdl.parents, mdl.weights, pc.translation.reshape(8, 3), graph=False)
        assert torch.equal(out.vertices.reshape(8, -1, 3), want[0])
        assert torch.equal(out.joints.reshape(8, -1, 3), want[1])
    assert len(mdl._plans) == 1
    assert next(iter(mdl._plans.values())).captures == 1
