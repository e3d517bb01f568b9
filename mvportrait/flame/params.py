"""FLAME parameters for a batch of sequences: every field is a (B, T, D) tensor."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# Joint order of the FLAME kinematic tree (and of ``FlameParams.full_pose``).
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")

_POSE_DIMS = {"global_pose": 3, "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6, "translation": 3}


@dataclass
class FlameParams:
    """Per-frame FLAME parameters of B sequences of T frames (axis-angle poses, metres).

    ``shape`` (beta) and ``expression`` (psi) may be given as (B, D) and are then broadcast over
    the T frames; every other field is (B, T, D). ``eye_pose`` is (left, right) concatenated,
    6 numbers, as in FLAME. Missing pose fields default to zeros. ``fps`` is metadata for
    sequences (frames per second).
    """

    shape: torch.Tensor
    expression: torch.Tensor
    global_pose: torch.Tensor | None = None
    neck_pose: torch.Tensor | None = None
    jaw_pose: torch.Tensor | None = None
    eye_pose: torch.Tensor | None = None
    translation: torch.Tensor | None = None
    fps: float = 25.0

    def __post_init__(self):
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fps"}
        for name, t in tensors.items():
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"FlameParams.{name} must be a torch.Tensor, got {type(t).__name__}")
        ref = next(t for t in (self.global_pose, self.neck_pose, self.jaw_pose, self.eye_pose,
                               self.translation, self.expression, self.shape)
                   if t is not None and t.dim() == 3) if any(
            t is not None and t.dim() == 3 for t in tensors.values()) else None
        if ref is None:
            raise ValueError("FlameParams needs at least one (B, T, D) field to know the frame count; "
                             "give expression or a pose as (B, T, D)")
        b, t_len = ref.shape[:2]
        dtype, device = ref.dtype, ref.device
        if not dtype.is_floating_point:
            raise TypeError(f"FlameParams fields must be floating point, got {dtype}")
        for name in ("shape", "expression"):
            v = tensors[name]
            if v.dim() == 2:
                v = v[:, None, :].expand(v.shape[0], t_len, v.shape[1])
            if v.dim() != 3:
                raise ValueError(f"FlameParams.{name} must be (B, D) or (B, T, D), got shape {tuple(v.shape)}")
            setattr(self, name, v)
        for name, d in _POSE_DIMS.items():
            v = tensors[name]
            if v is None:
                v = torch.zeros(b, t_len, d, dtype=dtype, device=device)
            if v.dim() != 3 or v.shape[-1] != d:
                raise ValueError(f"FlameParams.{name} must be (B, T, {d}), got shape {tuple(v.shape)}")
            setattr(self, name, v)
        for name in tensors:
            v = getattr(self, name)
            if tuple(v.shape[:2]) != (b, t_len):
                raise ValueError(f"FlameParams.{name} has batch/frames {tuple(v.shape[:2])}, "
                                 f"expected {(b, t_len)} like the other fields")
            if v.dtype != dtype or v.device != device:
                raise ValueError(f"FlameParams.{name} is {v.dtype} on {v.device}; all fields must be "
                                 f"{dtype} on {device}")
            if not torch.isfinite(v).all():
                raise ValueError(f"FlameParams.{name} contains NaN or Inf")
        if not (isinstance(self.fps, (int, float)) and self.fps > 0 and self.fps < 1e4):
            raise ValueError(f"FlameParams.fps must be a positive number, got {self.fps!r}")
        self.fps = float(self.fps)

    # ----------------------------------------------------------------------------- views
    @property
    def batch_size(self) -> int:
        return self.expression.shape[0]

    @property
    def num_frames(self) -> int:
        return self.expression.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.expression.dtype

    @property
    def device(self) -> torch.device:
        return self.expression.device

    def full_pose(self) -> torch.Tensor:
        """(B, T, 15): global, neck, jaw, left eye, right eye axis-angle vectors."""
        return torch.cat([self.global_pose, self.neck_pose, self.jaw_pose, self.eye_pose], dim=-1)

    def to(self, device=None, dtype=None) -> "FlameParams":
        kw = {n: getattr(self, n).to(device=device, dtype=dtype) for n in _FIELDS}
        return FlameParams(**kw, fps=self.fps)

    def frames(self, start: int, stop: int) -> "FlameParams":
        """Frames [start, stop) of every sequence."""
        return replace(self, **{n: getattr(self, n)[:, start:stop] for n in _FIELDS})

    @staticmethod
    def zeros(batch: int, frames: int, n_shape: int, n_expr: int, dtype=torch.float32, device=None,
              fps: float = 25.0) -> "FlameParams":
        return FlameParams(shape=torch.zeros(batch, frames, n_shape, dtype=dtype, device=device),
                           expression=torch.zeros(batch, frames, n_expr, dtype=dtype, device=device),
                           fps=fps)

    @staticmethod
    def cat(items: list["FlameParams"], dim: int = 1) -> "FlameParams":
        """Concatenate along frames (dim=1) or batch (dim=0)."""
        if not items:
            raise ValueError("FlameParams.cat needs at least one item")
        return FlameParams(**{n: torch.cat([getattr(p, n) for p in items], dim=dim) for n in _FIELDS},
                           fps=items[0].fps)


_FIELDS = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "translation")
