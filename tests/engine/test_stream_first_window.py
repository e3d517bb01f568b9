"""Streaming runtime, a shorter first window (``prepare(first_window=...)``): window 0's cheaper first call,
the frame layout of the windows after it, continuity across the seams, and the argument checks."""
import pytest
import torch

from micro import fill_zero_params, micro_stage2_config
from mvportrait.engine import stream_batch as stream_mod
from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.engine.stream import StreamingEngine
from mvportrait.flame.demo import demo_sequence
from mvportrait.models.stage2 import FLAME2VideoModel

W, O = 4, 1  # the model's window and the overlap


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = fill_zero_params(FLAME2VideoModel(micro_stage2_config(frames=W)).eval())
    return StreamingEngine(FLAME2Video(model, overlap=O))


@pytest.fixture(scope="module")
def ref():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _run(engine, ref, monkeypatch, seconds=0.8, **kw):
    """Frames, (frames per model call), and (start, frames, final latents) of every finished window."""
    calls, windows = [], []
    real_execute, real_emit = stream_mod._execute, stream_mod._emit
    monkeypatch.setattr(stream_mod, "_execute", lambda st, plan: (calls.append(plan.x.shape[2]),
                                                                  real_execute(st, plan))[1])
    monkeypatch.setattr(stream_mod, "_emit", lambda st, w: (windows.append((w.start, w.frames, w.final.clone())),
                                                            real_emit(st, w))[1])
    engine.prepare(ref, flame=demo_sequence(seconds=seconds), views="ring-2", seed=3, realtime=False, **kw)
    with engine.stream() as s:
        frames = list(s)
    monkeypatch.undo()
    return frames, calls, windows


@pytest.mark.parametrize("first, steps", [(2, 1), (3, 2), (2, 2)])
def test_short_first_window_layout_and_continuity(engine, ref, monkeypatch, first, steps):
    frames, calls, windows = _run(engine, ref, monkeypatch, first_window=first, steps=steps)
    total = round(0.8 * engine.stage2.fps)  # the sequence resampled to the stream's rate
    assert [f.index for f in frames] == list(range(total))  # every frame once, in order
    assert all(f.views.shape == (2, 32, 32, 3) for f in frames)
    assert calls[:steps] == [first] * steps  # window 0: its steps alone, on its own frames only
    assert set(calls[steps:]) == {W}
    assert windows[0][:2] == (0, first)
    for (s0, n0, z0), (s1, n1, z1) in zip(windows, windows[1:]):
        assert n1 == W and s1 == s0 + n0 - O  # each window starts O frames before its predecessor ends
        assert torch.equal(z1[:, :O], z0[:, n0 - O:])  # the overlap ends on the predecessor's final latents
    assert windows[-1][0] + windows[-1][1] >= total


def test_default_first_window_is_overlap_plus_one_for_one_step_with_fast_start(engine, ref, monkeypatch):
    a, calls_a, _ = _run(engine, ref, monkeypatch, steps=1)
    assert engine.settings.first_window == O + 1
    b, calls_b, _ = _run(engine, ref, monkeypatch, steps=1, first_window=O + 1)
    assert calls_a == calls_b and calls_a[0] == O + 1
    assert all((x.views == y.views).all() for x, y in zip(a, b)) and len(a) == len(b)
    _, calls_c, _ = _run(engine, ref, monkeypatch, steps=1, fast_start=False)  # windows enter together: W
    assert engine.settings.first_window == W and calls_c[0] == W
    _, calls_d, _ = _run(engine, ref, monkeypatch, steps=2)  # window 1 needs two calls: a full window 0
    assert engine.settings.first_window == W and calls_d[:2] == [W, W]


def test_stream_no_longer_than_the_first_window(engine, ref, monkeypatch):
    """A 2-frame first window and a 2-frame stream: one window, one 2-frame call."""
    frames, calls, windows = _run(engine, ref, monkeypatch, seconds=2 / engine.stage2.fps, first_window=2, steps=1)
    assert len(frames) == 2 and calls == [2] and len(windows) == 1


