"""Stage 1 of the streaming runtime: FLAME parameters per output frame, generated ahead of need.

Two drivers give the stage-2 scheduler the FLAME parameters of any output frame index:

* :class:`SequenceDriver` -- a given FLAME sequence (finite), resampled to the output rate by the
  nearest frame exactly as :meth:`FLAME2Video.model_frames` does.
* :class:`TextDriver` -- MotionDM + EmotionDM (:class:`Text2FLAME`) in *windows with continuity*:
  each model has a :class:`_Track`, a look-ahead buffer of raw (normalised, unsmoothed) frames at the
  models' rate (25 fps). A new window of ``max_frames`` is sampled with its first ``overlap`` frames
  fixed to the buffer's last ``overlap`` frames (``Text2FLAME.sample_window``'s inpainting), exactly
  the windows of ``Text2FLAME.sample`` -- one generator per model seeded as in ``Text2FLAME.generate``,
  so without live updates the streamed sequence equals the offline one. The window-3 smoothing is
  applied on demand over ``[first - r, last + r]`` of the requested frames, which gives the offline
  values wherever both exist (the offline sequence's last ``r`` frames see its end instead).

Look-ahead: a helper thread keeps every track at least one stage-1 hop (``max_frames - overlap``
frames) ahead of the last frame handed out, so the stage-2 worker normally never waits for stage 1.

Live text update (:meth:`TextDriver.set_text`): the track keeps its raw frames up to the last frame
already handed out (rendered), drops the rest, and continues from there with the new text: the next
window's first ``overlap`` frames are the kept ones (inpainting), and its first ``overlap // 2`` new
frames cross-fade linearly from the old text's continuation (already sampled by the look-ahead) to
the new window. The inpainting alone is not enough: replacement-style inpainting leaves a jump right
after the known frames (shipped stage 1, 10 steps: a 0.24 rad frame-to-frame pose change at a prompt
switch against <= 0.03 around it, 0.04 with the cross-fade; ``Text2FLAME.sample``'s own window seams
jump 0.08 against a median of 0.003). The generator of a track is re-seeded from (seed, revision), so
a stream with updates is deterministic for the frames at which the updates take effect.
"""
from __future__ import annotations

import logging
import math
import threading
import time

import torch

from mvportrait.flame.params import FlameParams

log = logging.getLogger(__name__)

EMOTION_SEED_OFFSET = 1_000_003  # Text2FLAME.generate seeds the emotion model with seed + this


def frame_sources(frames: list[int], fps_in: float, fps_out: float) -> torch.Tensor:
    """Nearest source-frame index (int64) of each output frame: ``round(i * fps_in / fps_out)`` in
    float64, half to even -- the rule of :meth:`FLAME2Video.model_frames`."""
    return torch.round(torch.tensor(frames, dtype=torch.float64) * fps_in / fps_out).long()


def sequence_length(num_frames: int, fps_in: float, fps_out: float) -> int:
    """Output frames of a ``num_frames`` sequence at ``fps_in`` seen at ``fps_out`` (as model_frames)."""
    return max(1, int(math.floor((num_frames - 1) * fps_out / fps_in + 1e-6)) + 1)


class SequenceDriver:
    """A fixed FLAME sequence (B = 1) seen at ``fps`` frames per second; ``total`` output frames."""

    revision_aware = False

    def __init__(self, flame: FlameParams, fps: float):
        from mvportrait.engine.flame2video import _select_frames

        if not isinstance(flame, FlameParams):
            raise TypeError(f"flame must be FlameParams, got {type(flame).__name__}")
        if flame.batch_size != 1:
            raise ValueError(f"a stream is driven by one sequence; got a batch of {flame.batch_size}")
        self._select = _select_frames
        self.flame, self.fps = flame, float(fps)
        self.fps_in = float(flame.fps or 25.0)
        self.total = sequence_length(flame.num_frames, self.fps_in, self.fps)

    def params(self, frames: list[int]) -> FlameParams:
        idx = frame_sources(frames, self.fps_in, self.fps).clamp(max=self.flame.num_frames - 1)
        fp = self._select(self.flame, idx)
        fp.fps = self.fps
        return fp

    def close(self, timeout: float | None = None) -> None:
        pass


