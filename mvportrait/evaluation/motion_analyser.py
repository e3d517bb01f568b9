"""Deterministic labelling of head/jaw pose sequences, and the jitter metric.

:func:`analyse_motion` reads ``neck_pose`` (+ ``global_pose``, composed as R_global R_neck) and
``jaw_pose`` and answers with the vocabulary of :mod:`mvportrait.data.motion`: head segments
(nod / shake / turn / tilt / look / still / sway with direction, speed class, repetition count and
amplitude class) and the jaw action (none / talk / open_close / open_wide).

How, in order:

1. Head angles: the composed rotation as an axis-angle vector in degrees (x = pitch, + down;
   y = yaw, + toward the subject's left; z = roll, + toward the right shoulder), smoothed over
   3 frames.
2. Sway: if (on angles smoothed over ~0.25 s) at least two axes swing back and forth twice or
   more (1.2 deg reversals) with a
   median half-period of 0.8 s or more and no axis ranges over 10 deg, the clip is ``sway``.
3. Bouts: runs of frames where the head speed (central differences over ~0.12 s, averaged over
   ~0.2 s) exceeds 3 deg/s, or 1.6x the speed that the clip's own frame noise would give (noise
   estimated from the median absolute second difference), merged across pauses under 0.1 s;
   bouts that move less than 2.5 deg are dropped. A bout that reverses the previous one along
   the same axis after a pause shorter than 0.4 s and than 0.8x the previous move is joined to
   it (the two halves of a slow nod). No bout = ``still``; a first bout that starts after
   0.75 s gets a leading ``still`` segment.
4. Each bout: the axis with the largest range is the action axis. If the net change over the
   bout is at least half the range, the head moved to a new pose and held it (``look`` on pitch,
   ``turn`` on yaw, ``tilt`` on roll; direction from the sign; amplitude from the held angle;
   speed from the 10-90 % rise time of the minimum-jerk move). Otherwise it oscillated
   (``nod`` on pitch, ``shake`` on yaw): the count is the number of down peaks (nod) or half the
   number of extrema (shake) found by a zig-zag filter at 35 % of the range; the period from
   the peak widths (nod) or the extremum spacing (shake); the amplitude is the median peak.
5. Jaw (``jaw_pose[:, 0]``): peak below 0.06 rad = none; open above 0.24 rad for 0.6 s = open
   wide; three or more openings (zig-zag at 0.03 rad) = talk; else open_close.

Class boundaries sit at the geometric means between the generator's class ranges
(``PERIOD_S``, ``MOVE_S``, ``AMPLITUDE_DEG``), so the analyser measures the physical
quantities the captions promise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mvportrait.data.motion import (AMPLITUDE_DEG, AMPLITUDES, JITTER, MOVE_S, PERIOD_S, SPEEDS, MotionLabel,
                                    MotionSegment)

SPEED_THRESHOLD = 3.0      # deg/s: moving vs resting
MERGE_GAP_S = 0.1         # pauses shorter than this do not split a bout
MIN_BOUT_DEG = 2.5         # bouts that move less than this are noise
RESUME_S = 0.4            # a reversal after a shorter pause continues the same oscillation
LEADING_STILL_S = 0.75     # a first bout starting later than this follows a "still" segment
SWAY_STEP_DEG = 1.2
SWAY_HALF_PERIOD_S = 0.8
SWAY_MAX_RANGE_DEG = 10.0
JAW_NONE, JAW_WIDE, JAW_WIDE_S, JAW_STEP = 0.06, 0.24, 0.6, 0.03

# 10 % -> 90 % rise of a minimum-jerk step, as a fraction of its duration.
_TAU10 = 0.24736
_RISE_FRACTION = 1.0 - 2.0 * _TAU10


def _between(lo_range, hi_range) -> float:
    """Geometric mean between the top of the lower class and the bottom of the upper one."""
    return math.sqrt(lo_range[1] * hi_range[0])


def _jittered(base: float) -> tuple[float, float]:
    return base * (1 - JITTER), base * (1 + JITTER)


def _speed_edges(table: dict) -> tuple[float, float]:
    """Ascending durations separating fast | normal | slow."""
    slow, normal, fast = (_jittered(table[s]) for s in SPEEDS)
    return _between(fast, normal), _between(normal, slow)


PERIOD_EDGES = _speed_edges(PERIOD_S)
MOVE_EDGES = _speed_edges(MOVE_S)
AMPLITUDE_EDGES = {a: (_between(t["small"], t["normal"]), _between(t["normal"], t["large"]))
                   for a, t in AMPLITUDE_DEG.items()}


@dataclass(frozen=True)
class MotionAnalysis:
    """What :func:`analyse_motion` found: any number of head segments (in time order) and the jaw."""

    segments: tuple[MotionSegment, ...]
    jaw: str

    def actions(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((s.action, s.direction) for s in self.segments)


# ----------------------------------------------------------------------------- helpers
def _rodrigues(aa: np.ndarray) -> np.ndarray:
    """(T, 3) axis-angle -> (T, 3, 3) rotation matrices."""
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)
    k = aa / np.maximum(theta, 1e-12)
    kx, ky, kz = k[:, 0], k[:, 1], k[:, 2]
    zero = np.zeros_like(kx)
    kmat = np.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).reshape(-1, 3, 3)
    s, c = np.sin(theta)[..., None], np.cos(theta)[..., None]
    return np.eye(3) + s * kmat + (1 - c) * (kmat @ kmat)


def _log(r: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotations -> (T, 3) axis-angle (angles below pi)."""
    cos = np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)
    theta = np.arccos(cos)
    w = np.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], -1)
    scale = np.where(theta > 1e-6, theta / np.maximum(2 * np.sin(theta), 1e-12), 0.5)
    return w * scale[:, None]


