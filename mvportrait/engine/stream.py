"""Streaming runtime: prepare once, then stream multi-view frames as they are ready.

::

    engine = StreamingEngine.from_pretrained()
    engine.prepare("me.png", "nods slowly, then smiles", views="ring-4", steps=4, seed=0)
    with engine.stream() as frames:             # async: async with engine.stream() as frames: async for ...
        for frame in frames:                    # StreamFrame(index, timestamp, views (V, H, W, 3) uint8, timings)
            show(frame.views)
            if frame.index == 50:
                engine.update(emotion="looks surprised")   # live, effective from the next window

Pipeline (one worker thread; stage 1 has its own look-ahead thread, :mod:`.stream_stage1`)::

    driver (text: MotionDM + EmotionDM windows with continuity | a FLAME sequence)
      -> FLAME params of a window's new frames, rendered just in time from the view rig
      -> FLAME encoder features of the new frames (the overlap frames keep the predecessor's)
      -> stream-batched denoising (below)  -> decode  -> FrameQueue (paced)

**Windows.** Stage 2 works on windows of ``W = config.frames`` frames sharing ``O = overlap`` frames
with the previous window (as :meth:`FLAME2Video.generate_from_maps`): window ``k`` starts at frame
``k * H`` (``H = W - O``) and emits its ``H`` new frames (window 0 all ``W``). A shorter first window
(``prepare(first_window=W1)``, ``O < W1 <= W``) makes the first model call cheaper and the first frame
sooner: window 0 is frames ``[0, W1)``, window ``k >= 1`` starts at ``k * H - (W - W1)``. It is the
default for one-step sampling (``W1 = O + 1``; :meth:`StreamingEngine.prepare`). The offline
pipeline takes the same argument (``generate_from_maps(first_window=)``, default ``W``; same noise, so
the same frames where the stream is exact, below) and ``mvportrait eval stage2 --frames N --first-window
W1`` measures it.

**Stream batch** (StreamDiffusion). Each window needs ``S = steps`` denoising steps. Up to
``B = stream_batch`` windows (default ``S``) are in flight at once, each at its own step: every
model call runs one batched :meth:`FLAME2VideoModel.denoise` over all of them with per-row
timesteps, a new window enters at every call and, in the steady state, one leaves finished
(except that, with ``fast_start`` (default), window 0 runs its ``S`` steps alone so the first frame
is not delayed by its successors' rows; the batch fills from window 1 on). So one
call yields ``H`` frames instead of ``H / S``, at ``S`` calls of latency; each call carries ``B``
rows, so the gain is what batching buys on the device (large on a GPU, where a small batch does not
fill it; little on a CPU that one window already saturates). The reference K/V cache is shared by
all rows (``b % R``).

**Continuity with unfinished predecessors.** The overlap frames of window ``k`` must equal window
``k - 1``'s last ``O`` frames, but with ``B > 1`` window ``k - 1`` is still being denoised while
``k`` runs (one step ahead of it). The inpainting constraint (the sampler's ``known`` /
``known_mask`` rule: known region noised to the current timestep, re-imposed after every step,
set exactly after the last step) therefore uses the best value available *at that step*: the
predecessor's current x0 estimate (from the same call, so it is always one step more refined than
the window it conditions), and its final latents once it has finished. The predecessor always
finishes at least one call before its successor takes its last step (same step count, earlier
start), so the *final* overlap latents equal the predecessor's final latents exactly, as in the
offline pipeline; only the intermediate guidance differs. Consequences, tested:

* ``stream_batch=1`` (one window at a time) or ``steps=1`` reproduces
  :meth:`FLAME2Video.generate_from_maps` with the same ``first_window`` (``settings.first_window``;
  same noise, same constraint); with ``B > 1`` and ``S > 1``
  the frames are close to it, not equal.
* The noise of a window is drawn from the stream's generator when the window enters, in window order
  and in the order :meth:`_Sampler.sample` draws it (start latents, overlap noise at the first
  timestep, then per step the step's own noise and the overlap noise at its ``prev_t``), and handed
  to every step explicitly (``noise=``, one row per window), never taken from a global RNG. So the
  frames depend on the seed only, never on timing or batch composition, and stochastic samplers work
  too: the consistency sampler of distilled students (:class:`ConsistencySampler`, fresh noise at every
  step but the last; guidance folded into the student, so the default guidance is 1), DDPM, DDIM with
  eta > 0. With ``stream_batch=1`` or one step they reproduce the offline pipeline with the same sampler.

(The alternative, staggering windows so a successor starts only when its predecessor is done, is
``stream_batch=1``: exact, but no batching across windows.)

**Live updates** (:meth:`StreamingEngine.update`) are handed to the worker and applied before the next
window enters: a new prompt / emotion switches the stage-1 text after the frames already rendered
(motion continues through stage-1 inpainting plus a short cross-fade, see :mod:`.stream_stage1`);
new views change the
cameras of the next windows (the view count is fixed per stream: the stream-batch buffers are
sized by it). Windows already in flight finish with what they started with, so the change shows
after at most ``B`` windows (``B + 1`` with ``prefetch``, where the next window is admitted during the
current model call), and every frame says which update ``revision`` it was made with.

**Output** goes through a bounded :class:`~.stream_queue.FrameQueue` (``lossless`` / ``latest``,
pacing to ``fps`` with presentation timestamps, lateness report). Closing the stream (``close()``,
leaving a ``with`` block, ``aclose()``, or dropping the iterator) stops the stream's run on the
engine's worker thread and its stage-1 thread and frees the buffers; an exception raised in any stage
is raised to the consumer. The worker thread itself is long-lived: one per engine runs all its
streams (GPU libraries keep per-thread caches that a new thread would rebuild in its first model call;
see ``_Worker``) and ends after ``WORKER_IDLE_S`` seconds without a stream.

Hot loop: no ``.item()`` / ``.cpu()`` / printing between model calls; timestep tensors are cached
per step pattern. A finished window is decoded one frame (all views) at a time and each frame is
queued as soon as it is decoded, so the first frame does not wait for the rest of its window; its
device-to-host copy is the only one (skipped with ``output="torch"``). Timings are host-side (on a GPU they measure launches, not kernels).

**Prefetch** (``prepare(prefetch=True)``, opt-in until its GPU parity test passes): the worker admits
the next window (stage 1, render with the rasteriser's one host read, FLAME encoder, noise copies) right
after launching a model
call, which then runs on its own CUDA stream; the sampler update waits for it on the device. The
admission's host time and synchronisations overlap the call instead of idling the device between calls.
A window's buffers are written when it joins the batch, not when admitted, so nothing races the running
call; the noise order, and therefore the frames, do not change (tested). In this mode the worker also
launches the next call before decoding a finished window's frames after its first, so their decoding
overlaps that call too (the first frame of each window still goes out before the launch).
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import weakref

import torch

from mvportrait.engine.stream_batch import FrameTimings, StepPlan, StreamFrame, StreamSettings, StreamState, run
from mvportrait.engine.stream_queue import POLICIES, StreamStats
from mvportrait.engine.stream_stage1 import SequenceDriver, TextDriver
from mvportrait.flame.params import FlameParams

log = logging.getLogger(__name__)

DEFAULT_STEPS = 4
DEFAULT_STAGE1_STEPS = 10
OUTPUTS = ("numpy", "torch")
JOIN_TIMEOUT_S = 30.0


# ------------------------------------------------------------------------------------ worker thread
WORKER_IDLE_S = 120.0  # a StreamingEngine's worker thread ends after this long without a stream


class _Job:
    """One stream's run on an engine's worker thread; ``is_alive`` / ``join`` as for a thread."""

    def __init__(self):
        self._done = threading.Event()
        self.thread: threading.Thread | None = None  # the worker thread running it

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)


class _Worker:
    """The long-lived thread of one :class:`StreamingEngine`: it runs the engine's streams one after another.

    Why not a new thread per stream: GPU libraries keep per-thread state that is expensive to build.
    PyTorch's cuDNN execution-plan and attention-graph caches are thread-local, so a new thread's first
    model call rebuilds the plan of every convolution and attention shape: measured on an H200, the sd15
    preset's first call of a stream took 0.53-0.57 s of host time against 0.10-0.11 s for the same call
    repeated (README, first frame). The thread ends after ``WORKER_IDLE_S`` without a stream (a later
    stream starts a new one).
    """

    def __init__(self, idle_s: float | None = None):
        self.idle_s = WORKER_IDLE_S if idle_s is None else idle_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, fn, *args) -> _Job:
        job = _Job()
        with self._lock:
            self._jobs.put((job, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mvportrait-stream", daemon=True)
                self._thread.start()
            job.thread = self._thread
        return job

    def _loop(self) -> None:
        while True:
            try:
                job, fn, args = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():  # (submit puts under the lock: no job is left behind)
                        self._thread = None
                        return
                continue
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - run() reports to the consumer; never let the thread die
                log.exception("stream worker job failed")
            finally:
                del fn, args  # the job's state goes now, not when the next job arrives
                job._done.set()


# ------------------------------------------------------------------------------------ iterator
class FrameStream:
    """The frames of a running stream: an iterator and an async iterator; ``close()`` stops it."""

    def __init__(self, state: StreamState, worker: _Worker):
        self._state = state
        self._queue = state.queue
        self._closed = False
        # the worker holds the state, never this object: dropping the iterator closes the stream
        self._job = worker.submit(run, state)

    @property
    def stats(self) -> StreamStats:
        return self._state.stats

    @property
    def thread(self) -> _Job:
        """The stream's run on its engine's worker thread (``is_alive()``, ``join(timeout)``, ``.thread``)."""
        return self._job

    def next(self, timeout: float | None = None) -> StreamFrame | None:
        """The next frame, or None at the end of the stream (the stream is then closed)."""
        try:
            frame = self._queue.get(timeout)
        except TimeoutError:
            raise
        except BaseException:
            self.close()
            raise
        if frame is None:
            self.close()
        return frame

    def __iter__(self):
        return self

    def __next__(self) -> StreamFrame:
        frame = self.next()
        if frame is None:
            raise StopIteration
        return frame

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamFrame:
        frame = await asyncio.to_thread(self.next)
        if frame is None:
            raise StopAsyncIteration
        return frame

    def close(self, timeout: float | None = JOIN_TIMEOUT_S) -> None:
        """Stop the work (waits for the model call in progress), end the stage-1 thread, free the buffers."""
        if self._closed:
            return
        self._closed = True
        st = self._state
        st.stop.set()
        self._queue.close()
        st.driver.close(timeout)
        if self._job.thread is not threading.current_thread():
            self._job.join(timeout)
            if self._job.is_alive():
                log.warning("the stream worker did not stop within %s s", timeout)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._closed = True
            self._state.stop.set()
            self._queue.close()


# ------------------------------------------------------------------------------------ engine
def _check_int(name, v, lo, hi=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an int in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
    return v


def _check_number(name, v, lo, hi) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
        raise ValueError(f"{name} must be a number in ({lo}, {hi}], got {v!r}")
    return float(v)


class StreamingEngine:
    """Stage 1 (optional: text driving) + stage 2, streamed; see the module docstring.

    ``stage2`` a :class:`FLAME2Video`; ``stage1`` a :class:`Text2FLAME` (None: FLAME-driven only).
    """

    def __init__(self, stage2, stage1=None):
        from mvportrait.engine.flame2video import FLAME2Video

        if not isinstance(stage2, FLAME2Video):
            raise TypeError(f"stage2 must be a FLAME2Video, got {type(stage2).__name__}")
        self.stage2, self.stage1 = stage2, stage1
        self.state: StreamState | None = None
        self.settings: StreamSettings | None = None
        self._stream = lambda: None  # weak reference to the running FrameStream
        self._parts: tuple[str, str] | None = None
        self._worker = _Worker()  # one long-lived thread runs every stream of this engine (see _Worker)
        self._last_job: _Job | None = None

    @classmethod
    def from_pretrained(cls, stage2_path=None, stage1_path=None, *, device="cpu", text_model=None,
                        stage1: bool = True, overlap: int | None = None, student: bool = False,
                        backend: str | None = None, dtype: torch.dtype = torch.float32,
                        decoder: str = "auto") -> "StreamingEngine":
        """Shipped (or given) stage-2 model folder, and stage-1 weights unless ``stage1=False``;
        ``student=True``: the distilled students (consistency sampling, their default steps, guidance 1);
        ``backend``: as for the pipelines (a name or ``stage1=...,stage2=...``; default MVP_BACKEND);
        ``dtype``: the stage-2 networks' precision (see :class:`FLAME2Video`; stage 1 stays float32);
        ``decoder``: ``auto`` (default: the student's distilled tiny decoder, ~8x cheaper decoding on a CPU
        for ~0.75 dB) | ``full`` | ``tiny``, as for :meth:`FLAME2Video.from_pretrained`."""
        from mvportrait.engine.flame2video import FLAME2Video
        from mvportrait.engine.text2flame import Text2FLAME

        kw = {} if overlap is None else {"overlap": overlap}
        s2 = FLAME2Video.from_pretrained(stage2_path, student=student, device=device, backend=backend, dtype=dtype,
                                         decoder=decoder, **kw)
        s1 = Text2FLAME.from_pretrained(stage1_path, student=student, device=device, text_model=text_model,
                                        backend=backend) if stage1 else None
        return cls(s2, s1)

    # ------------------------------------------------------------------------------------ setup
    def _cameras(self, views):
        from mvportrait.data.multiview import rig_cameras
        from mvportrait.render.cameras import Cameras

        size = self.stage2.config.image_size
        if isinstance(views, Cameras):
            if len(views.batch_shape) not in (1, 2):
                raise ValueError(f"views cameras must have batch shape (V,) or (T, V), got "
                                 f"{tuple(views.batch_shape)}")
            if (views.height, views.width) != (size, size):
                raise ValueError(f"views cameras must be {size}x{size} (the model's image size), got "
                                 f"{views.height}x{views.width}")
            return views.to(device=self.stage2.device, dtype=torch.float32)
        return rig_cameras(views, size, device=self.stage2.device)

    def prepare(self, reference, prompt: str | None = None, *, motion: str | None = None,
                emotion: str | None = None, flame: FlameParams | None = None, shape=None, views="ring-4",
                fps: float | None = None, seconds: float | None = None, steps: int | None = None,
                guidance: float | None = None, seed: int = 0, queue_size: int = 8, policy: str = "lossless",
                realtime: bool = True, stream_batch: int | None = None, stage1_steps: int | None = None,
                stage1_guidance: float | None = None, output: str = "numpy",
                lookahead: bool = True, fast_start: bool = True,
                first_window: int | None = None, prefetch: bool | None = None) -> "StreamingEngine":
        """All per-stream setup, once: reference K/V cache, text encoding, stage-1 look-ahead, cameras,
        schedules and the stream-batch buffers. Then :meth:`stream`.

        ``reference``: the portrait (path, PIL image, (3, H, W) tensor in [-1, 1]), or the
        :class:`~mvportrait.models.stage2.ReferenceContext` ``engine.stage2.prepare(portrait)`` returned:
        streams of one portrait can share it and skip the image loading and the reference network.
        Drive with text (``prompt``, split into motion and emotion; ``motion`` / ``emotion`` override a
        part) or a FLAME sequence (``flame``, finite). ``shape`` (n_shape,) identity for text driving
        (zeros: the mean head). ``views``: a rig spec (``ring-4``, ``yaws:0,45``, ...) or
        :class:`Cameras` (V,) / (T, V) (a trajectory, looped). ``fps``: output rate (default the stage-2
        model's). ``seconds``: length (default: the FLAME sequence, or unbounded for text).
        ``steps``: stage-2 sampler steps per window (``pipe.sampler``: DDIM, or a student's consistency
        sampler; default: a student's ``default_steps``, else 4); ``stage1_steps`` likewise (else 10);
        ``guidance``: image guidance (default :func:`default_guidance`); ``stream_batch``: windows in
        flight (1..steps, default steps). ``policy`` / ``queue_size`` / ``realtime``: the output queue
        (:mod:`.stream_queue`). ``output``: ``numpy`` (host uint8) or ``torch`` (tensor on the device).
        ``fast_start``: the first window denoises alone, the stream batch fills from the second one on
        (the first frame comes a batched call sooner; False: windows enter from the first call on).
        ``first_window``: frames of window 0, ``overlap + 1`` .. ``W`` (the model's window); default
        (None, auto) ``overlap + 1`` with ``fast_start`` and one step (the students' default), else ``W``
        (with more steps window 1 needs several calls after window 0, which a long window 0 covers
        in playback). A shorter first window is a cheaper
        first model call, so the first frame comes sooner (its denoising cost scales with the frames);
        later windows keep ``W`` frames and start ``W - first_window`` frames earlier. Needs
        ``fast_start`` (window 0 is then alone in its calls). What it costs in quality (shipped student,
        16 held-out 20-frame clips, README): 0.05 dB PSNR, ~0.3 dB on the first three frames. With the
        same ``first_window`` there (``settings.first_window`` holds the one used), the stream equals the
        offline :meth:`FLAME2Video.generate_from_maps` (see above).
        ``prefetch``: admit the next window (stage 1, render, FLAME encoder, noise) while the device runs
        the current model call, which then runs on its own CUDA stream (not with the ``compile`` backend,
        whose CUDA graphs share one memory pool across the networks; default off: on an H200 it took
        the sd15 stream from 22.7 to 28.4 frame sets/s, but its GPU parity test failed once, cause not yet
        known; on a CPU there is nothing to overlap). The frames are the same on a CPU (tested); an update
        then shows one window later.
        """
        from mvportrait.drivers.text import split_prompt

        running = self._stream()
        if running is not None and not running._closed:
            raise RuntimeError("a stream is running; close it before preparing another")
        pipe = self.stage2
        if steps is None:  # a student's own step count; few DDIM steps for a teacher
            steps = pipe.default_steps if getattr(pipe, "is_student", False) else DEFAULT_STEPS
        if stage1_steps is None:
            s1 = self.stage1
            stage1_steps = s1.default_steps if getattr(s1, "is_student", False) else DEFAULT_STAGE1_STEPS
        _check_int("steps", steps, 1, 1000)
        _check_int("seed", seed, 0)
        _check_int("queue_size", queue_size, 1)
        _check_int("stage1_steps", stage1_steps, 1, 1000)
        stream_batch = steps if stream_batch is None else _check_int("stream_batch", stream_batch, 1, steps)
        if first_window is None:  # auto: the cheapest first call, where window 0 runs alone in one call
            first_window = min(pipe.overlap + 1, pipe.window) if fast_start and steps == 1 else pipe.window
        else:
            _check_int("first_window", first_window, pipe.overlap + 1, pipe.window)
            if first_window < pipe.window and not fast_start:
                raise ValueError(f"first_window={first_window} (shorter than the {pipe.window}-frame window) needs "
                                 f"fast_start=True: window 0 must run its steps alone")
        if prefetch is None:  # off until its GPU parity test has passed (README, Streaming)
            prefetch = False
        elif not isinstance(prefetch, bool):
            raise ValueError(f"prefetch must be True, False or None (auto), got {prefetch!r}")
        if prefetch and getattr(pipe, "backend", "torch") == "compile":
            raise ValueError("prefetch=True does not go with the compile backend: its CUDA graphs share one memory "
                             "pool across the networks, so a FLAME-encoder replay during the UNet's could overwrite it")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        fps = pipe.fps if fps is None else _check_number("fps", fps, 0, 240)
        guidance = float(default_guidance(pipe) if guidance is None else guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        texts = prompt is not None or motion is not None or emotion is not None
        if (flame is None) == (not texts):
            raise ValueError("give either a text prompt (prompt / motion / emotion) or flame=FlameParams, "
                             "exactly one of the two")
        frames = None
        if seconds is not None:
            frames = max(1, int(round(_check_number("seconds", seconds, 0, 24 * 3600) * fps)))
        cameras = self._cameras(views)
        stats = StreamStats()
        t0 = time.perf_counter()
        ctx = pipe.prepare(reference)
        if flame is not None:
            driver = SequenceDriver(flame, fps)
            frames = driver.total if frames is None else min(frames, driver.total)
            self._parts = None
        else:
            if self.stage1 is None:
                raise ValueError("text driving needs a stage-1 model (StreamingEngine(stage2, stage1=Text2FLAME))")
            text = prompt if prompt is not None else (motion if motion is not None else emotion)
            parts = split_prompt(text, motion=motion, emotion=emotion)  # a lone part: the other is the default
            self._parts = (parts.motion, parts.emotion)
            m_text, e_text = self.stage1.encode([parts.motion], [parts.emotion])
            driver = TextDriver(self.stage1, m_text, e_text, fps=fps, shape=_identity(shape), steps=stage1_steps,
                                guidance=stage1_guidance, seed=seed, total=frames, lookahead=lookahead)
        self.settings = StreamSettings(fps=fps, steps=steps, guidance=guidance, seed=seed, queue_size=queue_size,
                                       policy=policy, realtime=bool(realtime), stream_batch=stream_batch,
                                       output=output, frames=frames, fast_start=bool(fast_start),
                                       first_window=first_window, prefetch=prefetch)
        old = self.state
        if old is not None and not old.started:
            old.driver.close()
        self.state = StreamState(pipe, self.settings, ctx, driver, cameras, stats)
        log.info("stream prepared in %.2f s: %s views, window %d (overlap %d, first window %d), %d steps, "
                 "stream batch %d, %.4g fps", time.perf_counter() - t0, self.state.views, pipe.window, pipe.overlap,
                 first_window, steps, stream_batch, fps)
        return self

    # ------------------------------------------------------------------------------------ streaming
    def stream(self) -> FrameStream:
        """Start the prepared stream: an iterator (and async iterator) of :class:`StreamFrame`."""
        st = self.state
        if st is None:
            raise RuntimeError("call prepare() before stream()")
        if st.started:
            raise RuntimeError("this stream was already started; call prepare() again for a new one")
        last = self._last_job
        if last is not None and last.is_alive():  # a dropped / timed-out stream still finishing its model call
            last.join(JOIN_TIMEOUT_S)
            if last.is_alive():
                raise RuntimeError(f"the engine's previous stream has not stopped within {JOIN_TIMEOUT_S:g} s "
                                   "(its worker is still in a model call); try again later")
        st.started = True
        stream = FrameStream(st, self._worker)
        self._last_job = stream.thread
        self._stream = weakref.ref(stream)
        return stream

    def update(self, prompt: str | None = None, *, motion: str | None = None, emotion: str | None = None,
               views=None) -> int:
        """Live change of the text (whole prompt, or its motion / emotion part) and / or the views (same
        count); applied before the next window enters. Returns the update's revision number."""
        from mvportrait.drivers.text import split_prompt

        st = self.state
        if st is None:
            raise RuntimeError("call prepare() before update()")
        upd = {}
        if prompt is not None or motion is not None or emotion is not None:
            if self._parts is None:
                raise ValueError("this stream is driven by a FLAME sequence; text updates need a text-driven "
                                 "stream")
            if prompt is not None:
                parts = split_prompt(prompt, motion=motion, emotion=emotion)
                m, e = parts.motion, parts.emotion
            else:
                m = motion if motion is not None else self._parts[0]
                e = emotion if emotion is not None else self._parts[1]
            m_cond, e_cond = self.stage1.encode([m], [e])  # text encoding here, not in the worker
            if m != self._parts[0]:
                upd["motion"] = m_cond
            if e != self._parts[1]:
                upd["emotion"] = e_cond
            self._parts = (m, e)
        if views is not None:
            cams = self._cameras(views)
            if cams.batch_shape[-1] != st.views:
                raise ValueError(f"a live update keeps the view count: this stream has {st.views} views, the "
                                 f"new rig has {cams.batch_shape[-1]}; prepare a new stream for another count")
            upd["cameras"] = cams
        with st.lock:
            st.pending.update(upd)
            if upd:
                st.requested += 1
            return st.requested


def default_guidance(pipe) -> float:
    """Image guidance a stream uses when none is given: 1 (none) for a distilled student (guidance folded
    into it: ``pipe.is_student`` or a consistency sampler), else the model config's."""
    from mvportrait.engine.schedulers import ConsistencySampler

    if getattr(pipe, "is_student", False) or isinstance(pipe.sampler, ConsistencySampler):
        return 1.0
    return float(pipe.config.guidance)


def _identity(shape) -> torch.Tensor:
    if shape is None:
        return torch.zeros(1, 300)
    s = torch.as_tensor(shape, dtype=torch.float32)
    if s.ndim == 1:
        s = s[None]
    if s.ndim != 2 or s.shape[0] != 1:
        raise ValueError(f"shape must be (n_shape,) or (1, n_shape), got {tuple(s.shape)}")
    return s


__all__ = ["StreamingEngine", "default_guidance", "StreamFrame", "FrameTimings", "FrameStream", "StreamSettings",
           "StreamStats",
           "StepPlan"]