class _Track:
    """One stage-1 model's raw look-ahead buffer (see the module docstring). Guarded by the driver's lock."""

    def __init__(self, t2f, model, text, *, steps: int, guidance: float | None, seed: int):
        self.t2f, self.model = t2f, model
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.cond, self.uncond = t2f.text_pair(model, text)
        self.generator = torch.Generator().manual_seed(seed)
        self.raw: torch.Tensor | None = None  # (1, L, D) normalised frames [base, base + L)
        self.base = 0
        self.epoch = 0  # bumped by every text change: a window sampled for an older epoch is discarded
        self.overlap = t2f.overlap
        self.radius = model.cfg.smooth // 2 if model.cfg.smooth > 1 else 0
        self.blend = max(1, self.overlap // 2)  # frames of the cross-fade after a text change
        self.fade_from: torch.Tensor | None = None  # (1, n, D) the old continuation to fade from

    @property
    def end(self) -> int:
        return self.base + (0 if self.raw is None else self.raw.shape[1])

    def job(self):
        """What sampling the next window needs, snapshotted under the lock."""
        known = None if self.raw is None else self.raw[:, -self.overlap:].clone()
        return self.epoch, self.cond, self.uncond, known, self.generator

    def sample(self, job) -> torch.Tensor:
        _, cond, uncond, known, gen = job
        return self.t2f.sample_window(self.model, cond, uncond, known=known, steps=self.steps,
                                      guidance=self.guidance, generator=gen)

    def append(self, job, window: torch.Tensor) -> bool:
        if job[0] != self.epoch:
            return False
        new = window if self.raw is None else window[:, self.overlap:]
        if self.fade_from is not None and self.raw is not None:
            n = min(self.fade_from.shape[1], new.shape[1])
            w = torch.arange(1, n + 1, dtype=new.dtype, device=new.device)[None, :, None] / (n + 1)
            new = torch.cat([torch.lerp(self.fade_from[:, :n], new[:, :n], w), new[:, n:]], dim=1)
        self.fade_from = None
        self.raw = new if self.raw is None else torch.cat([self.raw, new], dim=1)
        return True

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        """(n, D) denormalised, smoothed values of the frames ``idx`` (all < end - radius)."""
        from mvportrait.models.motion_denoiser import smooth_frames

        lo = max(0, int(idx.min()) - self.radius)
        hi = int(idx.max()) + self.radius
        seg = self.model.denormalize(self.raw[:, lo - self.base:hi + 1 - self.base])
        if self.radius:
            seg = smooth_frames(seg, self.model.cfg.smooth)
        return seg[0, idx - lo]

    def trim(self, keep_from: int) -> None:
        """Drop raw frames before ``keep_from`` (always keeping the last ``overlap``)."""
        if self.raw is None:
            return
        cut = min(keep_from - self.base, self.raw.shape[1] - self.overlap)
        if cut > 0:
            self.raw = self.raw[:, cut:].contiguous()
            self.base += cut

    def set_text(self, text, keep_upto: int, revision: int) -> None:
        """New text condition; raw frames after ``keep_upto`` are dropped and regenerated from it."""
        self.cond, self.uncond = self.t2f.text_pair(self.model, text)
        self.generator = torch.Generator().manual_seed((self.seed * 1_000_033 + revision) % (2**63))
        self.epoch += 1
        if self.raw is not None:
            keep = keep_upto + 1 - self.base
            if keep < self.overlap:  # nothing rendered yet (or too little kept): start over
                self.raw, self.base, self.fade_from = None, 0, None
            else:
                old = self.raw[:, keep:keep + self.blend]
                self.fade_from = old if old.shape[1] else None
                self.raw = self.raw[:, :keep]


class TextDriver:
    """Text-driven FLAME frames (unbounded, or ``total`` frames) with look-ahead; see the module docstring."""

    revision_aware = True

    def __init__(self, t2f, motion_text, emotion_text, *, fps: float, shape: torch.Tensor, steps: int,
                 guidance: float | None, seed: int, total: int | None = None, lookahead: bool = True):
        self.t2f, self.fps, self.total = t2f, float(fps), total
        self.shape = shape  # (1, n_shape)
        self.model_fps = float(t2f.model_fps)
        m_cond, e_cond = motion_text, emotion_text
        self.tracks = {"motion": _Track(t2f, t2f.motion_model, m_cond, steps=steps, guidance=guidance, seed=seed),
                       "emotion": _Track(t2f, t2f.emotion_model, e_cond, steps=steps, guidance=guidance,
                                         seed=seed + EMOTION_SEED_OFFSET)}
        self.committed = -1  # last source frame handed out (rendered)
        self.ahead = t2f.window - t2f.overlap
        self.wait_s = 0.0  # time the consumer of params() waited for stage 1
        self._lock = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._busy = 0  # windows being sampled outside the lock
        self._thread = None
        if lookahead:
            self._thread = threading.Thread(target=self._fill_loop, name="mvportrait-stage1", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------- look-ahead
    def _needs(self, track: _Track, upto: int) -> bool:
        return track.end <= upto + track.radius

    def _want(self) -> int:
        return self.committed + self.ahead

    def _fill_loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        while not self._stop and not any(self._needs(t, self._want()) for t in self.tracks.values()):
                            self._lock.wait()
                        if self._stop:
                            return
                        track = next(t for t in self.tracks.values() if self._needs(t, self._want()))
                        job = track.job()
                        self._busy += 1
                    try:
                        window = track.sample(job)
                    finally:
                        with self._lock:
                            self._busy -= 1
                    with self._lock:
                        track.append(job, window)
                        self._lock.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer of params()
            with self._lock:
                self._error = e
                self._lock.notify_all()

    def _ensure(self, track: _Track, upto: int) -> None:
        """Wait (lock held) until ``track`` covers ``upto`` (+ smoothing radius); inline without a helper."""
        while self._needs(track, upto):
            if self._error is not None:
                raise self._error
            if self._stop:
                raise RuntimeError("the stage-1 driver was closed")
            if self._thread is None:
                job = track.job()
                track.append(job, track.sample(job))
            else:
                self._lock.notify_all()
                self._lock.wait()

    def params(self, frames: list[int]) -> FlameParams:
        """FLAME parameters (1, len(frames)) of output frames ``frames`` (ascending)."""
        idx = frame_sources(frames, self.model_fps, self.fps)
        top = int(idx.max())
        t0 = time.perf_counter()
        with self._lock:
            for track in self.tracks.values():
                self._ensure(track, top)
            pose = self.tracks["motion"].values(idx)  # (n, 9)
            expr = self.tracks["emotion"].values(idx)  # (n, n_expr)
            self.committed = max(self.committed, top)
            for track in self.tracks.values():
                track.trim(self.committed - track.overlap - track.radius - 1)
            self._lock.notify_all()
        self.wait_s += time.perf_counter() - t0
        n = len(frames)
        return FlameParams(shape=self.shape.expand(1, self.shape.shape[-1]).to(pose.device, pose.dtype),
                           expression=expr[None].float(), global_pose=pose[None, :, 0:3].float(),
                           neck_pose=pose[None, :, 3:6].float(), jaw_pose=pose[None, :, 6:9].float(),
                           fps=self.fps) if n else None

    def set_text(self, *, motion=None, emotion=None, revision: int) -> None:
        """Switch the motion and/or emotion condition (encoded text) after the frames handed out so far."""
        with self._lock:
            if motion is not None:
                self.tracks["motion"].set_text(motion, self.committed, revision)
            if emotion is not None:
                self.tracks["emotion"].set_text(emotion, self.committed, revision)
            self._lock.notify_all()

    def close(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the stage-1 look-ahead thread did not stop within %s s", timeout)
        for track in self.tracks.values():
            track.raw = None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread


__all__ = ["SequenceDriver", "TextDriver", "frame_sources", "sequence_length"]
