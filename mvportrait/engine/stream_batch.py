"""The streaming runtime's engine loop: stream-batched windows, schedule -> execute -> update -> emit.

The design (windows, stream batch, continuity with unfinished predecessors, noise order, updates) is
described in :mod:`mvportrait.engine.stream`, which owns the public API; this module holds the
per-stream state (:class:`StreamState`) and the functions of the worker thread that take it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from mvportrait.engine import flame2video
from mvportrait.engine.flame2video import window_count
from mvportrait.engine.stream_queue import FrameQueue, StreamStats
from mvportrait.flame.params import FlameParams

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ handed to the consumer
@dataclass
class FrameTimings:
    """Seconds spent on one frame (window costs shared by the frames the window emits)."""

    stage1_s: float = 0.0  # waiting for stage 1 (0 when the look-ahead kept up)
    render_s: float = 0.0  # FLAME layer + rasterizer + FLAME encoder
    denoise_s: float = 0.0  # this window's share of the batched model calls and sampler updates
    decode_s: float = 0.0
    latency_s: float = 0.0  # the window admitted (with prefetch: during the previous call) -> this frame queued


@dataclass
class StreamFrame:
    index: int  # frame number in the stream (0, 1, ...)
    timestamp: float  # presentation time, seconds of stream time (index / fps)
    views: object  # (V, H, W, 3) uint8: numpy array, or torch tensor on the device with output="torch"
    timings: FrameTimings
    revision: int = 0  # live updates in effect when this frame's window entered
    flame: FlameParams | None = None  # (1, 1) the FLAME parameters rendered for this frame


@dataclass(frozen=True)
class StreamSettings:
    """Per-stream settings fixed by :meth:`StreamingEngine.prepare`."""

    fps: float
    steps: int
    guidance: float
    seed: int
    queue_size: int
    policy: str
    realtime: bool
    stream_batch: int
    output: str
    frames: int | None  # total frames (None: until closed)
    fast_start: bool = True  # the first window denoises alone (lower time to first frame)
    first_window: int | None = None  # frames of window 0 (prepare sets it; None: the model's window)
    prefetch: bool = False  # admit the next window while the device runs a model call (see _prefetch)


# ------------------------------------------------------------------------------------ internal state
@dataclass
class _Window:
    """One stage-2 window in flight."""

    index: int
    start: int  # first frame
    frames: int  # length (W; window 0 may be shorter, see StreamSettings.first_window)
    emit_from: int  # frames [emit_from, emit_to) are emitted when it finishes
    emit_to: int
    slot: int  # row of the stream-batch buffers
    noise: list  # noise of each re-imposition of the overlap: (V, O, C, h, w) or None
    step_noise: list  # noise of each sampler step: (V, W, C, h, w), or None where the step draws none
    flame: FlameParams  # params of frames [emit_from, ...) (the new frames)
    revision: int
    t_admit: float
    stage1_s: float = 0.0
    render_s: float = 0.0
    denoise_s: float = 0.0
    step: int = 0  # steps done
    x0: torch.Tensor | None = None  # (V, W, C, h, w) latest x0 estimate
    final: torch.Tensor | None = None  # (V, W, C, h, w) when finished
    feats: torch.Tensor | None = None  # (V, W, C0, h, w) FLAME features until placed in the buffers
    x_T: torch.Tensor | None = None  # (V, W, C, h, w) start latents until placed


@dataclass
class StepPlan:
    """What one engine step does: built by ``_schedule``, run by ``_execute``, applied by ``_update``."""

    rows: list  # _Window per batch row
    index: torch.Tensor | None  # slots gathered into the batch (None: the whole buffer, slot order)
    x: torch.Tensor  # (B, V, W, C, h, w) noisy latents
    feats: torch.Tensor  # (B, V, W, C0, h, w) FLAME features
    t_model: torch.Tensor  # (B,) int64 timesteps on the device
    t_step: object  # int (all rows at one step) or (B,) int64 tensor, for the sampler
    prev_step: object
    frames: int = 0  # frames per row (x.shape[2])
    out: torch.Tensor | None = None
    done: object = None  # torch.cuda.Event after the call on the compute stream (prefetch on CUDA)
    call_s: float = 0.0
    finished: list = field(default_factory=list)


class StreamState:
    """Everything one stream owns (explicit state: the worker functions below take it)."""

    def __init__(self, pipe, settings: StreamSettings, ctx, driver, cameras, stats: StreamStats):
        self.pipe, self.model, self.sampler = pipe, pipe.model, pipe.sampler
        self.stochastic = stochastic_sampler(self.sampler)  # raises for a sampler the runtime cannot pre-draw for
        self.settings, self.ctx, self.driver, self.cameras = settings, ctx, driver, cameras
        self.stats = stats
        self.views = cameras.batch_shape[-1]
        self.W, self.O = pipe.window, pipe.overlap
        self.W1 = settings.first_window or self.W  # window 0's length (later windows start W - W1 earlier)
        self.total = settings.frames
        self.n_windows = None if self.total is None else window_count(self.total, self.W, self.O, self.W1)
        self.pairs = self.sampler.timestep_pairs(settings.steps)
        self.step_draws = [step_draws_noise(self.sampler, p) for _, p in self.pairs]
        self.device, self.dtype = pipe.device, pipe.dtype
        b = settings.stream_batch
        lat = self.model.latent_shape(1, views=self.views, frames=self.W)[1:]
        self.x_buf = torch.zeros(b, *lat, device=self.device, dtype=self.dtype)
        self.f_buf = None  # allocated by the first window (feature shape from the FLAME encoder)
        self.windows: deque[_Window] = deque()
        self.next_index = 0
        self.tail_final: tuple[int, torch.Tensor] | None = None
        self.tail_feats: torch.Tensor | None = None  # FLAME features of the last window's overlap frames
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.t_cache: dict = {}
        self.prefetched: _Window | None = None  # admitted during the last model call, not yet in the batch
        # with prefetch on CUDA the model calls run on their own stream (see _prefetch)
        self.compute = torch.cuda.Stream(self.device) if settings.prefetch and self.device.type == "cuda" else None
        self.queue = FrameQueue(settings.queue_size, settings.policy, settings.fps, realtime=settings.realtime,
                                stats=stats)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pending: dict = {}
        self.revision = 0  # applied
        self.requested = 0  # requested by update()
        self.stage = "prepare"
        self.started = False
        self.released = False

    def release(self) -> None:
        """Free the buffers (the stream has ended)."""
        self.x_buf = self.f_buf = self.tail_feats = None
        self.tail_final = self.prefetched = None
        self.windows.clear()
        self.t_cache.clear()
        self.released = True


# ------------------------------------------------------------------------------------ sampler noise
def stochastic_sampler(sampler) -> bool:
    """Whether ``sampler``'s steps draw noise (the runtime then pre-draws it per window and passes it
    explicitly); raises ValueError for a sampler whose noise rule the runtime does not know."""
    from mvportrait.engine.schedulers import ConsistencySampler, DDIMSampler, DDPMSampler

    if isinstance(sampler, DDIMSampler):
        return float(sampler.eta) > 0.0
    if isinstance(sampler, (ConsistencySampler, DDPMSampler)):
        return True
    raise ValueError(f"the streaming runtime supports DDIMSampler, DDPMSampler and ConsistencySampler, got "
                     f"{type(sampler).__name__}")


def step_draws_noise(sampler, prev_t: int) -> bool:
    """Whether ``sampler.step(..., prev_t=prev_t)`` with an int ``prev_t`` draws noise: what
    ``_Sampler.sample`` draws from its generator at that step (DDIM: every step when eta > 0;
    DDPM and consistency: every step but the last)."""
    if not stochastic_sampler(sampler):
        return False
    from mvportrait.engine.schedulers import DDIMSampler

    return True if isinstance(sampler, DDIMSampler) else prev_t >= 0


# ------------------------------------------------------------------------------------ the engine loop
def _cameras_for(st: StreamState, frames: list[int]):
    cams = st.cameras
    if len(cams.batch_shape) == 1:
        return cams
    return cams[torch.tensor(frames) % cams.batch_shape[0]]


def window_span(st: StreamState, k: int) -> tuple[int, int]:
    """(first frame, frames) of window ``k``: window 0 has ``W1`` frames (the first window, default ``W``),
    window ``k >= 1`` starts ``O`` frames before its predecessor ends and has ``W``."""
    return flame2video.window_span(k, st.W, st.O, st.W1)


def _known(st: StreamState, index: int) -> torch.Tensor:
    """Window ``index - 1``'s last O latents: its current x0 estimate, or its final latents."""
    for w in st.windows:
        if w.index == index - 1:
            return w.x0[:, w.frames - st.O:w.frames]
    if st.tail_final is None or st.tail_final[0] != index - 1:
        raise RuntimeError(f"internal error: no latents of window {index - 1} for window {index}")
    return st.tail_final[1]


