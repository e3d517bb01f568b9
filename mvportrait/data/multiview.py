"""Synthetic multi-view portrait videos for stage 2 (FLAME2Video): identities, motions, renders.

A sample is one identity performing one short motion window, seen from V cameras:

* **Identity** ``k`` (an int): shape coefficients ``beta ~ N(0, 1)`` (``n_shape`` of the synthetic
  head's identity components) from ``default_rng([IDENTITY_STREAM, k])``, and the appearance
  ``Appearance.sample(k)`` (skin, hair, brows, lips, iris, background colour, light direction).
  An identity depends on its id (and ``head_seed``) only, not on the corpus seed. Train
  identities are ``0 .. n_identities - 1``; test identities are ``TEST_ID_BASE + 0 .. n - 1``
  (``TEST_ID_BASE`` = 1,000,000), so the splits never share an identity.
* **Motion**: head / neck / jaw poses from :func:`mvportrait.data.motion.sample_motion` and
  expressions from :func:`mvportrait.data.emotion.sample_emotion`, a ``clip_frames`` clip (default
  100 frames = 4 s at 25 fps) from which a window of ``frames`` frames is taken every
  ``frame_stride`` frames (default 3: 8 frames span 0.84 s, about one nod), starting uniformly
  in the clip. Eye pose and translation are zero. The window's frame rate is ``fps / frame_stride``
  (``FlameParams.fps`` of the sample).
* **Cameras**: the rig (default ``ring-{views}``: yaws 0, 90, 180, 270) at the default distance,
  field of view and target of :mod:`mvportrait.render.cameras`, each view jittered independently
  per sample (uniform: yaw and pitch +-5 degrees, roll +-3 degrees, distance x [0.92, 1.08]);
  static over the window.
* **Lighting**: fixed per identity and shared by the reference and every target frame: one
  directional light, ``Appearance.light_dir`` in *world* space (so a surface point has the same
  colour in every view: Lambert shading is view independent), ``intensity = AMBIENT + DIFFUSE *
  max(0, n . l)`` with ``AMBIENT = 0.4``, ``DIFFUSE = 0.6``, times the vertex colour, evaluated
  per vertex with the posed mesh's normals and interpolated (Gouraud), composited over the
  identity's background colour. No shadows, no specular.
* **Reference**: the identity at zero expression and pose, seen from the *un-jittered* front
  camera (yaw 0, pitch 0, roll 0), lit and coloured as above.

Sample format (``sample(i)``; ``batch(indices)`` adds a leading B to every tensor):

=============  ===================  ==========================================================
key            shape                meaning
=============  ===================  ==========================================================
reference      (3, H, W) float      reference portrait, RGB in [-1, 1]
renders        (V, F, 5, H, W)      geometry only: normal (3, unit camera-space normal in the
                                    display convention x right / y up / z toward the viewer,
                                    0 where empty), depth (1, :func:`encode_depth`: +1 at
                                    ``DEPTH_RANGE[0]`` = 0.75 m, -1 at ``DEPTH_RANGE[1]`` =
                                    1.25 m and on the background), mask (1, 0 or 1)
target         (V, F, 3, H, W)      the same frames shaded with the appearance, RGB in [-1, 1]
depth          (V, F, H, W)         camera-space z in metres, 0 where empty (for metrics)
cameras        Cameras (V,)         the jittered cameras (``batch``: (B, V))
flame          FlameParams (1, F)   the window's FLAME parameters (``batch``: (B, F))
identity       int                  identity id (``batch``: int64 tensor (B,))
index          int                  sample index (``batch``: int64 tensor (B,))
=============  ===================  ==========================================================

Every sample is deterministic in (seed, split, index); the per-sample random streams are
``SeedSequence([seed, split code, index])``. ``batch`` renders the reference and all frames and
views of all samples in one :func:`mvportrait.render.renderer.render` call (the reference rides
along as an extra frame), on ``device``, so kernel dispatch applies.

Speed (128 x 128, 4 views, 8 frames, batch 8; the command below):

* CPU, 2 cores of an AMD EPYC VM shared with other jobs (load 2-3), torch 2.13, C++ rasterizer,
  one torch thread: 5-8 samples/s. About 3/4 of it is inside ``render`` (rasterizer, normal and
  colour interpolation, and its per-pixel shading passes, which this corpus does not need).
* CUDA, NVIDIA H200, torch 2.11, Triton rasterizer: 240 samples/s at batch 8 (33 ms, 0.7 GiB
  peak), 310 samples/s at batch 16 (1.3 GiB); GPU time is ~9 ms of the 33, the rest is the
  per-sample numpy motion generation and Python on the host.

  python -c "import time,torch; torch.set_num_threads(1); from mvportrait.data.multiview import
  MultiViewCorpus as C; c=C(); c.batch(range(8)); t=time.perf_counter();
  [c.batch(range(8*k,8*k+8)) for k in range(1,6)]; print(40/(time.perf_counter()-t), 'samples/s')"

(``C(device="cuda")`` and a ``torch.cuda.synchronize()`` before the clock stops, on a GPU.)

The stage-2 pipeline builds its conditioning maps the same way with :func:`geometry_maps` on a
``render(..., modes=("normal", "depth", "mask"))`` output.

Disk cache: :func:`write_cache` writes ``shard-NNNNN.npz`` files (uint8 images, float16 depth)
and a ``manifest.json`` atomically; :class:`CachedMultiView` reads them back in the same format.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mvportrait.data.emotion import sample_emotion
from mvportrait.data.motion import sample_motion
from mvportrait.fileio import atomic_write
from mvportrait.flame.appearance import Appearance, vertex_colors
from mvportrait.flame.params import FlameParams
from mvportrait.flame.synthetic import synthetic_head
from mvportrait.render.cameras import (DEFAULT_DISTANCE, DEFAULT_FOV_Y_DEG, DEFAULT_TARGET, Cameras,
                                       intrinsics_from_fov, look_at, parse_view_spec, yaw_pitch_to_eye)
from mvportrait.render.renderer import render, vertex_normals

__all__ = ["MultiViewConfig", "MultiViewCorpus", "CachedMultiView", "write_cache", "reference_image", "rig_cameras",
           "identity_shape", "encode_depth", "geometry_maps", "TEST_ID_BASE", "DEPTH_RANGE", "AMBIENT",
           "DIFFUSE", "REFERENCE_BACKGROUND", "DEFAULT_REFERENCE_IDENTITY"]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
TEST_ID_BASE = 1_000_000
IDENTITY_STREAM = 0x1D  # first word of every identity's shape stream
DEFAULT_REFERENCE_IDENTITY = TEST_ID_BASE  # the shipped default portrait: the first test identity
DEPTH_RANGE = (0.75, 1.25)  # metres mapped to +1 .. -1 by encode_depth
AMBIENT, DIFFUSE = 0.4, 0.6
# Mean of the corpus background colours (Appearance.sample draws each channel from U(0.15, 0.85)):
# transparent pixels of user reference images are composited on it.
REFERENCE_BACKGROUND = (0.5, 0.5, 0.5)
CACHE_VERSION = 1


@dataclass(frozen=True)
class MultiViewConfig:
    """Everything that determines a corpus sample besides (seed, split, index)."""

    image_size: int = 128
    views: int = 4
    frames: int = 8
    fps: float = 25.0
    rig: str = ""  # view spec (see render.cameras.view_rig); "" = f"ring-{views}"
    frame_stride: int = 3
    clip_frames: int = 100
    n_identities: int = 0  # 0 = the split's default (1000 train, 100 test)
    n_shape: int = 300
    n_expr: int = 50
    yaw_jitter_deg: float = 5.0
    pitch_jitter_deg: float = 5.0
    roll_jitter_deg: float = 3.0
    distance_jitter: float = 0.08  # relative
    head_seed: int = 0

    def __post_init__(self):
        for name in ("image_size", "views", "frames", "frame_stride", "clip_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"MultiViewConfig.{name} must be a positive integer, got {v!r}")
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in [16, 2048], got {self.image_size}")
        if (self.frames - 1) * self.frame_stride + 1 > self.clip_frames:
            raise ValueError(f"{self.frames} frames every {self.frame_stride} need a clip of at least "
                             f"{(self.frames - 1) * self.frame_stride + 1} frames, clip_frames is {self.clip_frames}")
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps < 1000):
            raise ValueError(f"fps must be a positive number below 1000, got {self.fps!r}")
        if not 1 <= self.n_shape <= 300 or not 15 <= self.n_expr <= 100:
            raise ValueError(f"n_shape must be in [1, 300] and n_expr in [15, 100], got {self.n_shape}, {self.n_expr}")
        if not isinstance(self.n_identities, int) or self.n_identities < 0:
            raise ValueError(f"n_identities must be a non-negative int (0 = default), got {self.n_identities!r}")
        for name in ("yaw_jitter_deg", "pitch_jitter_deg", "roll_jitter_deg", "distance_jitter"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if self.distance_jitter >= 0.5 or self.pitch_jitter_deg >= 45:
            raise ValueError("distance_jitter must be < 0.5 and pitch_jitter_deg < 45")
        n_rig = len(parse_view_spec(self.rig_spec))
        if n_rig != self.views:
            raise ValueError(f"rig {self.rig_spec!r} has {n_rig} views but views={self.views}")

    @property
    def rig_spec(self) -> str:
        return self.rig or f"ring-{self.views}"


# ------------------------------------------------------------------------------ identities
@functools.lru_cache(maxsize=2)
def _head(head_seed: int):
    return synthetic_head(head_seed)


def identity_shape(identity: int, n_shape: int = 300) -> np.ndarray:
    """(n_shape,) float32 shape coefficients of an identity, ``N(0, 1)`` from its own stream."""
    if isinstance(identity, bool) or not isinstance(identity, (int, np.integer)) or identity < 0:
        raise ValueError(f"identity must be a non-negative integer, got {identity!r}")
    return np.random.default_rng([IDENTITY_STREAM, int(identity)]).standard_normal(n_shape).astype(np.float32)


@functools.lru_cache(maxsize=512)
def _identity(identity: int, n_shape: int, head_seed: int):
    """(beta (S,), vertex colours (Nv, 3), background (3,), world light (3,)) of an identity."""
    app = Appearance.sample(identity)
    colors = vertex_colors(_head(head_seed), app)
    return (identity_shape(identity, n_shape), colors, np.asarray(app.background, np.float32),
            np.asarray(app.light_dir, np.float32))


# ---------------------------------------------------------------------------- render path
def encode_depth(depth: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Camera z in metres -> [-1, 1]: ``+1`` at ``DEPTH_RANGE[0]``, ``-1`` at ``DEPTH_RANGE[1]`` (clamped);
    ``-1`` where ``mask`` is 0. ``out``: optional destination (may be a strided view)."""
    near, far = DEPTH_RANGE
    d = depth.mul(-2 / (far - near)).add_(2 * far / (far - near) - 1).clamp_(-1, 1)
    return torch.where(mask > 0.5, d, d.new_tensor(-1.0), out=out)


