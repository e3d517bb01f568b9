"""lbs_ref checked in float64 against independent math (matrix exponential, explicit per-vertex loop)."""
import numpy as np
import pytest
import torch

from mvportrait.kernels.lbs import lbs, lbs_ref, rodrigues

D = torch.float64


def _skew(r):
    x, y, z = r
    return torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=D)


def _random_model(nv=23, k=7, nj=5, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    w = torch.rand(nv, nj, generator=g, dtype=D)
    w /= w.sum(1, keepdim=True)
    jr = torch.rand(nj, nv, generator=g, dtype=D)
    jr /= jr.sum(1, keepdim=True)
    return dict(v_template=torch.randn(nv, 3, generator=g, dtype=D) * 0.1,
                dirs=torch.randn(nv, 3, k, generator=g, dtype=D) * 0.01,
                posedirs=torch.randn(nv, 3, 9 * (nj - 1), generator=g, dtype=D) * 0.01,
                j_regressor=jr, parents=torch.tensor([-1, 0, 1, 1, 1][:nj]), weights=w), g


def _lbs_loop(coeffs, pose, m, translation):
    """Independent per-vertex implementation: matrix_exp rotations, explicit 4x4 chain."""
    nv = m["v_template"].shape[0]
    nj = m["j_regressor"].shape[0]
    par = m["parents"].tolist()
    out = torch.zeros(coeffs.shape[0], nv, 3, dtype=D)
    for n in range(coeffs.shape[0]):
        vs = m["v_template"] + (m["dirs"] * coeffs[n]).sum(-1)
        jt = m["j_regressor"] @ vs
        rots = [torch.linalg.matrix_exp(_skew(pose[n, 3 * j:3 * j + 3])) for j in range(nj)]
        feat = torch.cat([(r - torch.eye(3, dtype=D)).flatten() for r in rots[1:]])
        vp = vs + (m["posedirs"] * feat).sum(-1)
        glob = []
        for j in range(nj):
            loc = torch.eye(4, dtype=D)
            loc[:3, :3] = rots[j]
            loc[:3, 3] = jt[j] - (jt[par[j]] if j else 0)
            glob.append(loc if j == 0 else glob[par[j]] @ loc)
        for v in range(nv):
            acc = torch.zeros(4, 4, dtype=D)
            for j in range(nj):
                rest = torch.eye(4, dtype=D)
                rest[:3, 3] = -jt[j]
                acc += m["weights"][v, j] * (glob[j] @ rest)
            out[n, v] = (acc @ torch.cat([vp[v], torch.ones(1, dtype=D)]))[:3] + translation[n]
    return out


def test_rodrigues_matches_matrix_exponential():
    r = torch.randn(64, 3, dtype=D) * 2
    r[:4] *= 1e-7  # tiny angles use the series
    r[4] = torch.tensor([np.pi, 0, 0], dtype=D)
    got = rodrigues(r)
    want = torch.stack([torch.linalg.matrix_exp(_skew(x)) for x in r])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert torch.allclose(got @ got.transpose(-1, -2), torch.eye(3, dtype=D).expand(64, 3, 3), atol=1e-12)


def test_rodrigues_gradient_finite_at_zero():
    r = torch.zeros(2, 3, dtype=D, requires_grad=True)
    rodrigues(r).sum().backward()
    assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("n", [1, 3])
def test_lbs_ref_matches_independent_loop(n):
    m, g = _random_model()
    coeffs = torch.randn(n, 7, generator=g, dtype=D)
    pose = torch.randn(n, 15, generator=g, dtype=D) * 0.5
    trans = torch.randn(n, 3, generator=g, dtype=D) * 0.1
    verts, _ = lbs_ref(coeffs, pose, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], m["parents"],
                       m["weights"], trans)
    torch.testing.assert_close(verts, _lbs_loop(coeffs, pose, m, trans), atol=1e-12, rtol=0)


def test_identity_pose_returns_shaped_template_and_joints_move_with_shape():
    m, g = _random_model()
    coeffs = torch.randn(4, 7, generator=g, dtype=D)
    verts, joints = lbs_ref(coeffs, torch.zeros(4, 15, dtype=D), m["v_template"], m["dirs"], m["posedirs"],
                            m["j_regressor"], m["parents"], m["weights"])
    shaped = m["v_template"] + torch.einsum("vck,nk->nvc", m["dirs"], coeffs)
    torch.testing.assert_close(verts, shaped, atol=1e-14, rtol=0)
    torch.testing.assert_close(joints, torch.einsum("jv,nvc->njc", m["j_regressor"], shaped), atol=1e-14, rtol=0)
    assert not torch.allclose(joints[0], joints[1])  # different shapes -> different joints


def test_root_rotation_is_rigid_about_root_joint():
    m, g = _random_model()
    coeffs = torch.randn(1, 7, generator=g, dtype=D)
    r = torch.randn(3, generator=g, dtype=D)
    pose = torch.zeros(1, 15, dtype=D)
    pose[0, :3] = r
    verts, joints = lbs_ref(coeffs, pose, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"],
                            m["parents"], m["weights"])
    rest, rest_j = lbs_ref(coeffs, torch.zeros_like(pose), m["v_template"], m["dirs"], m["posedirs"],
                           m["j_regressor"], m["parents"], m["weights"])
    rot = torch.linalg.matrix_exp(_skew(r))
    j0 = rest_j[0, 0]
    torch.testing.assert_close(verts[0], (rest[0] - j0) @ rot.T + j0, atol=1e-13, rtol=0)
    torch.testing.assert_close(joints[0], (rest_j[0] - j0) @ rot.T + j0, atol=1e-13, rtol=0)


def test_translation_adds():
    m, g = _random_model()
    c, p = torch.randn(2, 7, generator=g, dtype=D), torch.randn(2, 15, generator=g, dtype=D)
    t = torch.randn(2, 3, generator=g, dtype=D)
    a, _ = lbs_ref(c, p, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], m["parents"], m["weights"])
    b, _ = lbs_ref(c, p, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], m["parents"], m["weights"], t)
    torch.testing.assert_close(b, a + t[:, None], atol=1e-14, rtol=0)


def test_lbs_validates_inputs():
    m, g = _random_model(seed=1)
    c, p = torch.randn(2, 7, dtype=D), torch.randn(2, 15, dtype=D)
    args = [m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], m["parents"], m["weights"]]
    with pytest.raises(ValueError, match="pose"):
        lbs(c, p[:, :12], *args)
    with pytest.raises(ValueError, match="dtype"):
        lbs(c.float(), p, *args)
    bad = dict(m)
    bad["parents"] = torch.tensor([-1, 0, 3, 1, 1])
    with pytest.raises(ValueError, match="parents"):
        lbs(c, p, m["v_template"], m["dirs"], m["posedirs"], m["j_regressor"], bad["parents"], m["weights"])
    with pytest.raises(TypeError):
        lbs(c.numpy(), p, *args)