def _impose_times(st: StreamState) -> list[int]:
    """Timestep of each overlap re-imposition: at the start (t0) and after every step (prev_t; < 0 = exact)."""
    return [st.pairs[0][0]] + [p for _, p in st.pairs]


def _apply_updates(st: StreamState) -> None:
    with st.lock:
        upd, st.pending = st.pending, {}
        rev = st.requested
    if not upd:
        return
    if "motion" in upd or "emotion" in upd:
        st.driver.set_text(motion=upd.get("motion"), emotion=upd.get("emotion"), revision=rev)
    if "cameras" in upd:
        st.cameras = upd["cameras"]
    st.revision = rev
    k = st.next_index
    st.stats.updates.append((rev, window_span(st, k)[0] + (st.O if k else 0)))
    log.info("stream update %d applied from frame %d", rev, st.stats.updates[-1][1])


def _admit(st: StreamState) -> _Window | None:
    """Stage 1 + just-in-time render + noise for the next window; None when the stream has no more."""
    k = st.next_index
    if st.n_windows is not None and k >= st.n_windows:
        return None
    O = st.O
    start, W = window_span(st, k)
    first_new = start + (O if k else 0)
    frames = list(range(first_new, start + W))
    cond_frames = frames if st.total is None else [min(f, st.total - 1) for f in frames]
    t0 = time.perf_counter()
    st.stage = "stage1"
    fp = st.driver.params(cond_frames)
    t1 = time.perf_counter()
    st.stage = "render"
    maps = st.pipe.render_maps(fp, _cameras_for(st, cond_frames)).to(st.device, st.dtype)  # (1, V, n, 5, H, W)
    feats = st.model.encode_renders(maps)[0]  # (V, n, C0, h, w): the FLAME encoder works image by image, so
    if k:  # the overlap frames keep the features the predecessor computed (as it saw them; not recomputed)
        feats = torch.cat([st.tail_feats, feats], dim=1)  # (V, W, C0, h, w)
    st.tail_feats = feats[:, W - O:]
    slot = k % st.settings.stream_batch
    t2 = time.perf_counter()
    # all of the window's noise now, in the order _Sampler.sample draws it: start latents, overlap noise
    # at t0, then per step the step's own noise (stochastic samplers) and the overlap noise at prev_t; in
    # the window's own length (a shorter window 0 too), so the offline pipeline with the same first_window
    # draws the same numbers
    shape = (st.x_buf.shape[1], W, *st.x_buf.shape[3:])
    g = st.generator

    def draw():
        return torch.randn(shape, generator=g, dtype=st.dtype).to(st.device)

    x_T = draw()
    impose = _impose_times(st)
    noise = [draw()[:, :O] if k else None]
    step_noise = []
    for i, draws in enumerate(st.step_draws):
        step_noise.append(draw() if draws else None)
        if k:
            noise.append(draw()[:, :O] if impose[i + 1] >= 0 else None)
    emit_to = start + W if st.total is None else min(start + W, st.total)
    w = _Window(index=k, start=start, frames=W, emit_from=first_new, emit_to=emit_to, slot=slot, noise=noise,
                step_noise=step_noise, flame=fp, revision=st.revision, t_admit=t0, stage1_s=t1 - t0,
                render_s=t2 - t1, feats=feats, x_T=x_T)
    st.next_index += 1
    return w