def _write_maps(normal_rgb, depth, mask, out):
    """Renderer outputs (..., H, W, C) -> ``out`` (..., H, W, 5): unit normal (0 where empty),
    encoded depth, mask. ``out`` may be a permuted view of the final (..., 5, H, W) tensor."""
    torch.addcmul(-mask, normal_rgb, mask, value=2.0, out=out[..., 0:3])  # (2 rgb - 1) * mask
    encode_depth(depth, mask, out=out[..., 3:4])
    out[..., 4:5] = mask
    return out


def geometry_maps(render_output) -> torch.Tensor:
    """The 5-channel conditioning maps (B, T, V, 5, H, W) from a :class:`RenderOutput` with the
    ``normal``, ``depth`` and ``mask`` modes: unit display-convention normal (0 where empty),
    :func:`encode_depth`, mask -- the corpus' ``renders`` (before its (V, F) transpose), so the
    stage-2 pipeline builds the same maps from any FLAME sequence."""
    n = render_output["normal"]
    out = torch.empty(*n.shape[:-3], 5, *n.shape[-3:-1], dtype=n.dtype, device=n.device)
    _write_maps(n, render_output["depth"], render_output["mask"], out.movedim(-3, -1))
    return out


def _render(verts, faces, R, t, K, size, colors, light):
    """Render B samples x T frames x V views in one call.

    verts (B, T, Nv, 3); R (B, T, V, 3, 3), t (B, T, V, 3) world-to-camera; K (3, 3); colors
    (B, Nv, 3) in [0, 1]; light (B, 3) unit world direction toward the light. Lambert shading is
    evaluated per vertex (world-space normals of the posed mesh, so a point has the same colour
    from every view) and interpolated. Returns (lit colour times mask, normal in the renderer's
    RGB encoding, depth in metres, mask), each (B, T, V, H, W, C) with C = 3, 3, 1, 1.
    """
    b, t_len, nv, _ = verts.shape
    v = R.shape[2]
    lam = (vertex_normals(verts, faces) @ light[:, None, :, None]).clamp_min_(0)  # (B, T, Nv, 1)
    col = colors[:, None] * (AMBIENT + DIFFUSE * lam)  # (B, T, Nv, 3)
    # Fold samples into frames: cameras (B*T, V) may then differ per sample. With ambient 1 and
    # diffuse 0 "shaded" is the interpolated (pre-lit) colour times the mask.
    cams = Cameras(K, R.reshape(b * t_len, v, 3, 3), t.reshape(b * t_len, v, 3), size, size)
    out = render(verts.reshape(1, b * t_len, nv, 3), faces, cams, vertex_colors=col.reshape(1, b * t_len, nv, 3),
                 ambient=1.0, diffuse=0.0, background=0.0)
    shape = (b, t_len, v, size, size)
    return (out.shaded.reshape(*shape, 3), out.normal.reshape(*shape, 3), out.depth.reshape(*shape, 1),
            out.mask.reshape(*shape, 1))


