"""Procedural head-motion clips (neck / body / jaw poses) with structured labels and captions.

A clip is one or two head *segments* in time order plus one jaw action:

=========  ===========  ==============================================================
action     direction    what the head does (``neck_pose``, axis-angle, radians)
=========  ===========  ==============================================================
nod        -            ``count`` down-up cycles about +x (down = +x rotation)
shake      -            ``count`` left-right cycles about +y (left = +y rotation)
turn       left/right   yaw to a target angle and **hold** it
tilt       left/right   roll toward that shoulder and hold (left = -z, right = +z)
look       up/down      pitch to a target angle and hold (up = -x, down = +x)
still      -            no head motion (solo, or first of two segments)
sway       -            small slow multi-axis idle sway for the whole clip (solo only)
=========  ===========  ==============================================================

``turn``/``tilt``/``look`` are *turn and hold*: the head reaches the target and stays there,
also while a following segment plays (pose offsets compose per axis, so "looks down, then
nods" nods around the lowered head, and "turns left, then turns right" swings from the left
straight to the right). Every movement is a sum of minimum-jerk steps (zero velocity and
acceleration at both ends), with a little cross-axis coupling, a slow drift, a faint tremor
and a small body sway in ``global_pose``. Consecutive segments are separated by a short
pause, so the motion analyser can split them.

Timing: the first moving segment starts within 0.08-0.3 s; a leading "still" lasts 1.0-1.5 s;
a held pose lasts at least 0.5 s before the next segment, which follows a 0.6-0.9 s pause; the
clip keeps 0.3 s of quiet after the last motion. :func:`sample_motion` resamples label specs
that do not fit the clip (at 4 s, for example, "nods three times slowly" never fits) and keeps
nods / shakes around a held pose within ``MAX_EXCURSION_DEG``.

Modifiers: ``speed`` slow/normal/fast (cycle period of nod/shake, duration of a turn),
``amplitude`` small/normal/large (angle ranges in ``AMPLITUDE_DEG``), ``count`` 1-3 for nod
and shake. Jaw (``jaw_pose[..., 0]`` >= 0 opens the mouth): ``none``, ``talk`` (irregular
syllable-rate opening in phrases), ``open_close`` (opens once and closes), ``open_wide``
(opens wide and stays open).

Captions are rendered from the label by phrase banks. Every bank holds its wordings in two
fixed lists, ``train`` and ``test``: captions for the test split use only the held-out
wordings, so evaluation measures generalisation to unseen wordings.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

HEAD_ACTIONS = ("nod", "shake", "turn", "tilt", "look", "still", "sway")
DIRECTIONS = {"turn": ("left", "right"), "tilt": ("left", "right"), "look": ("up", "down")}
SPEEDS = ("slow", "normal", "fast")
AMPLITUDES = ("small", "normal", "large")
COUNTS = (1, 2, 3)
JAW_ACTIONS = ("none", "talk", "open_close", "open_wide")
OSCILLATIONS = ("nod", "shake")
HOLDS = ("turn", "tilt", "look")
SPLITS = ("train", "test")

# Cycle period (s) of one nod (down-up) or one shake (left-right); jittered by +-8%.
PERIOD_S = {"slow": 1.3, "normal": 0.85, "fast": 0.5}
# Duration (s) of the minimum-jerk move of turn / tilt / look; jittered by +-8%.
MOVE_S = {"slow": 1.4, "normal": 0.8, "fast": 0.4}
JITTER = 0.08
SHAKE_END_FRACTION = 0.35  # first / last move of a shake (centre <-> side), in periods
# Peak angle (degrees) per amplitude class: nod = down excursion, shake = side excursion,
# turn / tilt / look = held angle away from neutral.
AMPLITUDE_DEG = {
    "nod": {"small": (7.0, 9.0), "normal": (13.0, 17.0), "large": (21.0, 26.0)},
    "shake": {"small": (7.0, 10.0), "normal": (14.0, 19.0), "large": (25.0, 30.0)},
    "turn": {"small": (12.0, 17.0), "normal": (25.0, 32.0), "large": (40.0, 46.0)},
    "tilt": {"small": (7.5, 10.0), "normal": (13.0, 17.0), "large": (21.0, 26.0)},
    "look": {"small": (8.0, 11.0), "normal": (15.0, 20.0), "large": (25.0, 30.0)},
}
# Index in neck_pose and sign of the rotation for each action/direction.
AXIS = {"nod": 0, "look": 0, "shake": 1, "turn": 1, "tilt": 2}
SIGN = {("turn", "left"): 1.0, ("turn", "right"): -1.0, ("tilt", "left"): -1.0, ("tilt", "right"): 1.0,
        ("look", "up"): -1.0, ("look", "down"): 1.0}

START_S = (0.08, 0.3)      # first moving segment starts within this window
GAP_S = (0.6, 0.9)         # pause between two segments
STILL_FIRST_S = (1.0, 1.5)  # duration of a leading "still" segment
MIN_HOLD_S = 0.5           # a held pose lasts at least this long before the next segment
TAIL_S = 0.3               # quiet time left at the end of the clip after the last motion
SWAY_MIN_S = 3.0           # sway clips need this much time to be recognisable
MAX_EXCURSION_DEG = 50.0   # an oscillation around a held pose may not reach further than this
DEG = math.pi / 180.0


# ----------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class MotionSegment:
    """One head action over frames [start, end). Fields that do not apply are None."""

    action: str
    direction: str | None = None
    speed: str | None = None
    count: int | None = None
    amplitude: str | None = None
    start: int = 0
    end: int = 0

    def __post_init__(self):
        if self.action not in HEAD_ACTIONS:
            raise ValueError(f"unknown head action {self.action!r}; expected one of {HEAD_ACTIONS}")
        dirs = DIRECTIONS.get(self.action)
        if dirs is None and self.direction is not None:
            raise ValueError(f"action {self.action!r} takes no direction, got {self.direction!r}")
        if dirs is not None and self.direction not in dirs:
            raise ValueError(f"action {self.action!r} needs a direction in {dirs}, got {self.direction!r}")
        moving = self.action not in ("still", "sway")
        for name, vocab in (("speed", SPEEDS), ("amplitude", AMPLITUDES)):
            value = getattr(self, name)
            if moving and value not in vocab:
                raise ValueError(f"{name} of {self.action!r} must be one of {vocab}, got {value!r}")
            if not moving and value is not None:
                raise ValueError(f"action {self.action!r} takes no {name}, got {value!r}")
        if self.action in OSCILLATIONS:
            if self.count not in COUNTS:
                raise ValueError(f"count of {self.action!r} must be one of {COUNTS}, got {self.count!r}")
        elif self.count is not None:
            raise ValueError(f"action {self.action!r} takes no count, got {self.count!r}")

    def key(self) -> tuple:
        """The categorical part of the label (everything but the frame range)."""
        return (self.action, self.direction, self.speed, self.count, self.amplitude)


@dataclass(frozen=True)
class MotionLabel:
    """Head segments in time order and the jaw action of a clip of ``frames`` frames."""

    segments: tuple[MotionSegment, ...]
    jaw: str = "none"
    frames: int = 0
    fps: float = 25.0

    def __post_init__(self):
        segs = tuple(s if isinstance(s, MotionSegment) else MotionSegment(**s) for s in self.segments)
        object.__setattr__(self, "segments", segs)
        if not 1 <= len(segs) <= 2:
            raise ValueError(f"a motion label has 1 or 2 segments, got {len(segs)}")
        if self.jaw not in JAW_ACTIONS:
            raise ValueError(f"unknown jaw action {self.jaw!r}; expected one of {JAW_ACTIONS}")
        if len(segs) == 2:
            a, b = segs
            if "sway" in (a.action, b.action) or b.action == "still":
                raise ValueError("'sway' is solo only and 'still' can only be the first of two segments")
            if a.action == b.action and (a.action in OSCILLATIONS or a.direction == b.direction):
                raise ValueError(f"two consecutive segments repeat {a.action!r} {a.direction or ''}".rstrip())

    def actions(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((s.action, s.direction) for s in self.segments)

    def to_dict(self) -> dict:
        return {"segments": [asdict(s) for s in self.segments], "jaw": self.jaw, "frames": self.frames,
                "fps": self.fps}

    @staticmethod
    def from_dict(d: dict) -> "MotionLabel":
        return MotionLabel(segments=tuple(MotionSegment(**s) for s in d["segments"]), jaw=d["jaw"],
                           frames=int(d.get("frames", 0)), fps=float(d.get("fps", 25.0)))


# ---------------------------------------------------------------------------- helpers
def as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def check_clip_args(frames, fps) -> tuple[int, float]:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames <= 0:
        raise ValueError(f"frames must be a positive integer, got {frames!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.floating)) or not 0 < fps < 1000:
        raise ValueError(f"fps must be a positive number below 1000, got {fps!r}")
    return int(frames), float(fps)


def min_jerk(t: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """Minimum-jerk step 0 -> 1 over [t0, t1]: 10 s^3 - 15 s^4 + 6 s^5 with s clipped to [0, 1]."""
    s = np.clip((t - t0) / max(t1 - t0, 1e-6), 0.0, 1.0)
    return s * s * s * (10.0 - 15.0 * s + 6.0 * s * s)


@functools.lru_cache(maxsize=32)
def _cosine_basis(frames: int, fps: float, max_hz: float) -> np.ndarray:
    """(frames, K) orthonormal-ish cosine basis up to ``max_hz``, unit RMS per column."""
    duration = frames / fps
    k = np.arange(1, max(2, int(2 * duration * max_hz)) + 1)
    t = (np.arange(frames) + 0.5) / frames
    basis = np.cos(np.pi * t[:, None] * k[None]) * np.sqrt(2.0)
    return basis / np.sqrt(k.size)


def smooth_noise(rng: np.random.Generator, frames: int, fps: float, dims: int, max_hz: float = 1.0) -> np.ndarray:
    """(frames, dims) zero-mean smooth noise with about unit standard deviation."""
    b = _cosine_basis(frames, float(fps), float(max_hz))
    return b @ rng.standard_normal((b.shape[1], dims))


# ------------------------------------------------------------------------ generation
@dataclass
class _Track:
    """Sum of minimum-jerk steps on the three neck axes (degrees)."""

    steps: list = field(default_factory=list)  # (axis, t0, t1, delta_deg)

    def add(self, axis, t0, t1, delta):
        self.steps.append((axis, t0, t1, delta))

    def render(self, t: np.ndarray) -> np.ndarray:
        out = np.zeros((len(t), 3))
        for axis, t0, t1, delta in self.steps:
            out[:, axis] += delta * min_jerk(t, t0, t1)
        return out


def _segment_duration(seg: dict, rng) -> tuple[float, float]:
    """(motion duration, timing parameter) for a moving segment."""
    jit = rng.uniform(1 - JITTER, 1 + JITTER)
    if seg["action"] in OSCILLATIONS:
        period = PERIOD_S[seg["speed"]] * jit
        extra = 2 * SHAKE_END_FRACTION - 0.5 if seg["action"] == "shake" else 0.0
        return (seg["count"] + extra) * period, period
    move = MOVE_S[seg["speed"]] * jit
    return move, move


def _normalise_spec(spec) -> dict:
    if isinstance(spec, MotionSegment):
        spec = {k: v for k, v in asdict(spec).items() if k not in ("start", "end")}
    if not isinstance(spec, dict):
        raise TypeError(f"a segment spec is a dict or MotionSegment, got {type(spec).__name__}")
    unknown = set(spec) - {"action", "direction", "speed", "count", "amplitude"}
    if unknown:
        raise ValueError(f"unknown segment fields {sorted(unknown)}")
    action = spec.get("action")
    s = dict(spec)
    if action not in ("still", "sway"):
        s.setdefault("speed", "normal")
        s.setdefault("amplitude", "normal")
    if action in OSCILLATIONS:
        s.setdefault("count", 1)
    MotionSegment(**s)  # validates vocabulary
    return s


def make_motion(segments, jaw: str = "none", rng=0, frames: int = 100, fps: float = 25.0):
    """Realise a given label spec: ``segments`` is a list of 1-2 dicts (or MotionSegments) with
    action / direction / speed / count / amplitude (missing speed / amplitude = "normal", count = 1).
    A nod or shake around a held pose on the same axis must stay within ``MAX_EXCURSION_DEG``.

    Returns ``(MotionLabel, poses)`` with ``poses`` = {"global_pose", "neck_pose", "jaw_pose"}, each
    (frames, 3) float32 axis-angle. Raises ValueError for unknown labels or a spec that does not fit
    in ``frames`` frames.
    """
    frames, fps = check_clip_args(frames, fps)
    rng = as_rng(rng)
    specs = [_normalise_spec(s) for s in segments]
    MotionLabel(segments=tuple(MotionSegment(**s) for s in specs), jaw=jaw)  # validates structure
    duration = frames / fps
    t = np.arange(frames) / fps
    track = _Track()
    target = np.zeros(3)  # held angle per axis (degrees)
    out_segments = []
    now = 0.0
    solo = len(specs) == 1 and specs[0]["action"] in ("still", "sway")
    if solo and specs[0]["action"] == "sway" and duration < SWAY_MIN_S:
        raise ValueError(f"a sway clip needs at least {SWAY_MIN_S} s, got {duration:.2f} s")
    for i, spec in enumerate(specs):
        action = spec["action"]
        last = i == len(specs) - 1
        if solo:
            out_segments.append(MotionSegment(**spec, start=0, end=frames))
            break
        if action == "still":  # leading still segment
            length = rng.uniform(*STILL_FIRST_S)
            out_segments.append(MotionSegment(**spec, start=0, end=round(length * fps)))
            now = length
            continue
        start = rng.uniform(*START_S) if i == 0 else now
        move, timing = _segment_duration(spec, rng)
        amp = rng.uniform(*AMPLITUDE_DEG[action][spec["amplitude"]])
        axis = AXIS[action]
        end_motion = start + move
        need = end_motion + (TAIL_S if last else GAP_S[0] + (MIN_HOLD_S if action in HOLDS else 0.0))
        if need > duration + 1e-9:
            raise ValueError(f"segments {[s['action'] for s in specs]} do not fit in {frames} frames "
                             f"at {fps} fps ({duration:.2f} s)")
        if action in OSCILLATIONS and abs(target[axis]) + amp * (1 + JITTER) > MAX_EXCURSION_DEG:
            raise ValueError(f"{action} of {amp:.0f} deg around a held {target[axis]:.0f} deg goes past "
                             f"{MAX_EXCURSION_DEG} deg")
        others = [a for a in range(3) if a != axis]
        if action in HOLDS:
            new = SIGN[(action, spec["direction"])] * amp
            track.add(axis, start, end_motion, new - target[axis])
            for a in others:  # a little coupling into the other axes
                track.add(a, start, end_motion, rng.uniform(-0.05, 0.05) * amp)
            target[axis] = new
            hold = duration - end_motion if last else rng.uniform(MIN_HOLD_S, MIN_HOLD_S + 0.4)
            if not last and end_motion + hold + GAP_S[0] > duration:
                hold = MIN_HOLD_S
            seg_end = duration if last else end_motion + hold
        else:
            keys = _oscillation_keys(action, spec["count"], amp, rng)
            times = _oscillation_times(action, spec["count"], start, timing)
            prev = 0.0
            for (k0, k1), value in zip(times, keys):
                track.add(axis, k0, k1, value - prev)
                prev = value
            coupling = rng.uniform(-0.06, 0.06, size=2) * amp
            for a, c in zip(others, coupling):  # a small, in-phase wobble on the other axes
                peaks = keys / max(np.abs(keys).max(), 1e-9)
                prev = 0.0
                for (k0, k1), value in zip(times, peaks * c):
                    track.add(a, k0, k1, value - prev)
                    prev = value
            seg_end = end_motion
        out_segments.append(MotionSegment(**spec, start=round(start * fps),
                                          end=min(frames, round(seg_end * fps))))
        now = seg_end + (0.0 if last else rng.uniform(*GAP_S))
        if not last and now + 0.1 > duration:
            raise ValueError(f"segments {[s['action'] for s in specs]} do not fit in {frames} frames")
    neck = track.render(t)
    if solo and specs[0]["action"] == "sway":
        neck += _sway(rng, t)
    neck += 0.2 * smooth_noise(rng, frames, fps, 3, max_hz=0.8)  # slow drift
    neck += 0.02 * rng.standard_normal((frames, 3))  # faint tremor
    body = _body_sway(rng, t)
    jaw_pose = _jaw(jaw, rng, t, duration, fps)
    label = MotionLabel(segments=tuple(out_segments), jaw=jaw, frames=frames, fps=fps)
    poses = {"global_pose": (body * DEG).astype(np.float32), "neck_pose": (neck * DEG).astype(np.float32),
             "jaw_pose": jaw_pose.astype(np.float32)}
    return label, poses


def _oscillation_keys(action, count, amp, rng) -> np.ndarray:
    """Keyframe angles (degrees, relative to the held pose) of a nod or shake, ending at 0."""
    keys = []
    if action == "nod":  # down, slightly up past neutral, ..., back to neutral
        for c in range(count):
            keys.append(amp * rng.uniform(0.92, 1.08))
            keys.append(0.0 if c == count - 1 else -amp * rng.uniform(0.0, 0.15))
    else:  # shake: to one side, to the other, ..., back to centre
        first = rng.choice((-1.0, 1.0))
        for c in range(count):
            keys.append(first * amp * rng.uniform(0.92, 1.08))
            keys.append(-first * amp * rng.uniform(0.92, 1.08))
        keys.append(0.0)
    return np.array(keys)


def _oscillation_times(action, count, start, period):
    """(t0, t1) of each keyframe move: nods take half a period per move; shakes take
    ``SHAKE_END_FRACTION`` of a period for the first and last move (half the distance of a swing
    at the same peak acceleration) and half a period for the swings in between."""
    if action == "nod":
        return [(start + k * period / 2, start + (k + 1) * period / 2) for k in range(2 * count)]
    edges = [start, start + SHAKE_END_FRACTION * period]
    for _ in range(2 * count - 1):
        edges.append(edges[-1] + period / 2)
    edges.append(edges[-1] + SHAKE_END_FRACTION * period)
    return list(zip(edges[:-1], edges[1:]))


def _sway(rng, t) -> np.ndarray:
    """Idle head sway (degrees): slow sinusoids on all three axes, yaw strongest."""
    amp_y = rng.uniform(2.2, 3.5)
    amps = np.array([amp_y * rng.uniform(0.4, 0.6), amp_y, amp_y * rng.uniform(0.6, 0.9)])
    freqs = rng.uniform(0.35, 0.55, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    out = amps * np.sin(2 * np.pi * freqs * t[:, None] + phases)
    return out - out[0] * np.exp(-t[:, None] / 0.3)  # ease in from rest


def _body_sway(rng, t) -> np.ndarray:
    """Small torso sway for global_pose (degrees)."""
    amps = rng.uniform(0.1, 0.35, size=(2, 3))
    freqs = rng.uniform(0.05, 0.25, size=(2, 3))
    phases = rng.uniform(0, 2 * np.pi, size=(2, 3))
    out = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None, :, None] + phases[:, None])).sum(0)
    return out - out[0]


def _jaw(kind: str, rng, t, duration, fps) -> np.ndarray:
    """(T, 3) jaw pose in radians; opening is +x."""
    frames = len(t)
    opening = np.zeros(frames)
    if kind == "none":
        opening += rng.uniform(0.0, 0.015)
    elif kind == "talk":
        now = rng.uniform(0.0, min(0.4, duration * 0.1))
        while now < duration:
            phrase_end = min(duration, now + rng.uniform(1.0, 2.5))
            rate = rng.uniform(3.0, 4.5)  # syllables per second
            while now < phrase_end:
                syl = rng.uniform(0.8, 1.25) / rate
                a = rng.uniform(0.05, 0.18)
                x = np.clip((t - now) / syl, 0, 1)
                opening = np.maximum(opening, a * np.sin(np.pi * x) ** 2)
                now += syl
            now += rng.uniform(0.2, 0.5)  # pause between phrases
    elif kind == "open_close":
        open_s, hold_s, close_s = rng.uniform(0.25, 0.45), rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.45)
        total = open_s + hold_s + close_s
        if total + 0.3 > duration:
            raise ValueError(f"jaw 'open_close' needs about {total + 0.3:.2f} s, the clip has {duration:.2f} s")
        t0 = rng.uniform(0.1, duration - total - 0.2)
        a = rng.uniform(0.13, 0.22)
        opening = a * (min_jerk(t, t0, t0 + open_s) - min_jerk(t, t0 + open_s + hold_s, t0 + total))
    elif kind == "open_wide":
        open_s = rng.uniform(0.3, 0.6)
        if open_s + 1.1 > duration:
            raise ValueError(f"jaw 'open_wide' needs about {open_s + 1.1:.2f} s, the clip has {duration:.2f} s")
        t0 = rng.uniform(0.1, min(1.5, duration - open_s - 1.0))
        opening = rng.uniform(0.27, 0.35) * min_jerk(t, t0, t0 + open_s)
    else:
        raise ValueError(f"unknown jaw action {kind!r}; expected one of {JAW_ACTIONS}")
    opening = np.maximum(opening + 0.003 * smooth_noise(rng, frames, fps, 1)[:, 0], 0.0)
    jaw = np.zeros((frames, 3))
    jaw[:, 0] = opening
    jaw[:, 1:] = 0.004 * smooth_noise(rng, frames, fps, 2)
    return jaw


def _random_spec(rng, duration: float) -> tuple[list[dict], str]:
    """A random label spec (may not fit; the caller retries)."""
    def one(exclude=None, allow_still=False):
        while True:
            pool = ["nod", "shake", "turn", "tilt", "look"] + (["still"] if allow_still else [])
            action = pool[rng.integers(len(pool))]
            spec = {"action": action}
            if action in DIRECTIONS:
                spec["direction"] = DIRECTIONS[action][rng.integers(2)]
            if action != "still":
                spec["speed"] = SPEEDS[rng.integers(3)]
                spec["amplitude"] = AMPLITUDES[rng.integers(3)]
            if action in OSCILLATIONS:
                spec["count"] = int(COUNTS[rng.integers(3)])
            if exclude is None or not (action == exclude["action"] and (
                    action in OSCILLATIONS or spec.get("direction") == exclude.get("direction"))):
                return spec

    r = rng.random()
    if r < 0.07:
        segs = [{"action": "still"}]
    elif r < 0.14 and duration >= SWAY_MIN_S:
        segs = [{"action": "sway"}]
    elif r < 0.55:
        segs = [one()]
    else:
        first = one(allow_still=True)
        segs = [first, one(exclude=first)]
    jaw_p = rng.random()
    jaw = "none" if jaw_p < 0.4 else "talk" if jaw_p < 0.7 else "open_close" if jaw_p < 0.85 else "open_wide"
    return segs, jaw


def sample_motion(rng, frames: int = 100, fps: float = 25.0, max_tries: int = 50):
    """A random captionable head-motion clip: ``(MotionLabel, poses)`` (see :func:`make_motion`).

    Specs that do not fit the clip are resampled; a clip too short for anything else becomes
    "still" (with jaw "none" or "talk").
    """
    frames, fps = check_clip_args(frames, fps)
    rng = as_rng(rng)
    duration = frames / fps
    for _ in range(max_tries):
        segs, jaw = _random_spec(rng, duration)
        sub = np.random.default_rng(rng.integers(2**63))
        try:
            return make_motion(segs, jaw, sub, frames, fps)
        except ValueError:
            continue
    jaw = "talk" if rng.random() < 0.5 else "none"
    return make_motion([{"action": "still"}], jaw, rng, frames, fps)


# --------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class Bank:
    """Wordings of one slot: ``train`` ones are used for the training split, ``test`` ones are
    held out and used only for the test split. "" (an omitted slot) may appear in both."""

    train: tuple
    test: tuple

    def items(self, split: str) -> tuple:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.test

    def pick(self, rng, split: str):
        items = self.items(split)
        return items[rng.integers(len(items))]


SUBJECTS = Bank(  # (subject, possessive)
    train=(("", "their"), ("", "their"), ("the person", "their"), ("a man", "his"), ("a woman", "her"),
           ("he", "his"), ("she", "her"), ("the man", "his"), ("the woman", "her")),
    test=(("", "their"), ("someone", "their"), ("the subject", "their"), ("a girl", "her"),
          ("the speaker", "their"), ("this person", "their")),
)

VERBS = {
    "nod": Bank(train=("nods", "nods {poss} head", "nods {poss} head up and down", "dips {poss} head",
                       "nods in agreement", "gives {n} {noun}"),
                test=("bobs {poss} head up and down", "nods yes", "moves {poss} head up and down",
                      "performs {n} {noun}")),
    "shake": Bank(train=("shakes {poss} head", "shakes {poss} head no", "shakes {poss} head from side to side",
                         "shakes {poss} head left and right", "gives {n} {noun}"),
                  test=("wags {poss} head side to side", "shakes {poss} head in disagreement",
                        "swings {poss} head from side to side", "performs {n} {noun}")),
    "turn": Bank(train=("turns to the {dir}", "turns {dir}", "turns {poss} head to the {dir}",
                        "looks to the {dir}", "rotates {poss} head to the {dir}", "turns {poss} head {dir}"),
                 test=("looks toward the {dir} side", "rotates the head {dir}ward", "swivels {poss} head to the {dir}",
                       "glances over to the {dir}")),
    "tilt": Bank(train=("tilts {poss} head to the {dir}", "tilts {poss} head {dir}", "leans {poss} head to the {dir}",
                        "cocks {poss} head to the {dir}", "tilts to the {dir}"),
                 test=("tips {poss} head toward the {dir} shoulder", "inclines {poss} head to the {dir}",
                       "bends {poss} head sideways to the {dir}")),
    "look_up": Bank(train=("looks up", "raises {poss} head", "looks upward", "lifts {poss} head"),
                    test=("lifts {poss} chin", "turns {poss} face upward", "gazes up")),
    "look_down": Bank(train=("looks down", "lowers {poss} head", "looks downward", "drops {poss} head"),
                      test=("drops {poss} chin", "turns {poss} face downward", "gazes down")),
    "still": Bank(train=("stays still", "keeps {poss} head still", "holds {poss} head steady", "does not move",
                         "remains motionless"),
                  test=("holds perfectly still", "keeps {poss} head motionless", "stays frozen in place")),
    "sway": Bank(train=("sways {poss} head gently", "makes small idle head movements", "sways gently",
                        "moves {poss} head idly"),
                 test=("rocks {poss} head softly", "drifts {poss} head around lazily", "has a gentle idle sway")),
}
NOUNS = {"nod": ("nod", "nods"), "shake": ("head shake", "head shakes")}
COUNT_ADVERBS = {
    1: Bank(train=("once", "one time"), test=("a single time", "just once")),
    2: Bank(train=("twice", "two times"), test=("a couple of times", "2 times")),
    3: Bank(train=("three times", "thrice"), test=("3 times", "three separate times")),
}
COUNT_NUMBERS = {
    1: Bank(train=("a",), test=("one single",)),
    2: Bank(train=("two",), test=("a pair of",)),
    3: Bank(train=("three",), test=("a series of three",)),
}
SPEED_WORDS = {
    "slow": Bank(train=("slowly", "at a slow pace", "leisurely"), test=("unhurriedly", "at a relaxed pace")),
    "fast": Bank(train=("quickly", "rapidly", "fast"), test=("briskly", "swiftly", "at high speed")),
}
AMPLITUDE_WORDS = {
    "small": Bank(train=("slightly", "a little", "subtly"), test=("barely", "just a touch", "minimally")),
    "large": Bank(train=("a lot", "strongly", "markedly"), test=("dramatically", "considerably", "a great deal")),
}
NOD_LARGE = Bank(train=("deeply",), test=("very far down",))
SEQUENCERS = Bank(train=("{a}, then {b}", "{a} and then {b}", "first {a}, then {b}", "{a}, and after that {b}"),
                  test=("{a}; next, {b}", "{a}, and afterwards {b}", "{a}, subsequently {b}"))
JAW_PHRASES = {
    "talk": Bank(train=("while talking", "while speaking", "and talks", "as if speaking", "while saying something"),
                 test=("while conversing", "and chats away", "while uttering some words")),
    "open_close": Bank(train=("and opens and closes {poss} mouth", "while opening and closing {poss} mouth",
                              "and briefly opens {poss} mouth"),
                       test=("while {poss} mouth opens and shuts", "and lets {poss} jaw drop open briefly")),
    "open_wide": Bank(train=("and opens {poss} mouth wide", "with {poss} mouth wide open",
                             "and opens {poss} mouth as wide as possible"),
                      test=("and gapes", "with {poss} jaw hanging wide open", "and stretches {poss} mouth wide open")),
    "none": Bank(train=("", "", "", "", "", "", "with {poss} mouth closed", "keeping {poss} mouth shut"),
                 test=("", "", "", "", "with {poss} lips sealed", "without a word")),
}
# The -ly speed adverbs that may also stand before the verb ("slowly nods").
_PRE_ADVERBS = {"slowly", "leisurely", "quickly", "rapidly", "unhurriedly", "briskly", "swiftly"}


def banks() -> dict[str, Bank]:
    """Every phrase bank of motion captions by a dotted name (for split checks and counting)."""
    out = {"subjects": SUBJECTS, "sequencers": SEQUENCERS, "nod_large": NOD_LARGE}
    out.update({f"verb.{k}": v for k, v in VERBS.items()})
    out.update({f"count_adverb.{k}": v for k, v in COUNT_ADVERBS.items()})
    out.update({f"count_number.{k}": v for k, v in COUNT_NUMBERS.items()})
    out.update({f"speed.{k}": v for k, v in SPEED_WORDS.items()})
    out.update({f"amplitude.{k}": v for k, v in AMPLITUDE_WORDS.items()})
    out.update({f"jaw.{k}": v for k, v in JAW_PHRASES.items()})
    return out


def _segment_phrase(seg: MotionSegment, rng, split: str, poss: str) -> str:
    key = f"look_{seg.direction}" if seg.action == "look" else seg.action
    template = VERBS[key].pick(rng, split)
    fill = {"poss": poss, "dir": seg.direction or ""}
    post = []
    if "{n}" in template:
        number = COUNT_NUMBERS[seg.count].pick(rng, split)
        fill["n"] = number
        fill["noun"] = NOUNS[seg.action][0 if seg.count == 1 else 1]
    text = template.format(**fill)
    if seg.amplitude in AMPLITUDE_WORDS:
        bank = NOD_LARGE if (seg.action == "nod" and seg.amplitude == "large" and rng.random() < 0.4) \
            else AMPLITUDE_WORDS[seg.amplitude]
        post.append(bank.pick(rng, split))
    if seg.count is not None and "{n}" not in template and (seg.count > 1 or rng.random() < 0.5):
        post.append(COUNT_ADVERBS[seg.count].pick(rng, split))
    if seg.speed in SPEED_WORDS:
        word = SPEED_WORDS[seg.speed].pick(rng, split)
        if word in _PRE_ADVERBS and rng.random() < 0.4:
            text = f"{word} {text}"
        elif post and seg.amplitude in AMPLITUDE_WORDS:
            post[-1] += ","  # "shakes the head a lot, quickly"
            post.append(word)
        else:
            post.append(word)
    return " ".join([text] + post)


def motion_phrase(label: MotionLabel, rng, split: str = "train", poss: str = "their") -> str:
    """The verb phrase of a motion label (third person, no subject), e.g. "nods twice, then turns left"."""
    rng = as_rng(rng)
    parts = [_segment_phrase(s, rng, split, poss) for s in label.segments]
    text = parts[0] if len(parts) == 1 else SEQUENCERS.pick(rng, split).format(a=parts[0], b=parts[1])
    jaw = JAW_PHRASES[label.jaw].pick(rng, split).format(poss=poss)
    return f"{text} {jaw}" if jaw else text


def with_subject(subject: str, phrase: str) -> str:
    return f"{subject} {phrase}" if subject else phrase


def caption_motion(label: MotionLabel, rng, split: str = "train") -> str:
    """A full motion caption: a random subject from the split's wordings plus the verb phrase."""
    rng = as_rng(rng)
    subject, poss = SUBJECTS.pick(rng, split)
    return with_subject(subject, motion_phrase(label, rng, split, poss))
