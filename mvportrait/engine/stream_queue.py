"""The streaming runtime's bounded output queue: back-pressure policy, pacing clock, statistics.

A :class:`FrameQueue` sits between the producer (the stream's worker thread) and the consumer (the
frame iterator). Every frame carries a presentation timestamp ``ts`` (seconds of stream time). With
``realtime=True`` a frame is *released* to the consumer at ``anchor + ts`` on the monotonic clock,
where the anchor is set by the first frame (so the first frame is released as soon as it is ready
and the others follow at the target rate). Frames that are ready later than their release time are
*late*: they are released at once and the anchor moves by the delay (playback slips instead of
bursting to catch up); lateness is counted and reported. With ``realtime=False`` frames are released
as soon as they are queued.

Capacity counts released and not yet released frames. When the queue is full:

* ``lossless``: the producer waits until the consumer takes a frame (no frame dropped or duplicated;
  a slow consumer slows the producer down). A wait for the consumer moves the anchor too, so frames
  after it are not reported as late production.
* ``latest``: the producer never waits for the consumer, only for the clock: the oldest frame whose
  release time has passed is dropped (and counted); if none has passed yet (the producer is ahead
  of real time) the producer waits until the oldest is due. A fast consumer therefore loses nothing;
  a slow one sees the newest frames.

The consumer's :meth:`FrameQueue.get` returns frames in order, each no earlier than its release
time, ``None`` at the end of the stream, and raises the producer's exception (after the frames
queued before it) when the producer failed.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

POLICIES = ("lossless", "latest")
LATE_TOLERANCE_S = 0.002  # a frame this close to its release time is on time
REPORT_EVERY_S = 5.0  # at most one "cannot keep up" warning per this many seconds


@dataclass
class StreamStats:
    """Counters of one stream (read them from :attr:`FrameStream.stats`; updated live)."""

    frames_out: int = 0  # frames queued by the producer
    frames_delivered: int = 0  # frames taken by the consumer
    dropped: int = 0  # frames dropped by the ``latest`` policy
    late: int = 0  # frames ready after their release time (the producer could not keep up)
    slip_s: float = 0.0  # total delay added to the playback clock by late frames
    producer_wait_s: float = 0.0  # time the producer spent waiting for space (consumer or clock)
    first_frame_s: float | None = None  # stream start -> first frame queued
    calls: int = 0  # batched stage-2 model calls
    rows: int = 0  # windows denoised over all calls (rows / calls = mean stream batch)
    busy_s: float = 0.0  # producer time spent computing (not waiting)
    updates: list = field(default_factory=list)  # (revision, first frame conditioned on it)

    @property
    def produce_fps(self) -> float:
        """Frames per second of compute time: what the producer could sustain without waits."""
        return self.frames_out / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def mean_batch(self) -> float:
        return self.rows / self.calls if self.calls else 0.0


class _End:
    """Marker for the end of the stream inside the queue."""


class FrameQueue:
    """Bounded frame queue with a pacing clock; see the module docstring. Thread-safe."""

    def __init__(self, capacity: int, policy: str, fps: float, *, realtime: bool = True,
                 stats: StreamStats | None = None, clock: Callable[[], float] = time.monotonic):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"queue size must be an int >= 1, got {capacity!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.capacity, self.policy, self.fps, self.realtime = capacity, policy, float(fps), bool(realtime)
        self.stats = stats if stats is not None else StreamStats()
        self._clock = clock
        self._cond = threading.Condition()
        self._items: deque[tuple[float, Any]] = deque()
        self._anchor: float | None = None
        self._closed = False
        self._ended = False
        self._error: BaseException | None = None
        self._raised = False
        self._last_report = -float("inf")
        self._start = clock()

    # ------------------------------------------------------------------------------ producer
    def _release_time(self, ts: float, now: float) -> float:
        if not self.realtime:
            return now
        if self._anchor is None:
            self._anchor = now - ts
        release = self._anchor + ts
        late = now - release
        if late > LATE_TOLERANCE_S:
            self._anchor += late
            self.stats.late += 1
            self.stats.slip_s += late
            if now - self._last_report >= REPORT_EVERY_S:
                self._last_report = now
                log.warning("stream cannot keep up with %.4g fps: frame at %.2f s is %.0f ms late (%d late "
                            "frames, %.2f s behind in total; producing %.1f frames per compute second)",
                            self.fps, ts, late * 1e3, self.stats.late, self.stats.slip_s, self.stats.produce_fps)
            release = now
        return release

    def put(self, frame, ts: float) -> bool:
        """Queue ``frame`` with presentation timestamp ``ts``; False if the queue was closed."""
        with self._cond:
            now = self._clock()
            if self.stats.first_frame_s is None:
                self.stats.first_frame_s = now - self._start
            release = self._release_time(ts, now)
            waited = False
            while not self._closed and len(self._items) >= self.capacity:
                timeout = None
                if self.policy == "latest":
                    head = self._items[0][0]
                    if head <= now:
                        self._items.popleft()
                        self.stats.dropped += 1
                        continue
                    timeout = head - now
                t0 = self._clock()
                self._cond.wait(timeout)
                now = self._clock()
                self.stats.producer_wait_s += now - t0
                waited = True
            if self._closed:
                return False
            if waited and self.realtime and release < now:
                # the wait (for the consumer, or the clock) is not late production: shift the clock
                self._anchor += now - release
                release = now
            self._items.append((release, frame))
            self.stats.frames_out += 1
            self._cond.notify_all()
            return True

    def finish(self) -> None:
        """The producer is done: the consumer gets the queued frames, then the end."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The producer failed: the consumer gets the queued frames, then ``error`` is raised."""
        with self._cond:
            self._error = error
            self._ended = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ consumer
    def get(self, timeout: float | None = None):
        """The next frame (in order, not before its release time); None at the end of the stream.
        Raises the producer's exception once; ``TimeoutError`` after ``timeout`` seconds without one."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = self._clock()
                if self._items:
                    release, frame = self._items[0]
                    if release <= now:
                        self._items.popleft()
                        self.stats.frames_delivered += 1
                        self._cond.notify_all()
                        return frame
                    wait = release - now
                elif self._error is not None and not self._raised:
                    self._raised = True
                    raise self._error
                elif self._ended:
                    return None
                else:
                    wait = None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        raise TimeoutError(f"no frame within {timeout} s")
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def close(self) -> None:
        """Stop both sides: queued frames are discarded, a waiting producer or consumer returns."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


__all__ = ["FrameQueue", "StreamStats", "POLICIES"]
