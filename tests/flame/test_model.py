import numpy as np
import pytest
import torch

from mvportrait.flame.model import FlameModel
from mvportrait.flame.params import FlameParams
from mvportrait.flame.synthetic import synthetic_head


def _arrays(nv=12, nf=8, s=4, e=3):
    rng = np.random.default_rng(0)
    w = rng.random((nv, 5))
    return dict(v_template=rng.normal(size=(nv, 3)), shapedirs=rng.normal(size=(nv, 3, s)),
                exprdirs=rng.normal(size=(nv, 3, e)), posedirs=rng.normal(size=(nv, 3, 36)),
                j_regressor=np.full((5, nv), 1 / nv), weights=w / w.sum(1, keepdims=True),
                parents=[-1, 0, 1, 1, 1], faces=rng.integers(0, nv, (nf, 3)))


def test_any_vertex_and_component_count():
    m = FlameModel(**_arrays(nv=7, s=2, e=9))
    out = m(FlameParams(shape=torch.zeros(2, 2), expression=torch.zeros(2, 3, 9)))
    assert out.vertices.shape == (2, 3, 7, 3) and out.landmarks is None


@pytest.mark.parametrize("key,value,match", [
    ("shapedirs", np.zeros((11, 3, 4)), "V=11"),
    ("posedirs", np.zeros((12, 3, 30)), "pose features"),
    ("faces", np.array([[0, 1, 99]]), "faces index"),
    ("parents", [-1, 0, 3, 1, 1], "parents"),
    ("v_template", np.full((12, 3), np.nan), "NaN"),
    ("weights", np.zeros((12, 4)), "J=4"),
])
def test_bad_arrays_named_in_errors(key, value, match):
    a = _arrays()
    a[key] = value
    with pytest.raises(ValueError, match=match):
        FlameModel(**a)


def test_forward_rejects_too_many_components_and_wrong_type():
    m = FlameModel(**_arrays())
    with pytest.raises(ValueError, match="components"):
        m(FlameParams(shape=torch.zeros(1, 5), expression=torch.zeros(1, 1, 3)))
    with pytest.raises(TypeError, match="FlameParams"):
        m(torch.zeros(1, 15))


def test_fewer_components_equal_zero_padding_and_to_float64():
    m = synthetic_head(0).model
    g = torch.Generator().manual_seed(0)
    beta, psi = torch.randn(1, 20, generator=g), torch.randn(1, 4, 10, generator=g)
    pose = torch.randn(1, 4, 3, generator=g) * 0.2
    a = m(FlameParams(shape=beta, expression=psi, jaw_pose=pose)).vertices
    b = m(FlameParams(shape=torch.nn.functional.pad(beta, (0, 280)),
                      expression=torch.nn.functional.pad(psi, (0, 90)), jaw_pose=pose)).vertices
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    m64 = m.to(dtype=torch.float64)
    c = m64(FlameParams(shape=beta.double(), expression=psi.double(), jaw_pose=pose.double())).vertices
    torch.testing.assert_close(c.float(), a, atol=1e-5, rtol=0)