def _place(st: StreamState, w: _Window) -> None:
    """Put an admitted window into its stream-batch slot: features, start latents, and (k >= 1) its
    overlap frames re-imposed from the predecessor's latest latents (which may have been updated since
    the window was admitted, so this happens here, when it joins the batch)."""
    if st.f_buf is None:  # (B, V, W, C0, h, w); a shorter first window fills its first W1 frames
        st.f_buf = torch.zeros(st.settings.stream_batch, w.feats.shape[0], st.W, *w.feats.shape[2:],
                               device=st.device, dtype=st.dtype)
    st.f_buf[w.slot, :, :w.frames] = w.feats
    st.x_buf[w.slot, :, :w.frames] = w.x_T
    if w.index:
        st.x_buf[w.slot, :, :st.O] = st.sampler.schedule.add_noise(_known(st, w.index), w.noise[0], st.pairs[0][0])
    w.feats = w.x_T = None


def _prefetch(st: StreamState) -> None:
    """Admit the next window now, while the device runs the model call just launched (``prefetch``):
    stage 1, render, FLAME encoder and noise take host time that would otherwise leave the device idle
    between calls. On CUDA the model call runs on its own stream (:func:`_execute`), so the admission's
    own synchronisations on the default stream (the rasteriser's one host read, host-to-device copies)
    do not wait for it. Admission writes no stream-batch buffer (:func:`_place` does, when the window
    joins the batch), so it cannot race the running call. Updates are applied first, as
    :func:`_schedule` does; the prefetched window counts as entered from here."""
    if st.prefetched is not None or (st.n_windows is not None and st.next_index >= st.n_windows):
        return
    _apply_updates(st)
    st.prefetched = _admit(st)