def _composite(shaded, mask, background, out=None):
    """``2 * (shaded + background * (1 - mask)) - 1``: RGB in [-1, 1]; background (B, 3) for
    (B, ..., H, W, 3) images. ``out`` may be a strided view."""
    bg = background.reshape(background.shape[0], *([1] * (shaded.dim() - 2)), 3)
    rgb = torch.addcmul(shaded, 1 - mask, bg)
    return torch.add(rgb.new_tensor(-1.0), rgb, alpha=2.0, out=out)


def _cameras_np(rng, cfg: MultiViewConfig):
    """(yaw, pitch, roll (V,) degrees, distance (V,)) of one sample's jittered rig."""
    base = np.asarray(parse_view_spec(cfg.rig_spec), np.float64)  # (V, 2)
    v = len(base)
    u = rng.uniform(-1.0, 1.0, size=(4, v))
    return (base[:, 0] + cfg.yaw_jitter_deg * u[0], base[:, 1] + cfg.pitch_jitter_deg * u[1],
            cfg.roll_jitter_deg * u[2], DEFAULT_DISTANCE * (1 + cfg.distance_jitter * u[3]))


def _rig_poses(yaw, pitch, roll, distance):
    """World-to-camera (R (..., 3, 3), t (..., 3)) float64 from yaw / pitch / roll (degrees) and distance."""
    yaw, pitch, roll, distance = (torch.as_tensor(np.asarray(x), dtype=torch.float64)
                                  for x in (yaw, pitch, roll, distance))
    target = torch.tensor(DEFAULT_TARGET, dtype=torch.float64)
    eye = yaw_pitch_to_eye(yaw, pitch, distance[..., None], target)
    r, t = look_at(eye, target.expand_as(eye))
    c, s = torch.cos(torch.deg2rad(roll)), torch.sin(torch.deg2rad(roll))
    z, o = torch.zeros_like(c), torch.ones_like(c)
    rz = torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*c.shape, 3, 3)  # roll about the optical axis
    return rz @ r, (rz @ t[..., None])[..., 0]


