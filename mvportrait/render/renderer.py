"""Multi-view renders of FLAME meshes: normal maps, depth, masks and Lambert shading.

Output layout: every requested mode is a float tensor (B, T, V, H, W, C).

* ``normal`` (C=3): unit camera-space normals in the *display* convention -- x right, y up, z
  toward the viewer (OpenGL-style; i.e. OpenCV camera axes with y and z flipped) -- encoded as
  ``rgb = n * 0.5 + 0.5``; background 0. A surface facing the camera is (0.5, 0.5, 1.0).
* ``depth`` (C=1): camera-space z in metres (OpenCV, distance along the optical axis), 0 where
  empty.
* ``mask`` (C=1): 1 where a triangle covers the pixel centre, else 0.
* ``shaded`` (C=3): ``colour * clamp(ambient + diffuse * max(0, n . l), 0, 1)`` per pixel with
  the interpolated, renormalised normal ``n`` and the unit direction *toward* the light ``l``,
  composited over ``background``.

Normals are area-weighted vertex normals of the posed mesh (faces counter-clockwise seen from
outside), interpolated with perspective-correct barycentrics. Back faces are culled.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import torch

from mvportrait import envs
from mvportrait.kernels import _graphs
from mvportrait.kernels import rasterize as rast
from mvportrait.render.cameras import Cameras

__all__ = ["RenderOutput", "vertex_normals", "render", "to_uint8", "MODES", "DEFAULT_LIGHT_DIR"]

logger = logging.getLogger(__name__)

MODES = ("normal", "depth", "mask", "shaded")
# Toward the light, display convention (x right, y up, z toward the viewer): above, right, front.
DEFAULT_LIGHT_DIR = (0.3, 0.4, 1.0)
DEFAULT_COLOR = (0.8, 0.8, 0.8)


@dataclass
class RenderOutput:
    """Requested modes as (B, T, V, H, W, C) float tensors; modes not requested are None."""

    normal: torch.Tensor | None = None  # (B, T, V, H, W, 3) in [0, 1]
    depth: torch.Tensor | None = None  # (B, T, V, H, W, 1) metres
    mask: torch.Tensor | None = None  # (B, T, V, H, W, 1) 0/1
    shaded: torch.Tensor | None = None  # (B, T, V, H, W, 3) in [0, 1]

    def items(self):
        """(mode, tensor) pairs of the rendered modes."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, mode: str) -> torch.Tensor:
        if mode not in MODES:
            raise KeyError(f"unknown render mode {mode!r}; modes are {', '.join(MODES)}")
        value = getattr(self, mode)
        if value is None:
            raise KeyError(f"mode {mode!r} was not rendered; pass it in `modes`")
        return value


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals: verts (..., Nv, 3), faces (F, 3) -> (..., Nv, 3).

    Each face adds ``(v1 - v0) x (v2 - v0)`` (twice its area times its outward unit normal) to
    its three vertices; the sums are normalised (vertices in no face get 0).
    """
    if not isinstance(verts, torch.Tensor) or verts.dim() < 2 or verts.shape[-1] != 3:
        raise ValueError(f"verts must be a tensor of shape (..., Nv, 3), got "
                         f"{tuple(verts.shape) if isinstance(verts, torch.Tensor) else type(verts).__name__}")
    faces = rast._check_faces(faces, verts.shape[-2], verts.device)
    v0, v1, v2 = verts[..., faces[:, 0], :], verts[..., faces[:, 1], :], verts[..., faces[:, 2], :]
    fn = torch.linalg.cross(v1 - v0, v2 - v0)  # (..., F, 3)
    lead, nf = fn.shape[:-2], faces.shape[0]
    # Scatter along dim 0 of a (Nv, L*3) buffer (torch's fast index_add_ path; index_add_ on
    # dim -2 of (..., Nv, 3) is ~3x slower), corner 0 of every face first, then corners 1 and 2.
    src = fn.reshape(-1, nf, 3).transpose(0, 1).reshape(nf, -1)  # (F, L*3)
    acc = torch.zeros(verts.shape[-2], src.shape[1], dtype=fn.dtype, device=fn.device)
    acc.index_add_(0, faces.t().reshape(-1), src.repeat(3, 1))
    out = acc.reshape(-1, *lead, 3).movedim(0, -2).contiguous()  # (..., Nv, 3)
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (any shape) -> uint8 in [0, 255], rounded, values clamped."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("to_uint8 expects a floating torch.Tensor with values in [0, 1]")
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)


def _as_rgb(value, name, dtype, device) -> torch.Tensor:
    x = torch.as_tensor(value, dtype=dtype, device=device)
    if x.dim() == 0:
        x = x.expand(3)
    if x.shape != (3,) or not torch.isfinite(x).all():
        raise ValueError(f"{name} must be a number or 3 finite numbers, got {value!r}")
    return x


def _normalise_vertices(vertices):
    """(B, T, Nv, 3) | (B, Nv, 3) | (Nv, 3) -> (B, T, Nv, 3)."""
    if not isinstance(vertices, torch.Tensor):
        raise TypeError(f"vertices must be a torch.Tensor, got {type(vertices).__name__}")
    if vertices.shape[-1:] != (3,) or vertices.dim() not in (2, 3, 4):
        raise ValueError(f"vertices must have shape (B, T, Nv, 3), (B, Nv, 3) or (Nv, 3), got {tuple(vertices.shape)}")
    if not vertices.is_floating_point():
        raise ValueError(f"vertices must be a floating tensor, got {vertices.dtype}")
    if not torch.isfinite(vertices).all():
        raise ValueError("vertices contain NaN or infinite values")
    while vertices.dim() < 4:
        vertices = vertices.unsqueeze(0 if vertices.dim() == 2 else 1)
    return vertices


def render(vertices: torch.Tensor, faces: torch.Tensor, cameras: Cameras, *, vertex_colors=None,
           light_dir=None, light_space: str = "camera", ambient: float = 0.35, diffuse: float = 0.65,
           background=0.0, modes=("normal", "depth", "mask", "shaded"), near: float = 1e-4,
           impl: str | None = None) -> RenderOutput:
    """Render world-space meshes from every camera. Only the requested ``modes`` are computed.

    * ``vertices``: (B, T, Nv, 3) world space (metres); (B, Nv, 3) is read as T = 1 and (Nv, 3)
      as B = T = 1. The output always has the (B, T, V) leading dims.
    * ``faces``: (F, 3) int64, counter-clockwise seen from outside.
    * ``cameras``: (V,) -- the same rig for every frame -- or (T, V) per frame. A (T, V)
      trajectory with a T = 1 mesh renders the static mesh along the trajectory.
    * ``vertex_colors``: (Nv, 3), (B, Nv, 3) or (B, T, Nv, 3) in [0, 1]; default light grey.
    * ``light_dir``: direction toward the light, (3,); ``light_space="camera"`` (default, in the
      display convention x right / y up / z toward the viewer, so every view is lit the same way
      -- a head-light) or ``"world"`` (FLAME world axes, one light fixed in the scene).
      Default :data:`DEFAULT_LIGHT_DIR` in camera space.
    * ``background``: number or RGB for ``shaded`` (other modes use 0).
    * ``impl``: rasterizer / interpolation kernels (``auto`` | ``cpp`` | ``ref`` | ``triton``, see
      :mod:`mvportrait.kernels.rasterize`); default ``MVP_KERNELS`` (``auto``).
    """
    impl = envs.kernels() if impl is None else impl
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown render modes {bad or modes}; choose from {', '.join(MODES)}")
    if not isinstance(cameras, Cameras):
        raise TypeError(f"cameras must be Cameras, got {type(cameras).__name__}")
    if light_space not in ("camera", "world"):
        raise ValueError(f"light_space must be 'camera' or 'world', got {light_space!r}")
    for name, value in (("ambient", ambient), ("diffuse", diffuse)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    verts = _normalise_vertices(vertices)  # (B, T, Nv, 3)
    b, t, nv, _ = verts.shape
    faces = _checked_faces(faces, nv, verts.device)
    cams = cameras.to(device=verts.device, dtype=verts.dtype)
    if len(cams.batch_shape) == 1:
        cams = cams.reshape(1, -1)
    elif len(cams.batch_shape) != 2:
        raise ValueError(f"cameras must have batch shape (V,) or (T, V), got {tuple(cams.batch_shape)}")
    tc, v = cams.batch_shape
    if tc != t and 1 not in (tc, t):
        raise ValueError(f"cameras have {tc} frames but vertices have {t}; expected equal counts or one of them 1")
    t_out = max(t, tc)
    h, w = cams.height, cams.width

    # (B, T, 1, Nv, 3) against cameras (T, V) -> (B, T, V, Nv, 3) -> N = B*T*V images
    pix = cams.project(verts[:, :, None].expand(b, t_out, 1, nv, 3)).reshape(-1, nv, 3)
    n = pix.shape[0]
    shape = (b, t_out, v, h, w)
    shading = "normal" in modes or "shaded" in modes
    if shading:
        # Per-view rotation to the display camera frame: flip OpenCV y and z.
        r_flip = cams.R.clone()
        r_flip[..., 1:, :] *= -1  # rows y, z negated, on the device (no host-to-device copy per call)
        r_disp = r_flip.expand(t_out, v, 3, 3).reshape(1, t_out, v, 3, 3)
        nrm_w = vertex_normals(verts, faces)  # (B, T, Nv, 3) world
        # Rotate per vertex, then interpolate (linear, so the same as rotating every pixel): the
        # interpolation yields display-frame normals directly, with no per-pixel 3x3 products.
        nrm_c = nrm_w[:, :, None].expand(b, t_out, 1, nv, 3) @ r_disp.transpose(-1, -2)  # (B, T, V, Nv, 3)
        # rasterize, then one fused pass: interpolate, renormalise, encode (N, H, W, 3) each; on the
        # GPU one CUDA graph for both with one host read
        frags, unit, rgb = rast.rasterize_normal_map(pix, nrm_c.reshape(n, nv, 3), faces, h, w, cull_backfaces=True,
                                                     near=near, impl=impl)
    else:
        frags = rast.rasterize(pix, faces, h, w, cull_backfaces=True, near=near, impl=impl)
    mask = frags.mask[..., None].to(verts.dtype)  # (N, H, W, 1)
    out = RenderOutput()
    if "mask" in modes:
        out.mask = mask.reshape(*shape, 1)
    if "depth" in modes:
        out.depth = frags.depth[..., None].to(verts.dtype).reshape(*shape, 1)
    if not shading:
        return out
    nrm = unit.reshape(*shape, 3)  # display camera frame, 0 where empty
    m = mask.reshape(*shape, 1)
    if "normal" in modes:
        out.normal = rgb.reshape(*shape, 3)
    if "shaded" in modes:
        light = _light(light_dir, light_space, r_disp, verts)  # (1, T, V, 1, 1, 3)
        lam = (nrm * light).sum(-1, keepdim=True).clamp_min(0)
        intensity = (ambient + diffuse * lam).clamp(0, 1)
        col = _colors(vertex_colors, b, t, nv, verts)[:, :, None].expand(b, t_out, v, nv, 3).reshape(n, nv, 3)
        col = rast.interpolate(col, faces, frags, impl=impl).reshape(*shape, 3)
        bg = _as_rgb(background, "background", verts.dtype, verts.device)
        out.shaded = (col * intensity).clamp(0, 1) * m + bg * (1 - m)
    return out


def _checked_faces(faces, nv: int, device) -> torch.Tensor:
    """``faces`` checked (and made int64) once per content: the index-range check reads them back,
    a device sync per call on a GPU."""
    if not isinstance(faces, torch.Tensor):
        return rast._check_faces(faces, nv, device)  # raises its TypeError
    return _graphs.once("render.faces", (faces,), lambda: rast._check_faces(faces, nv, device), (nv, device))


def _colors(vertex_colors, b, t, nv, verts) -> torch.Tensor:
    """Vertex colours broadcast to (B, T, Nv, 3)."""
    if vertex_colors is None:
        return torch.tensor(DEFAULT_COLOR, dtype=verts.dtype, device=verts.device).expand(b, t, nv, 3)
    col = torch.as_tensor(vertex_colors, dtype=verts.dtype, device=verts.device)
    ok = col.dim() in (2, 3, 4) and col.shape[-2:] == (nv, 3)
    if ok and col.dim() == 3:
        col = col[:, None]
    try:
        col = col.expand(b, t, nv, 3) if ok else None
    except RuntimeError:
        col = None
    if col is None:
        raise ValueError(f"vertex_colors must have shape (Nv={nv}, 3), (B={b}, Nv, 3) or (B, T={t}, Nv, 3), "
                         f"got {tuple(torch.as_tensor(vertex_colors).shape)}")
    if not torch.isfinite(col).all():
        raise ValueError("vertex_colors contain NaN or infinite values")
    return col


def _light(light_dir, light_space, r_disp, verts) -> torch.Tensor:
    """Unit light direction in the display camera frame: (1, T, V, 1, 1, 3)."""
    if light_dir is None:
        light_dir, light_space = DEFAULT_LIGHT_DIR, "camera"
    ld = torch.as_tensor(light_dir, dtype=verts.dtype, device=verts.device)
    if ld.shape != (3,) or not torch.isfinite(ld).all() or ld.norm() == 0:
        raise ValueError(f"light_dir must be 3 finite numbers, not all zero, got {light_dir!r}")
    ld = ld / ld.norm()
    _, t, v = r_disp.shape[:3]
    if light_space == "world":
        ld = (r_disp @ ld[:, None])[..., 0]  # (1, T, V, 3)
    else:
        ld = ld.expand(1, t, v, 3)
    return ld[:, :, :, None, None, :]
