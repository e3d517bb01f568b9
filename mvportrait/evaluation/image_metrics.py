"""Stage-2 image and video metrics: PSNR, SSIM, multi-view consistency, temporal flicker.

Images are float tensors (..., C, H, W). Unless stated otherwise values are in [0, 1]
(``data_range=1``); for [-1, 1] images pass ``data_range=2`` or map them with ``(x + 1) / 2``.

* :func:`psnr` -- ``10 log10(data_range^2 / MSE)`` per image (MSE over C, H, W); ``inf`` for
  identical images.
* :func:`ssim` -- Wang et al. 2004: Gaussian window 11 x 11, sigma 1.5 (normalised to sum 1),
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = data_range``, local statistics over the
  *valid* window positions only (no padding: the SSIM map is (H - 10) x (W - 10)), the map
  averaged per channel, the channels averaged. Population (biased) local variances, as in the
  reference MATLAB code. Images need H, W >= 11.
* :func:`view_consistency` -- for every ordered view pair (i, j), i != j, every foreground
  pixel of view i is lifted to 3D with the known depth, projected into view j, and kept when it
  lands inside view j in front of the camera and its depth agrees with view j's depth map
  (bilinearly sampled, so pixels next to a silhouette or an occlusion edge fail the test). The
  colour of view j there (bilinear) is compared with the colour of view i: mean absolute
  difference over the co-visible pixels and channels, pooled over all pairs and frames. Pass the
  ground-truth images as ``reference`` to get the same number for them: that is the floor left
  by resampling and by view-dependent shading.
* :func:`temporal_flicker` -- mean ``|x_t - x_{t-1}|`` of the generated and of the ground-truth
  frames, their ratio, and the mean absolute difference of the two difference signals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mvportrait.render.cameras import Cameras

__all__ = ["psnr", "ssim", "gaussian_window", "view_consistency", "ViewConsistency", "temporal_flicker",
           "SSIM_WINDOW", "SSIM_SIGMA", "SSIM_K1", "SSIM_K2"]

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _pair(a, b, name: str, min_dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    for n, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: {n} must be a floating torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < min_dim:
        raise ValueError(f"{name}: images must be (..., C, H, W), got shape {tuple(a.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def _check_range(data_range) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not (
            math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    return float(data_range)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image: (..., C, H, W) -> (...)."""
    a, b = _pair(a, b, "psnr")
    rng = _check_range(data_range)
    mse = (a - b).pow(2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(rng * rng / mse)  # mse 0 -> inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """(size,) 1-D Gaussian centred on the middle tap, normalised to sum 1 (the 2-D window is its outer product)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per image (see the module docstring): (..., C, H, W) -> (...)."""
    a, b = _pair(a, b, "ssim")
    rng = _check_range(data_range)
    *lead, c, h, w = a.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    g = gaussian_window(dtype=a.dtype).to(a.device)
    x = torch.stack([a, b, a * a, b * b, a * b], 0).reshape(-1, 1, h, w)  # (5*N*C, 1, H, W)
    x = F.conv2d(x, g.reshape(1, 1, 1, -1))  # separable valid filtering: rows, then columns
    x = F.conv2d(x, g.reshape(1, 1, -1, 1))
    mu_a, mu_b, e_aa, e_bb, e_ab = x.reshape(5, -1, h - SSIM_WINDOW + 1, w - SSIM_WINDOW + 1)
    c1, c2 = (SSIM_K1 * rng) ** 2, (SSIM_K2 * rng) ** 2
    var_a, var_b, cov = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b, e_ab - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return smap.mean(dim=(-2, -1)).reshape(*lead, c).mean(-1)


# ------------------------------------------------------------------------ view consistency
@dataclass(frozen=True)
class ViewConsistency:
    """Result of :func:`view_consistency`.

    ``error``: mean |colour_i - colour_j| over all co-visible pixels of all ordered pairs and
    frames (``nan`` when no pixel is co-visible); ``pair_error`` (V, V): the same per ordered pair
    (source i, target j; ``nan`` on the diagonal and where nothing is co-visible);
    ``covisible`` (V, V): co-visible pixels per pair summed over frames; ``reference_error`` /
    ``reference_pair_error``: the same for the ``reference`` images, or None."""

    error: float
    pair_error: torch.Tensor
    covisible: torch.Tensor
    reference_error: float | None = None
    reference_pair_error: torch.Tensor | None = None

    def to_dict(self) -> dict:
        out = {"error": self.error, "covisible_pixels": int(self.covisible.sum())}
        if self.reference_error is not None:
            out["reference_error"] = self.reference_error
        return out


def _per_frame(cameras: Cameras, v: int, f: int, h: int, w: int, device, dtype):
    if not isinstance(cameras, Cameras):
        raise TypeError(f"cameras must be Cameras, got {type(cameras).__name__}")
    if (cameras.height, cameras.width) != (h, w):
        raise ValueError(f"cameras are {cameras.height}x{cameras.width} but images are {h}x{w}")
    shape = tuple(cameras.batch_shape)
    if shape == (v,):
        cameras = cameras.expand(f, v)
    elif shape != (f, v):
        raise ValueError(f"cameras must have batch shape (V,) = ({v},) or (F, V) = ({f}, {v}), got {shape}")
    cams = cameras.to(device=device, dtype=dtype)
    return cams.K.transpose(0, 1), cams.R.transpose(0, 1), cams.t.transpose(0, 1)  # (V, F, ...)


@torch.no_grad()
def view_consistency(images: torch.Tensor, depth: torch.Tensor, cameras: Cameras, *,
                     reference: torch.Tensor | None = None, depth_tolerance: float = 0.01) -> ViewConsistency:
    """Multi-view colour consistency through known geometry (see the module docstring).

    ``images`` (V, F, C, H, W) float (any value range; the error is in its units); ``depth``
    (V, F, H, W) camera-space z in metres, 0 = empty (the renderer's depth / the corpus'
    ``depth``); ``cameras`` (V,) or (F, V) in the OpenCV convention of
    :mod:`mvportrait.render.cameras`; ``reference``: optional ground-truth images like ``images``;
    ``depth_tolerance``: metres.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (V, F, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    v, f, c, h, w = images.shape
    if not isinstance(depth, torch.Tensor) or tuple(depth.shape) != (v, f, h, w):
        raise ValueError(f"depth must be a tensor (V, F, H, W) = {(v, f, h, w)}, got "
                         f"{tuple(depth.shape) if isinstance(depth, torch.Tensor) else type(depth).__name__}")
    if reference is not None and (not isinstance(reference, torch.Tensor) or reference.shape != images.shape):
        raise ValueError(f"reference must be a tensor shaped like images {tuple(images.shape)}")
    if not (isinstance(depth_tolerance, (int, float)) and depth_tolerance > 0):
        raise ValueError(f"depth_tolerance must be a positive number of metres, got {depth_tolerance!r}")
    if v < 2:
        raise ValueError("view_consistency needs at least two views")
    dev, dt = images.device, torch.float32
    k, r, t = _per_frame(cameras, v, f, h, w, dev, dt)
    depth = depth.to(dev, dt)
    # Lift every pixel centre of every view: x_cam = z K^-1 (u, v, 1), X = R^T (x_cam - t).
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=dt) + 0.5, torch.arange(w, device=dev, dtype=dt) + 0.5,
                            indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, 1, h * w, 3)
    rays = pix @ torch.linalg.inv(k).transpose(-1, -2)  # (V, F, HW, 3), z = 1
    x_cam = rays * depth.reshape(v, f, h * w, 1)
    world = (x_cam - t[:, :, None]) @ r  # R^T (x - t) as row vectors: (V, F, HW, 3)
    fg = depth.reshape(v, f, h * w) > 0
    sets = [("gen", images)] + ([("ref", reference)] if reference is not None else [])
    sums = {name: torch.zeros(v, v, dtype=torch.float64) for name, _ in sets}
    counts = torch.zeros(v, v, dtype=torch.int64)
    for j in range(v):  # target view
        pj = world @ r[j].transpose(-1, -2)[None] + t[j][None, :, None]  # (V, F, HW, 3) in camera j
        z = pj[..., 2]
        zs = z.clamp_min(1e-6)
        uv = torch.stack([pj[..., 0] / zs, pj[..., 1] / zs, torch.ones_like(z)], -1) @ k[j].transpose(-1, -2)[None]
        grid = torch.stack([uv[..., 0] / w * 2 - 1, uv[..., 1] / h * 2 - 1], -1)  # align_corners=False
        grid = grid.permute(1, 0, 2, 3)  # (F, V_src, HW, 2): sample target j of frame f
        dj = F.grid_sample(depth[j][:, None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[:, 0].transpose(0, 1)  # (V_src, F, HW)
        inside = (grid.abs() <= 1).all(-1).transpose(0, 1)
        ok = fg & inside & (z > 0) & (dj > 0) & ((dj - z).abs() <= depth_tolerance)
        ok[j] = False
        counts[:, j] += ok.sum(dim=(1, 2)).cpu()
        for name, imgs in sets:
            imgs = imgs.to(dev, dt)
            # (F, C, V_src, HW): view j's colours where the source pixels land
            cj = F.grid_sample(imgs[j], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            ci = imgs.reshape(v, f, c, h * w)
            diff = (ci - cj.permute(2, 0, 1, 3)).abs().mean(2)  # (V_src, F, HW)
            sums[name][:, j] += (diff * ok).sum(dim=(1, 2)).double().cpu()

    def pooled(s):
        return float(s.sum() / counts.sum()) if counts.sum() > 0 else float("nan")

    def per_pair(s):
        return torch.where(counts > 0, s / counts.clamp_min(1), torch.full_like(s, float("nan")))

    out = dict(error=pooled(sums["gen"]), pair_error=per_pair(sums["gen"]), covisible=counts)
    if reference is not None:
        out.update(reference_error=pooled(sums["ref"]), reference_pair_error=per_pair(sums["ref"]))
    return ViewConsistency(**out)


# ------------------------------------------------------------------------------- flicker
def temporal_flicker(gen: torch.Tensor, gt: torch.Tensor) -> dict:
    """Frame-difference statistics of a generated video against the ground truth.

    ``gen`` / ``gt``: (..., F, C, H, W) with frames on dim -4 (e.g. the corpus' (V, F, 3, H, W)),
    F >= 2. Returns floats: ``gen_diff`` = mean |gen_t - gen_{t-1}|, ``gt_diff`` the same for the
    ground truth, ``ratio`` = gen_diff / gt_diff (1 = as much frame-to-frame change as the ground
    truth; inf when the ground truth is static and the generation is not; nan when both are
    static), ``diff_error`` = mean |(gen_t - gen_{t-1}) - (gt_t - gt_{t-1})|.
    """
    gen, gt = _pair(gen, gt, "temporal_flicker", min_dim=4)
    if gen.shape[-4] < 2:
        raise ValueError(f"temporal_flicker needs at least 2 frames on dim -4, got shape {tuple(gen.shape)}")
    dg, dt = gen.diff(dim=-4), gt.diff(dim=-4)
    gen_diff, gt_diff = float(dg.abs().mean()), float(dt.abs().mean())
    if gt_diff > 0:
        ratio = gen_diff / gt_diff
    else:
        ratio = float("nan") if gen_diff == 0 else float("inf")
    return {"gen_diff": gen_diff, "gt_diff": gt_diff, "ratio": ratio, "diff_error": float((dg - dt).abs().mean())}