def _pose_array(poses, key: str, frames: int | None) -> np.ndarray | None:
    if key not in poses or poses[key] is None:
        return None
    a = np.asarray(poses[key], dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{key} must be (T, 3) (or (1, T, 3)), got shape {a.shape}")
    if frames is not None and a.shape[0] != frames:
        raise ValueError(f"{key} has {a.shape[0]} frames, neck_pose has {frames}")
    if not np.isfinite(a).all():
        raise ValueError(f"{key} contains NaN or Inf")
    return a


def head_angles(poses: dict) -> np.ndarray:
    """(T, 3) head orientation in degrees: axis-angle of R_global @ R_neck."""
    if not isinstance(poses, dict):
        raise TypeError(f"poses must be a dict of arrays, got {type(poses).__name__}")
    neck = _pose_array(poses, "neck_pose", None)
    if neck is None:
        raise ValueError("poses needs a 'neck_pose' array (T, 3)")
    if neck.shape[0] < 1:
        raise ValueError("poses have no frames")
    glob = _pose_array(poses, "global_pose", neck.shape[0])
    rot = _rodrigues(neck) if glob is None else _rodrigues(glob) @ _rodrigues(neck)
    return np.degrees(_log(rot))


def _smooth(x: np.ndarray, width: int = 3) -> np.ndarray:
    if len(x) < width:
        return x.copy()
    pad = width // 2
    xp = np.concatenate([np.repeat(x[:1], pad, 0), x, np.repeat(x[-1:], pad, 0)])
    kernel = np.ones(width) / width
    return np.stack([np.convolve(xp[:, k], kernel, mode="valid") for k in range(x.shape[1])], 1)


def zigzag(x: np.ndarray, step: float) -> list[int]:
    """Indices of the alternating extrema of a 1-D signal: a turning point is confirmed once the
    signal has moved back from it by more than ``step``. The trend the signal starts with is
    found first (its starting point is not reported); the last, unconfirmed extreme is not
    reported either."""
    out: list[int] = []
    direction, ext, lo, hi = 0, 0, 0, 0
    for i in range(1, len(x)):
        v = x[i]
        if direction == 0:
            hi = i if v > x[hi] else hi
            lo = i if v < x[lo] else lo
            if x[hi] - x[lo] > step:
                direction, ext = (1, hi) if hi > lo else (-1, lo)
        elif direction == 1:
            if v >= x[ext]:
                ext = i
            elif x[ext] - v > step:
                out.append(ext)
                direction, ext = -1, i
        else:
            if v <= x[ext]:
                ext = i
            elif v - x[ext] > step:
                out.append(ext)
                direction, ext = 1, i
    return out


def _crossing(x: np.ndarray, level: float, start: int, step: int) -> float | None:
    """Fractional index where x crosses ``level`` walking from ``start`` by ``step`` (+1 / -1)."""
    i = start
    above = x[i] >= level
    while 0 <= i + step < len(x):
        j = i + step
        if (x[j] >= level) != above:
            denom = x[j] - x[i]
            frac = 0.0 if denom == 0 else (level - x[i]) / denom
            return i + step * frac
        i = j
    return None


def _classify(value: float, edges: tuple[float, float], labels: tuple[str, str, str]) -> str:
    return labels[0] if value < edges[0] else labels[1] if value < edges[1] else labels[2]


# ------------------------------------------------------------------------------ head
def angular_speed(angles: np.ndarray, fps: float) -> np.ndarray:
    """(T,) head speed in deg/s: central differences over ~0.12 s of the (lightly smoothed)
    angles, then averaged over ~0.2 s, which fills the brief stops at the turning points of an
    oscillation and keeps frame-level noise well below the moving threshold."""
    if len(angles) < 2:
        return np.zeros(len(angles))
    h = max(1, round(0.06 * fps))
    pad = np.concatenate([np.repeat(angles[:1], h, 0), angles, np.repeat(angles[-1:], h, 0)])
    speed = np.linalg.norm((pad[2 * h:] - pad[:-2 * h]) * fps / (2 * h), axis=1)
    return _smooth(speed[:, None], max(3, 2 * round(0.1 * fps) + 1))[:, 0]


def noise_level(angles: np.ndarray) -> float:
    """Robust estimate of per-frame white noise (deg) from the median absolute second difference."""
    if len(angles) < 3:
        return 0.0
    d2 = angles[2:] - 2 * angles[1:-1] + angles[:-2]
    return float(np.median(np.abs(d2)) / 0.6745 / math.sqrt(6.0))


def _bouts(angles: np.ndarray, fps: float, noise: float) -> list[tuple[int, int]]:
    h = max(1, round(0.06 * fps))
    noise_speed = noise * fps * math.sqrt(6.0) / (2 * h)  # RMS speed that white noise alone gives
    moving = angular_speed(angles, fps) > max(SPEED_THRESHOLD, 1.6 * noise_speed)
    runs = []
    i = 0
    while i < len(moving):
        if moving[i]:
            j = i
            while j < len(moving) and moving[j]:
                j += 1
            runs.append([i, j])
            i = j
        else:
            i += 1
    merged = []
    gap = round(MERGE_GAP_S * fps)
    for r in runs:
        if merged and r[0] - merged[-1][1] <= gap:
            merged[-1][1] = r[1]
        else:
            merged.append(r)
    out = []
    for a, b in merged:
        seg = angles[a:b + 1]
        if (seg.max(0) - seg.min(0)).max() >= MIN_BOUT_DEG:
            out.append((a, b))
    return out


def _is_sway(angles: np.ndarray, fps: float) -> bool:
    if (angles.max(0) - angles.min(0)).max() >= SWAY_MAX_RANGE_DEG:
        return False
    swinging = 0
    for k in range(3):
        ext = zigzag(angles[:, k], SWAY_STEP_DEG)
        if len(ext) >= 2 and np.median(np.diff(ext)) / fps >= SWAY_HALF_PERIOD_S:
            swinging += 1
    return swinging >= 2


def _merge_reversals(angles: np.ndarray, bouts: list, fps: float) -> list[tuple[int, int]]:
    """Join a bout to the previous one when, after a short pause, it moves along the same axis in
    the opposite direction: the two are halves of one oscillation whose turning point was slow
    enough to stop the head for a moment (slow, small nods). "Short" is below ``RESUME_S`` and
    below 0.8x the duration of the previous bout's last move (a minimum-jerk move stalls at its
    end for a time proportional to its duration)."""
    out = [list(bouts[0])] if bouts else []
    for a, b in bouts[1:]:
        ga, gb = out[-1]
        g = angles[ga:gb + 1]
        ax_g = int(np.argmax(np.ptp(g, axis=0)))
        ax_b = int(np.argmax(np.ptp(angles[a:b + 1], axis=0)))
        turns = zigzag(g[:, ax_g], max(0.35 * np.ptp(g[:, ax_g]), 1.0))
        last_start = ga + (turns[-1] if turns else 0)
        pause = (a - gb) / fps
        if ax_g == ax_b and pause < min(RESUME_S, 0.8 * (gb - last_start) / fps):
            k = max(1, round(0.12 * fps))
            last = angles[gb, ax_g] - angles[max(last_start, gb - k), ax_g]
            first = angles[min(b, a + k), ax_b] - angles[a, ax_b]
            if last * first < 0:
                out[-1][1] = b
                continue
        out.append([a, b])
    return [tuple(x) for x in out]


def _bout_segment(angles: np.ndarray, a: int, b: int, next_start: int, fps: float) -> MotionSegment:
    t_len = len(angles)
    pad = max(1, round(0.15 * fps))
    a0, b0 = max(0, a - pad), min(t_len, b + pad)
    base = np.median(angles[max(0, a0 - 3):a0 + 1], axis=0)
    end = np.median(angles[max(b0 - 1, 0):min(t_len, b0 + 3)], axis=0)
    x = angles[a0:b0] - base
    ranges = x.max(0) - x.min(0)
    axis = int(np.argmax(ranges))
    rng_ = ranges[axis]
    net = end[axis] - base[axis]
    xs = x[:, axis]
    if abs(net) >= 0.5 * rng_:  # moved to a new pose and held it
        action = {0: "look", 1: "turn", 2: "tilt"}[axis]
        sign = np.sign(net)
        direction = {("look", 1): "down", ("look", -1): "up", ("turn", 1): "left", ("turn", -1): "right",
                     ("tilt", 1): "right", ("tilt", -1): "left"}[(action, int(sign))]
        held = abs(end[axis])
        amplitude = _classify(held, AMPLITUDE_EDGES[action], AMPLITUDES)
        rel = (xs * sign)  # rising from ~0 to ~|net|
        lo = _crossing(rel, 0.1 * abs(net), 0, 1)
        hi = _crossing(rel, 0.9 * abs(net), 0, 1)
        duration = ((hi - lo) / fps / _RISE_FRACTION) if lo is not None and hi is not None else MOVE_S["normal"]
        speed = _classify(duration, MOVE_EDGES, ("fast", "normal", "slow"))
        return MotionSegment(action, direction, speed, None, amplitude, start=a, end=next_start)
    action = "nod" if axis == 0 else "shake" if axis == 1 else "tilt"
    if action == "tilt":  # a roll oscillation is not in the vocabulary: report the dominant side
        direction = "right" if xs[np.argmax(np.abs(xs))] > 0 else "left"
        amplitude = _classify(np.abs(xs).max(), AMPLITUDE_EDGES["tilt"], AMPLITUDES)
        return MotionSegment("tilt", direction, "normal", None, amplitude, start=a, end=b)
    ext = zigzag(xs, max(0.35 * rng_, 1.5))
    if action == "nod":
        down = max(xs.max(), 1e-6)
        peaks = [i for i in ext if xs[i] > 0.5 * down]
        if not peaks:
            peaks = [int(np.argmax(xs))]
        widths = []
        for p in peaks:
            half = 0.5 * xs[p]
            left, right = _crossing(xs, half, p, -1), _crossing(xs, half, p, 1)
            if left is not None and right is not None:
                widths.append(right - left)
        period = 2 * np.median(widths) / fps if widths else PERIOD_S["normal"]
        count = len(peaks)
        amp = float(np.median(xs[peaks]))
    else:
        if len(ext) < 2:
            ext = [int(np.argmax(xs)), int(np.argmin(xs))]
            ext.sort()
        count = max(1, round(len(ext) / 2))
        period = 2 * np.median(np.diff(ext)) / fps
        amp = float(np.median(np.abs(xs[ext])))
    speed = _classify(period, PERIOD_EDGES, ("fast", "normal", "slow"))
    amplitude = _classify(amp, AMPLITUDE_EDGES[action], AMPLITUDES)
    return MotionSegment(action, None, speed, int(min(max(count, 1), 3)), amplitude, start=a, end=b)


def analyse_head(poses: dict, fps: float = 25.0) -> tuple[MotionSegment, ...]:
    """Head segments of a pose sequence (see the module docstring)."""
    raw = head_angles(poses)
    noise = noise_level(raw)
    angles = _smooth(raw)
    t_len = len(angles)
    if _is_sway(_smooth(raw, max(3, 2 * round(0.12 * fps) + 1)), fps):
        return (MotionSegment("sway", start=0, end=t_len),)
    bouts = _merge_reversals(angles, _bouts(angles, fps, noise), fps)
    if not bouts:
        return (MotionSegment("still", start=0, end=t_len),)
    segs = []
    if bouts[0][0] > LEADING_STILL_S * fps:
        segs.append(MotionSegment("still", start=0, end=bouts[0][0]))
    for i, (a, b) in enumerate(bouts):
        nxt = bouts[i + 1][0] if i + 1 < len(bouts) else t_len
        segs.append(_bout_segment(angles, a, b, nxt, fps))
    return tuple(segs)


# ------------------------------------------------------------------------------- jaw
def analyse_jaw(jaw_pose, fps: float = 25.0) -> str:
    """Jaw action of a (T, 3) jaw pose: none / talk / open_close / open_wide."""
    j = np.asarray(jaw_pose, dtype=np.float64)
    if j.ndim == 3 and j.shape[0] == 1:
        j = j[0]
    if j.ndim != 2 or j.shape[1] != 3:
        raise ValueError(f"jaw_pose must be (T, 3), got shape {j.shape}")
    opening = _smooth(j[:, :1])[:, 0]
    if opening.max() < JAW_NONE:
        return "none"
    if opening.max() >= JAW_WIDE and (opening > JAW_WIDE).sum() / fps >= JAW_WIDE_S:
        return "open_wide"
    ext = zigzag(np.concatenate([[0.0], opening, [0.0]]), JAW_STEP)  # max, min, max, ...
    n_open = len(ext[0::2])
    return "talk" if n_open >= 3 else "open_close"


def analyse_motion(poses: dict, fps: float = 25.0) -> MotionAnalysis:
    """Label a pose sequence: ``poses`` has ``neck_pose`` (T, 3) and optionally ``global_pose``
    and ``jaw_pose`` (T, 3), axis-angle radians (numpy or torch; (1, T, 3) is accepted)."""
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
    poses = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in poses.items()}
    segments = analyse_head(poses, fps)
    jaw_pose = poses.get("jaw_pose")
    jaw = "none" if jaw_pose is None else analyse_jaw(jaw_pose, fps)
    return MotionAnalysis(segments=segments, jaw=jaw)