@pytest.mark.parametrize("kw, message", [
    ({"first_window": O}, "first_window"),
    ({"first_window": W + 1}, "first_window"),
    ({"first_window": 2.5}, "first_window"),
    ({"first_window": 2, "fast_start": False}, "fast_start"),
])
def test_first_window_checks(engine, ref, kw, message):
    with pytest.raises(ValueError, match=message):
        engine.prepare(ref, flame=demo_sequence(seconds=0.4), views="ring-2", realtime=False, **kw)


@pytest.mark.parametrize("first, steps, stream_batch", [(2, 1, None), (3, 2, 1), (4, 1, None)])
def test_stream_equals_the_offline_pipeline_with_the_same_first_window(engine, ref, monkeypatch, first, steps,
                                                                       stream_batch):
    """One step, or one window at a time: the stream's windows (a shorter window 0 included) draw the offline
    pipeline's noise, so ``generate_from_maps(first_window=)`` gives the same frames and final latents."""
    pipe = engine.stage2
    fp = demo_sequence(seconds=0.8)
    maps, _ = pipe.render_conditions(fp, "ring-2")
    ctx = pipe.prepare(ref)
    finals = []
    real = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda z: (finals.append(z.clone()), real(z))[1])
    offline = pipe.generate_from_maps(ctx, maps, steps=steps, seed=3, first_window=first)
    monkeypatch.undo()
    frames, calls, windows = _run(engine, ref, monkeypatch, first_window=first, steps=steps,
                                  stream_batch=stream_batch)
    video = torch.stack([torch.as_tensor(f.views) for f in frames])
    assert video.shape == offline.shape and calls[0] == first
    diff = (video.int() - offline.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    z_off = finals[0][0]  # (V, T, C, h, w): the offline latents of every frame
    for start, n, z in windows:  # each streamed window's final latents are the offline frames' latents
        n = min(n, z_off.shape[1] - start)
        assert (z[:, :n] - z_off[:, start:start + n]).abs().max() < 2e-5


def test_offline_first_window_layout_and_checks(engine, ref):
    pipe = engine.stage2
    maps, _ = pipe.render_conditions(demo_sequence(seconds=0.8), "ring-2")
    ctx = pipe.prepare(ref)
    default = pipe.generate_from_maps(ctx, maps, steps=1, seed=3)
    assert torch.equal(default, pipe.generate_from_maps(ctx, maps, steps=1, seed=3, first_window=W))
    short = pipe.generate_from_maps(ctx, maps, steps=1, seed=3, first_window=2)
    assert short.shape == default.shape and not torch.equal(short, default)
    t = pipe.last_timings.extra
    total = maps.shape[2]
    assert t["windows"] == 1 + -(-(total - 2) // (W - O))  # 2 frames, then windows of W starting W - 2 earlier
    for bad in (O, W + 1, 2.5, True):
        with pytest.raises(ValueError, match="first_window"):
            pipe.generate_from_maps(ctx, maps, steps=1, first_window=bad)


def test_stream_shorter_than_its_first_window_equals_the_offline_pipeline(engine, ref, monkeypatch):
    """One frame with a 3-frame first window: window 0's conditioning padded (offline and streamed alike),
    one frame out, the offline frame."""
    pipe = engine.stage2
    fp = demo_sequence(seconds=1 / 25)  # 1 frame at the model's rate
    maps, _ = pipe.render_conditions(fp, "ring-2")
    assert maps.shape[2] == 1
    offline = pipe.generate_from_maps(pipe.prepare(ref), maps, steps=1, seed=3, first_window=3)
    frames, calls, _ = _run(engine, ref, monkeypatch, seconds=1 / 25, first_window=3, steps=1)
    assert len(frames) == 1 and calls == [3] and offline.shape[0] == 1
    assert (torch.as_tensor(frames[0].views).int() - offline[0].int()).abs().max() <= 1
