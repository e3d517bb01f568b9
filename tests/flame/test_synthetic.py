"""The synthetic FLAME-format head: format, topology, skinning, semantic components, landmarks."""
import numpy as np
import pytest
import torch

from mvportrait.flame.appearance import Appearance, vertex_colors
from mvportrait.flame.landmarks import IBUG_GROUPS
from mvportrait.flame.params import FlameParams
from mvportrait.flame.synthetic import EXPRESSION_NAMES, synthetic_head


@pytest.fixture(scope="module")
def head():
    return synthetic_head(0)


def _params(model, frames=1, **kw):
    e = torch.zeros(1, frames, model.n_expr)
    for name, val in kw.pop("expr", {}).items():
        e[..., EXPRESSION_NAMES.index(name)] = val
    return FlameParams(shape=torch.zeros(1, model.n_shape), expression=e,
                       **{k: torch.tensor(v, dtype=torch.float32).reshape(1, 1, -1).expand(1, frames, -1)
                          for k, v in kw.items()})


def _edges(faces):
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return counts


def test_format_and_sizes(head):
    m = head.model
    assert (m.n_vertices, m.n_faces, m.n_shape, m.n_expr, m.n_joints) == (5024, 10036, 300, 100, 5)
    flame = synthetic_head(0, flame_size=True).model
    assert (flame.n_vertices, flame.n_faces) == (5023, 9976)  # exactly FLAME's counts
    assert m.posedirs.shape == (5024, 3, 36) and m.lmk_faces_idx.shape == (68,)
    assert m.parents.tolist() == [-1, 0, 1, 1, 1]
    torch.testing.assert_close(m.j_regressor.sum(1), torch.ones(5))
    torch.testing.assert_close(m.weights.sum(1), torch.ones(m.n_vertices))
    assert (m.weights >= 0).all()
    assert m.posedirs.abs().sum() > 0  # non-zero pose correctives


def test_closed_surface_outward_and_open_neck_variant(head):
    f = head.model.faces.numpy()
    assert (_edges(f) == 2).all()  # closed two-manifold: every edge shared by exactly two faces
    v = head.model.v_template.double()
    ft = head.model.faces
    vol = (torch.cross(v[ft[:, 0]], v[ft[:, 1]], dim=1) * v[ft[:, 2]]).sum() / 6
    assert 0.003 < vol < 0.008  # outward winding, a head-sized volume in m^3
    open_counts = _edges(synthetic_head(0, flame_size=True).model.faces.numpy())
    assert (open_counts == 1).sum() == 60  # one boundary loop at the neck


def test_deterministic_and_seed_changes_random_components():
    a, b, c = synthetic_head(3), synthetic_head(3), synthetic_head(4)
    assert torch.equal(a.model.shapedirs, b.model.shapedirs)
    assert not torch.allclose(a.model.shapedirs[..., 50], c.model.shapedirs[..., 50])
    torch.testing.assert_close(a.model.shapedirs[..., 0], c.model.shapedirs[..., 0])  # named ones fixed
    with pytest.raises(ValueError, match="seed"):
        synthetic_head(-1)


def test_shape_components_orthogonal_with_decaying_variance(head):
    s = head.model.shapedirs.double().reshape(-1, 300)
    gram = s.T @ s
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() < 1e-8
    peak = s.reshape(-1, 3, 300).norm(dim=1).max(0).values
    assert peak[0] > peak[20] > peak[120] > peak[299]


def test_eyeballs_stay_rigid_under_shape(head):
    m = head.model
    eye = torch.as_tensor(head.is_eye)
    beta = torch.randn(1, 300)
    out = m(FlameParams(shape=beta, expression=torch.zeros(1, 1, 100)))
    d = out.vertices[0, 0, eye] - m.v_template[eye]
    n = d.shape[0] // 2
    for part in (d[:n], d[n:]):
        torch.testing.assert_close(part, part[:1].expand_as(part), atol=1e-6, rtol=0)


def test_jaw_opens_mouth_and_moves_only_lower_face(head):
    m = head.model
    rest = m(_params(m))
    opened = m(_params(m, jaw_pose=[0.3, 0, 0]))
    lm0, lm1 = rest.landmarks[0, 0], opened.landmarks[0, 0]
    gap = lambda lm: (lm[62] - lm[66]).norm()  # inner lip, upper centre vs lower centre  # noqa: E731
    assert gap(lm0) < 0.004 and gap(lm1) > 0.015
    moved = (opened.vertices - rest.vertices)[0, 0].norm(dim=-1)
    top = m.v_template[:, 1] > 0.06
    assert moved[top].max() < 1e-6  # the cranium does not move
    assert (lm1[8, 1] < lm0[8, 1] - 0.01)  # chin goes down


