import pytest
import torch

from mvportrait.flame.params import FlameParams


def test_broadcast_and_defaults():
    p = FlameParams(shape=torch.randn(2, 10), expression=torch.randn(2, 7, 5))
    assert p.shape.shape == (2, 7, 10) and p.batch_size == 2 and p.num_frames == 7
    assert p.full_pose().shape == (2, 7, 15) and not p.full_pose().any()
    assert p.translation.shape == (2, 7, 3)


def test_slicing_and_cat_round_trip():
    p = FlameParams(shape=torch.randn(1, 4), expression=torch.randn(1, 9, 3), jaw_pose=torch.randn(1, 9, 3), fps=30)
    q = FlameParams.cat([p.frames(0, 4), p.frames(4, 9)])
    assert q.fps == 30
    torch.testing.assert_close(q.full_pose(), p.full_pose())
    torch.testing.assert_close(q.expression, p.expression)


@pytest.mark.parametrize("kwargs,match", [
    (dict(expression=torch.randn(1, 5, 3), jaw_pose=torch.randn(1, 5, 2)), "jaw_pose"),
    (dict(expression=torch.randn(1, 5, 3), jaw_pose=torch.randn(1, 4, 3)), "batch/frames"),
    (dict(expression=torch.full((1, 5, 3), float("nan"))), "NaN"),
    (dict(expression=torch.randn(1, 5, 3), global_pose=torch.tensor([[[0.0, float("inf"), 0]]]).expand(1, 5, 3)), "NaN or Inf"),
    (dict(expression=torch.randn(5, 3)), "frame count"),
    (dict(expression=torch.randn(1, 5, 3), fps=0), "fps"),
    (dict(expression=torch.randn(1, 5, 3).double()), "float64"),
])
def test_bad_input_raises_clear_errors(kwargs, match):
    kwargs.setdefault("shape", torch.randn(1, 4))
    with pytest.raises((ValueError, TypeError), match=match):
        FlameParams(**kwargs)


def test_non_tensor_and_integer_fields_rejected():
    with pytest.raises(TypeError, match="torch.Tensor"):
        FlameParams(shape=[0.0] * 4, expression=torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match="floating point"):
        FlameParams(shape=torch.zeros(1, 4, dtype=torch.long), expression=torch.zeros(1, 2, 3, dtype=torch.long))
