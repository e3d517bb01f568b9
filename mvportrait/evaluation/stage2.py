"""Stage-2 evaluation on held-out identities and motions (``mvportrait eval stage2``).

For ``n`` clips of ``MultiViewCorpus(split="test")`` (identities and motion streams never seen in
training), the pipeline generates every view and frame from the clip's own conditioning maps
(its jittered cameras, rendered from its FLAME window) and its reference portrait, and the result
is compared with the ground-truth renders:

* **PSNR / SSIM** (:mod:`mvportrait.evaluation.image_metrics`, images in [0, 1]) per view and
  overall, plus the same for the autoencoder's reconstruction of the ground truth (the ceiling
  the diffusion model can reach through this decoder).
* **View consistency**: mean absolute colour difference between views after warping each view's
  pixels through the ground-truth depth into the other views (co-visible pixels only); the
  ground truth's own value is the floor (interpolation and resampling).
* **Temporal flicker**: mean absolute frame-to-frame difference of generated vs ground truth
  videos, their ratio, and the mean absolute difference of the two difference signals.
* **Time**: seconds per frame (all views) for the sampler run, on the evaluation device.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from mvportrait.evaluation.image_metrics import psnr, ssim, temporal_flicker, view_consistency


def _to01(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(-1, 1) + 1) / 2


@torch.inference_mode()
def evaluate_stage2(pipe, *, n: int = 8, steps: int = 25, guidance: float | None = None, seed: int = 0,
                    corpus_seed: int = 0, frame_stride: int | None = None, rig: str = "",
                    on_clip: Callable[[int, dict], None] | None = None, keep: int = 1,
                    frames: int | None = None, first_window: int | None = None) -> tuple[dict, list]:
    """Metrics over ``n`` held-out clips; returns (report dict, first ``keep`` (gt, gen) uint8 pairs
    of shape (T, V, H, W, 3) for pictures). ``rig``: the corpus rig (default ``ring-{views}``).
    ``frames``: clip length (default the model's window; longer clips run in overlapping windows, and
    ``first_window`` sets window 0's length as in :meth:`FLAME2Video.generate_from_maps`); the report's
    ``psnr_per_frame`` shows what a window seam does."""
    from mvportrait.data.multiview import MultiViewCorpus

    cfg = pipe.config
    stride = frame_stride or max(1, int(round(25.0 / pipe.fps)))
    frames = cfg.frames if frames is None else frames
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    corpus = MultiViewCorpus(split="test", seed=corpus_seed, image_size=cfg.image_size, views=cfg.views,
                             frames=frames, frame_stride=stride, rig=rig)
    per_frame_psnr = []
    per_view_psnr, per_view_ssim, ae_psnr, ae_ssim = [], [], [], []
    vc_gen, vc_gt, flick = [], [], []
    sampler_s, frames_total = 0.0, 0
    pictures = []
    for i in range(n):
        s = corpus.sample(i)
        ctx = pipe.prepare(s["reference"])
        maps = s["renders"][None]  # (1, V, F, 5, H, W)
        t0 = time.perf_counter()
        gen = pipe.generate_from_maps(ctx, maps, steps=steps, guidance=guidance, seed=seed + i,
                                      first_window=first_window)  # (F, V, H, W, 3)
        sampler_s += time.perf_counter() - t0
        frames_total += gen.shape[0]
        gen01 = gen.permute(1, 0, 4, 2, 3).float() / 255.0  # (V, F, 3, H, W)
        gt01 = _to01(s["target"])  # (V, F, 3, H, W)
        p = psnr(gen01, gt01)  # (V, F)
        per_view_psnr.append(p.mean(1))
        per_view_ssim.append(ssim(gen01, gt01).mean(1))
        per_frame_psnr.append(p.mean(0))
        lat = pipe.model.autoencoder.encode(s["target"].flatten(0, 1).to(pipe.device, pipe.dtype))
        rec = _to01(pipe.model.autoencoder.decode(lat).float().cpu()).reshape(gt01.shape)
        ae_psnr.append(psnr(rec, gt01).mean())
        ae_ssim.append(ssim(rec, gt01).mean())
        vc = view_consistency(gen01, s["depth"], s["cameras"], reference=gt01)
        vc_gen.append(float(vc.error))
        vc_gt.append(float(vc.reference_error))
        flick.append(temporal_flicker(gen01, gt01))  # frames on dim -4 of (V, F, 3, H, W)
        if len(pictures) < keep:
            gt_u8 = (gt01 * 255).round().to(torch.uint8).permute(1, 0, 3, 4, 2)  # (F, V, H, W, 3)
            pictures.append((gt_u8, gen))
        if on_clip:
            on_clip(i, {"psnr": float(per_view_psnr[-1].mean()), "ssim": float(per_view_ssim[-1].mean())})
    pv_psnr = torch.stack(per_view_psnr)  # (n, V)
    pv_ssim = torch.stack(per_view_ssim)
    mean = lambda xs, k: float(np.mean([float(x[k]) for x in xs]))  # noqa: E731
    report = {
        "clips": n, "views": cfg.views, "frames": frames, "image_size": cfg.image_size, "steps": steps,
        "window": pipe.window, "overlap": pipe.overlap, "first_window": first_window or pipe.window,
        "guidance": float(cfg.guidance if guidance is None else guidance), "seed": seed, "fps": pipe.fps,
        "psnr": float(pv_psnr.mean()), "ssim": float(pv_ssim.mean()),
        "psnr_per_view": [round(float(x), 3) for x in pv_psnr.mean(0)],
        "ssim_per_view": [round(float(x), 4) for x in pv_ssim.mean(0)],
        "psnr_per_frame": [round(float(x), 3) for x in torch.stack(per_frame_psnr).mean(0)],
        "autoencoder_psnr": float(torch.stack(ae_psnr).mean()), "autoencoder_ssim": float(torch.stack(ae_ssim).mean()),
        "view_consistency": float(np.nanmean(vc_gen)), "view_consistency_gt": float(np.nanmean(vc_gt)),
        "flicker_gen": mean(flick, "gen_diff"), "flicker_gt": mean(flick, "gt_diff"),
        "flicker_ratio": mean(flick, "ratio"), "flicker_diff_error": mean(flick, "diff_error"),
        "seconds_per_frame": sampler_s / max(1, frames_total),
    }
    return report, pictures


def comparison_sheet(pairs, frames: int = 4) -> np.ndarray:
    """(H, W, 3) uint8 picture: for each pair, a row block of ground truth (top) and generated
    (bottom) for ``frames`` evenly spaced frames x all views."""
    from mvportrait.render.video import make_grid

    blocks = []
    for gt, gen in pairs:
        idx = np.linspace(0, gt.shape[0] - 1, min(frames, gt.shape[0])).round().astype(int)
        for x in (gt, gen):
            row = np.concatenate([np.asarray(make_grid(x[i:i + 1].numpy()))[0] for i in idx], axis=1)
            blocks.append(row)
    pad = np.zeros((4, blocks[0].shape[1], 3), np.uint8)
    out = []
    for k, b in enumerate(blocks):
        out.append(b)
        out.append(pad if k % 2 == 0 else np.full_like(pad, 255))
    return np.concatenate(out[:-1], axis=0)


__all__ = ["evaluate_stage2", "comparison_sheet"]
