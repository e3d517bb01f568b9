"""Streaming runtime: order and completeness (lossless), drops (latest), cancellation, errors, determinism,
stream batch vs the offline pipeline, live updates and their continuity, pacing, async iteration."""
import asyncio
import gc
import logging
import time

import numpy as np
import pytest
import torch

from mvportrait.config import DenoiserConfig
from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.engine.stream import StreamingEngine
from mvportrait.engine.stream_queue import FrameQueue
from mvportrait.engine.text2flame import DEFAULT_WEIGHTS as STAGE1_WEIGHTS
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
    return FLAME2Video.from_pretrained(out / "final", overlap=1)  # window 2, overlap 1: a window per frame


@pytest.fixture(scope="module")
def tiny_t2f():
    torch.manual_seed(0)
    return Text2FLAME(MotionDenoiser(DenoiserConfig.from_name("tiny", "motion")),
                      MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")), HashingEncoder(), overlap=8)


@pytest.fixture(scope="module")
def engine(pipe, tiny_t2f):
    return StreamingEngine(pipe, tiny_t2f)


@pytest.fixture(scope="module")
def ref():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 32, 32, generator=g) * 2 - 1


def _frames(engine, **kw):
    with engine.stream() as stream:
        return list(stream), stream.stats


def _video(frames) -> torch.Tensor:
    return torch.stack([torch.as_tensor(f.views) for f in frames])  # (T, V, H, W, 3)


def test_lossless_order_completeness_and_frame_format(engine, ref):
    fp = demo_sequence(seconds=1.0)  # 25 frames at 25 fps -> 13 at the model's 12.5 fps
    engine.prepare(ref, flame=fp, views="ring-2", steps=2, seed=0, queue_size=1, policy="lossless", realtime=False)
    got = []
    with engine.stream() as stream:
        for f in stream:
            time.sleep(0.25)  # ~3x a frame's production time, also on a loaded machine: the producer must wait
            got.append(f)
        stats = stream.stats
    assert [f.index for f in got] == list(range(13))
    assert stats.dropped == 0 and stats.frames_out == stats.frames_delivered == 13
    assert stats.producer_wait_s > 0
    f = got[5]
    assert isinstance(f.views, np.ndarray) and f.views.shape == (2, 32, 32, 3) and f.views.dtype == np.uint8
    assert f.timestamp == pytest.approx(5 / 12.5)
    assert f.timings.denoise_s > 0 and f.timings.render_s > 0 and f.timings.latency_s > 0
    assert f.flame.num_frames == 1 and f.revision == 0
    assert stats.mean_batch > 1.5  # stream batch: two windows per call in the steady state