def rig_cameras(spec: str, size: int, *, device="cpu") -> Cameras:
    """(V,) un-jittered cameras of a rig spec (``front``, ``ring-N``, ``arc-N``, ``yaws:...``) at the
    corpus' distance, field of view and target: the cameras stage-2 generation renders its
    conditioning maps from (training jitters these)."""
    base = np.asarray(parse_view_spec(spec), np.float64)  # (V, 2) yaw, pitch in degrees
    v = len(base)
    r, t = _rig_poses(base[:, 0], base[:, 1], np.zeros(v), np.full(v, DEFAULT_DISTANCE))
    k = intrinsics_from_fov(DEFAULT_FOV_Y_DEG, size, size, device=device)
    return Cameras(k, r.to(device, torch.float32), t.to(device, torch.float32), size, size)


def reference_image(identity: int, size: int = 128, *, head_seed: int = 0, n_shape: int = 300,
                    device="cpu") -> torch.Tensor:
    """(3, size, size) float in [-1, 1]: the corpus reference portrait of ``identity``."""
    cfg = MultiViewConfig(image_size=size, views=1, frames=1, rig="front", n_shape=n_shape, head_seed=head_seed,
                          clip_frames=1)
    beta, colors, bg, light = _identity(int(identity), cfg.n_shape, cfg.head_seed)
    model = _head(head_seed).model.to(device=device)
    dev = lambda a: torch.as_tensor(a, device=device)[None]  # noqa: E731
    params = FlameParams(shape=dev(beta), expression=torch.zeros(1, 1, 15, device=device))
    verts = model(params, with_landmarks=False).vertices
    r, t = _rig_poses(0.0, 0.0, 0.0, DEFAULT_DISTANCE)
    k = intrinsics_from_fov(DEFAULT_FOV_Y_DEG, size, size, dtype=torch.float32, device=device)
    f32 = lambda x: x.to(device=device, dtype=torch.float32).reshape(1, 1, 1, *x.shape)  # noqa: E731
    shaded, _, _, mask = _render(verts, model.faces, f32(r), f32(t), k, size, dev(colors), dev(light))
    return _composite(shaded, mask, dev(bg))[0, 0, 0].permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------- corpus