def _timesteps(st: StreamState, values: tuple[int, ...]) -> torch.Tensor:
    t = st.t_cache.get(values)
    if t is None:
        t = st.t_cache[values] = torch.tensor(values, dtype=torch.int64, device=st.device)
    return t


def _schedule(st: StreamState) -> StepPlan | None:
    """Apply pending updates, admit one window, and lay out the batch; None when all is done."""
    _apply_updates(st)
    first_alone = st.settings.fast_start and any(w.index == 0 for w in st.windows)  # window 0 still in flight
    if len(st.windows) < st.settings.stream_batch and not first_alone:
        w, st.prefetched = st.prefetched or _admit(st), None
        if w is not None:
            _place(st, w)
            st.windows.append(w)
    if not st.windows:
        return None
    st.stage = "denoise"
    b = st.settings.stream_batch
    n = st.windows[0].frames  # every row has one length (a shorter window 0 runs alone: fast_start)
    if len(st.windows) == b and n == st.W:
        rows = sorted(st.windows, key=lambda w: w.slot)
        index, x, feats = None, st.x_buf, st.f_buf
    else:
        rows = list(st.windows)
        index = torch.tensor([w.slot for w in rows], device=st.device)
        x, feats = st.x_buf[index, :, :n], st.f_buf[index, :, :n]
    ts = tuple(st.pairs[w.step][0] for w in rows)
    ps = tuple(st.pairs[w.step][1] for w in rows)
    if len(set(ts)) == 1:
        t_step, prev_step = ts[0], ps[0]
    else:
        t_step, prev_step = torch.tensor(ts), torch.tensor(ps)
    return StepPlan(rows=rows, index=index, x=x, feats=feats, t_model=_timesteps(st, ts), t_step=t_step,
                    prev_step=prev_step, frames=n)


def _execute(st: StreamState, plan: StepPlan) -> None:
    st.stage = "denoise"
    t0 = time.perf_counter()
    if st.compute is None:
        plan.out = st.model.denoise(plan.x, plan.t_model, plan.feats, st.ctx, guidance=st.settings.guidance)
    else:  # on the compute stream, after everything queued so far; _update orders the default stream after it
        main = torch.cuda.current_stream(st.device)
        st.compute.wait_stream(main)
        with torch.cuda.stream(st.compute):
            plan.out = st.model.denoise(plan.x, plan.t_model, plan.feats, st.ctx, guidance=st.settings.guidance)
        for t in (plan.x, plan.feats, plan.t_model):  # allocated on the default stream, read by this call
            t.record_stream(st.compute)
        plan.done = torch.cuda.Event()
        plan.done.record(st.compute)
    plan.call_s = time.perf_counter() - t0


def _step_noise(st: StreamState, plan: StepPlan) -> torch.Tensor | None:
    """(B, V, W, C, h, w) noise of this call's sampler step: each row's own pre-drawn noise for its step
    (zeros where that step draws none: a per-row last step, which ignores it); None when no row needs any."""
    if not st.stochastic:
        return None
    rows = [w.step_noise[w.step] for w in plan.rows]
    if all(n is None for n in rows):
        if isinstance(plan.prev_step, torch.Tensor):  # per-row steps: the samplers want a tensor anyway
            return torch.zeros_like(plan.x)
        return None
    return torch.stack([torch.zeros_like(plan.x[0]) if n is None else n[:, :plan.frames] for n in rows])


def _update(st: StreamState, plan: StepPlan) -> None:
    """Sampler step for every row, overlap re-imposition (oldest window first), retire finished windows."""
    st.stage = "denoise"  # (a prefetch in between set its own stages)
    if plan.done is not None:  # the call ran on the compute stream: wait for it on the device (not the host)
        main = torch.cuda.current_stream(st.device)
        main.wait_event(plan.done)
        plan.out.record_stream(main)
    prev, x0 = st.sampler.step(plan.out, plan.t_step, plan.x, prev_t=plan.prev_step, noise=_step_noise(st, plan))
    if plan.index is None:
        st.x_buf.copy_(prev)
    else:
        st.x_buf[plan.index, :, :plan.frames] = prev
    share = plan.call_s / len(plan.rows)
    for r, w in enumerate(plan.rows):
        w.x0 = x0[r]
        w.step += 1
        w.denoise_s += share
    st.stats.calls += 1
    st.stats.rows += len(plan.rows)
    O, S = st.O, st.settings.steps
    impose = _impose_times(st)
    for w in sorted(plan.rows, key=lambda w: w.index):
        if w.index:
            known = _known(st, w.index)
            t = impose[w.step]
            if t >= 0:
                st.x_buf[w.slot, :, :O] = st.sampler.schedule.add_noise(known, w.noise[w.step], t)
            else:
                if w.step < S:
                    raise RuntimeError("internal error: exact overlap before the last step")
                st.x_buf[w.slot, :, :O] = known
        if w.step == S:
            w.final = st.x_buf[w.slot, :, :w.frames].clone()
            st.tail_final = (w.index, w.final[:, w.frames - O:])
            st.windows.remove(w)
            plan.finished.append(w)


