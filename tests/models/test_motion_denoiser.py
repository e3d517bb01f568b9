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


# ------------------------------------------------------------------- token cross-attention
def _tokens_model(kind="motion", **kw):
    torch.manual_seed(0)
    return MotionDenoiser(DenoiserConfig.from_name("tiny", kind, text_cond="tokens", **kw))


def _words(b=2, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 384, generator=g), torch.ones(b, n, dtype=torch.bool)


def test_presets_condition_on_tokens_and_old_configs_stay_pooled():
    assert DenoiserConfig.from_name("paper").text_cond == "tokens"
    assert DenoiserConfig.from_name("paper-pooled").text_cond == "pooled"
    old = DenoiserConfig.from_name("paper").to_dict()
    del old["text_cond"]  # a checkpoint written before the field existed
    assert DenoiserConfig.from_dict(old).text_cond == "pooled"
    with pytest.raises(ValueError, match="text_cond"):
        DenoiserConfig(text_cond="words")


@pytest.mark.parametrize("kind,dim", [("motion", MOTION_DIM), ("emotion", 50)])
def test_tokens_forward_shapes_and_text_matters(kind, dim):
    m = _tokens_model(kind).eval()
    x, t = torch.randn(2, 32, dim), torch.tensor([10, 600])
    tokens, mask = _words()
    out = m(x, t, tokens, mask)
    assert out.shape == (2, 32, dim) and torch.isfinite(out).all()
    other = m(x, t, *_words(seed=2))
    assert not torch.allclose(out, other)
    assert torch.allclose(m(x, t, tokens), out)  # no mask = every token is real
    with pytest.raises(ValueError, match="tokens"):
        m(x, t, torch.randn(2, 384))  # pooled input to a tokens model
    with pytest.raises(ValueError, match="mask"):
        m(x, t, tokens, mask[:, :3])
    with pytest.raises(ValueError, match="pooled|text_dim"):
        _model()(torch.randn(1, 32, MOTION_DIM), torch.tensor([3]), tokens[:1])  # tokens to a pooled model


def test_padding_tokens_do_not_change_the_output():
    m = _tokens_model().eval()
    x, t = torch.randn(3, 32, MOTION_DIM), torch.tensor([0, 300, 999])
    tokens, mask = _words(3, 6)
    mask[0, 4:] = False  # caption 0 has 4 real tokens, caption 1 has 6, caption 2 has 2
    mask[2, 2:] = False
    tokens = tokens * mask[..., None]
    ref = m(x, t, tokens, mask)
    # garbage in the padded positions, and 7 more padded positions
    pad = torch.randn(3, 7, 384) * 50
    garbage = torch.where(mask[..., None], tokens, torch.randn_like(tokens) * 50)
    out = m(x, t, torch.cat([garbage, pad], 1), torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # each caption alone at its own length gives its row of the batch
    for i, n in enumerate((4, 6, 2)):
        one = m(x[i:i + 1], t[i:i + 1], tokens[i:i + 1, :n], mask[i:i + 1, :n])
        torch.testing.assert_close(one, ref[i:i + 1], atol=1e-5, rtol=1e-5)


def test_tokens_cfg_null_and_dropout():
    m = _tokens_model()
    tokens, mask = m.null(3, 5)
    assert tokens.shape == (3, 5, 384) and mask.tolist() == [[True, False, False, False, False]] * 3
    assert torch.equal(tokens[:, 0], m.null_text.detach().expand(3, -1)) and not tokens[:, 1:].any()
    words, wmask = _words(4000, 5)
    with torch.no_grad():
        m.null_text.fill_(0.25)
    out, omask = m.drop_text(words, wmask, p=0.1, generator=torch.Generator().manual_seed(0))
    dropped = ~omask[:, 1]
    assert 0.08 < dropped.float().mean().item() < 0.12
    assert (out[dropped, 0] == 0.25).all() and not out[dropped, 1:].any() and not omask[dropped, 1:].any()
    assert torch.equal(out[~dropped], words[~dropped]) and torch.equal(omask[~dropped], wmask[~dropped])
    same, same_mask = m.drop_text(words, wmask, p=0.0)
    assert same is words and same_mask is wmask
    # the null caption conditions differently from a real one, and null_text learns
    m.eval()
    x, t = torch.randn(2, 32, MOTION_DIM), torch.tensor([3, 900])
    assert not torch.allclose(m(x, t, *_words()), m(x, t, *m.null(2, 5)))
    m.null_text.grad = None
    m(x, t, *m.null(2, 5)).sum().backward()
    assert m.null_text.grad is not None and m.null_text.grad.abs().sum() > 0
    # the null caption's padding length does not matter either
    torch.testing.assert_close(m(x, t, *m.null(2, 1)), m(x, t, *m.null(2, 9)), atol=1e-5, rtol=1e-5)


def test_tokens_model_runs_under_bf16_autocast():
    m = _tokens_model().eval()
    x, t = torch.randn(2, 32, MOTION_DIM), torch.tensor([10, 600])
    tokens, mask = _words()
    mask[0, 3:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, tokens, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), m(x, t, tokens, mask), atol=0.15, rtol=0.1)