class MultiViewCorpus:
    """Deterministic synthetic multi-view portrait clips (see the module docstring for the format).

    ``MultiViewCorpus(split="train", seed=0, image_size=128, views=4, frames=8, ...)``: keyword
    arguments are :class:`MultiViewConfig` fields, or pass ``config=``. ``num_samples`` (default
    1,000,000 train / 1,000 test) bounds the indices. ``device``: where renders are made and returned.
    """

    def __init__(self, split: str = "train", seed: int = 0, *, device="cpu", num_samples: int | None = None,
                 config: MultiViewConfig | None = None, **kw):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if config is not None and kw:
            raise TypeError(f"pass either config= or config fields, not both (got {sorted(kw)})")
        known = {f.name for f in fields(MultiViewConfig)}
        if set(kw) - known:
            raise TypeError(f"unknown MultiViewCorpus options {sorted(set(kw) - known)}; known: {sorted(known)}")
        self.config = config if config is not None else MultiViewConfig(**kw)
        self.split, self.seed = split, int(seed)
        default_n = 1_000_000 if split == "train" else 1_000
        self.num_samples = default_n if num_samples is None else int(num_samples)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples!r}")
        self.device = torch.device(device)
        cfg = self.config
        self.n_identities = cfg.n_identities or (1000 if split == "train" else 100)
        self.id_base = 0 if split == "train" else TEST_ID_BASE
        if self.n_identities > TEST_ID_BASE:
            raise ValueError(f"n_identities must be at most {TEST_ID_BASE}")
        self.model = _head(cfg.head_seed).model.to(device=self.device)
        self.faces = self.model.faces
        self.K = intrinsics_from_fov(DEFAULT_FOV_Y_DEG, cfg.image_size, cfg.image_size, device=self.device)
        r, t = _rig_poses(0.0, 0.0, 0.0, DEFAULT_DISTANCE)
        self._front = (r.to(self.device, torch.float32), t.to(self.device, torch.float32))

    def __len__(self) -> int:
        return self.num_samples

    @property
    def identities(self) -> range:
        """The identity ids of this split."""
        return range(self.id_base, self.id_base + self.n_identities)

    def reference_camera(self) -> Cameras:
        """The un-jittered front camera (1,) the references are rendered from."""
        return Cameras(self.K, self._front[0][None], self._front[1][None], self.config.image_size,
                       self.config.image_size)

    # ------------------------------------------------------------------------- sampling
    def _spec(self, index: int) -> dict:
        """Everything random about sample ``index`` (numpy, CPU)."""
        cfg = self.config
        ss = np.random.SeedSequence([self.seed, _SPLIT_CODE[self.split], int(index)])
        r_id, r_motion, r_emotion, r_cam, r_win = (np.random.default_rng(s) for s in ss.spawn(5))
        identity = self.id_base + int(r_id.integers(self.n_identities))
        beta, colors, bg, light = _identity(identity, cfg.n_shape, cfg.head_seed)
        _, poses = sample_motion(r_motion, cfg.clip_frames, cfg.fps)
        _, expr = sample_emotion(r_emotion, cfg.clip_frames, cfg.fps, cfg.n_expr)
        span = (cfg.frames - 1) * cfg.frame_stride + 1
        start = int(r_win.integers(cfg.clip_frames - span + 1))
        window = slice(start, start + span, cfg.frame_stride)
        return dict(identity=identity, beta=beta, colors=colors, background=bg, light=light,
                    expression=expr[window], cams=_cameras_np(r_cam, cfg),
                    **{k: v[window] for k, v in poses.items()})

    def _check_index(self, i) -> int:
        if isinstance(i, torch.Tensor) and i.dim() == 0:
            i = i.item()
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"sample index must be an int, got {type(i).__name__}")
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a {self.split} corpus of {self.num_samples}")
        return int(i)

    def sample(self, i: int) -> dict:
        """One sample (see the module docstring); ``flame`` keeps a batch dim of 1."""
        return _unbatch(self.batch([i]))

    __getitem__ = sample

    @torch.no_grad()
    def batch(self, indices) -> dict:
        """Samples ``indices`` stacked on a leading B, rendered in one call."""
        indices = [self._check_index(i) for i in indices]
        if not indices:
            raise ValueError("batch needs at least one index")
        cfg, dev, size = self.config, self.device, self.config.image_size
        specs = [self._spec(i) for i in indices]
        b, f = len(specs), cfg.frames
        stack = lambda k: torch.from_numpy(np.stack([s[k] for s in specs])).to(dev)  # noqa: E731
        beta, colors, light, bg = stack("beta"), stack("colors"), stack("light"), stack("background")
        expr = stack("expression")
        # frame 0 of every sample is its reference: zero expression and pose
        pad = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x], 1)  # noqa: E731
        params = FlameParams(shape=beta, expression=pad(expr), global_pose=pad(stack("global_pose")),
                             neck_pose=pad(stack("neck_pose")), jaw_pose=pad(stack("jaw_pose")))
        verts = self.model(params, with_landmarks=False).vertices  # (B, F+1, Nv, 3)
        cam = [np.stack([s["cams"][k] for s in specs]) for k in range(4)]  # 4 x (B, V)
        r, t = (x.to(dev, torch.float32) for x in _rig_poses(*cam))  # (B, V, 3, 3), (B, V, 3)
        v = r.shape[1]
        rr = r[:, None].repeat(1, f + 1, 1, 1, 1)  # (B, F+1, V, 3, 3)
        tt = t[:, None].repeat(1, f + 1, 1, 1)
        rr[:, 0, 0], tt[:, 0, 0] = self._front
        shaded, normal, depth, mask = _render(verts, self.faces, rr, tt, self.K, size, colors, light)
        # write straight into the (B, V, F, C, H, W) outputs through (B, F, V, H, W, C) views
        renders = torch.empty(b, v, f, 5, size, size, device=dev)
        target = torch.empty(b, v, f, 3, size, size, device=dev)
        as_render = lambda x: x.permute(0, 2, 1, 4, 5, 3)  # noqa: E731
        fr = slice(1, None)  # frame 0 is the reference
        _write_maps(normal[:, fr], depth[:, fr], mask[:, fr], as_render(renders))
        _composite(shaded[:, fr], mask[:, fr], bg, out=as_render(target))
        window = FlameParams(shape=beta, expression=expr, global_pose=params.global_pose[:, 1:],
                             neck_pose=params.neck_pose[:, 1:], jaw_pose=params.jaw_pose[:, 1:],
                             fps=cfg.fps / cfg.frame_stride)
        return {
            "reference": _composite(shaded[:, 0, 0], mask[:, 0, 0], bg).permute(0, 3, 1, 2).contiguous(),
            "renders": renders,
            "target": target,
            "depth": depth[:, fr, :, :, :, 0].transpose(1, 2).contiguous(),  # (B, V, F, H, W)
            "cameras": Cameras(self.K, r, t, size, size),
            "flame": window,
            "identity": torch.tensor([s["identity"] for s in specs], dtype=torch.int64),
            "index": torch.tensor(indices, dtype=torch.int64),
        }


