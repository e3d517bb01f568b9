"""The fused per-frame joint kernel of the Triton LBS (``_lbs_joints_kernel``) vs the torch step it replaces.

The torch step (float32 ``construct_joint_basis`` joints, ``rodrigues``, pose feature, ``batch_rigid_transform``)
is what ``lbs_ref`` computes and what the Triton path ran before; the kernel must give its three outputs
(pose feature, chain ``A`` (N, J, 3, 4), posed joints) for any valid parents tree, tiny / zero / large
angles, with and without translation. On a machine without CUDA the kernel runs under the Triton
interpreter (TRITON_INTERPRET is set at collection time, before anything imports triton). Uninitialised
memory is NaN while these tests run (deterministic mode), so output elements the kernel forgets to write
fail the comparisons. ``gpu``-marked tests check the FLAME size through ``lbs_plan``'s CUDA graph.
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
from mvportrait.kernels import lbs as K  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
DEV = "cuda" if CUDA else "cpu"
FLAME = [-1, 0, 1, 1, 1]
TREES = {"root": [-1], "pair": [-1, 0], "flame": FLAME, "branch": [-1, 0, 0, 2]}


@pytest.fixture(autouse=True)
def _nan_empty(nan_empty):
    """Unwritten outputs read NaN (tests/conftest.py: nan_empty)."""


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def _poses(gen, n, nj, dtype=torch.float32, device=DEV):
    """(N, 3J) axis-angles cycling through the regimes of ``rodrigues``: exact zeros, tiny angles (Taylor
    branch), angles just below and above its float32 threshold |r| = 1e-2, moderate and near pi."""
    angles = torch.tensor([0.0, 1e-6, 3e-4, 2e-3, 0.0099, 0.0101, 0.3, 1.2, 2.5, 3.1])
    axis = torch.randn(n, nj, 3, generator=gen)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    pick = torch.randperm(n * nj, generator=gen) % len(angles)
    pose = axis * angles[pick].reshape(n, nj, 1)
    if n * nj > 3:
        pose.view(-1, 3)[1] = torch.tensor([0.0, 0.0, 0.7])  # single-axis rotations: exact zeros in r
        pose.view(-1, 3)[2] = torch.tensor([-2.9, 0.0, 0.0])
    return pose.reshape(n, 3 * nj).to(device, dtype)


def _basis(gen, nj, k, device=DEV):
    """FLAME-like joint basis (J, 3, 1 + K) float32: rest joints ~0.1, directions ~0.01."""
    rest = torch.randn(nj, 3, 1, generator=gen) * 0.1
    return torch.cat([rest, torch.randn(nj, 3, k, generator=gen) * 0.01], -1).to(device)


def torch_step(coeffs, pose, basis, parents, translation):
    """The reference joint step (what ``_lbs_triton`` ran before the fused kernel), float32."""
    n, nj = coeffs.shape[0], basis.shape[0]
    joints = basis[..., 0] + torch.einsum("jck,nk->njc", basis[..., 1:], coeffs.float())
    rot = K.rodrigues(pose.float().reshape(n, nj, 3))
    feat = (rot[:, 1:] - torch.eye(3, device=rot.device)).reshape(n, 9 * (nj - 1))
    posed_joints, a = K.batch_rigid_transform(rot, joints, parents)
    if translation is not None:
        posed_joints = posed_joints + translation.float()[:, None, :]
    return feat, a[:, :, :3, :], posed_joints


def _close(got, want, rtol=1e-5, msg=""):
    """Relative 1e-5 of the largest entry (entries of A / joints cancel: elementwise rtol is meaningless)."""
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous(), msg
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=msg)


def _check_kernel(gen, n, parents, k, translation, dtype=torch.float32):
    nj = len(parents)
    basis = _basis(gen, nj, k)
    coeffs = torch.randn(n, k, generator=gen).to(DEV, dtype)
    pose = _poses(gen, n, nj, dtype)
    trans = (torch.randn(n, 3, generator=gen) * 0.1).to(DEV, dtype) if translation else None
    par_t = torch.tensor(parents, dtype=torch.int32, device=DEV)
    got = K._lbs_joints_triton(coeffs, pose, basis, par_t, trans)
    want = torch_step(coeffs, pose, basis, parents, trans)
    msg = f"seed {gen.initial_seed()}"
    assert [tuple(g.shape) for g in got] == [(n, 9 * (nj - 1)), (n, nj, 3, 4), (n, nj, 3)]
    for name, g, w in zip(("feat", "a", "joints"), got, want):
        _close(g, w, msg=f"{name}: {msg}")


@pytest.mark.parametrize("translation", [True, False])
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("n", [1, 3, 17, 40])
def test_joint_kernel_matches_torch_step(gen, n, tree, translation):
    _check_kernel(gen, n, TREES[tree], 23, translation)


@pytest.mark.parametrize("k", [0, 1, 300])
def test_joint_kernel_component_counts(gen, k):
    _check_kernel(gen, 5, FLAME, k, True)  # no components; one; several K blocks with a masked tail


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_joint_kernel_half_inputs_are_widened_like_the_torch_step(gen, dtype):
    _check_kernel(gen, 6, FLAME, 11, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_joint_kernel_writes_joints_into_a_given_output(gen, dtype):
    """``joints_out`` (what lbs passes: the model's dtype, a view of the packed graph buffer) gets the
    rounded posed joints; nothing else of the buffer is touched."""
    n, k = 5, 6
    basis = _basis(gen, 5, k)
    coeffs, pose = torch.randn(n, k, generator=gen).to(DEV, dtype), _poses(gen, n, 5, dtype)
    trans = torch.randn(n, 3, generator=gen).to(DEV, dtype)
    buf = torch.full((n * 15 + 7,), 123.0, dtype=dtype, device=DEV)
    view = buf[3:3 + n * 15].view(n, 5, 3)
    got = K._lbs_joints_triton(coeffs, pose, basis, torch.tensor(FLAME, dtype=torch.int32, device=DEV), trans, view)
    assert got[2] is view
    want = torch_step(coeffs, pose, basis, FLAME, trans)[2]
    ulp = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # 1 ulp (+ the interpreter's
    torch.testing.assert_close(view.float(), want, atol=ulp * 2, rtol=ulp)  # truncation to bf16)
    assert torch.all(buf[:3] == 123) and torch.all(buf[3 + n * 15:] == 123)


def test_joint_kernel_deep_chain_and_large_coefficients(gen):
    """Every joint the child of the previous one (errors compound along the chain) and large joints."""
    parents = [-1, 0, 1, 2, 3, 4, 5]
    nj, n, k = len(parents), 9, 40
    basis = _basis(gen, nj, k) * 30
    coeffs = torch.randn(n, k, generator=gen).to(DEV) * 3
    pose = _poses(gen, n, nj)
    trans = torch.randn(n, 3, generator=gen).to(DEV)
    got = K._lbs_joints_triton(coeffs, pose, basis, torch.tensor(parents, dtype=torch.int32, device=DEV), trans)
    for g, w in zip(got, torch_step(coeffs, pose, basis, parents, trans)):
        _close(g, w, msg=f"seed {gen.initial_seed()}")


def test_rotation_part_is_orthonormal(gen):
    """The chain's rotations stay rotations (no sign or transposition slip that the references share)."""
    n = 8
    basis = _basis(gen, 5, 4)
    a = K._lbs_joints_triton(torch.randn(n, 4, device=DEV), _poses(gen, n, 5), basis,
                             torch.tensor(FLAME, dtype=torch.int32, device=DEV), None)[1]
    rot = a[..., :3].double()
    eye = torch.eye(3, dtype=torch.float64, device=DEV).expand_as(rot)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye, atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(n, 5, dtype=torch.float64, device=DEV),
                               atol=2e-6, rtol=0)


