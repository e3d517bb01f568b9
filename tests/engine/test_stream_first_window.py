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


def test_first_window_of_the_full_length_is_the_default(engine, ref, monkeypatch):
    a, calls_a, _ = _run(engine, ref, monkeypatch, steps=2)
    b, calls_b, _ = _run(engine, ref, monkeypatch, steps=2, first_window=W)
    assert calls_a == calls_b and calls_a[0] == W
    assert all((x.views == y.views).all() for x, y in zip(a, b)) and len(a) == len(b)


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
