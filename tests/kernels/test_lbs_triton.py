"""Triton LBS + vertex normals vs the PyTorch references.

On a machine without CUDA the kernels run under the Triton interpreter. Triton reads
TRITON_INTERPRET once, when triton itself is imported (its own ``@jit`` helpers such as
``tl.zeros`` are wrapped then), so the flag is set here at collection time, before anything
imports triton; mvportrait's kernel modules import triton lazily, on the first Triton call, so
importing them earlier (other test modules do) is fine. With CUDA the same tests run compiled
on the GPU, and the ``gpu``-marked tests add the full-size FLAME case.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from mvportrait.kernels import lbs as K  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}  # the interpreter truncates f32 -> bf16: 1 ulp


def _model(nv, k, nj=5, dtype=torch.float32, faces=False):
    """Random FLAME-like model on DEV: skinning weights and regressor rows sum to 1."""
    w = torch.rand(nv, nj)
    w /= w.sum(1, keepdim=True)
    jr = torch.rand(nj, nv)
    jr /= jr.sum(1, keepdim=True)
    m = dict(v_template=torch.randn(nv, 3) * 0.1, dirs=torch.randn(nv, 3, k) * 0.01,
             posedirs=torch.randn(nv, 3, 9 * (nj - 1)) * 0.01, j_regressor=jr, weights=w)
    m = {key: val.to(DEV, dtype) for key, val in m.items()}
    m["parents"] = torch.tensor([-1, 0, 1, 1, 1][:nj], device=DEV)
    return m


def _args(m, n, translation=True):
    k = m["dirs"].shape[2]
    nj = m["j_regressor"].shape[0]
    dt = m["v_template"].dtype
    coeffs = torch.randn(n, k, device=DEV).to(dt)
    pose = (torch.randn(n, 3 * nj, device=DEV) * 0.5).to(dt)
    trans = (torch.randn(n, 3, device=DEV) * 0.1).to(dt) if translation else None
    return (coeffs, pose, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], m["parents"], m["weights"],
            trans)


def _f32(args):
    return [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _grid_mesh(rows, cols):
    """Bumpy height-field grid (consistently oriented faces) plus one vertex in no face."""
    y, x = torch.meshgrid(torch.linspace(-0.1, 0.1, rows), torch.linspace(-0.1, 0.1, cols), indexing="ij")
    verts = torch.stack([x, y, 0.02 * torch.randn(rows, cols)], -1).reshape(-1, 3)
    verts = torch.cat([verts, torch.zeros(1, 3)])
    idx = torch.arange(rows * cols).reshape(rows, cols)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = torch.cat([torch.stack([a, b, d], -1).reshape(-1, 3), torch.stack([a, d, c], -1).reshape(-1, 3)])
    return verts, faces


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("k", [1, 7, 50])
@pytest.mark.parametrize("nv", [1, 37, 130])
def test_lbs_triton_matches_reference_fp32(nv, k, n):
    m = _model(nv, k)
    args = _args(m, n)
    out = torch.full((n, nv, 3), float("nan"), device=DEV)
    verts, joints = K.lbs(*args, out=out, impl="triton")
    ref_v, ref_j = K.lbs_ref(*args)
    assert verts.data_ptr() == out.data_ptr()
    torch.testing.assert_close(verts, ref_v, **TOL[torch.float32])
    torch.testing.assert_close(joints, ref_j, **TOL[torch.float32])


@pytest.mark.parametrize("launch", [(32, 64, 8), (64, 32, 8), (32, 16, 4)])
def test_lbs_triton_vertex_launches_match_reference(monkeypatch, launch):
    """Every launch the benchmark sweep tries (BLOCK_V, BLOCK_N, warps) gives the reference's result,
    with frame and vertex counts that leave partial blocks in both grid dimensions."""
    monkeypatch.setattr(K, "VERTEX_CONFIG", launch)
    m = _model(37, 9)
    args = _args(m, 19)
    out = torch.full((19, 37, 3), float("nan"), device=DEV)
    verts, joints = K.lbs(*args, out=out, impl="triton", graph=False)
    ref_v, ref_j = K.lbs_ref(*args)
    torch.testing.assert_close(verts, ref_v, **TOL[torch.float32])
    torch.testing.assert_close(joints, ref_j, **TOL[torch.float32])


def test_vertex_config_default_and_override(monkeypatch):
    assert K._vertex_config(1) == (16, 16, 4)
    assert K._vertex_config(16) == (16, 16, 4)
    assert K._vertex_config(17) == (32, 32, 4)
    assert K._vertex_config(1000) == (32, 32, 4)
    monkeypatch.setattr(K, "VERTEX_CONFIG", (16, 32, 4))
    assert K._vertex_config(1) == (16, 32, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nv,k,n", [(37, 7, 5), (130, 50, 1), (1, 1, 5)])
def test_lbs_triton_half_precision_against_fp32_reference(nv, k, n, dtype):
    m = _model(nv, k, dtype=dtype)
    args = _args(m, n)
    out = torch.full((n, nv, 3), float("nan"), device=DEV, dtype=dtype)
    verts, joints = K.lbs(*args, out=out, impl="triton")
    assert verts.dtype == dtype and joints.dtype == dtype
    ref_v, ref_j = K.lbs_ref(*_f32(args))  # the same rounded inputs, computed in fp32
    torch.testing.assert_close(verts.float(), ref_v, **TOL[dtype])
    torch.testing.assert_close(joints.float(), ref_j, **TOL[dtype])


def test_lbs_triton_without_translation_allocates_and_accepts_joint_basis():
    m = _model(37, 7)
    args = _args(m, 3, translation=False)
    basis = K.construct_joint_basis(m["j_regressor"], m["v_template"], m["dirs"])
    assert basis.shape == (5, 3, 8) and basis.dtype == torch.float32
    verts, joints = K.lbs(*args, joint_basis=basis, impl="triton")
    ref_v, ref_j = K.lbs_ref(*args)
    assert verts.is_contiguous() and verts.shape == (3, 37, 3)
    torch.testing.assert_close(verts, ref_v, **TOL[torch.float32])
    torch.testing.assert_close(joints, ref_j, **TOL[torch.float32])


def test_lbs_triton_fewer_joints():
    m = _model(21, 5, nj=2)  # 9 pose features: one block of the pose loop, partly masked
    args = _args(m, 2)
    torch.testing.assert_close(K.lbs(*args, impl="triton")[0], K.lbs_ref(*args)[0], **TOL[torch.float32])


def test_construct_vertex_faces_lists_each_corner():
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [1, 1, 4]])
    table = K.construct_vertex_faces(faces, 6)
    assert table.dtype == torch.int32 and table.shape == (6, 3)
    rows = [sorted(int(f) for f in r if f >= 0) for r in table]
    assert rows == [[0, 1], [0, 2, 2], [0, 1], [1], [2], []]
    with pytest.raises(ValueError, match="outside"):
        K.construct_vertex_faces(faces, 4)
    with pytest.raises(ValueError, match="integer"):
        K.construct_vertex_faces(faces.float(), 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 3])
def test_vertex_normals_triton_matches_reference(n, dtype):
    verts, faces = _grid_mesh(5, 7)  # 35 + 1 vertices, 48 faces
    verts = (verts + 0.01 * torch.randn(n, *verts.shape)).to(DEV, dtype)
    faces = faces.to(DEV)
    out = torch.full_like(verts, float("nan"))
    got = K.vertex_normals(verts, faces, out=out, impl="triton")
    want = K.vertex_normals_ref(verts.float(), faces)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    assert torch.all(got[:, -1] == 0)  # the vertex in no face
    assert torch.allclose(got[:, :-1].float().norm(dim=-1), torch.ones(1, device=DEV), atol=2e-3)


def test_lbs_with_faces_returns_normals_of_posed_vertices():
    verts0, faces = _grid_mesh(4, 9)
    nv = verts0.shape[0]
    m = _model(nv, 7)
    m["v_template"] = verts0.to(DEV)
    faces = faces.to(DEV)
    args = _args(m, 5)
    table = K.construct_vertex_faces(faces, nv)
    verts, joints, normals = K.lbs(*args, faces=faces, vertex_faces=table, impl="triton")
    ref_v, _ = K.lbs_ref(*args)
    torch.testing.assert_close(verts, ref_v, **TOL[torch.float32])
    torch.testing.assert_close(normals, K.vertex_normals_ref(ref_v, faces), atol=1e-4, rtol=1e-4)
    ref = K.lbs(*args, faces=faces, impl="ref")  # the reference path returns normals too
    exact = dict(atol=1e-6, rtol=1e-6) if CUDA else dict(atol=0, rtol=0)  # CUDA index_add_: atomics, any order
    torch.testing.assert_close(ref[2], K.vertex_normals_ref(ref_v, faces), **exact)


def test_dispatch_rules():
    m = _model(37, 7)
    args = _args(m, 2)
    if not CUDA:  # auto = reference on CPU: bit-identical
        torch.testing.assert_close(K.lbs(*args)[0], K.lbs_ref(*args)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="impl"):
        K.lbs(*args, impl="cpp")
    m64 = {key: (v.double() if v.is_floating_point() else v) for key, v in m.items()}
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        K.lbs(*_args(m64, 2), impl="triton")
    with pytest.raises(ValueError, match="out"):
        K.lbs(*args, out=torch.empty(2, 3, 37, device=DEV), impl="triton")
    with pytest.raises(ValueError, match="joint_basis"):
        K.lbs(*args, joint_basis=torch.zeros(5, 3, 7, device=DEV), impl="triton")


def test_flame_model_honours_mvp_kernels(monkeypatch):
    from mvportrait.flame.model import FlameModel
    from mvportrait.flame.params import FlameParams

    nv = 29
    w = torch.rand(nv, 5)
    model = FlameModel(v_template=torch.randn(nv, 3) * 0.1, shapedirs=torch.randn(nv, 3, 4) * 0.01,
                       exprdirs=torch.randn(nv, 3, 3) * 0.01, posedirs=torch.randn(nv, 3, 36) * 0.01,
                       j_regressor=torch.full((5, nv), 1 / nv), weights=w / w.sum(1, keepdim=True),
                       parents=[-1, 0, 1, 1, 1], faces=torch.randint(0, nv, (10, 3)), device=DEV)
    params = FlameParams(shape=torch.randn(2, 4), expression=torch.randn(2, 3, 3),
                         jaw_pose=torch.randn(2, 3, 3) * 0.2, translation=torch.randn(2, 3, 3) * 0.1)
    outs = {}
    for choice in ("ref", "triton", "cpp"):
        monkeypatch.setenv("MVP_KERNELS", choice)
        outs[choice] = model(params).vertices
    torch.testing.assert_close(outs["triton"], outs["ref"], **TOL[torch.float32])
    torch.testing.assert_close(outs["cpp"], outs["triton" if CUDA else "ref"], atol=0, rtol=0)


@pytest.mark.skipif(CUDA, reason="checks the CPU error path without the interpreter")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch\nfrom mvportrait.kernels.lbs import lbs\n"
            "m = [torch.zeros(4, 3), torch.zeros(4, 3, 2), torch.zeros(4, 3, 36), torch.ones(5, 4) / 4,\n"
            "     torch.tensor([-1, 0, 1, 1, 1]), torch.ones(4, 5) / 5]\n"
            "try:\n    lbs(torch.zeros(1, 2), torch.zeros(1, 15), *m, impl='triton')\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------- full size, GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_full_size_flame_64_frames(dtype):
    from mvportrait.flame.synthetic import synthetic_head

    head = synthetic_head(0, flame_size=True)
    mdl = head.model.to(device="cuda", dtype=dtype)
    dirs = mdl.blend_dirs(300, 100)
    n = 64
    coeffs = torch.randn(n, 400, device="cuda").to(dtype)
    pose = (torch.randn(n, 15, device="cuda") * 0.3).to(dtype)
    trans = (torch.randn(n, 3, device="cuda") * 0.05).to(dtype)
    args = (coeffs, pose, mdl.v_template, dirs, mdl.posedirs, mdl.j_regressor, mdl.parents, mdl.weights, trans)
    out = torch.full((n, mdl.n_vertices, 3), float("nan"), device="cuda", dtype=dtype)
    verts, joints, normals = K.lbs(*args, faces=mdl.faces, out=out, impl="triton")
    ref_v, ref_j = K.lbs_ref(*_f32(args))
    tol = dict(atol=5e-5, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(verts.float(), ref_v, **tol)
    torch.testing.assert_close(joints.float(), ref_j, **tol)
    ref_n = K.vertex_normals_ref(verts.float(), mdl.faces)
    torch.testing.assert_close(normals.float(), ref_n, atol=1e-4 if dtype == torch.float32 else 1e-2, rtol=0)