# ------------------------------------------------------------------------- end to end through lbs
def _model(gen, nv, k, parents, dtype=torch.float32):
    nj = len(parents)
    w = torch.rand(nv, nj, generator=gen)
    w /= w.sum(1, keepdim=True)
    jr = torch.rand(nj, nv, generator=gen)
    jr /= jr.sum(1, keepdim=True)
    m = dict(v_template=torch.randn(nv, 3, generator=gen) * 0.1, dirs=torch.randn(nv, 3, k, generator=gen) * 0.01,
             posedirs=torch.randn(nv, 3, 9 * (nj - 1), generator=gen) * 0.01, j_regressor=jr, weights=w)
    m = {key: val.to(DEV, dtype) for key, val in m.items()}
    m["parents"] = torch.tensor(parents, device=DEV)
    return m


def _lbs_args(m, coeffs, pose, trans):
    return (coeffs, pose, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], m["parents"], m["weights"],
            trans)


@pytest.mark.parametrize("translation", [True, False])
@pytest.mark.parametrize("tree", list(TREES))
def test_lbs_triton_against_float64_reference(gen, tree, translation):
    parents = TREES[tree]
    nj, n, nv, k = len(parents), 5, 29, 9
    m = _model(gen, nv, k, parents)
    coeffs = torch.randn(n, k, generator=gen).to(DEV)
    pose = _poses(gen, n, nj)
    trans = (torch.randn(n, 3, generator=gen) * 0.1).to(DEV) if translation else None
    args = _lbs_args(m, coeffs, pose, trans)
    verts, joints = K.lbs(*args, impl="triton")
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref_v, ref_j = K.lbs_ref(*args64)
    msg = f"seed {gen.initial_seed()}"
    torch.testing.assert_close(verts.double(), ref_v, atol=1e-5, rtol=1e-5, msg=msg)
    torch.testing.assert_close(joints.double(), ref_j, atol=1e-5, rtol=1e-5, msg=msg)


