"""CUDA-graph replay of the Triton LBS (``lbs(..., graph=...)``) and the one-time checks cache.

The graph tests need a GPU (``gpu`` marker); the cache and the dispatch rules are checked on
the CPU too.
"""
import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from mvportrait.kernels import _graphs  # noqa: E402
from mvportrait.kernels import lbs as K  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")


def _model(nv, k, dev, nj=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(nv, nj, generator=g)
    w /= w.sum(1, keepdim=True)
    jr = torch.rand(nj, nv, generator=g)
    jr /= jr.sum(1, keepdim=True)
    m = dict(v_template=torch.randn(nv, 3, generator=g) * 0.1, dirs=torch.randn(nv, 3, k, generator=g) * 0.01,
             posedirs=torch.randn(nv, 3, 9 * (nj - 1), generator=g) * 0.01, j_regressor=jr, weights=w)
    m = {key: val.to(dev) for key, val in m.items()}
    m["parents"] = torch.tensor([-1, 0, 1, 1, 1][:nj], device=dev)
    return m


def _inputs(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    dev = m["v_template"].device
    k = m["dirs"].shape[2]
    return (torch.randn(n, k, generator=g).to(dev), (torch.randn(n, 15, generator=g) * 0.5).to(dev),
            (torch.randn(n, 3, generator=g) * 0.1).to(dev))


def _call(m, inp, **kw):
    c, p, t = inp
    return K.lbs(c, p, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], m["parents"], m["weights"],
                 t, **kw)


# ------------------------------------------------------------------------------ CPU
def test_once_caches_until_the_tensor_changes():
    t = torch.arange(6)
    calls = []

    def work():
        calls.append(1)
        return int(t.sum())

    assert _graphs.once("test.sum", (t,), work) == 15
    assert _graphs.once("test.sum", (t,), work) == 15
    assert len(calls) == 1
    t[0] = 10  # in place: the version counter moves, the value is recomputed
    assert _graphs.once("test.sum", (t,), work) == 25
    assert len(calls) == 2
    assert _graphs.once("test.sum", (t,), work, extra="other") == 25  # extra is part of the key
    assert len(calls) == 3


def test_once_accepts_inference_tensors():
    with torch.inference_mode():  # no version counter: cached by address / shape / dtype
        t = torch.arange(4)
    calls = []
    for _ in range(2):
        assert _graphs.once("test.inference", (t,), lambda: calls.append(1) or 6) == 6
    assert len(calls) == 1
    m = _model(12, 4, "cpu")
    with torch.inference_mode():  # a model and inputs made under inference mode, as the engine does
        mi = {key: val.clone() for key, val in m.items()}
        inp = _inputs(mi, 2, 0)
        got = _call(mi, inp, impl="ref", faces=torch.randint(0, 12, (10, 3)))
    torch.testing.assert_close(got[0], _call(m, inp, impl="ref")[0])


def test_once_does_not_cache_failures():
    t = torch.tensor([-1, 5])
    calls = []

    def check():
        calls.append(1)
        raise ValueError("bad")

    for _ in range(2):
        with pytest.raises(ValueError, match="bad"):
            _graphs.once("test.bad", (t,), check)
    assert len(calls) == 2


def test_bad_parents_raise_on_every_call():
    m = _model(12, 4, "cpu")
    m["parents"] = torch.tensor([-1, 0, 3, 1, 1])
    for _ in range(2):
        with pytest.raises(ValueError, match="topologically sorted"):
            _call(m, _inputs(m, 2, 0), impl="ref")


def test_graphs_are_not_used_on_cpu_and_graph_true_is_an_error():
    m = _model(12, 4, "cpu")
    assert not _graphs.usable(torch.device("cpu"))
    with pytest.raises(ValueError, match="graph=True needs"):
        _call(m, _inputs(m, 2, 0), impl="ref", graph=True)
    with pytest.raises(ValueError, match="graph must be"):
        _call(m, _inputs(m, 2, 0), impl="ref", graph="yes")


def test_rigid_transform_takes_parents_as_list_or_tensor():
    rot = K.rodrigues(torch.randn(3, 5, 3) * 0.4)
    joints = torch.randn(3, 5, 3)
    a = K.batch_rigid_transform(rot, joints, torch.tensor([-1, 0, 1, 1, 1]))
    b = K.batch_rigid_transform(rot, joints, [-1, 0, 1, 1, 1])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_triton
@pytest.mark.parametrize("with_faces", [False, True])
@pytest.mark.parametrize("n", [1, 7])
def test_graph_replays_match_eager_on_fresh_inputs(n, with_faces):
    m = _model(301, 20, "cuda")
    faces = torch.randint(0, 301, (500, 3), device="cuda") if with_faces else None
    before = K.GRAPHS.captures
    results = []
    for seed in range(4):  # successive calls with different inputs: no stale replay
        inp = _inputs(m, n, seed)
        got = _call(m, inp, faces=faces, impl="triton", graph=True)
        want = _call(m, inp, faces=faces, impl="triton", graph=False)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        results.append([g.clone() for g in got])
        if seed == 0:
            first = got
    assert K.GRAPHS.captures == before + 1  # one capture, then replays
    for g, r in zip(first, results[0]):  # results of call 1 are not overwritten by later replays
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    assert not torch.equal(results[0][0], results[1][0])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_triton
def test_graph_writes_out_and_follows_in_place_model_updates():
    m = _model(97, 8, "cuda", seed=1)
    inp = _inputs(m, 3, 5)
    out = torch.full((3, 97, 3), float("nan"), device="cuda")
    v, _ = _call(m, inp, out=out, impl="triton", graph=True)
    assert v.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, _call(m, inp, impl="triton", graph=False)[0], rtol=0, atol=0)
    m["v_template"].add_(0.05)  # same address, new values: the replay reads them (joint basis recomputed)
    v2, j2 = _call(m, inp, impl="triton", graph=True)
    ref_v, ref_j = K.lbs_ref(inp[0], inp[1], m["v_template"], m["dirs"], m["posedirs"],
                             m["j_regressor"], m["parents"], m["weights"], inp[2])
    torch.testing.assert_close(v2, ref_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(j2, ref_j, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_triton
def test_graphs_off_by_env_grad_or_capture(monkeypatch):
    m = _model(50, 6, "cuda", seed=2)
    inp = _inputs(m, 2, 0)
    _call(m, inp, impl="triton")  # warm the default path once
    before = K.GRAPHS.replays
    monkeypatch.setenv("MVP_CUDA_GRAPHS", "0")
    _call(m, inp, impl="triton")
    with pytest.raises(ValueError, match="graph=True needs"):
        _call(m, inp, impl="triton", graph=True)
    monkeypatch.setenv("MVP_CUDA_GRAPHS", "1")
    c = inp[0].clone().requires_grad_(True)
    v, _ = _call(m, (c, inp[1], inp[2]), impl="triton")  # autograd input: eager path
    assert K.GRAPHS.replays == before
    _call(m, inp, impl="triton")
    assert K.GRAPHS.replays == before + 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_triton
def test_flame_model_forward_on_gpu_uses_one_graph():
    from mvportrait.flame.params import FlameParams
    from mvportrait.flame.synthetic import synthetic_head

    head = synthetic_head(0, flame_size=True)
    mdl = head.model.to(device="cuda")
    before = K.GRAPHS.captures
    outs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        p = FlameParams.zeros(1, 8, n_shape=300, n_expr=100)
        p.expression.copy_(torch.randn(p.expression.shape, generator=g))
        p.jaw_pose.copy_(torch.rand(p.jaw_pose.shape, generator=g) * 0.2)
        outs.append(mdl(p, with_landmarks=False).vertices.clone())
    assert K.GRAPHS.captures - before <= 1
    assert not torch.equal(outs[0], outs[1])
