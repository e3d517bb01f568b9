"""Streaming runtime: one long-lived worker thread per engine runs its streams (GPU libraries keep
per-thread caches, e.g. PyTorch's cuDNN plans, that a new thread per stream would rebuild), and it ends
after an idle time."""
import dataclasses
import threading
import time

import pytest
import torch

from micro import fill_zero_params, micro_stage2_config
from mvportrait.engine import stream as stream_api
from mvportrait.engine import stream_batch as stream_mod
from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.engine.stream import StreamingEngine
from mvportrait.flame.demo import demo_sequence
from mvportrait.models.stage2 import FLAME2VideoModel


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture()
def engine():
    torch.manual_seed(0)
    model = fill_zero_params(FLAME2VideoModel(micro_stage2_config(frames=4)).eval())
    return StreamingEngine(FLAME2Video(model, overlap=1))


REF = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _stream(engine):
    engine.prepare(REF, flame=demo_sequence(seconds=0.5), views="ring-2", seed=1, realtime=False, steps=1)
    with engine.stream() as s:
        frames = list(s)
        job = s.thread
    return frames, job


def test_streams_of_one_engine_share_one_worker_thread(engine, monkeypatch):
    idents = []
    real = stream_mod._execute
    monkeypatch.setattr(stream_mod, "_execute", lambda st, plan: (idents.append(threading.get_ident()),
                                                                  real(st, plan))[1])
    frames_a, job_a = _stream(engine)
    frames_b, job_b = _stream(engine)
    assert frames_a and len(frames_a) == len(frames_b)
    assert not job_a.is_alive() and not job_b.is_alive()  # each stream's run has ended
    assert job_a.thread is job_b.thread and job_a.thread.is_alive()  # the thread stays for the next stream
    assert len(set(idents)) == 1 and idents[0] != threading.get_ident()  # every model call there, not here
    other = StreamingEngine(engine.stage2)  # another engine: its own thread (streams of two engines overlap)
    _, job_c = _stream(other)
    assert job_c.thread is not job_a.thread


def test_worker_thread_ends_when_idle_and_restarts(engine, monkeypatch):
    monkeypatch.setattr(stream_api, "WORKER_IDLE_S", 0.2)
    engine._worker = stream_api._Worker()  # picks up the short idle time
    _, job_a = _stream(engine)
    job_a.thread.join(5)
    assert not job_a.thread.is_alive() and engine._worker._thread is None
    frames, job_b = _stream(engine)  # a new thread for the next stream
    assert frames and job_b.thread is not job_a.thread


def test_a_failing_job_does_not_kill_the_worker():
    w = stream_api._Worker(idle_s=5)
    bad = w.submit(lambda: 1 / 0)
    bad.join(5)
    done = []
    good = w.submit(done.append, 1)
    good.join(5)
    assert done == [1] and good.thread is bad.thread and not good.is_alive()
    t0 = time.perf_counter()
    w.submit(time.sleep, 0.01).join(5)
    assert time.perf_counter() - t0 < 5


def test_a_new_stream_waits_for_the_previous_run_then_refuses(engine, monkeypatch):
    """A dropped or timed-out stream may still be in its model call: stream() waits for it, and raises
    (rather than queueing silently behind it) when it does not end in time."""
    class Stuck:
        thread = None
        joins: list = []

        def is_alive(self):
            return True

        def join(self, timeout=None):
            self.joins.append(timeout)

    monkeypatch.setattr(stream_api, "JOIN_TIMEOUT_S", 0.01)
    engine.prepare(REF, flame=demo_sequence(seconds=0.5), views="ring-2", seed=1, realtime=False, steps=1)
    engine._last_job = Stuck()
    with pytest.raises(RuntimeError, match="previous stream has not stopped"):
        engine.stream()
    assert Stuck.joins == [0.01]  # it waited the join time before refusing
    engine._last_job = None
    with engine.stream() as s:
        assert list(s)


def test_a_prepared_reference_context_is_reused_across_streams(engine, monkeypatch):
    """prepare(reference=ReferenceContext): the same frames as from the image, without running the
    reference network again; a context of another model, device or batch is refused."""
    ctx = engine.stage2.prepare(REF)
    runs = []
    real = engine.stage2.model.prepare_reference
    monkeypatch.setattr(engine.stage2.model, "prepare_reference", lambda *a, **k: (runs.append(1), real(*a, **k))[1])
    from_image, _ = _stream(engine)
    assert len(runs) == 1
    kw = dict(flame=demo_sequence(seconds=0.5), views="ring-2", seed=1, realtime=False, steps=1)
    engine.stage2._ctx_shapes = None  # (the module-scoped pipeline may have probed before)
    engine.prepare(ctx, **kw)
    with engine.stream() as s:
        from_ctx = list(s)
    assert len(runs) == 2  # one shape probe the first time a context is given, no reference run per stream
    engine.prepare(ctx, **kw)
    assert len(runs) == 2
    assert [f.index for f in from_ctx] == [f.index for f in from_image]
    for a, b in zip(from_image, from_ctx):
        assert (a.views == b.views).all()
    for bad, match in ((dataclasses.replace(ctx, latent=ctx.latent.repeat(2, 1, 1, 1)), "one portrait"),
                       (ctx.to(dtype=torch.float64), "float64"),
                       (dataclasses.replace(ctx, image_tokens=ctx.image_tokens[:, :1]), "does not fit")):
        with pytest.raises(ValueError, match=match):
            engine.prepare(bad, **kw)