def test_triton_path_no_longer_runs_the_torch_step(gen, monkeypatch):
    """``lbs(impl="triton")`` and a Triton plan use the kernel: the torch step's functions are not called."""
    m = _model(gen, 13, 4, FLAME)
    coeffs, pose, trans = torch.randn(2, 4, device=DEV), _poses(gen, 2, 5), torch.zeros(2, 3, device=DEV)
    want = K.lbs_ref(*_lbs_args(m, coeffs, pose, trans))

    def boom(*a, **kw):
        raise AssertionError("the torch joint step ran on the Triton path")

    monkeypatch.setattr(K, "rodrigues", boom)
    monkeypatch.setattr(K, "batch_rigid_transform", boom)
    for got in (K.lbs(*_lbs_args(m, coeffs, pose, trans), impl="triton"),
                K.lbs_plan(*(m[key] for key in ("v_template", "dirs", "posedirs", "j_regressor", "parents",
                                                "weights")), batch=2, impl="triton")(coeffs, pose, trans)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_parents_tensor_is_made_once_per_content(gen, monkeypatch):
    m = _model(gen, 11, 3, TREES["branch"])
    args = _lbs_args(m, torch.randn(2, 3, device=DEV), _poses(gen, 2, 4), None)
    K.lbs(*args, impl="triton")
    calls = []
    real = K._parents_tensor
    monkeypatch.setattr(K, "_parents_tensor", lambda *a: calls.append(a) or real(*a))
    first = K.lbs(*args, impl="triton")
    assert calls == []  # cached by _graphs.once
    m["parents"].copy_(torch.tensor([-1, 0, 1, 1]))  # in place: version bump -> new tensor
    second = K.lbs(*args, impl="triton")
    assert len(calls) == 1
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.testing.assert_close(second[1].double(), K.lbs_ref(*args64)[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first[1], second[1])


# --------------------------------------------------------------------------- FLAME size, GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CUDA graph path of lbs_plan at the FLAME size)")
@pytest.mark.parametrize("n", [1, 64])
def test_gpu_flame_plan_graph_matches_torch_step(gen, n):
    from mvportrait.flame.synthetic import synthetic_head

    mdl = synthetic_head(0, flame_size=True).model.to(device="cuda")
    dirs = mdl.blend_dirs(300, 100)
    model = (mdl.v_template, dirs, mdl.posedirs, mdl.j_regressor, mdl.parents, mdl.weights)
    plan = K.lbs_plan(*model, batch=n, impl="triton", graph=True)
    basis = K.construct_joint_basis(mdl.j_regressor, mdl.v_template, dirs)
    par = [int(p) for p in mdl.parents.tolist()]
    graph, _ = plan._static
    par_t = torch.tensor(par, dtype=torch.int32, device="cuda")
    zeros = [torch.zeros(n, 400, device="cuda"), torch.zeros(n, 15, device="cuda"), torch.zeros(n, 3, device="cuda")]
    g = _graphs.capture(lambda c, p, t: K._lbs_joints_triton(c, p, basis, par_t, t), zeros, keep=(basis, par_t))
    for _ in range(3):
        coeffs = torch.randn(n, 400, generator=gen).cuda()
        pose = _poses(gen, n, 5, device="cuda")
        trans = (torch.randn(n, 3, generator=gen) * 0.05).cuda()
        graph.outputs[0].fill_(float("nan"))  # unwritten output elements fail below
        verts, joints = plan(coeffs, pose, trans)
        feat, a, posed = torch_step(coeffs, pose, basis, par, trans)
        _close(joints, posed, msg=f"seed {gen.initial_seed()}")
        ref_v, ref_j = K.lbs_ref(coeffs, pose, *model, trans)  # fp32, the torch step inside
        torch.testing.assert_close(verts, ref_v, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(joints, ref_j, atol=5e-5, rtol=1e-4)
        # the kernel alone, replayed from a graph of its own with these inputs
        for out in g.outputs:
            out.fill_(float("nan"))
        for name, got, want in zip(("feat", "a", "joints"), g.replay([coeffs, pose, trans]), (feat, a, posed)):
            _close(got, want, msg=f"{name}: seed {gen.initial_seed()}")
    assert plan.captures == 1
