"""Streaming runtime with stochastic samplers (distilled students' consistency sampler, DDPM): per-window
noise pre-drawn in the offline pipeline's order, passed per row; offline equality, determinism, 1 step,
stage-1 look-ahead with a student sampler."""
import pytest
import torch

from mvportrait.config import DenoiserConfig
from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.engine.schedulers import ConsistencySampler, DDIMSampler, DDPMSampler, NoiseSchedule
from mvportrait.engine.stream import StreamingEngine, default_guidance
from mvportrait.engine.stream_batch import step_draws_noise, stochastic_sampler
from mvportrait.engine.text2flame import Text2FLAME
from mvportrait.flame.demo import demo_sequence
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.text_encoder import HashingEncoder


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


def _schedule(cfg):
    return NoiseSchedule.from_kind(cfg.beta_schedule, cfg.train_timesteps)


@pytest.fixture(scope="module")
def pipe(stage2_micro_run):
    """Its own pipeline (the sampler is swapped): window 2, overlap 1, a consistency sampler."""
    out, _ = stage2_micro_run
    p = FLAME2Video.from_pretrained(out / "final", overlap=1)
    p.sampler = ConsistencySampler(_schedule(p.config), prediction_type=p.config.prediction)
    return p


@pytest.fixture(scope="module")
def ref():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 32, 32, generator=g) * 2 - 1


def _stream(pipe, ref, fp, **kw):
    engine = StreamingEngine(pipe)
    engine.prepare(ref, flame=fp, views="ring-2", realtime=False, **kw)
    with engine.stream() as s:
        frames = list(s)
        stats = s.stats
    return torch.stack([torch.as_tensor(f.views) for f in frames]), stats


def test_noise_rules():
    sched = NoiseSchedule.from_kind("scaled_linear", 1000)
    assert not stochastic_sampler(DDIMSampler(sched))
    assert stochastic_sampler(DDIMSampler(sched, eta=1.0)) and stochastic_sampler(DDPMSampler(sched))
    cs = ConsistencySampler(sched)
    assert [step_draws_noise(cs, p) for _, p in cs.timestep_pairs(3)] == [True, True, False]
    assert [step_draws_noise(DDIMSampler(sched, eta=0.5), p) for _, p in cs.timestep_pairs(2)] == [True, True]
    with pytest.raises(ValueError, match="ConsistencySampler"):
        stochastic_sampler(object())


@pytest.mark.parametrize("steps", [1, 3])
def test_one_window_at_a_time_equals_offline(pipe, ref, steps, decode_spy):
    """stream_batch=1: every window's noise (start, per-step, overlap) in the offline order -> the frames
    of FLAME2Video.generate_from_maps with the same consistency sampler and seed."""
    fp = demo_sequence(seconds=0.8)
    ctx = pipe.prepare(ref)
    maps, _ = pipe.render_conditions(fp, "ring-2")
    spy = decode_spy(pipe)
    offline = pipe.generate_from_maps(ctx, maps, steps=steps, guidance=1.0, seed=3)
    z_off = spy.take()
    video, stats = _stream(pipe, ref, fp, steps=steps, seed=3, stream_batch=1)
    z = spy.take()
    assert stats.mean_batch == 1.0
    assert video.shape == offline.shape and z.shape == z_off.shape
    assert (video.int() - offline.int()).abs().max() <= 1
    assert (z - z_off).abs().max() < 2e-5
    if steps > 1:  # the per-step noise matters: another seed's step noise changes the frames
        other = pipe.generate_from_maps(ctx, maps, steps=steps, guidance=1.0, seed=4)
        assert not torch.equal(other, offline)


def test_stream_batch_rows_get_their_own_noise(pipe, ref, decode_spy):
    """Three windows at three different steps share each call; window 0 (no predecessor to condition on)
    must still equal the offline window 0 exactly: its rows got its own step noise at every step."""
    fp = demo_sequence(seconds=0.8)
    ctx = pipe.prepare(ref)
    maps, _ = pipe.render_conditions(fp, "ring-2")
    spy = decode_spy(pipe)
    pipe.generate_from_maps(ctx, maps, steps=3, guidance=1.0, seed=5)
    z_off = spy.take()
    video, stats = _stream(pipe, ref, fp, steps=3, seed=5)
    z = spy.take()
    assert stats.mean_batch > 2.0
    assert (z[:2] - z_off[:2]).abs().max() < 2e-5  # window 0: frames 0 and 1
    assert torch.isfinite(z).all() and (z - z_off).norm() / z_off.norm() < 0.5


