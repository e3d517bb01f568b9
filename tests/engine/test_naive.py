"""Naive pipeline: the engine's math without its optimisations (same frames as FLAME2Video.generate and
Text2FLAME.generate), and it really is naive (call counts: reference UNet per step, guidance as two UNet
calls, one view per encoder / decoder call)."""
import pytest
import torch

from mvportrait.config import DenoiserConfig
from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.engine.naive import NaivePipeline
from mvportrait.engine.text2flame import Text2FLAME
from mvportrait.flame.demo import demo_sequence
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.text_encoder import HashingEncoder


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def pipe(stage2_micro_run):
    out, _ = stage2_micro_run
    return FLAME2Video.from_pretrained(out / "final", overlap=1)


@pytest.fixture(scope="module")
def t2f():
    torch.manual_seed(0)
    return Text2FLAME(MotionDenoiser(DenoiserConfig.from_name("tiny", "motion")),
                      MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")), HashingEncoder(), overlap=8)


@pytest.fixture(scope="module")
def ref():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 32, 32, generator=g) * 2 - 1


class _Count:
    def __init__(self, monkeypatch, obj, name):
        self.n = 0
        real = getattr(obj, name)

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(obj, name, counted)


@pytest.mark.parametrize("views, steps, guidance", [("ring-2", 3, None), ("ring-3", 2, 1.0)])
def test_same_frames_as_flame2video(pipe, ref, views, steps, guidance):
    fp = demo_sequence(seconds=0.6)
    fast = pipe.generate(ref, fp, views=views, steps=steps, guidance=guidance, seed=3)
    naive = NaivePipeline(pipe)
    slow = naive.generate(ref, fp, views=views, steps=steps, guidance=guidance, seed=3)
    assert slow.shape == fast.shape and slow.dtype == torch.uint8
    diff = (slow.int() - fast.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    assert set(naive.timings) >= {"lbs", "raster", "flame_encoder", "reference", "unet", "decode"}


def test_it_is_naive(pipe, ref, monkeypatch):
    """Reference UNet once per step, guidance as two UNet calls per step, one view per FLAME-encoder and
    per decoder call, the reference rasterizer one view at a time."""
    import mvportrait.render.renderer as renderer

    fp = demo_sequence(seconds=0.4)  # 10 frames at 25 fps -> 5 at 12.5: window 2, hop 1 -> 4 windows
    m = pipe.model
    counts = {name: _Count(monkeypatch, obj, attr) for name, obj, attr in (
        ("reference", m.reference_unet, "forward"), ("unet", m.unet, "forward"),
        ("encoder", m.flame_encoder, "forward"), ("decode", m.autoencoder, "decode"))}
    impls = []
    real_render = renderer.render
    monkeypatch.setattr(renderer, "render", lambda *a, **k: (impls.append((k["impl"], a[2].batch_shape[-1])),
                                                             real_render(*a, **k))[1])
    frames = NaivePipeline(pipe).generate(ref, fp, views="ring-2", steps=3, seed=0)
    windows, steps = 4, 3
    assert frames.shape[:2] == (5, 2)
    assert counts["reference"].n == windows * steps
    assert counts["unet"].n == 2 * windows * steps
    assert counts["encoder"].n == 2 * windows
    assert counts["decode"].n == 5 * 2
    assert set(impls) == {("ref", 1)} and len(impls) == 2 * windows


def test_stage1_matches_text2flame(pipe, t2f):
    naive = NaivePipeline(pipe, t2f)
    a = naive.text2flame("nods twice, then smiles", seconds=2.0, fps=25.0, steps=4, seed=5)
    b = t2f.generate("nods twice, then smiles", seconds=2.0, fps=25, steps=4, seed=5)
    assert a.num_frames == b.num_frames == 50
    for name in ("global_pose", "neck_pose", "jaw_pose", "expression"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    assert naive.timings["text"] > 0 and naive.timings["stage1"] > 0


def test_needs_eager_torch_and_stage1(pipe, monkeypatch):
    with pytest.raises(ValueError, match="stage-1"):
        NaivePipeline(pipe).text2flame("nods", seconds=1.0)

    class Wrapped:
        backend = "onnxruntime"

    from mvportrait.engine import backends

    monkeypatch.setattr(backends, "BackendFLAME2VideoModel", Wrapped)
    fake = type("P", (), {"model": Wrapped()})()
    with pytest.raises(ValueError, match="eager PyTorch"):
        NaivePipeline(fake)