def test_neck_rotation_turns_head_about_neck_joint(head):
    m = head.model
    out = m(_params(m, neck_pose=[0, 0.5, 0]))  # yaw toward the subject's left
    nose = out.landmarks[0, 0, 30]
    assert nose[0] > 0.03  # the nose tip moves to +x
    base = m(_params(m)).vertices[0, 0]
    bottom = m.v_template[:, 1] < -0.165
    torch.testing.assert_close(out.vertices[0, 0, bottom], base[bottom], atol=1e-4, rtol=0)  # correctives only


def test_landmark_layout_is_ibug_68(head):
    lm = head.model(_params(head.model)).landmarks[0, 0]
    x, y = lm[:, 0], lm[:, 1]
    jaw = list(IBUG_GROUPS["jaw"])
    assert (x[jaw[:8]] < 0).all() and (x[jaw[9:]] > 0).all() and abs(x[8]) < 1e-3  # right -> left
    assert y[8] == y[jaw].min()  # chin is the lowest contour point
    assert (x[list(IBUG_GROUPS["right_eye"])] < 0).all() and (x[list(IBUG_GROUPS["left_eye"])] > 0).all()
    assert (x[list(IBUG_GROUPS["right_brow"])] < 0).all() and (x[list(IBUG_GROUPS["left_brow"])] > 0).all()
    assert y[list(IBUG_GROUPS["right_brow"])].min() > y[list(IBUG_GROUPS["right_eye"])].max()
    assert lm[30, 2] == lm[:, 2].max()  # nose tip is the most forward point
    assert y[51] > y[62] > y[66] > y[57]  # outer upper lip > inner upper > inner lower > outer lower
    # symmetric layout
    mirror = [16 - i for i in range(17)]
    torch.testing.assert_close(x[jaw], -x[mirror], atol=2e-3, rtol=0)


@pytest.mark.parametrize("name,check", [
    ("smile", lambda a, b: b[48, 1] - a[48, 1] > 0.003 and b[54, 1] - a[54, 1] > 0.003),
    ("frown", lambda a, b: a[48, 1] - b[48, 1] > 0.003 and a[54, 1] - b[54, 1] > 0.003),
    ("brow_raise", lambda a, b: (b[17:27, 1] - a[17:27, 1]).min() > 0.002),
    ("brow_furrow", lambda a, b: (a[[21, 22], 1] - b[[21, 22], 1]).min() > 0.0015 and b[22, 0] - b[21, 0] < a[22, 0] - a[21, 0]),
    ("eye_close_left", lambda a, b: (b[43, 1] - b[47, 1]) < 0.4 * (a[43, 1] - a[47, 1]) and abs(b[38, 1] - a[38, 1]) < 1e-4),
    ("eye_close_right", lambda a, b: (b[37, 1] - b[41, 1]) < 0.4 * (a[37, 1] - a[41, 1]) and abs(b[44, 1] - a[44, 1]) < 1e-4),
    ("lip_pucker", lambda a, b: (b[54, 0] - b[48, 0]) < (a[54, 0] - a[48, 0]) - 0.004 and b[51, 2] > a[51, 2] + 0.003),
    ("mouth_stretch", lambda a, b: (b[54, 0] - b[48, 0]) > (a[54, 0] - a[48, 0]) + 0.006),
    ("lips_part", lambda a, b: (b[62, 1] - b[66, 1]) > (a[62, 1] - a[66, 1]) + 0.002),
    ("brow_inner_raise", lambda a, b: (b[[21, 22], 1] - a[[21, 22], 1]).min() > 0.002),
    ("eyes_wide", lambda a, b: (b[37, 1] - b[41, 1]) > (a[37, 1] - a[41, 1]) + 0.002),
])
def test_semantic_expressions_move_landmarks(head, name, check):
    m = head.model
    a = m(_params(m)).landmarks[0, 0]
    b = m(_params(m, expr={name: 1.0})).landmarks[0, 0]
    assert check(a, b), name


def test_appearance_deterministic_and_colours_regions(head):
    a1, a2, b = Appearance.sample(5), Appearance.sample(5), Appearance.sample(6)
    assert a1 == a2 and a1 != b
    col = vertex_colors(head, Appearance.default())
    assert col.shape == (head.model.n_vertices, 3) and col.dtype == np.float32
    assert 0 <= col.min() and col.max() <= 1
    pupil = head.eye_polar == 0
    assert col[pupil].max() < 0.1  # pupils are dark
    assert col[head.pocket > 0.9].mean() < col[~head.is_eye].mean()  # mouth inside is darker than skin
