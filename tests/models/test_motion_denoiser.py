"""MotionDenoiser: shapes, the velocity loss, CFG dropout, smoothing, config presets."""
import pytest
import torch

from mvportrait.config import DENOISER_PRESETS, MOTION_DIM, DenoiserConfig
from mvportrait.models.motion_denoiser import MotionDenoiser, diffusion_loss, smooth_frames


def _model(kind="motion", **kw):
    torch.manual_seed(0)
    return MotionDenoiser(DenoiserConfig.from_name("tiny", kind, **kw))


@pytest.mark.parametrize("kind,dim", [("motion", MOTION_DIM), ("emotion", 50)])
def test_forward_shapes(kind, dim):
    m = _model(kind).eval()
    for b, t in ((1, 32), (3, 17)):
        out = m(torch.randn(b, t, dim), torch.randint(0, 1000, (b,)), torch.randn(b, 384))
        assert out.shape == (b, t, dim)
        assert torch.isfinite(out).all()


def test_forward_rejects_wrong_channels():
    with pytest.raises(ValueError, match="channels"):
        _model()(torch.randn(1, 8, 5), torch.zeros(1, dtype=torch.long), torch.randn(1, 384))


def test_text_changes_output():
    m = _model().eval()
    x, t = torch.randn(2, 32, MOTION_DIM), torch.full((2,), 500)
    a = m(x, t, torch.randn(2, 384))
    b = m(x, t, m.null(2))
    assert not torch.allclose(a, b)


def test_velocity_loss_hand_made():
    x0 = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])  # (1, 4, 1), velocity 1 per frame
    pred = torch.tensor([[[1.0], [1.0], [3.0], [3.0]]])  # errors 1, 0, 1, 0; velocities 0, 2, 0
    out = diffusion_loss(pred, x0, velocity_weight=0.5)
    assert out["simple"].item() == pytest.approx(0.5)  # (1 + 0 + 1 + 0) / 4
    assert out["velocity"].item() == pytest.approx(1.0)  # ((0-1)^2 + (2-1)^2 + (0-1)^2) / 3
    assert out["loss"].item() == pytest.approx(0.5 + 0.5 * 1.0)
    # a constant offset costs L_simple only
    off = diffusion_loss(x0 + 2.0, x0)
    assert off["velocity"].item() == pytest.approx(0.0) and off["simple"].item() == pytest.approx(4.0)


def test_cfg_dropout_rate_and_null():
    m = _model()
    text = torch.randn(4000, 384)
    with torch.no_grad():
        m.null_text.fill_(0.25)
    out = m.drop_text(text, p=0.1, generator=torch.Generator().manual_seed(0))
    dropped = (out == 0.25).all(1)
    assert 0.08 < dropped.float().mean().item() < 0.12
    assert torch.equal(out[~dropped], text[~dropped])
    assert torch.equal(m.drop_text(text, p=0.0), text)
    # null_text is learned: it receives gradients
    m.null_text.grad = None
    y = m(torch.randn(2, 32, MOTION_DIM), torch.tensor([3, 900]), m.null(2)).sum()
    y.backward()
    assert m.null_text.grad is not None and m.null_text.grad.abs().sum() > 0


def test_normalization_round_trip():
    m = _model()
    m.set_normalization(torch.arange(9.0), torch.full((9,), 2.0))
    x = torch.randn(2, 5, 9)
    assert torch.allclose(m.denormalize(m.normalize(x)), x, atol=1e-6)


def test_smooth_frames():
    x = torch.zeros(1, 5, 1)
    x[0, 2, 0] = 3.0
    y = smooth_frames(x, 3)
    assert torch.allclose(y[0, :, 0], torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    ramp = torch.arange(10.0).reshape(1, 10, 1)
    assert torch.allclose(smooth_frames(ramp, 3)[:, 1:-1], ramp[:, 1:-1])  # linear motion is kept
    assert torch.equal(smooth_frames(ramp, 1), ramp)
    with pytest.raises(ValueError):
        smooth_frames(ramp, 4)


def test_presets():
    assert DENOISER_PRESETS["paper"]["layers"] == 1 and DENOISER_PRESETS["paper"]["width"] == 64
    cfg = DenoiserConfig.from_name("paper", "emotion")
    assert cfg.in_dim == 50 and cfg.kind == "emotion"
    assert DenoiserConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown denoiser preset"):
        DenoiserConfig.from_name("huge")
    with pytest.raises(ValueError):
        DenoiserConfig(width=65, heads=4)