@pytest.mark.parametrize("steps, stream_batch", [(1, None), (3, 1)])
def test_matches_offline_pipeline_where_exact(engine, pipe, ref, steps, stream_batch, decode_spy):
    """One step, or one window at a time: the offline pipeline's noise and constraint, so the same frames
    (up to float rounding of rendering each window's frames separately)."""
    fp = demo_sequence(seconds=0.8)
    ctx = pipe.prepare(ref)
    maps, _ = pipe.render_conditions(fp, "ring-2")
    spy = decode_spy(pipe)
    offline = pipe.generate_from_maps(ctx, maps, steps=steps, seed=4)
    z_off = spy.take()
    engine.prepare(ref, flame=fp, views="ring-2", steps=steps, seed=4, realtime=False, stream_batch=stream_batch)
    frames, _ = _frames(engine)
    video = _video(frames)
    assert video.shape == offline.shape
    diff = (video.int() - offline.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    assert (spy.take() - z_off).abs().max() < 2e-5


def test_frames_are_queued_as_they_are_decoded(pipe, tiny_t2f, ref, monkeypatch):
    """A window of several new frames is decoded one frame (all views) at a time, and each frame is
    queued before the next is decoded: the first frame does not wait for its whole window."""
    events = []  # the first window (2 frames, no predecessor) emits both of its frames
    real_decode, real_put = pipe.model.autoencoder.decode, FrameQueue.put
    monkeypatch.setattr(pipe.model.autoencoder, "decode", lambda z: (events.append(("decode", z.shape[0])),
                                                                     real_decode(z))[1])
    monkeypatch.setattr(FrameQueue, "put", lambda q, f, ts: (events.append(("put", f.index)), real_put(q, f, ts))[1])
    eng = StreamingEngine(pipe, tiny_t2f)
    eng.prepare(ref, flame=demo_sequence(seconds=0.5), views="ring-2", steps=2, seed=0, realtime=False)
    frames, _ = _frames(eng)
    n = len(frames)
    assert n >= 4 and pipe.window == 2
    assert events == [e for i in range(n) for e in (("decode", 2), ("put", i))]


@pytest.mark.parametrize("fast_start, first_calls", [(True, [1, 1, 1, 2, 2]), (False, [1, 2, 2, 2, 2])])
def test_fast_start_runs_the_first_window_alone(engine, ref, monkeypatch, fast_start, first_calls):
    """fast_start: window 0 takes its S steps alone (rows per call 1, 1), then the batch fills as usual;
    without it a new window enters at every call from the first on."""
    from mvportrait.engine import stream_batch as stream_mod

    rows = []
    real_execute = stream_mod._execute
    monkeypatch.setattr(stream_mod, "_execute", lambda st, plan: (rows.append(len(plan.rows)),
                                                                  real_execute(st, plan))[1])
    engine.prepare(ref, flame=demo_sequence(seconds=0.8), views="ring-2", steps=2, seed=0, realtime=False,
                   fast_start=fast_start)
    frames, _ = _frames(engine)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert rows[:5] == first_calls and sum(rows) == 2 * (len(frames) - 1)  # every window takes 2 steps


def test_stream_batch_close_to_offline_and_continuous(engine, pipe, ref, monkeypatch, decode_spy):
    """Three windows in flight: each window's overlap latents end exactly on its predecessor's final
    latents, and the frames stay close to the offline pipeline (conditioning on x0 estimates)."""
    from mvportrait.engine import stream_batch as stream_mod

    fp = demo_sequence(seconds=1.2)
    ctx = pipe.prepare(ref)
    maps, _ = pipe.render_conditions(fp, "ring-2")
    spy = decode_spy(pipe)
    offline = pipe.generate_from_maps(ctx, maps, steps=3, seed=1)
    z_off = spy.take()
    finals = []
    real_emit = stream_mod._emit
    monkeypatch.setattr(stream_mod, "_emit", lambda st, w: (finals.append(w.final.clone()), real_emit(st, w))[1])
    engine.prepare(ref, flame=fp, views="ring-2", steps=3, seed=1, realtime=False)
    frames, stats = _frames(engine)
    video, z = _video(frames), spy.take()
    assert stats.mean_batch > 2.0  # three windows in flight at different steps
    o = pipe.overlap
    for prev, cur in zip(finals, finals[1:]):
        assert torch.equal(cur[:, :o], prev[:, -o:])
    assert video.shape == offline.shape and z.shape == z_off.shape
    assert (video.float() - offline.float()).abs().mean() < 0.5
    assert (z - z_off).norm() / z_off.norm() < 1e-4  # without the overlap constraint: ~6e-4


def test_deterministic_for_a_seed_sync_and_async(engine, ref):
    fp = demo_sequence(seconds=0.8)
    engine.prepare(ref, flame=fp, views="ring-2", steps=3, seed=7, realtime=False)
    a = _video(_frames(engine)[0])
    engine.prepare(ref, flame=fp, views="ring-2", steps=3, seed=7, realtime=False, queue_size=1)

    async def consume():
        async with engine.stream() as stream:
            return [f async for f in stream]

    b = _video(asyncio.run(consume()))
    engine.prepare(ref, flame=fp, views="ring-2", steps=3, seed=8, realtime=False)
    c = _video(_frames(engine)[0])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_latest_policy_drops_for_a_slow_consumer(engine, ref):
    fp = demo_sequence(seconds=1.6)
    engine.prepare(ref, flame=fp, views="ring-2", steps=1, seed=0, queue_size=2, policy="latest", realtime=False)
    n = engine.settings.frames
    assert n == 20  # 40 frames at 25 fps seen at 12.5 fps
    got = []
    with engine.stream() as stream:
        for f in stream:
            time.sleep(0.2)  # ~3x a frame's production time here, also on a loaded machine
            got.append(f.index)
        stats = stream.stats
    assert got == sorted(set(got)) and got[-1] == n - 1  # in order, no duplicates, the newest kept
    assert stats.frames_out == n and stats.dropped > 0
    assert stats.dropped == n - len(got) == n - stats.frames_delivered


def test_close_stops_the_worker_and_frees_buffers(engine, ref):
    engine.prepare(ref, "nods, then smiles", views="ring-2", steps=2, seed=0, realtime=False, stage1_steps=2)
    stream = engine.stream()  # unbounded text-driven stream
    for _ in range(3):
        next(stream)
    st = engine.state
    s1 = st.driver.thread
    stream.close()
    assert not stream.thread.is_alive() and not s1.is_alive()
    assert st.released and st.x_buf is None and not st.windows
    with pytest.raises(StopIteration):
        next(stream)


def test_dropping_the_iterator_ends_the_stream(engine, ref):
    engine.prepare(ref, "turns to the left", views="ring-2", steps=1, seed=0, realtime=False, stage1_steps=2)
    stream = engine.stream()
    next(stream)
    thread = stream.thread
    del stream
    gc.collect()
    thread.join(10)
    assert not thread.is_alive() and engine.state.released


def test_exception_in_a_stage_reaches_the_consumer(engine, pipe, ref, monkeypatch):
    calls = {"n": 0}
    real = pipe.model.denoise

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom in the UNet")
        return real(*a, **k)

    monkeypatch.setattr(pipe.model, "denoise", flaky)
    engine.prepare(ref, flame=demo_sequence(seconds=1.0), views="ring-2", steps=1, seed=0, realtime=False)
    stream = engine.stream()
    got = []
    with pytest.raises(RuntimeError, match="boom in the UNet") as info:
        for f in stream:
            got.append(f.index)
    assert got == [0, 1, 2, 3]  # the frames finished before the failure arrive first
    assert any("denoise" in note for note in getattr(info.value, "__notes__", []))
    assert not stream.thread.is_alive()


def test_live_view_update_and_checks(engine, ref):
    fp = demo_sequence(seconds=1.6)
    engine.prepare(ref, flame=fp, views="ring-2", steps=2, seed=0, realtime=False, queue_size=1)
    base = _video(_frames(engine)[0])
    engine.prepare(ref, flame=fp, views="ring-2", steps=2, seed=0, realtime=False, queue_size=1)
    with pytest.raises(ValueError, match="view count"):
        engine.update(views="ring-3")
    with pytest.raises(ValueError, match="FLAME sequence"):
        engine.update(emotion="smiles")
    got = []
    with engine.stream() as stream:
        for f in stream:
            got.append(f)
            if f.index == 3:
                assert engine.update(views="yaws:30,210") == 1
        stats = stream.stats
    (rev, first), = stats.updates
    assert rev == 1 and first <= 3 + 1 + 2 + 2  # queue (1) + in flight (2 windows) + one window
    revs = [f.revision for f in got]
    assert revs == sorted(revs) and revs[first] == 1 and revs[first - 1] == 0
    video = _video(got)
    assert torch.equal(video[:first], base[:first]) and not torch.equal(video[first + 2:], base[first + 2:])


def _pose(frames):
    return torch.cat([torch.cat([f.flame.global_pose[0], f.flame.neck_pose[0]], -1) for f in frames])


def test_text_stream_equals_offline_stage1_and_update_takes_effect(engine, tiny_t2f, ref):
    kw = dict(views="ring-2", fps=25.0, seconds=2.0, steps=1, seed=5, realtime=False, stage1_steps=4, queue_size=1)
    engine.prepare(ref, "nods twice, then smiles", **kw)
    a = _frames(engine)[0]
    offline = tiny_t2f.generate("nods twice, then smiles", seconds=2.0, fps=25, steps=4, seed=5)
    # stage 1 in windows with continuity = Text2FLAME's windows (the last frame sees the end there)
    assert torch.equal(_pose(a)[:-1, 3:], offline.neck_pose[0, :-1])
    engine.prepare(ref, "nods twice, then smiles", **kw)
    got = []
    with engine.stream() as stream:
        for f in stream:
            got.append(f)
            if f.index == 12:
                engine.update(motion="turns to the right")
        (rev, first), = stream.stats.updates
    assert 12 < first <= 12 + 1 + 1 + 2
    pa, pb = _pose(a), _pose(got)
    assert torch.equal(pa[:first], pb[:first])  # nothing already rendered changes
    assert not torch.allclose(pa[first + 4:], pb[first + 4:])  # the new text drives what follows
    assert [f.revision for f in got][first - 1:first + 1] == [0, 1]


@pytest.mark.skipif(not (STAGE1_WEIGHTS / "motion.safetensors").is_file(), reason="no shipped stage-1 weights")
def test_update_keeps_the_motion_continuous(pipe, ref):
    """Trained stage 1: the frame-to-frame pose change across a live prompt change is no larger than
    the motion just before it (stage-1 inpainting + cross-fade; a restart would jump)."""
    engine = StreamingEngine(pipe, Text2FLAME.from_pretrained())
    engine.prepare(ref, "nods slowly", views="ring-2", fps=25.0, seconds=2.4, steps=1, seed=0, realtime=False,
                   stage1_steps=6, queue_size=1)
    got = []
    with engine.stream() as stream:
        for f in stream:
            got.append(f)
            if f.index == 30:
                engine.update(motion="turns to the left")
        (_, first), = stream.stats.updates
    d = (_pose(got)[1:] - _pose(got)[:-1]).norm(dim=-1)  # d[i]: frame i -> i + 1
    before = d[first - 12:first - 2].max()
    seam = d[first - 2:first + 3].max()
    assert seam <= 2.0 * before + 0.01, (seam, before)


def test_pacing_to_real_time_and_lateness_report(engine, ref, caplog):
    fp = demo_sequence(seconds=0.8)  # 10 frames at 12.5 fps: 0.72 s of playback, ~0.3 s of compute
    engine.prepare(ref, flame=fp, views="ring-2", steps=1, seed=0, realtime=True)
    times = []
    with engine.stream() as stream:
        for f in stream:
            times.append(time.monotonic())
    n = len(times)
    assert n == 10
    assert all(times[i] - times[0] >= i / 12.5 - 0.02 for i in range(n))  # never ahead of the clock
    engine.prepare(ref, flame=fp, views="ring-2", steps=1, seed=0, fps=240.0, realtime=True)
    with caplog.at_level(logging.WARNING, logger="mvportrait.engine.stream_queue"):
        _, stats = _frames(engine)
    assert stats.late > 0 and stats.slip_s > 0 and "cannot keep up" in caplog.text
    fp = demo_sequence(seconds=4.0)
    engine.prepare(ref, flame=fp, views="ring-2", steps=1, seed=0, fps=2.5, realtime=False)
    t0 = time.monotonic()
    frames, _ = _frames(engine)
    assert len(frames) == 10 and time.monotonic() - t0 < 0.5 * 9 / 2.5  # not paced: as fast as it computes


def test_bad_arguments(engine, pipe, ref):
    fresh = StreamingEngine(pipe)
    with pytest.raises(RuntimeError, match="prepare"):
        fresh.stream()
    with pytest.raises(ValueError, match="stage-1"):
        fresh.prepare(ref, "nods")
    fp = demo_sequence(seconds=0.4)
    with pytest.raises(ValueError, match="exactly one"):
        engine.prepare(ref, "nods", flame=fp)
    with pytest.raises(ValueError, match="exactly one"):
        engine.prepare(ref)
    with pytest.raises(ValueError, match="policy"):
        engine.prepare(ref, flame=fp, policy="newest")
    with pytest.raises(ValueError, match="stream_batch"):
        engine.prepare(ref, flame=fp, steps=2, stream_batch=3)
    with pytest.raises(ValueError, match="fps"):
        engine.prepare(ref, flame=fp, fps=-1)
    with pytest.raises(ValueError, match="view spec"):
        engine.prepare(ref, flame=fp, views="hexagon")
    engine.prepare(ref, flame=fp, views="ring-2", steps=1, realtime=False)
    stream = engine.stream()
    with pytest.raises(RuntimeError, match="already started"):
        engine.stream()
    with pytest.raises(RuntimeError, match="running"):
        engine.prepare(ref, flame=fp)
    stream.close()


def test_frame_queue_policies_without_a_model():
    q = FrameQueue(2, "latest", fps=1000.0, realtime=False)
    for i in range(5):
        assert q.put(i, i / 1000.0)
    q.finish()
    assert [q.get(), q.get(), q.get()] == [3, 4, None] and q.stats.dropped == 3
    q = FrameQueue(1, "lossless", fps=100.0, realtime=False)
    assert q.put(0, 0.0)
    q.fail(ValueError("stage failed"))
    assert q.get() == 0
    with pytest.raises(ValueError, match="stage failed"):
        q.get()
    assert q.get() is None
    q = FrameQueue(1, "lossless", fps=100.0)
    q.put(0, 0.0)
    q.close()
    assert q.put(1, 0.01) is False and q.get() is None


def test_cli_stream_writes_video_and_reports(stage2_micro_run, tmp_path, capsys):
    from mvportrait.cli import main
    from mvportrait.flame import io as flame_io
    from mvportrait.render.video import read_video

    out, _ = stage2_micro_run
    seq = tmp_path / "seq.npz"
    flame_io.save_sequence(seq, demo_sequence(seconds=0.8))
    video, raw = tmp_path / "s.mp4", tmp_path / "s.rgb"
    argv = ["stream", "--flame", str(seq), "--weights", str(out / "final"), "--overlap", "1", "--views", "ring-2",
            "--steps", "2", "--fps", "12.5", "--out", str(video), "--raw", str(raw), "--no-realtime", "--threads", "1"]
    assert main(argv) == 0
    frames = read_video(video)
    assert frames.shape[0] == 10 and frames.shape[2] == 2 * 32 + 2  # two views side by side
    assert raw.stat().st_size == 10 * 32 * 66 * 3
    err = capsys.readouterr().err
    assert "10 frames" in err and "fps delivered" in err and "latency p50" in err and "dropped 0" in err
    assert "video_size 66x32" in err  # what a raw reader needs (--raw / --show)
    assert main(["stream", "--prompt", "nods", "--flame", str(seq), "--out", str(video)]) == 2
    assert main(["stream", "--flame", str(seq), "--policy", "newest", "--out", str(video)]) == 2
    assert "--policy" in capsys.readouterr().err
    assert main(["stream", "--flame", str(seq), "--backend", "warp-drive", "--out", str(video)]) == 2
    assert "--backend" in capsys.readouterr().err
    assert main(["stream", "--flame", str(seq), "--dtype", "float64", "--out", str(video)]) == 2
    assert "--dtype" in capsys.readouterr().err


def test_cli_stream_backend_and_dtype(stage2_micro_run, tmp_path):
    """--backend and --dtype reach the streaming engine: torch.compile frames equal eager ones up to
    rounding; bfloat16 ones differ by bfloat16 rounding."""
    from mvportrait.cli import main
    from mvportrait.flame import io as flame_io

    out, _ = stage2_micro_run
    seq = tmp_path / "seq.npz"
    flame_io.save_sequence(seq, demo_sequence(seconds=0.4))
    raws = {}
    for backend, dtype in (("torch", "float32"), ("compile", "float32"), ("torch", "bfloat16")):
        raws[backend, dtype] = tmp_path / f"{backend}_{dtype}.rgb"
        argv = ["stream", "--flame", str(seq), "--weights", str(out / "final"), "--overlap", "1", "--views",
                "ring-2", "--steps", "2", "--out", "", "--show", str(raws[backend, dtype]), "--no-realtime",
                "--threads", "1", "--backend", backend, "--dtype", dtype, "--quiet"]
        assert main(argv) == 0
    a, b, c = (np.frombuffer(r.read_bytes(), np.uint8).astype(int) for r in raws.values())
    assert a.size == b.size == c.size > 0 and np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05
    assert 0 < np.abs(a - c).mean() < 1.5  # --dtype reaches the networks: bfloat16 rounding, no more


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_text_stream_on_cuda_matches_cpu(stage2_micro_run, ref):
    """Text-driven streaming with both stages on the GPU (stage-1 poses and the identity shape meet on the
    device) gives the CPU stream's frames up to float rounding (noise is drawn on the CPU generator)."""
    out, _ = stage2_micro_run
    kw = dict(views="ring-2", fps=25.0, seconds=1.0, steps=1, seed=3, realtime=False, stage1_steps=2, queue_size=2)
    videos = []
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        t2f = Text2FLAME(MotionDenoiser(DenoiserConfig.from_name("tiny", "motion")).to(dev),
                         MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")).to(dev), HashingEncoder(),
                         overlap=8)
        eng = StreamingEngine(FLAME2Video.from_pretrained(out / "final", overlap=1, device=dev), t2f)
        eng.prepare(ref.to(dev), "nods twice, then smiles", **kw)
        frames = _frames(eng)[0]
        assert [f.index for f in frames] == list(range(25))
        videos.append(_video(frames).float())
    diff = (videos[0] - videos[1]).abs()
    assert diff.mean() < 2.0 and diff.max() <= 64, (diff.mean(), diff.max())