def compare(label: MotionLabel, found: MotionAnalysis) -> dict[str, bool]:
    """Per-attribute agreement of an analysis with a ground-truth label: ``actions`` (sequence of
    action + direction), ``count``, ``speed``, ``amplitude`` (each over all segments, needs the
    actions to agree), ``jaw``, and ``all``."""
    actions = label.actions() == found.actions()
    out = {"actions": actions}
    for attr in ("count", "speed", "amplitude"):
        out[attr] = actions and all(getattr(a, attr) == getattr(b, attr)
                                    for a, b in zip(label.segments, found.segments))
    out["jaw"] = label.jaw == found.jaw
    out["all"] = all(out.values())
    return out


# ----------------------------------------------------------------------------- metric
def jitter(poses) -> float:
    """Mean absolute acceleration: mean over frames and channels of |x[t+1] - 2 x[t] + x[t-1]|
    (units of the input per frame^2). ``poses`` is an array (T, D) / (B, T, D) / (T,) or a dict
    of such arrays with the same frame count (all channels are pooled)."""
    if isinstance(poses, dict):
        if not poses:
            raise ValueError("jitter needs at least one pose array")
        arrays = [np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64)
                  for v in poses.values()]
        arrays = [a[:, None] if a.ndim == 1 else a for a in arrays]
        try:
            x = np.concatenate(arrays, axis=-1)
        except ValueError as e:
            raise ValueError(f"pose arrays in the dict must share their frame axes: {e}") from None
    else:
        x = np.asarray(poses.detach().cpu().numpy() if hasattr(poses, "detach") else poses, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
    if x.ndim not in (2, 3):
        raise ValueError(f"jitter expects (T, D) or (B, T, D) arrays, got shape {x.shape}")
    if x.shape[-2] < 3:
        raise ValueError(f"jitter needs at least 3 frames, got {x.shape[-2]}")
    acc = x[..., 2:, :] - 2 * x[..., 1:-1, :] + x[..., :-2, :]
    return float(np.abs(acc).mean())