def test_same_seed_same_frames_any_timing(pipe, ref):
    fp = demo_sequence(seconds=0.8)
    a, _ = _stream(pipe, ref, fp, steps=2, seed=7)
    b, _ = _stream(pipe, ref, fp, steps=2, seed=7, queue_size=1)  # another interleaving of producer/consumer
    c, _ = _stream(pipe, ref, fp, steps=2, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_student_default_guidance_is_one(pipe, ref):
    assert default_guidance(pipe) == 1.0
    engine = StreamingEngine(pipe)
    engine.prepare(ref, flame=demo_sequence(seconds=0.2), views="ring-2", steps=1, realtime=False)
    assert engine.settings.guidance == 1.0


def test_ddpm_sampler_streams_like_offline(pipe, ref, monkeypatch):
    fp = demo_sequence(seconds=0.5)
    ctx = pipe.prepare(ref)
    maps, _ = pipe.render_conditions(fp, "ring-2")
    monkeypatch.setattr(pipe, "sampler", DDPMSampler(_schedule(pipe.config), prediction_type=pipe.config.prediction,
                                                     timestep_spacing="trailing"))
    offline = pipe.generate_from_maps(ctx, maps, steps=2, guidance=1.0, seed=1)
    video, _ = _stream(pipe, ref, fp, steps=2, seed=1, stream_batch=1, guidance=1.0)
    assert (video.int() - offline.int()).abs().max() <= 1


def test_text_stream_with_a_consistency_stage1_equals_offline(pipe, ref, monkeypatch):
    """The stage-1 look-ahead samples windows through Text2FLAME.sample_window, so a student stage 1
    (consistency sampler from its config) streams the same motion as Text2FLAME.generate."""
    torch.manual_seed(0)
    t2f = Text2FLAME(MotionDenoiser(DenoiserConfig.from_name("tiny", "motion")),
                     MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")), HashingEncoder(), overlap=8)
    samplers = {}

    def student_sampler(self, model):
        cfg = model.cfg
        return samplers.setdefault(id(model), ConsistencySampler(_schedule(cfg), prediction_type=cfg.prediction))

    monkeypatch.setattr(Text2FLAME, "sampler_for", student_sampler)
    engine = StreamingEngine(pipe, t2f)
    engine.prepare(ref, "nods twice, then smiles", views="ring-2", fps=25.0, seconds=2.0, steps=1, seed=5,
                   realtime=False, stage1_steps=2, stage1_guidance=1.0, queue_size=1)
    with engine.stream() as s:
        frames = list(s)
    offline = t2f.generate("nods twice, then smiles", seconds=2.0, fps=25, steps=2, guidance=1.0, seed=5)
    pose = torch.cat([f.flame.neck_pose[0] for f in frames])
    expr = torch.cat([f.flame.expression[0] for f in frames])
    assert len(frames) == 50
    assert torch.equal(pose[:-1], offline.neck_pose[0, :-1])  # the last frame sees the sequence end offline
    assert torch.equal(expr[:-1], offline.expression[0, :-1])
    assert set(type(v).__name__ for v in samplers.values()) == {"ConsistencySampler"}


def test_student_default_steps(pipe, ref, monkeypatch):
    """A student's own default_steps when no steps are given (a teacher: the stream's few DDIM steps)."""
    engine = StreamingEngine(pipe)
    fp = demo_sequence(seconds=0.2)
    engine.prepare(ref, flame=fp, views="ring-2", realtime=False)
    assert engine.settings.steps == 4
    monkeypatch.setattr(pipe, "distill", {"sampler": "consistency", "guidance": 2.0, "teacher": "..",
                                          "default_steps": 2}, raising=False)
    engine.prepare(ref, flame=fp, views="ring-2", realtime=False)
    assert engine.settings.steps == 2 and engine.settings.stream_batch == 2 and engine.settings.guidance == 1.0
