"""The built-in demo sequence: the synthetic head turns, nods, smiles and opens its mouth."""
from __future__ import annotations

import math

import torch

from mvportrait.flame.params import FlameParams
from mvportrait.flame.synthetic import EXPRESSION_NAMES


def _bump(t, start, end):
    """Smooth 0 -> 1 -> 0 window over [start, end] (seconds)."""
    x = ((t - start) / (end - start)).clamp(0, 1)
    return torch.sin(math.pi * x) ** 2


def _ramp(t, start, end):
    x = ((t - start) / (end - start)).clamp(0, 1)
    return x * x * (3 - 2 * x)


def demo_sequence(seconds: float = 4.0, fps: float = 25.0, *, n_shape: int = 300, n_expr: int = 100,
                  shape: torch.Tensor | None = None) -> FlameParams:
    """A (1, T) FlameParams: turn left and right, nod, smile, talk (jaw), with a blink.

    The timeline is scaled to ``seconds``: [0, .3) turn, [.3, .5) nod, [.45, 1) smile, [.7, 1)
    mouth opening and closing like speech; one blink in the middle. ``shape`` (n_shape,) sets the
    identity (zeros = the template).
    """
    if not (seconds > 0 and fps > 0):
        raise ValueError(f"seconds and fps must be positive, got {seconds}, {fps}")
    frames = max(1, round(seconds * fps))
    if frames > 100_000:
        raise ValueError(f"{frames} frames is too long for the demo (max 100000)")
    t = torch.arange(frames, dtype=torch.float32) / fps / seconds  # normalised time in [0, 1)
    neck = torch.zeros(frames, 3)
    neck[:, 1] = 0.55 * torch.sin(2 * math.pi * t / 0.3) * _bump(t, 0.0, 0.3) ** 0.5 * (t < 0.3)
    neck[:, 0] = 0.25 * torch.sin(2 * math.pi * (t - 0.3) / 0.1) * (t >= 0.3) * (t < 0.5)
    jaw = torch.zeros(frames, 3)
    talk = 0.5 + 0.5 * torch.sin(2 * math.pi * (t - 0.7) * 9 - math.pi / 2)
    jaw[:, 0] = 0.28 * talk * _bump(t, 0.7, 1.0) ** 0.5
    expr = torch.zeros(frames, n_expr)
    if n_expr >= len(EXPRESSION_NAMES):
        idx = {n: i for i, n in enumerate(EXPRESSION_NAMES)}
        expr[:, idx["smile"]] = 1.4 * _ramp(t, 0.45, 0.6) * (1 - _ramp(t, 0.9, 1.0))
        blink = _bump(t, 0.38, 0.42)
        expr[:, idx["eye_close_left"]] = blink
        expr[:, idx["eye_close_right"]] = blink
    beta = torch.zeros(n_shape) if shape is None else torch.as_tensor(shape, dtype=torch.float32)
    if beta.shape != (n_shape,):
        raise ValueError(f"shape must be ({n_shape},), got {tuple(beta.shape)}")
    return FlameParams(shape=beta[None], expression=expr[None], neck_pose=neck[None], jaw_pose=jaw[None], fps=fps)
