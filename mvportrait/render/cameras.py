"""Pinhole cameras, view rigs and camera trajectories.

Conventions (OpenCV):

* World: FLAME's frame -- metres, y up, the face looks toward +z, the subject's left is +x.
* Camera: x right, y down, z forward (the viewing direction). A world point ``X`` maps to
  ``x_cam = R @ X + t``; the camera centre in world space is ``C = -R^T t``.
* Pixels: ``u = fx * x / z + skew * y / z + cx``, ``v = fy * y / z + cy`` (``K`` applied to
  ``x_cam / z``). Pixel ``(i, j)`` (row ``i``, column ``j``) has its centre at
  ``(u, v) = (j + 0.5, i + 0.5)``, so the image spans ``u in [0, W]``, ``v in [0, H]`` and its
  centre is ``(W / 2, H / 2)``. Focal lengths must be positive (no mirrored cameras).
* Yaw / pitch of a rig camera (degrees): the camera sits at
  ``target + d * (cos p sin y, sin p, cos p cos y)`` and looks at ``target``. Yaw 0 is the front
  camera (on +z, facing the face); positive yaw moves the camera toward the subject's left (+x);
  positive pitch moves it up (looking down at the face).

``Cameras`` holds any leading batch shape: ``(V,)`` for a rig, ``(T, V)`` for a trajectory.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

__all__ = [
    "Cameras",
    "look_at",
    "intrinsics_from_fov",
    "yaw_pitch_to_eye",
    "view_rig",
    "parse_view_spec",
    "trajectory",
    "DEFAULT_DISTANCE",
    "DEFAULT_FOV_Y_DEG",
    "DEFAULT_TARGET",
    "TRAJECTORY_KINDS",
]

logger = logging.getLogger(__name__)

# A FLAME head (with neck) spans y ~ -0.17 .. +0.12 m; at 1 m with an 18 degree vertical field of
# view the frame shows 2 * tan(9 deg) = 0.317 m of height at the target's depth.
DEFAULT_DISTANCE = 1.0
DEFAULT_FOV_Y_DEG = 18.0
DEFAULT_TARGET = (0.0, -0.02, 0.0)
TRAJECTORY_KINDS = ("static", "orbit", "dolly")

_SPEC_FORMS = (
    '"front" (one view, yaw 0), "ring-N" (N yaws evenly spaced over 360 degrees, starting at the '
    'front), "arc-N" (N yaws evenly spaced over -60..+60 degrees), "yaws:Y1,Y2,..." (explicit yaws '
    'in degrees, each optionally "yaw@pitch", e.g. "yaws:0,45@10,-45"), or a sequence of yaws / '
    "(yaw, pitch) pairs in degrees"
)


def _as_float_tensor(x, name, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype() if dtype is None else dtype)
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    try:
        return torch.as_tensor(x, dtype=dtype or torch.get_default_dtype(), device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a tensor or a nested sequence of numbers, got {type(x).__name__}") from e


def _check_size(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(eq=False)
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    Fields: ``K`` (..., 3, 3) intrinsics, ``R`` (..., 3, 3) world-to-camera rotation, ``t``
    (..., 3) translation, ``height`` / ``width`` in pixels. ``K``, ``R`` and ``t`` are broadcast
    to one batch shape at construction (so one ``K`` (3, 3) can serve a rig of ``R`` (V, 3, 3));
    ``R`` and ``t`` are converted to ``K``'s dtype and device. All must be finite; ``R`` must be a
    rotation, ``K`` upper triangular with positive focal lengths and last row ``(0, 0, 1)``.
    Validation reads values (a host sync): build cameras once, outside per-frame loops.
    """

    K: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    height: int
    width: int

    def __post_init__(self):
        self.height = _check_size("height", self.height)
        self.width = _check_size("width", self.width)
        k = _as_float_tensor(self.K, "K")
        r = _as_float_tensor(self.R, "R", dtype=k.dtype, device=k.device)
        t = _as_float_tensor(self.t, "t", dtype=k.dtype, device=k.device)
        for name, x, tail in (("K", k, (3, 3)), ("R", r, (3, 3)), ("t", t, (3,))):
            if x.dim() < len(tail) or tuple(x.shape[x.dim() - len(tail):]) != tail:
                raise ValueError(f"Cameras.{name} must have shape (..., {', '.join(map(str, tail))}), "
                                 f"got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"Cameras.{name} contains NaN or infinite values")
        try:
            batch = torch.broadcast_shapes(k.shape[:-2], r.shape[:-2], t.shape[:-1])
        except RuntimeError as e:
            raise ValueError(f"Cameras batch shapes do not broadcast: K {tuple(k.shape)}, R {tuple(r.shape)}, "
                             f"t {tuple(t.shape)}") from e
        self.K = k.expand(*batch, 3, 3)
        self.R = r.expand(*batch, 3, 3)
        self.t = t.expand(*batch, 3)
        self._validate_values()

    def _validate_values(self):
        k, r = self.K.detach(), self.R.detach()
        if k.numel() == 0:
            return
        if not ((k[..., 0, 0] > 0).all() and (k[..., 1, 1] > 0).all()):
            raise ValueError("Cameras.K must have positive focal lengths K[0,0] and K[1,1]")
        last = torch.tensor([0.0, 0.0, 1.0], dtype=k.dtype, device=k.device)
        if not ((k[..., 2, :] - last).abs() <= 1e-6).all() or not (k[..., 1, 0].abs() <= 1e-6).all():
            raise ValueError("Cameras.K must be upper triangular with last row (0, 0, 1)")
        eye = torch.eye(3, dtype=r.dtype, device=r.device)
        tol = 1e-4 if r.dtype in (torch.float32, torch.float64) else 1e-2
        if not ((r @ r.transpose(-1, -2) - eye).abs() <= tol).all() or not (torch.linalg.det(r.float()) > 0).all():
            raise ValueError("Cameras.R must be proper rotation matrices (R R^T = I, det R = +1)")

    # ------------------------------------------------------------------------ shape helpers
    @property
    def batch_shape(self) -> torch.Size:
        return self.t.shape[:-1]

    @property
    def num_views(self) -> int:
        """Size of the last batch dim (views of a (V,) rig or a (T, V) trajectory)."""
        if len(self.batch_shape) == 0:
            return 1
        return self.batch_shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.R.dtype

    @property
    def device(self) -> torch.device:
        return self.R.device

    def __len__(self) -> int:
        if len(self.batch_shape) == 0:
            raise TypeError("a single camera (empty batch shape) has no len()")
        return self.batch_shape[0]

    def __getitem__(self, idx) -> "Cameras":
        """Index the batch dims only, e.g. ``cams[0]``, ``cams[:, 1:3]``."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis or i is None for i in idx) or len(idx) > len(self.batch_shape):
            raise IndexError(f"Cameras with batch shape {tuple(self.batch_shape)} cannot be indexed with {idx}")
        return Cameras(self.K[idx], self.R[idx], self.t[idx], self.height, self.width)

    def reshape(self, *shape) -> "Cameras":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        return Cameras(self.K.reshape(*shape, 3, 3), self.R.reshape(*shape, 3, 3), self.t.reshape(*shape, 3),
                       self.height, self.width)

    def expand(self, *shape) -> "Cameras":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        return Cameras(self.K.expand(*shape, 3, 3), self.R.expand(*shape, 3, 3), self.t.expand(*shape, 3),
                       self.height, self.width)

    def to(self, device=None, dtype=None) -> "Cameras":
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Cameras need a floating dtype, got {dtype}")
        f = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        return Cameras(f(self.K), f(self.R), f(self.t), self.height, self.width)

    # ------------------------------------------------------------------------ geometry
    def centers(self) -> torch.Tensor:
        """Camera positions in world space, ``C = -R^T t``: (..., 3)."""
        return -(self.R.transpose(-1, -2) @ self.t[..., None])[..., 0]

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """World points (..., N, 3) -> camera-space points (..., N, 3); batch dims broadcast."""
        points = self._check_points(points)
        return (self.R[..., None, :, :] @ points[..., None])[..., 0] + self.t[..., None, :]

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points (..., N, 3) -> (..., N, 3) holding ``[u, v, z_cam]``.

        Broadcasting: the points' leading dims (before N) broadcast against the camera batch
        shape, e.g. cameras (V,) with points (N, 3) -> (V, N, 3); cameras (V,) with points
        (B, T, 1, N, 3) -> (B, T, V, N, 3); cameras (T, V) with points (B, T, V, N, 3). ``u, v``
        are meaningful only where ``z_cam > 0`` (points behind the camera are still returned;
        the divide uses ``|z| >= 1e-12`` so they stay finite).
        """
        x = self.world_to_camera(points)  # (..., N, 3)
        z = x[..., 2]
        z_safe = torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
        k = self.K[..., None, :, :]  # (..., 1, 3, 3)
        u = (k[..., 0, 0] * x[..., 0] + k[..., 0, 1] * x[..., 1]) / z_safe + k[..., 0, 2]
        v = k[..., 1, 1] * x[..., 1] / z_safe + k[..., 1, 2]
        return torch.stack([u, v, z], dim=-1)

    def _check_points(self, points) -> torch.Tensor:
        if not isinstance(points, torch.Tensor):
            raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
        if points.dim() < 2 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (..., N, 3), got {tuple(points.shape)}")
        if points.dtype != self.dtype or points.device != self.device:
            raise ValueError(f"points are {points.dtype} on {points.device}, cameras are {self.dtype} on "
                             f"{self.device}; use Cameras.to(...)")
        try:
            torch.broadcast_shapes(points.shape[:-2], self.batch_shape)
        except RuntimeError as e:
            raise ValueError(f"points batch dims {tuple(points.shape[:-2])} do not broadcast with camera batch "
                             f"shape {tuple(self.batch_shape)}") from e
        return points


# ---------------------------------------------------------------------------- constructors
def look_at(eye, target, up=(0.0, 1.0, 0.0), *, dtype=None, device=None):
    """OpenCV world-to-camera pose looking from ``eye`` at ``target``.

    ``eye``, ``target``, ``up``: (..., 3), broadcast together. Returns ``(R (..., 3, 3),
    t (..., 3))`` with camera z = normalize(target - eye), x = normalize(z x up) (image right),
    y = z x x (image down, i.e. roughly -up). Raises ValueError if eye == target or the viewing
    direction is parallel to ``up``.
    """
    eye = _as_float_tensor(eye, "eye", dtype=dtype, device=device)
    target = _as_float_tensor(target, "target", dtype=eye.dtype, device=eye.device)
    up = _as_float_tensor(up, "up", dtype=eye.dtype, device=eye.device)
    for name, x in (("eye", eye), ("target", target), ("up", up)):
        if x.dim() == 0 or x.shape[-1] != 3:
            raise ValueError(f"look_at: {name} must have shape (..., 3), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"look_at: {name} contains NaN or infinite values")
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    fwd = target - eye
    fwd_n = fwd.norm(dim=-1, keepdim=True)
    if (fwd_n <= 1e-9).any():
        raise ValueError("look_at: eye and target coincide")
    z = fwd / fwd_n
    x = torch.linalg.cross(z, up)
    x_n = x.norm(dim=-1, keepdim=True)
    if (x_n <= 1e-6 * up.norm(dim=-1, keepdim=True)).any():
        raise ValueError("look_at: viewing direction is parallel to `up`; pick another up vector")
    x = x / x_n
    y = torch.linalg.cross(z, x)
    r = torch.stack([x, y, z], dim=-2)  # rows = camera axes in world coords, (..., 3, 3)
    t = -(r @ eye[..., None])[..., 0]
    return r, t


def intrinsics_from_fov(fov_y_deg, height: int, width: int, *, dtype=None, device=None) -> torch.Tensor:
    """Square-pixel intrinsics (..., 3, 3) with vertical field of view ``fov_y_deg`` (0, 180).

    ``fy = fx = (H / 2) / tan(fov / 2)``, principal point at the image centre ``(W / 2, H / 2)``
    (pixel-centre convention, see module docstring). ``fov_y_deg`` may be a float or a tensor.
    """
    height, width = _check_size("height", height), _check_size("width", width)
    fov = _as_float_tensor(fov_y_deg, "fov_y_deg", dtype=dtype, device=device)
    if not torch.isfinite(fov).all() or not ((fov > 0) & (fov < 180)).all():
        raise ValueError(f"fov_y_deg must be in (0, 180) degrees, got {fov_y_deg!r}")
    f = (height / 2) / torch.tan(torch.deg2rad(fov) / 2)
    k = torch.zeros(*fov.shape, 3, 3, dtype=fov.dtype, device=fov.device)
    k[..., 0, 0] = f
    k[..., 1, 1] = f
    k[..., 0, 2] = width / 2
    k[..., 1, 2] = height / 2
    k[..., 2, 2] = 1
    return k


def yaw_pitch_to_eye(yaw_deg, pitch_deg, distance, target) -> torch.Tensor:
    """Camera position(s) for yaw / pitch in degrees (see module docstring). Returns (..., 3)."""
    yaw = torch.deg2rad(yaw_deg)
    pitch = torch.deg2rad(pitch_deg)
    d = torch.stack([torch.cos(pitch) * torch.sin(yaw), torch.sin(pitch), torch.cos(pitch) * torch.cos(yaw)], -1)
    return target + distance * d


def parse_view_spec(spec) -> list[tuple[float, float]]:
    """A view spec (see :func:`view_rig`) -> list of (yaw_deg, pitch_deg)."""
    def bad(why=""):
        return ValueError(f"unknown view spec {spec!r}{': ' + why if why else ''}; accepted forms: {_SPEC_FORMS}")

    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "front":
            return [(0.0, 0.0)]
        m = re.fullmatch(r"(ring|arc)-(\d+)", s)
        if m:
            n = int(m.group(2))
            if n < 1:
                raise bad("N must be >= 1")
            if m.group(1) == "ring":
                return [(360.0 * k / n, 0.0) for k in range(n)]
            if n == 1:
                return [(0.0, 0.0)]
            return [(-60.0 + 120.0 * k / (n - 1), 0.0) for k in range(n)]
        if s.startswith("yaws:"):
            views = []
            for item in s[5:].split(","):
                parts = item.strip().split("@")
                try:
                    vals = [float(p) for p in parts]
                except ValueError:
                    raise bad(f"{item.strip()!r} is not a number or 'yaw@pitch'") from None
                if len(vals) not in (1, 2):
                    raise bad(f"{item.strip()!r} is not 'yaw' or 'yaw@pitch'")
                views.append((vals[0], vals[1] if len(vals) == 2 else 0.0))
            return _check_views(views, bad)
        raise bad()
    if isinstance(spec, (list, tuple)) and len(spec) > 0:
        views = []
        for item in spec:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                views.append((float(item), 0.0))
            elif (isinstance(item, (list, tuple)) and len(item) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)):
                views.append((float(item[0]), float(item[1])))
            else:
                raise bad(f"element {item!r} is not a yaw or a (yaw, pitch) pair")
        return _check_views(views, bad)
    raise bad()


def _check_views(views, bad):
    for yaw, pitch in views:
        if not (math.isfinite(yaw) and math.isfinite(pitch)):
            raise bad("angles must be finite")
        if abs(pitch) >= 89.0:
            raise bad(f"pitch {pitch} must be within (-89, 89) degrees")
    return views


def view_rig(spec="front", *, height: int, width: int, distance: float = DEFAULT_DISTANCE,
             target=DEFAULT_TARGET, fov_y_deg: float = DEFAULT_FOV_Y_DEG, dtype=torch.float32,
             device=None) -> Cameras:
    """Cameras (V,) on a sphere of radius ``distance`` around ``target``, all looking at it.

    ``spec``: ``"front"``; ``"ring-N"`` (yaws 0, 360/N, ...); ``"arc-N"`` (yaws evenly spaced
    over -60..+60, ``arc-1`` = front); ``"yaws:0,45,-45"`` (degrees; an entry may be
    ``yaw@pitch``); or a sequence of yaws / (yaw, pitch) pairs. Yaw / pitch conventions are in
    the module docstring. The defaults frame a FLAME-scale head (about 0.32 m of height visible
    at the target's depth).
    """
    views = parse_view_spec(spec)
    if not (isinstance(distance, (int, float)) and math.isfinite(distance) and distance > 0):
        raise ValueError(f"distance must be a positive number, got {distance!r}")
    yp = torch.tensor(views, dtype=torch.float64)  # (V, 2)
    tgt = _as_float_tensor(target, "target", dtype=torch.float64)
    if tgt.shape != (3,):
        raise ValueError(f"target must be 3 numbers, got shape {tuple(tgt.shape)}")
    eye = yaw_pitch_to_eye(yp[:, 0], yp[:, 1], float(distance), tgt)  # (V, 3)
    r, t = look_at(eye, tgt.expand_as(eye))
    k = intrinsics_from_fov(float(fov_y_deg), height, width, dtype=torch.float64)
    return Cameras(k.expand(len(views), 3, 3), r, t, height, width).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------- trajectories
def _rot_y(theta: torch.Tensor) -> torch.Tensor:
    """Rotation about world +y by ``theta`` radians: (T,) -> (T, 3, 3); +theta moves +z toward +x."""
    c, s = torch.cos(theta), torch.sin(theta)
    z, o = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(*theta.shape, 3, 3)


def trajectory(rig: Cameras, kind: str, frames: int, **kw) -> Cameras:
    """Per-frame cameras (T, V) from a rig (V,).

    * ``"static"``: the rig repeated for every frame.
    * ``"orbit"``: every camera rotates about the vertical axis through ``target`` (default
      :data:`DEFAULT_TARGET`); frame ``t`` adds yaw ``degrees * t / T`` (``endpoint=False``,
      default, so a 360 degree orbit loops seamlessly) or ``degrees * t / (T - 1)``
      (``endpoint=True``). ``degrees`` defaults to 360; positive = toward the subject's left.
    * ``"dolly"``: every camera moves along the line to ``target``; its distance is scaled
      linearly from 1 at the first frame to ``factor`` (default 0.8) at the last.
    """
    if not isinstance(rig, Cameras):
        raise TypeError(f"trajectory expects Cameras, got {type(rig).__name__}")
    if len(rig.batch_shape) != 1:
        raise ValueError(f"trajectory expects a rig of shape (V,), got batch shape {tuple(rig.batch_shape)}")
    frames = _check_size("frames", frames)
    allowed = {"static": set(), "orbit": {"degrees", "target", "endpoint"}, "dolly": {"factor", "target"}}
    if kind not in allowed:
        raise ValueError(f"unknown trajectory kind {kind!r}; expected one of {', '.join(TRAJECTORY_KINDS)}")
    extra = set(kw) - allowed[kind]
    if extra:
        raise TypeError(f"trajectory {kind!r} got unexpected options {sorted(extra)}; "
                        f"accepted: {sorted(allowed[kind]) or 'none'}")
    v = rig.batch_shape[0]
    if kind == "static":
        return rig.expand(frames, v)

    work = torch.float64
    r0, t0, k = rig.R.to(work), rig.t.to(work), rig.K.to(work)
    c0 = -(r0.transpose(-1, -2) @ t0[..., None])[..., 0]  # (V, 3)
    target = _as_float_tensor(kw.get("target", DEFAULT_TARGET), "target", dtype=work, device=rig.device)
    if target.shape != (3,):
        raise ValueError(f"target must be 3 numbers, got shape {tuple(target.shape)}")
    steps = torch.arange(frames, dtype=work, device=rig.device)
    if kind == "orbit":
        degrees = float(kw.get("degrees", 360.0))
        denom = (frames - 1) if kw.get("endpoint", False) and frames > 1 else frames
        rot = _rot_y(torch.deg2rad(degrees * steps / denom))[:, None]  # (T, 1, 3, 3)
        c = target + (rot @ (c0 - target)[..., None])[..., 0]  # (T, V, 3)
        r = r0 @ rot.transpose(-1, -2)  # (T, V, 3, 3)
    else:
        factor = kw.get("factor", 0.8)
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"dolly factor must be a positive number, got {factor!r}")
        s = 1 + (factor - 1) * steps / max(frames - 1, 1)  # (T,)
        c = target + s[:, None, None] * (c0 - target)  # (T, V, 3)
        r = r0.expand(frames, v, 3, 3)
    t = -(r @ c[..., None])[..., 0]
    out = Cameras(k.expand(frames, v, 3, 3), r, t, rig.height, rig.width)
    return out.to(dtype=rig.dtype)