def _emit(st: StreamState, w: _Window, first: int = 0, last: int | None = None) -> bool:
    """Decode a finished window's new frames ``first`` .. ``last - 1`` (default: all) and queue them;
    False when the queue was closed.

    Frames are decoded one at a time (all views of a frame in one decoder call, as
    ``FLAME2Video.decode`` does) and each is queued as soon as it is decoded, so the first frame of a
    window does not wait for the decoding of the window's other frames.
    """
    lo, hi = w.emit_from - w.start, w.emit_to - w.start
    n_new = w.flame.num_frames
    n = hi - lo
    for j in range(first, n if last is None else min(last, n)):
        st.stage = "decode"
        t0 = time.perf_counter()
        img = st.pipe.decoder.decode(w.final[:, lo + j])  # (V, 3, H, W)
        u8 = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # (V, H, W, 3)
        views = u8.cpu().numpy() if st.settings.output == "numpy" else u8
        dec = time.perf_counter() - t0
        st.stats.busy_s += dec
        i = w.emit_from + j
        tm = FrameTimings(stage1_s=w.stage1_s / n_new, render_s=w.render_s / n_new, denoise_s=w.denoise_s / n,
                          decode_s=dec, latency_s=time.perf_counter() - w.t_admit)
        frame = StreamFrame(index=i, timestamp=i / st.settings.fps, views=views, timings=tm,
                            revision=w.revision, flame=w.flame.frames(j, j + 1))
        st.stage = "output"
        if not st.queue.put(frame, frame.timestamp):
            return False
    if last is None or last >= n:
        w.final = w.x0 = None
    return True


def _launch(st: StreamState) -> StepPlan | None:
    """Schedule the next model call and launch it (with prefetch: then admit the window after it)."""
    plan = _schedule(st)
    if plan is not None:
        _execute(st, plan)
        if st.settings.prefetch:
            _prefetch(st)
    return plan


def run(st: StreamState) -> None:
    """The worker thread: schedule -> execute -> update -> emit until done, closed or failed.

    With ``prefetch`` the next model call is launched (on the compute stream) before a finished
    window's frames after its first are decoded, so their decoding and delivery overlap that call
    (each window's first frame still goes out before the launch: the first frame is not delayed).
    """
    try:
        with torch.inference_mode():
            plan = None
            while not st.stop.is_set():
                t0 = time.perf_counter()
                if plan is None:
                    plan = _launch(st)
                    if plan is None:
                        break
                _update(st, plan)
                st.stats.busy_s += time.perf_counter() - t0
                finished, plan = plan.finished, None
                if st.settings.prefetch:
                    if not all(_emit(st, w, last=1) for w in finished):
                        return
                    if st.stop.is_set():
                        break
                    t0 = time.perf_counter()
                    plan = _launch(st)
                    st.stats.busy_s += time.perf_counter() - t0
                    if not all(_emit(st, w, first=1) for w in finished):
                        return
                    if plan is None:
                        break
                elif not all(_emit(st, w) for w in finished):
                    return
        st.queue.finish()
    except BaseException as e:  # noqa: BLE001 - every failure goes to the consumer
        if st.stop.is_set():
            log.debug("stream worker stopped during %s: %r", st.stage, e)
        else:
            e.add_note(f"mvportrait stream: raised in stage {st.stage!r} (window {st.next_index - 1})")
            log.debug("stream worker failed in %s", st.stage, exc_info=True)
            st.queue.fail(e)
    finally:
        if st.compute is not None:  # a failure between a call and its update: let the call finish before freeing
            torch.cuda.current_stream(st.device).wait_stream(st.compute)
        st.driver.close()
        st.release()


__all__ = ["FrameTimings", "StreamFrame", "StreamSettings", "StreamState", "StepPlan", "run", "stochastic_sampler",
           "step_draws_noise"]
