"""The naive pipeline: the same models and math as the engine, none of its optimisations.

The baseline the end-to-end benchmark (``benchmarks/bench_e2e.py``, ``mvportrait bench e2e``) measures
the engine against. What is naive, stage by stage (everything else is the engine's own code):

======================  ===========================================================================
stage                   naive                                    (the engine instead)
======================  ===========================================================================
networks                eager PyTorch modules                    (backends: compile / ORT / TRT)
stage 1 (text)          the teacher denoisers, full-step DDIM     (students / few steps, look-ahead
                        (default 50), classifier-free guidance    thread, CFG batched in one call)
                        as two separate calls (cond, uncond),
                        the whole sequence before stage 2
LBS                     ``kernels.lbs.lbs_ref`` (plain PyTorch)   (``lbs`` dispatch: Triton on GPU)
raster                  ``rasterize_ref`` + reference normal      (C++ on CPU / Triton on GPU; all
                        maps, **one view at a time**               views in one launch)
FLAME encoder           one view at a time                        (all views and windows batched)
reference UNet          **recomputed at every step** (its hidden  (run once per identity; K/V
                        states projected to K/V inside every       projected once and cached)
                        self-attention of every call)
stage-2 sampling        full-step DDIM (default 25 steps), image  (students: 1-2 consistency steps,
                        guidance as two separate UNet calls,       guidance folded; else few DDIM
                        one window at a time                       steps, [cond; uncond] in one call,
                                                                   stream batch across windows)
UNet views              batched (the view module attends along    (batched)
                        the view axis: it needs every view)
VAE decode              one view of one frame at a time           (all views of a window's new frames)
======================  ===========================================================================

Rendering re-renders each window's overlap frames (the engine renders every frame once). The noise,
windows, overlap constraint and sampler are :meth:`FLAME2Video.generate`'s, so for the same seed,
steps and guidance the naive pipeline gives the same frames as ``FLAME2Video.generate`` with the DDIM
sampler (up to float rounding: tested), only slower. ``timings`` holds the seconds spent per stage.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Iterator

import torch

from mvportrait.engine.schedulers import combine_guidance
from mvportrait.flame.params import FlameParams

log = logging.getLogger(__name__)

STAGES = ("text", "stage1", "lbs", "raster", "flame_encoder", "reference", "unet", "decode")
DEFAULT_STEPS = 25
DEFAULT_STAGE1_STEPS = 50


class _Clock:
    """Seconds per stage: ``with clock("unet"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._name = None

    def __call__(self, name: str):
        self._name = name
        return self

    @staticmethod
    def _sync():  # the naive pipeline is sequential: a stage's queued GPU work belongs to that stage
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        self.seconds[self._name] += time.perf_counter() - self._t0


def _reference_image(reference, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1], as :meth:`FLAME2Video.prepare` reads it."""
    from mvportrait.data.images import load_reference_image

    if isinstance(reference, torch.Tensor):
        if reference.dim() != 3 or reference.shape[0] != 3:
            raise ValueError(f"reference tensor must be (3, H, W) in [-1, 1], got {tuple(reference.shape)}")
        if tuple(reference.shape[1:]) == (size, size):
            return reference
        return torch.nn.functional.interpolate(reference[None].float(), size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False)[0]
    return load_reference_image(reference, size=size)


class NaivePipeline:
    """The naive pipeline over a teacher :class:`FLAME2Video` (eager torch backend) and, for text
    driving, a teacher :class:`Text2FLAME`; see the module docstring."""

    def __init__(self, stage2, stage1=None):
        from mvportrait.engine.backends import BackendFLAME2VideoModel

        if isinstance(stage2.model, BackendFLAME2VideoModel):
            raise ValueError(f"the naive pipeline runs the eager PyTorch modules; this FLAME2Video runs on "
                             f"{stage2.model.backend} (load it with backend='torch')")
        for name, p in (("stage2", stage2), ("stage1", stage1)):
            if p is not None and p.is_student:
                raise ValueError(f"the naive pipeline runs the full-step teachers; the {name} pipeline holds a "
                                 "distilled student (load it without student=True)")
        self.pipe, self.stage1 = stage2, stage1
        self.model = stage2.model
        self.sampler = stage2.sampler  # the teacher pipeline's DDIM sampler: same schedule and spacing
        self.clock = _Clock()

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.clock.seconds)

    def reset_timings(self) -> None:
        self.clock = _Clock()

    # ------------------------------------------------------------------------------ stage 1
    @torch.inference_mode()
    def text2flame(self, prompt: str, *, seconds: float, fps: float | None = None, steps: int = DEFAULT_STAGE1_STEPS,
                   guidance: float | None = None, seed: int = 0, shape: torch.Tensor | None = None) -> FlameParams:
        """Prompt -> FLAME sequence of ``round(seconds * fps)`` frames (default fps: stage 2's), as
        :meth:`Text2FLAME.generate` (same windows, seeds, smoothing, resampling) with guidance as two calls."""
        from mvportrait.drivers.text import split_prompt
        from mvportrait.engine.stream_stage1 import EMOTION_SEED_OFFSET
        from mvportrait.engine.text2flame import resample_frames
        from mvportrait.models.motion_denoiser import smooth_frames

        t2f = self.stage1
        if t2f is None:
            raise ValueError("text driving needs a stage-1 model: NaivePipeline(stage2, stage1=Text2FLAME)")
        fps = float(self.pipe.fps if fps is None else fps)
        parts = split_prompt(prompt)
        with self.clock("text"):
            m_text, e_text = t2f.encode([parts.motion], [parts.emotion])
        n_model = max(2, int(round(seconds * t2f.model_fps)))
        out = {}
        with self.clock("stage1"):
            for name, model, text, s in (("motion", t2f.motion_model, m_text, seed),
                                         ("emotion", t2f.emotion_model, e_text, seed + EMOTION_SEED_OFFSET)):
                x = self._stage1_sequence(model, text, n_model, steps, guidance, torch.Generator().manual_seed(s))
                out[name] = resample_frames(smooth_frames(model.denormalize(x), model.cfg.smooth).cpu(),
                                            int(round(seconds * fps)))
        pose, expr = out["motion"], out["emotion"]
        shape = torch.zeros(1, 300) if shape is None else torch.as_tensor(shape, dtype=torch.float32).reshape(1, -1)
        return FlameParams(shape=shape, expression=expr, global_pose=pose[..., 0:3].contiguous(),
                           neck_pose=pose[..., 3:6].contiguous(), jaw_pose=pose[..., 6:9].contiguous(), fps=fps)

    def _stage1_sequence(self, model, text, frames: int, steps: int, guidance, generator) -> torch.Tensor:
        """(1, frames, D) normalised: Text2FLAME.sample's windows, DDIM, guidance as two calls."""
        t2f = self.stage1
        cond, uncond = t2f.text_pair(model, text)
        scale = float(model.cfg.guidance if guidance is None else guidance)
        cfg = model.cfg
        sampler = t2f.sampler_for(model)
        dev = next(model.parameters()).device

        def call(x, t, c):
            return model(x, t, *c) if isinstance(c, tuple) else model(x, t, c)

        def denoise(x, t, _):
            out_c = call(x, t, cond)
            if scale == 1.0:
                return out_c
            return combine_guidance(call(x, t, uncond), out_c, scale)

        w, o, d = cfg.max_frames, t2f.overlap, cfg.in_dim
        n_windows = 1 if frames <= w else 1 + math.ceil((frames - w) / (w - o))
        seq = None
        for _ in range(n_windows):
            known = mask = None
            if seq is not None:
                known = torch.zeros(1, w, d, device=dev)
                known[:, :o] = seq[:, -o:]
                mask = torch.zeros(1, w, 1, device=dev)
                mask[:, :o] = 1.0
            x = sampler.sample(denoise, (1, w, d), steps=steps, generator=generator, known=known, known_mask=mask,
                               device=dev)
            seq = x if seq is None else torch.cat([seq, x[:, o:]], dim=1)
        return seq[:, :frames]

    # ------------------------------------------------------------------------------ stage 2
    def _render(self, fp: FlameParams, cameras) -> torch.Tensor:
        """(1, V, T, 5, H, W) maps: reference LBS, then the reference rasterizer one view at a time."""
        from mvportrait.data.multiview import geometry_maps
        from mvportrait.kernels.lbs import lbs_ref
        from mvportrait.render.renderer import render

        flame = self.pipe.flame
        p = fp.to(device=flame.device, dtype=flame.dtype)
        ns, ne = p.shape.shape[-1], p.expression.shape[-1]
        t = p.num_frames
        with self.clock("lbs"):
            coeffs = torch.cat([p.shape, p.expression], -1).reshape(t, ns + ne)  # FLAME layer's own layout
            verts, _ = lbs_ref(coeffs, p.full_pose().reshape(t, -1), flame.v_template, flame.blend_dirs(ns, ne),
                               flame.posedirs, flame.j_regressor, flame.parents, flame.weights,
                               p.translation.reshape(t, 3))
        maps = []
        with self.clock("raster"):
            for v in range(cameras.batch_shape[-1]):
                out = render(verts[None].float(), flame.faces, cameras[v:v + 1], modes=("normal", "depth", "mask"),
                             impl="ref")
                maps.append(geometry_maps(out))  # (1, T, 1, 5, H, W)
        return torch.cat(maps, dim=2).transpose(1, 2).contiguous()

    def _encode_renders(self, maps: torch.Tensor) -> torch.Tensor:
        with self.clock("flame_encoder"):
            return torch.cat([self.model.encode_renders(maps[:, v:v + 1]) for v in range(maps.shape[1])], dim=1)

    def _denoise(self, x, t, feats, ref_latent, tokens, null, guidance: float) -> torch.Tensor:
        """One guided model output: the reference UNet afresh, then cond and uncond as two UNet calls."""
        m = self.model
        with self.clock("reference"):
            hidden = m.reference_unet(ref_latent, tokens)  # ReferenceCache of hidden states: projected in every call
        with self.clock("unet"):
            out_c = m.unet(x, t, tokens, feats, hidden)
            if guidance == 1.0:
                return out_c
            out_u = m.unet(x, t, null, feats, None)  # unconditional: null image tokens, no reference
            return combine_guidance(out_u, out_c, guidance)

    def _decode(self, lat: torch.Tensor) -> torch.Tensor:
        """(1, V, n, C, h, w) -> (n, V, H, W, 3) uint8, one view of one frame per decoder call."""
        frames = []
        with self.clock("decode"):
            for f in range(lat.shape[2]):
                views = [self.model.autoencoder.decode(lat[0, v, f][None])[0] for v in range(lat.shape[1])]
                img = torch.stack(views)  # (V, 3, H, W)
                frames.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
        return torch.stack(frames).cpu()

    @torch.inference_mode()
    def windows(self, reference, flame: FlameParams, *, views="ring-4", steps: int = DEFAULT_STEPS,
                guidance: float | None = None, seed: int = 0) -> Iterator[torch.Tensor]:
        """Each window's new frames (n, V, H, W, 3) uint8 as it finishes; :meth:`generate`'s windows."""
        from mvportrait.data.multiview import rig_cameras
        from mvportrait.engine.flame2video import _select_frames
        from mvportrait.render.cameras import Cameras

        pipe, m = self.pipe, self.model
        guidance = float(m.config.guidance if guidance is None else guidance)
        size = m.config.image_size
        cams = views if isinstance(views, Cameras) else rig_cameras(views, size, device=pipe.device)
        fp = _select_frames(flame, pipe.model_frames(flame))
        with self.clock("reference"):
            img = _reference_image(reference, size)[None].to(pipe.device, pipe.dtype)
            ref_latent = m.autoencoder.encode(img)
            tokens = m.image_embedder(ref_latent)
            null = m.image_embedder.null(1).to(tokens.dtype)
        total, nv = fp.num_frames, cams.batch_shape[-1]
        w, o = pipe.window, pipe.overlap
        hop = w - o
        n_windows = 1 if total <= w else 1 + math.ceil((total - w) / hop)
        shape = m.latent_shape(1, views=nv, frames=w)
        g = torch.Generator().manual_seed(seed)
        tail = None
        for k in range(n_windows):
            start = k * hop
            sel = torch.clamp(torch.arange(start, start + w), max=total - 1)
            maps = self._render(_select_frames(fp, sel), cams).to(pipe.dtype)  # overlap frames re-rendered
            feats = self._encode_renders(maps)
            known = mask = None
            if tail is not None:
                known = torch.zeros(shape, device=pipe.device, dtype=pipe.dtype)
                known[:, :, :o] = tail
                mask = torch.zeros(1, 1, w, 1, 1, 1, device=pipe.device, dtype=pipe.dtype)
                mask[:, :, :o] = 1.0

            def denoise(x, t, _, feats=feats):
                return self._denoise(x, t, feats, ref_latent, tokens, null, guidance)

            lat = self.sampler.sample(denoise, shape, steps=steps, generator=g, known=known, known_mask=mask,
                                      device=pipe.device, dtype=pipe.dtype)
            tail = lat[:, :, w - o:]
            lo, hi = (0 if k == 0 else o), min(w, total - start)
            yield self._decode(lat[:, :, lo:hi])

    def generate(self, reference, flame: FlameParams, **kw) -> torch.Tensor:
        """Frames (T, V, H, W, 3) uint8, as :meth:`FLAME2Video.generate` (``views``, ``steps``, ``guidance``,
        ``seed``)."""
        return torch.cat(list(self.windows(reference, flame, **kw)))


__all__ = ["NaivePipeline", "STAGES", "DEFAULT_STEPS", "DEFAULT_STAGE1_STEPS"]
