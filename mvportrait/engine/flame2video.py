"""FLAME2Video (stage 2): reference portrait + FLAME sequence + view rig -> V synchronized videos.

Pipeline (prepare once, stream many)::

    reference image --autoencoder, image embedder, reference UNet--> ReferenceContext  (once)
    FLAME params --FLAME layer--> vertices --renderer (V views)--> normal/depth/mask maps
        --FLAME encoder--> features (per window)
    noise --DDIM (image guidance) over the multi-view video UNet--> latents --decoder--> frames

Frame rate: the model is trained on corpus clips sampled every ``frame_stride`` frames of 25 fps
(``fps`` in the shipped ``train_summary.json``; 12.5 fps for the shipped model). A FLAME
sequence at another rate is resampled to the model rate (nearest frame) and the output video
has the model rate.

Long sequences: windows of ``config.frames`` frames with ``overlap`` frames shared; window k
starts at ``k * (frames - overlap)`` and its first ``overlap`` frames are fixed to the previous
window's last latents through the sampler's inpainting hook (``known`` / ``known_mask``), so the
video continues without a seam. The last window is padded by repeating the last frame's
conditioning and the padding is dropped. ``generate_from_maps(first_window=W1)`` shortens window 0 to
``W1`` frames (the later windows start ``frames - W1`` earlier), the streaming engine's layout.

Distilled student: ``FLAME2Video.from_pretrained(student=True)`` (or the path of a student folder,
e.g. ``mvportrait/weights/stage2_student``) loads the consistency-distilled UNet over its teacher's
other networks (``mvportrait.models.students``); :attr:`FLAME2Video.sampler` is then a
``ConsistencySampler`` (trailing 1/2/4-step grid), the default image guidance is 1.0 (the teacher's
guidance is folded into the student) and the default step count :attr:`FLAME2Video.default_steps` (1 for
the shipped student). The shipped student folder also holds a distilled tiny latent decoder
(``mvportrait.models.tiny_decoder``), which ``from_pretrained(decoder="auto")`` picks up in place of
the autoencoder's decoder (the default ``decoder="full"`` keeps the autoencoder's: offline generation
favours quality; the streaming engine defaults to ``"auto"``); :attr:`FLAME2Video.decoder` is
whichever decodes, :attr:`FLAME2Video.decoder_kind` says which.

Backends: ``backend`` (``torch`` | ``compile`` | ``onnxruntime`` | ``tensorrt``, or a per-stage spec;
default ``MVP_BACKEND``) picks what runs the networks (``engine/backends.py``); the pipeline code is
the same for all of them. ``cache`` is the artifact cache exports and engines come from.

Precision: ``from_pretrained(dtype=torch.bfloat16)`` runs every stage-2 network in bfloat16 (weights
and activations). On a CPU with bfloat16 instructions (oneDNN; AVX512-BF16 / AMX) it is the fast
setting. The frames stay within a few levels of float32 (tested; ``mvportrait eval stage2 --dtype
bfloat16`` measures the quality). Memory format: on a CPU (torch / compile backends) the pipeline puts
the networks in ``channels_last`` (``channels_last=None``; True / False force it): oneDNN's convolutions
run faster on it, bfloat16 (~1.2x end to end on an AVX512-BF16 CPU) and float32 alike (an AVX2 CPU, one
process alternating both: UNet call 1.08x, tiny decoder 1.31x, FLAME encoder 1.34x); float32 frames
change by rounding only (tested).

Identity: the FLAME shape of the sequence (``FlameParams.shape``) drives the geometry; for a
reference whose shape is unknown, zeros (the mean head) are used. The shipped default reference
is a held-out corpus identity whose shape is known (:data:`DEFAULT_REFERENCE_IDENTITY`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mvportrait.engine.schedulers import ConsistencySampler, DDIMSampler, NoiseSchedule
from mvportrait.flame.params import FlameParams
from mvportrait.models.stage2 import FLAME2VideoModel, ReferenceContext

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "stage2"
DEFAULT_STUDENT = Path(__file__).resolve().parent.parent / "weights" / "stage2_student"
TEACHER_STEPS = 25
DECODERS = ("auto", "full", "tiny")
TINY_DECODER_FILE = "tiny_decoder.safetensors"  # a distilled tiny latent decoder beside a model (the student)
DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent / "weights" / "reference" / "default.png"
DEFAULT_FPS = 12.5
MAX_FRAMES = 25 * 120


@dataclass
class Stage2Timings:
    prepare_s: float = 0.0
    render_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.render_s + self.denoise_s + self.decode_s


def _check_int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an int in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
    return v


class FLAME2Video:
    """Stage-2 generation with a :class:`FLAME2VideoModel`; build with :meth:`from_pretrained`."""

    def __init__(self, model: FLAME2VideoModel, *, fps: float = DEFAULT_FPS, overlap: int = 2,
                 timestep_spacing: str = "trailing", head_seed: int = 0, backend: str | None = None,
                 cache=None, channels_last: bool | None = None, decoder=None):
        from mvportrait.data.multiview import _head
        from mvportrait.engine.backends import resolve_backend, stage2_model

        self.backend = resolve_backend("stage2", backend)
        p = next(model.parameters())
        if channels_last is None:  # where it pays: oneDNN's convolutions on a CPU (module docstring)
            channels_last = p.device.type == "cpu" and self.backend in ("torch", "compile")
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.channels_last = bool(channels_last)
        self.model = stage2_model(model.eval(), self.backend, cache=cache).eval()
        self.config = model.config
        self.window = self.config.frames
        if not 0 < overlap < self.window:
            raise ValueError(f"overlap must be in [1, {self.window - 1}], got {overlap}")
        self.overlap = overlap
        self.fps = float(fps)
        self.head = _head(head_seed)
        self.device, self.dtype = p.device, p.dtype
        self.flame = self.head.model.to(device=self.device)
        self.distill = getattr(model, "distill", None)
        schedule = NoiseSchedule.from_kind(self.config.beta_schedule, self.config.train_timesteps)
        if self.distill is not None:  # consistency student: its own grid (trailing), guidance folded in
            self.sampler = ConsistencySampler(schedule, prediction_type=self.config.prediction)
        else:
            self.sampler = DDIMSampler(schedule, prediction_type=self.config.prediction,
                                       timestep_spacing=timestep_spacing)
        # the latent decoder: the autoencoder's, or a distilled tiny decoder (same call, ~cheaper; run in
        # torch whatever the backend: it is small)
        if decoder is None:
            self.decoder, self.decoder_kind = self.model.autoencoder, "full"
        else:
            decoder = decoder.to(device=self.device, dtype=self.dtype).eval()
            if self.channels_last:
                decoder = decoder.to(memory_format=torch.channels_last)
            self.decoder, self.decoder_kind = decoder, "tiny"
        self.last_timings = Stage2Timings()

    @property
    def is_student(self) -> bool:
        """True for a consistency student (few-step sampling, ``config.guidance`` 1.0: guidance folded in)."""
        return self.distill is not None

    @property
    def default_steps(self) -> int:
        """Steps used when none are given: the student's ``default_steps``, else 25 (DDIM)."""
        return int(self.distill["default_steps"]) if self.distill else TEACHER_STEPS

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, student: bool = False, device="cpu",
                        dtype: torch.dtype = torch.float32, decoder: str = "full", **kwargs) -> "FLAME2Video":
        """Load a model folder (default: the shipped ``mvportrait/weights/stage2``, or with
        ``student=True`` the shipped distilled ``mvportrait/weights/stage2_student``). A student folder
        (its ``config.json`` has a ``distill`` object) is recognised whatever the flag; ``student=True``
        with a teacher folder is an error. ``decoder``: ``"full"`` (default: the autoencoder's decoder),
        ``"auto"`` (the folder's distilled tiny decoder, ``tiny_decoder.safetensors``, when it has one --
        the shipped student does -- else the autoencoder's; the streaming engine's default) or ``"tiny"``
        (the folder's tiny decoder; an error without one). The tiny decoder decodes ~8x faster on a CPU
        and costs the shipped student ~0.75 dB PSNR and some flicker (its model card).
        ``kwargs`` go to the constructor (``backend``, ``overlap``, ...)."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        folder = Path(path) if path is not None else (DEFAULT_STUDENT if student else DEFAULT_WEIGHTS)
        model = FLAME2VideoModel.from_pretrained(folder, device=device, dtype=dtype)
        if student and model.distill is None:
            raise ValueError(f"{folder} holds a teacher, not a distilled student (no 'distill' in its config.json)")
        has_tiny = (folder / TINY_DECODER_FILE).is_file()
        if decoder == "tiny" and not has_tiny:
            raise ValueError(f"{folder} has no distilled tiny decoder ({TINY_DECODER_FILE}); use decoder='full'")
        if decoder == "tiny" or (decoder == "auto" and has_tiny):
            from mvportrait.models.tiny_decoder import TinyDecoder

            kwargs["decoder"] = TinyDecoder.from_pretrained(folder, device=device, dtype=dtype)
        summary = folder / "train_summary.json"
        if "fps" not in kwargs and summary.is_file():
            fps = json.loads(summary.read_text()).get("fps")
            if fps:
                kwargs["fps"] = float(fps)
        pipe = cls(model, **kwargs)
        pipe.path = str(folder)
        return pipe

    # ------------------------------------------------------------------------- reference
    @torch.inference_mode()
    def prepare(self, reference) -> ReferenceContext:
        """Reference image (path, PIL image, or (3, H, W) tensor in [-1, 1]) -> ReferenceContext (once).

        A :class:`ReferenceContext` this pipeline made before is returned as it is (checked against this
        model): keep one per portrait and pass it to every stream of that portrait (``StreamingEngine.
        prepare``) to skip the image loading and the reference network."""
        from mvportrait.data.images import load_reference_image

        if isinstance(reference, ReferenceContext):
            return self._check_context(reference)
        size = self.config.image_size
        if isinstance(reference, torch.Tensor):
            img = reference
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"reference tensor must be (3, H, W) in [-1, 1], got {tuple(img.shape)}")
            if not torch.isfinite(img).all():
                raise ValueError("reference tensor contains NaN or Inf")
            if tuple(img.shape[1:]) != (size, size):
                img = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear",
                                                      antialias=True, align_corners=False)[0]
        else:
            img = load_reference_image(reference, size=size)
        t0 = time.perf_counter()
        ctx = self.model.prepare_reference(img[None].to(self.device, self.dtype))
        self.last_timings.prepare_s = time.perf_counter() - t0
        return ctx

    def _check_context(self, ctx: ReferenceContext) -> ReferenceContext:
        """A given reference context must be one this pipeline's model makes: one portrait, its device, dtype
        and token / cache shapes."""
        t = ctx.image_tokens
        if ctx.batch_size != 1:
            raise ValueError(f"reference context must hold one portrait, got a batch of {ctx.batch_size}")
        for name, x in (("latent", ctx.latent), ("image_tokens", t), ("null_tokens", ctx.null_tokens)):
            if x.device != self.device or x.dtype != self.dtype:
                raise ValueError(f"reference context {name} is {x.dtype} on {x.device}; this pipeline runs "
                                 f"{self.dtype} on {self.device} (make it with this pipeline's prepare())")
        ref = self._context_shapes()
        got = (tuple(ctx.latent.shape), tuple(t.shape), len(ctx.cache.keys or ctx.cache.hidden or ()))
        if got != ref:
            raise ValueError(f"reference context does not fit this model: latent / tokens / cache layers {got}, "
                             f"expected {ref} (made by another model?)")
        return ctx

    def _context_shapes(self) -> tuple:
        """(latent shape, image-token shape, cache layers) of this model's contexts, from one made once."""
        if getattr(self, "_ctx_shapes", None) is None:
            size = self.config.image_size
            with torch.inference_mode():
                probe = self.model.prepare_reference(torch.zeros(1, 3, size, size, device=self.device,
                                                                 dtype=self.dtype))
            self._ctx_shapes = (tuple(probe.latent.shape), tuple(probe.image_tokens.shape),
                                len(probe.cache.keys or probe.cache.hidden or ()))
        return self._ctx_shapes

    # -------------------------------------------------------------------------- conditions
    def model_frames(self, flame: FlameParams) -> torch.Tensor:
        """Indices of the FLAME frames seen at the model rate (nearest frame)."""
        fps = float(flame.fps or 25.0)
        n = flame.num_frames
        count = max(1, int(math.floor((n - 1) * self.fps / fps + 1e-6)) + 1)
        return torch.clamp(torch.round(torch.arange(count, dtype=torch.float64) * fps / self.fps).long(), max=n - 1)

    @torch.inference_mode()
    def render_conditions(self, flame: FlameParams, views: str = "ring-4") -> tuple[torch.Tensor, object]:
        """(1, V, T, 5, H, W) conditioning maps of the (resampled) sequence, and the cameras."""
        from mvportrait.data.multiview import rig_cameras

        if flame.batch_size != 1:
            raise ValueError(f"FLAME2Video generates one sequence at a time; got a batch of {flame.batch_size}")
        idx = self.model_frames(flame)
        fp = _select_frames(flame, idx)
        cams = rig_cameras(views, self.config.image_size, device=self.device)
        return self.render_maps(fp, cams), cams

    @torch.inference_mode()
    def render_maps(self, flame: FlameParams, cameras) -> torch.Tensor:
        """(1, V, T, 5, H, W) conditioning maps of the frames of a (1, T) sequence as they are (no
        resampling) from ``cameras``: a (V,) rig or a (T, V) per-frame trajectory of image size
        ``config.image_size`` (the streaming runtime renders each window's new frames with this)."""
        from mvportrait.data.multiview import geometry_maps
        from mvportrait.render.renderer import render

        verts = self.flame(flame.to(self.device), with_landmarks=False).vertices.float()  # (1, T, Nv, 3)
        out = render(verts, self.flame.faces, cameras, modes=("normal", "depth", "mask"))
        maps = geometry_maps(out)  # (1, T, V, 5, H, W)
        return maps.transpose(1, 2).contiguous()

    # ---------------------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, reference, flame: FlameParams, *, views: str = "ring-4", steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, ref_ctx: ReferenceContext | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Frames (T, V, H, W, 3) uint8 at :attr:`fps` for ``flame`` seen from ``views``.

        ``reference`` as in :meth:`prepare` (ignored when ``ref_ctx`` is given). ``guidance``:
        image-guidance scale (default the config's; 1 = off; 1.0 for a student). ``steps`` default:
        :attr:`default_steps`. Same seed and inputs -> same output.
        """
        steps = self.default_steps if steps is None else steps
        _check_int("steps", steps, 1, 1000)
        _check_int("seed", seed, 0)
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))):
            raise TypeError(f"guidance must be a number, got {type(guidance).__name__}")
        if not isinstance(flame, FlameParams):
            raise TypeError(f"flame must be FlameParams, got {type(flame).__name__}")
        guidance = float(self.config.guidance if guidance is None else guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        if flame.num_frames > MAX_FRAMES:
            raise ValueError(f"the sequence has {flame.num_frames} frames; at most {MAX_FRAMES} are supported")
        timings = Stage2Timings()
        ctx = ref_ctx if ref_ctx is not None else self.prepare(reference)
        timings.prepare_s = self.last_timings.prepare_s if ref_ctx is None else 0.0
        t0 = time.perf_counter()
        maps, _ = self.render_conditions(flame, views)
        timings.render_s = time.perf_counter() - t0
        out = self.generate_from_maps(ctx, maps, steps=steps, guidance=guidance, seed=seed, on_progress=on_progress)
        t = self.last_timings
        timings.denoise_s, timings.decode_s, timings.extra = t.denoise_s, t.decode_s, t.extra
        self.last_timings = timings
        return out

    @torch.inference_mode()
    def generate_from_maps(self, ctx: ReferenceContext, maps: torch.Tensor, *, steps: int | None = None,
                           guidance: float | None = None, seed: int = 0,
                           on_progress: Callable[[int, int], None] | None = None,
                           first_window: int | None = None) -> torch.Tensor:
        """Frames (T, V, H, W, 3) uint8 from conditioning maps (1, V, T, 5, H, W) (any cameras: the
        maps carry the geometry) and a prepared reference; windows as in the module docstring.
        ``first_window``: frames of window 0, ``overlap + 1`` .. ``window`` (default the window), as the
        streaming engine's ``prepare(first_window=)``: later windows keep the window's length and start
        ``window - first_window`` frames earlier (what a short first window does to quality is measured
        with ``mvportrait eval stage2 --frames N --first-window W1``)."""
        steps = self.default_steps if steps is None else steps
        _check_int("steps", steps, 1, 1000)
        _check_int("seed", seed, 0)
        w1 = self.window if first_window is None else _check_int("first_window", first_window, self.overlap + 1,
                                                                  self.window)
        guidance = float(self.config.guidance if guidance is None else guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        size = self.config.image_size
        if maps.dim() != 6 or maps.shape[0] != 1 or tuple(maps.shape[3:]) != (5, size, size):
            raise ValueError(f"maps must have shape (1, V, T, 5, {size}, {size}), got {tuple(maps.shape)}")
        maps = maps.to(self.device, self.dtype)
        timings = Stage2Timings()
        _, nv, total = maps.shape[:3]
        w, o = self.window, self.overlap
        n_windows = window_count(total, w, o, w1)
        g = torch.Generator().manual_seed(seed)
        done, total_steps = 0, n_windows * steps
        lat_all = None
        t0 = time.perf_counter()
        for k in range(n_windows):
            start, n = window_span(k, w, o, w1)
            shape = self.model.latent_shape(1, views=nv, frames=n)
            sel = torch.clamp(torch.arange(start, start + n), max=total - 1)
            feats = self.model.encode_renders(maps[:, :, sel.to(maps.device)])
            known = mask = None
            if lat_all is not None:
                known = torch.zeros(shape, device=self.device, dtype=self.dtype)
                known[:, :, :o] = lat_all[:, :, start:start + o]
                mask = torch.zeros(1, 1, w, 1, 1, 1, device=self.device, dtype=self.dtype)
                mask[:, :, :o] = 1.0

            def denoise(x, t, cond, feats=feats):
                return self.model.denoise(x, t, feats, ctx, guidance=guidance)

            def callback(i, t, x, x0):
                nonlocal done
                done += 1
                if on_progress:
                    on_progress(done, total_steps)

            lat = self.sampler.sample(denoise, shape, steps=steps, generator=g, known=known, known_mask=mask,
                                      device=self.device, dtype=self.dtype, callback=callback)
            lat_all = lat if lat_all is None else torch.cat([lat_all, lat[:, :, o:]], dim=2)
        lat_all = lat_all[:, :, :total]
        timings.denoise_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self.decode(lat_all)
        timings.decode_s = time.perf_counter() - t0
        timings.extra = {"frames": total, "views": nv, "windows": n_windows, "steps": steps, "guidance": guidance}
        self.last_timings = timings
        return out

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, V, T, C, h, w) latents -> (T, V, H, W, 3) uint8, one frame (all views) at a time."""
        frames = []
        for f in range(latents.shape[2]):
            img = self.decoder.decode(latents[0, :, f])  # (V, 3, H, W)
            frames.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
        return torch.stack(frames).cpu()


def window_span(k: int, window: int, overlap: int, first_window: int | None = None) -> tuple[int, int]:
    """(first frame, frames) of window ``k``: window 0 has ``first_window`` frames (default ``window``), window
    ``k >= 1`` has ``window`` and starts ``overlap`` frames before its predecessor ends. One layout for the
    offline pipeline and the streaming engine."""
    w1 = window if first_window is None else first_window
    return (0, w1) if k == 0 else (k * (window - overlap) - (window - w1), window)


def window_count(total: int, window: int, overlap: int, first_window: int | None = None) -> int:
    """Windows (:func:`window_span`) that cover ``total`` frames."""
    w1 = window if first_window is None else first_window
    return 1 if total <= w1 else 1 + math.ceil((total - w1) / (window - overlap))


def auto_dtype(device="cpu", backend: str | None = "torch") -> torch.dtype:
    """Stage-2 precision for ``dtype="auto"`` (``generate`` / ``stream`` / ``bench e2e``): bfloat16 with the
    torch or compile backend on CUDA and on a CPU whose oneDNN has bfloat16 kernels (there it is ~2x faster,
    and the shipped student's held-out PSNR / SSIM / flicker move by < 0.01 dB / 0.0001 / 0.04: README,
    Stage 2), float32 otherwise (other CPUs; ONNX Runtime and TensorRT run float32 exports)."""
    dev = torch.device(device)
    if (backend or "torch") not in ("torch", "compile"):
        return torch.float32
    if dev.type == "cuda":
        return torch.bfloat16
    if dev.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _select_frames(flame: FlameParams, idx: torch.Tensor) -> FlameParams:
    """The frames ``idx`` of a (1, T) sequence (per-frame fields indexed; shape kept)."""
    kw = {}
    for name in ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "translation"):
        v = getattr(flame, name, None)
        if v is not None:
            kw[name] = v[:, idx.to(v.device)]
    return FlameParams(fps=flame.fps, **kw)


__all__ = ["FLAME2Video", "Stage2Timings", "auto_dtype", "DEFAULT_WEIGHTS", "DEFAULT_STUDENT", "DEFAULT_REFERENCE",
           "DEFAULT_FPS"]