def _unbatch(batch: dict) -> dict:
    out = {k: batch[k][0] for k in ("reference", "renders", "target", "depth", "cameras")}
    out.update(flame=batch["flame"], identity=int(batch["identity"][0]), index=int(batch["index"][0]))
    return out


# ------------------------------------------------------------------------------ disk cache
def _to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


_FLAME_KEYS = ("expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "translation")


def _shard_arrays(parts: list[dict]) -> dict:
    """Corpus batches -> the numpy arrays of one shard."""
    cat = lambda key: torch.cat([p[key] for p in parts]).cpu()  # noqa: E731
    cams = lambda key: torch.cat([getattr(p["cameras"], key) for p in parts]).cpu().numpy()  # noqa: E731
    renders = cat("renders")
    flame = FlameParams.cat([p["flame"] for p in parts], dim=0).to(device="cpu")
    return dict(reference=_to_u8(cat("reference")), target=_to_u8(cat("target")), normal=_to_u8(renders[:, :, :, :3]),
                mask=renders[:, :, :, 4].round().to(torch.uint8).numpy(), depth=cat("depth").numpy().astype(np.float16),
                identity=cat("identity").numpy(), index=cat("index").numpy(), K=cams("K"), R=cams("R"), t=cams("t"),
                shape=flame.shape[:, 0].numpy(), **{k: getattr(flame, k).numpy() for k in _FLAME_KEYS})


def write_cache(path, n: int, corpus: MultiViewCorpus | None = None, *, shard_size: int = 32,
                batch_size: int = 8, compress: bool = True, **corpus_kwargs) -> Path:
    """Render samples ``0 .. n-1`` of ``corpus`` (or of ``MultiViewCorpus(**corpus_kwargs)``) into the
    folder ``path``: ``shard-NNNNN.npz`` with ``shard_size`` samples each, then ``manifest.json``.

    Shards hold ``reference`` / ``target`` / ``normal`` as uint8 (``round((x + 1) * 127.5)``),
    ``depth`` float16 metres, ``mask`` uint8, cameras ``K`` / ``R`` / ``t`` and the FLAME window as
    float32, ``identity`` / ``index`` int64. Every file is written atomically; a folder without
    a manifest is incomplete. At 128 x 128, 4 views, 8 frames a sample takes about 1 MB compressed.
    """
    if corpus is None:
        corpus = MultiViewCorpus(**corpus_kwargs)
    elif corpus_kwargs:
        raise TypeError("pass either corpus= or corpus options, not both")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= len(corpus):
        raise ValueError(f"n must be an int in [1, {len(corpus)}], got {n!r}")
    if not (isinstance(shard_size, int) and shard_size > 0 and isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"shard_size and batch_size must be positive ints, got {shard_size!r}, {batch_size!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").unlink(missing_ok=True)  # an old cache here is invalid from now on
    shards = []
    for s0 in range(0, n, shard_size):
        idx = list(range(s0, min(n, s0 + shard_size)))
        parts = [corpus.batch(idx[k:k + batch_size]) for k in range(0, len(idx), batch_size)]
        arrays = _shard_arrays(parts)
        name = f"shard-{len(shards):05d}.npz"
        save = np.savez_compressed if compress else np.savez

        def write(tmp, arrays=arrays, save=save):
            with open(tmp, "wb") as fh:
                save(fh, **arrays)

        atomic_write(path / name, write)
        shards.append({"file": name, "count": len(idx)})
        log.info("multi-view cache %s: %d / %d samples", path, idx[-1] + 1, n)
    manifest = {"version": CACHE_VERSION, "split": corpus.split, "seed": corpus.seed, "n": n,
                "fps": corpus.config.fps / corpus.config.frame_stride, "config": asdict(corpus.config),
                "shards": shards}

    def write_manifest(tmp):
        Path(tmp).write_text(json.dumps(manifest, indent=1))

    atomic_write(path / "manifest.json", write_manifest)
    return path


class CachedMultiView:
    """Read a folder written by :func:`write_cache`; ``sample`` / ``batch`` return the corpus format
    (images decoded to float, depth re-encoded from metres). Keeps the last ``keep_shards`` shards."""

    def __init__(self, path, *, device="cpu", keep_shards: int = 2):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{self.path} holds no manifest.json (not a multi-view cache, or incomplete)")
        try:
            self.manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{mf} is not a readable manifest: {e}") from e
        if self.manifest.get("version") != CACHE_VERSION:
            raise ValueError(f"{mf} has cache version {self.manifest.get('version')}, expected {CACHE_VERSION}")
        try:
            self.config = MultiViewConfig(**self.manifest["config"])
            self.split, self.fps = self.manifest["split"], float(self.manifest["fps"])
            counts = [int(s["count"]) for s in self.manifest["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{mf} is not a valid multi-view cache manifest: {e}") from e
        self.device = torch.device(device)
        self._starts = np.cumsum([0] + counts)
        if self._starts[-1] != self.manifest["n"]:
            raise ValueError(f"{mf}: shard counts add up to {self._starts[-1]}, manifest says {self.manifest['n']}")
        self._open: OrderedDict = OrderedDict()
        self._keep = max(1, int(keep_shards))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, k: int) -> dict:
        if k not in self._open:
            file = self.path / self.manifest["shards"][k]["file"]
            if not file.is_file():
                raise FileNotFoundError(f"multi-view cache shard {file} is missing")
            try:
                with np.load(file, allow_pickle=False) as z:
                    self._open[k] = {name: z[name] for name in z.files}
            except (OSError, ValueError) as e:
                raise ValueError(f"multi-view cache shard {file} is unreadable: {e}") from e
            while len(self._open) > self._keep:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]

    def sample(self, i: int) -> dict:
        return _unbatch(self.batch([i]))

    __getitem__ = sample

    def batch(self, indices) -> dict:
        rows = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
                raise IndexError(f"sample {i!r} out of range for a cache of {len(self)}")
            k = int(np.searchsorted(self._starts, i, side="right") - 1)
            rows.append((k, int(i - self._starts[k])))
        if not rows:
            raise ValueError("batch needs at least one index")
        def get(key):
            return torch.from_numpy(np.stack([self._shard(k)[key][j] for k, j in rows])).to(self.device)

        dec = lambda key: get(key).float() / 127.5 - 1  # noqa: E731
        mask = get("mask").float()[:, :, :, None]  # (B, V, F, 1, H, W)
        depth = get("depth").float()
        normal = dec("normal") * mask
        renders = torch.cat([normal, encode_depth(depth[:, :, :, None], mask), mask], 3)
        size = self.config.image_size
        flame = FlameParams(shape=get("shape"), **{k: get(k) for k in _FLAME_KEYS}, fps=self.fps)
        return {"reference": dec("reference"), "renders": renders, "target": dec("target"), "depth": depth,
                "cameras": Cameras(get("K"), get("R"), get("t"), size, size), "flame": flame,
                "identity": get("identity").cpu(), "index": get("index").cpu()}

