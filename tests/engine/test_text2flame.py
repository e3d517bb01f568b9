"""Text2FLAME pipeline: shapes, determinism, windowed long generation, argument errors, shipped weights."""
import logging

import numpy as np
import pytest
import torch

from mvportrait.config import DenoiserConfig
from mvportrait.engine.text2flame import DEFAULT_WEIGHTS, Text2FLAME
from mvportrait.evaluation import motion_analyser as ma
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.text_encoder import HashingEncoder


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (and do not fight a busy machine's other processes)."""

SHIPPED = (DEFAULT_WEIGHTS / "motion.safetensors").is_file()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="no shipped stage-1 weights")


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    m = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion"))
    e = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion"))
    return Text2FLAME(m, e, HashingEncoder(), overlap=8)


@pytest.fixture(scope="module")
def shipped():
    return Text2FLAME.from_pretrained()


def test_shapes_and_padding(tiny_pipe):
    p = tiny_pipe.generate("nods twice, then smiles", seconds=1.0, fps=25, steps=4)
    assert p.batch_size == 1 and p.num_frames == 25
    assert p.neck_pose.shape == (1, 25, 3) and p.jaw_pose.shape == (1, 25, 3) and p.global_pose.shape == (1, 25, 3)
    assert p.expression.shape == (1, 25, 50) and p.shape.shape == (1, 25, 300)
    assert torch.count_nonzero(p.shape) == 0
    q = tiny_pipe.generate("nods", seconds=1.0, steps=4, n_expr=100, shape=torch.ones(300), fps=30)
    assert q.expression.shape == (1, 30, 100) and torch.count_nonzero(q.expression[..., 50:]) == 0
    assert torch.all(q.shape == 1) and q.fps == 30


def test_deterministic_with_seed(tiny_pipe):
    a = tiny_pipe.generate("turns to the left", seconds=1.0, steps=4, seed=3)
    b = tiny_pipe.generate("turns to the left", seconds=1.0, steps=4, seed=3)
    c = tiny_pipe.generate("turns to the left", seconds=1.0, steps=4, seed=4)
    assert torch.equal(a.neck_pose, b.neck_pose) and torch.equal(a.expression, b.expression)
    assert not torch.equal(a.neck_pose, c.neck_pose)
    t = tiny_pipe.last_timings
    assert t.encode_s >= 0 and t.motion_s > 0 and t.emotion_s > 0


def test_windowed_length(tiny_pipe):
    w = tiny_pipe.window  # 32 frames, overlap 8 -> 3 windows for 70 frames
    p = tiny_pipe.generate("nods", seconds=70 / 25, steps=2)
    assert w == 32 and p.num_frames == 70
    assert torch.isfinite(p.neck_pose).all()


@pytest.mark.parametrize("kw,match", [
    ({"seconds": 0}, "seconds"), ({"seconds": -1.0}, "seconds"), ({"seconds": float("nan")}, "seconds"),
    ({"fps": 0}, "fps"), ({"fps": 1000}, "fps"), ({"steps": 0}, "steps"), ({"seed": -1}, "seed"),
    ({"seconds": 1e6}, "seconds"),
])
def test_bad_arguments(tiny_pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipe.generate("nods", **kw)


def test_bad_prompts(tiny_pipe, caplog):
    with pytest.raises(ValueError, match="empty"):
        tiny_pipe.generate("   ")
    with pytest.raises(TypeError):
        tiny_pipe.generate(None)
    with caplog.at_level(logging.WARNING):
        p = tiny_pipe.generate("nods slowly " * 400, seconds=0.5, steps=1)
    assert p.num_frames == 12
    assert any("longer than" in r.getMessage() for r in caplog.records)


def test_bad_construction():
    m = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion"))
    e = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion"))
    with pytest.raises(ValueError, match="in_dim"):
        Text2FLAME(e, e, HashingEncoder())
    with pytest.raises(ValueError, match="overlap"):
        Text2FLAME(m, e, HashingEncoder(), overlap=32)
    with pytest.raises(FileNotFoundError):
        Text2FLAME.from_pretrained("/nonexistent/folder")


# ------------------------------------------------------------------- token-conditioned models
@pytest.fixture(scope="module")
def tokens_pipe():
    torch.manual_seed(0)
    m = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion", text_cond="tokens"))
    e = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion"))  # pooled and tokens models mix
    return Text2FLAME(m, e, HashingEncoder(), overlap=8)


def test_tokens_pipeline_encodes_tokens_and_generates(tokens_pipe):
    from mvportrait.engine.text2flame import cond_rows

    (tok, mask), pooled = tokens_pipe.encode(["nods twice, then turns left", "nods"], ["smiles", "frowns"])
    assert tok.shape[:2] == mask.shape and mask.sum(1).tolist() == [7, 3] and pooled.shape == (2, 384)
    first = cond_rows((tok, mask), slice(1, 2))
    assert first[0].shape[0] == 1 and torch.equal(first[1], mask[1:])
    a = tokens_pipe.generate("nods twice, then turns left and smiles", seconds=1.0, steps=3, seed=2)
    b = tokens_pipe.generate("nods twice, then turns left and smiles", seconds=1.0, steps=3, seed=2)
    assert a.num_frames == 25 and torch.equal(a.neck_pose, b.neck_pose)
    assert tokens_pipe.generate("nods", seconds=70 / 25, steps=2).num_frames == 70  # windows + inpainting


def test_tokens_sampling_ignores_padding_and_checks_the_condition(tokens_pipe):
    model = tokens_pipe.motion_model
    (tok, mask), _ = tokens_pipe.encode(["nods"], ["smiles"])
    padded = (torch.cat([tok, torch.randn(1, 4, 384)], 1), torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], 1))
    outs = [tokens_pipe.sample(model, c, 32, steps=3, generator=torch.Generator().manual_seed(0)) for c in
            ((tok, mask), padded)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tokens"):
        tokens_pipe.sample(model, tok[:, 0], 32, steps=2)
    with pytest.raises(ValueError, match="pooled"):
        tokens_pipe.sample(tokens_pipe.emotion_model, (tok, mask), 32, steps=2)


# ------------------------------------------------------------------- the shipped reference models
@needs_shipped
def test_shipped_turn_left(shipped):
    p = shipped.generate("a man turns to the left", seconds=4.0, seed=0, steps=50)
    found = ma.analyse_motion({"global_pose": p.global_pose, "neck_pose": p.neck_pose, "jaw_pose": p.jaw_pose})
    assert ("turn", "left") in found.actions()
    assert ("turn", "right") not in found.actions()


@needs_shipped
def test_shipped_long_generation_no_border_jump(shipped):
    from mvportrait.data.corpus import Text2FlameCorpus

    ref = Text2FlameCorpus.generate(200, seed=0).motion_features()
    max_step = np.abs(np.diff(ref, axis=1)).max()
    p = shipped.generate("shakes their head, then looks up", seconds=10.0, seed=1, steps=10)
    x = torch.cat([p.global_pose, p.neck_pose, p.jaw_pose], -1)[0].numpy()
    hop = shipped.window - shipped.overlap
    assert x.shape[0] == 250
    steps = np.abs(np.diff(x, axis=0))  # (T - 1, 9)
    for border in (shipped.window, shipped.window + hop):  # first new frame of windows 2 and 3
        assert steps[border - 2:border + 1].max() <= max_step, border
    assert steps.max() <= max_step
