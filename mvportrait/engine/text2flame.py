"""Text2FLAME (stage 1): prompt -> FLAME parameter sequence with MotionDM + EmotionDM.

Pipeline::

    prompt --split_prompt--> motion text, emotion text --text encoder--> per model: pooled (1, 384)
                                                      or token features (1, L, 384) + mask (1, L)
    MotionDM  (DDIM, CFG) -> global | neck | jaw axis-angle (T, 9)
    EmotionDM (DDIM, CFG) -> expression (T, n_expr)
    window-3 moving average (the paper's smoothing; ``DenoiserConfig.smooth``) -> FlameParams

Text encoding is a separate call (:meth:`Text2FLAME.encode`) from sampling (:meth:`sample`) so
each can be timed; :meth:`generate` runs both and records ``last_timings``. A text condition is what
the model's ``cfg.text_cond`` asks for: a (B, text_dim) tensor (``"pooled"``) or a ``(tokens, mask)``
tuple (``"tokens"``); :func:`cond_rows` slices either by batch rows.

Length: the models are trained on windows of ``max_frames`` frames (100 = 4 s at 25 fps). A
request of ``n <= max_frames`` frames samples one window and keeps its first ``n`` frames. Longer
requests are generated in windows of ``max_frames`` with ``overlap`` frames shared: window ``k``
starts at ``k * (max_frames - overlap)``, and its first ``overlap`` frames are fixed to the last
``overlap`` frames of window ``k - 1`` through the sampler's inpainting hook (``known`` /
``known_mask``, in the model's normalised units), so the motion continues from where it was; the
text conditions every window alike (the described action repeats window after window). The
smoothing runs once over the joined sequence.

Distilled students: ``Text2FLAME.from_pretrained(student=True)`` loads ``motion_student`` +
``emotion_student`` (consistency distillation of the teachers, ``mvportrait.train.distill``): the
sampler becomes a ``ConsistencySampler`` (trailing 1/2/4-step grid), the default guidance 1.0 (the
teachers' guidance is folded in) and the default step count :attr:`Text2FLAME.default_steps` (2);
:attr:`Text2FLAME.is_student` tells which is loaded.

Backends: ``backend`` (``torch`` | ``compile`` | ``onnxruntime`` | ``tensorrt``, or a per-stage spec;
default ``MVP_BACKEND``) runs MotionDM, EmotionDM and the text encoder's network through
``engine/backends.py``; the sampling code is the same for all of them.

Models are trained at 25 fps; other ``fps`` values resample the 25 fps output linearly in time.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mvportrait.config import MOTION_DIM
from mvportrait.drivers.text import split_prompt
from mvportrait.engine.schedulers import ConsistencySampler, DDIMSampler, NoiseSchedule
from mvportrait.flame.params import FlameParams
from mvportrait.models.motion_denoiser import MotionDenoiser, smooth_frames
from mvportrait.models.students import distill_info, load_stage1

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "stage1"
STUDENT_STEMS = ("motion_student", "emotion_student")
TEACHER_STEPS = 50
MAX_SECONDS = 600.0


@dataclass
class Timings:
    encode_s: float = 0.0
    motion_s: float = 0.0
    emotion_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _load(path_stem: Path) -> tuple[MotionDenoiser, dict]:
    """(model, JSON metadata) of ``<stem>.{safetensors,json}``: a teacher or a distilled student."""
    return load_stage1(path_stem)


def cond_rows(cond, rows: slice):
    """Rows of a text condition: a pooled (B, E) tensor or a ``(tokens, mask)`` tuple."""
    if isinstance(cond, tuple):
        return tuple(c[rows] for c in cond)
    return cond[rows]


def cond_batch(cond) -> int:
    return (cond[0] if isinstance(cond, tuple) else cond).shape[0]


def resample_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, D) -> (B, n, D) by linear interpolation over time (same start and end)."""
    if x.shape[1] == n:
        return x
    return torch.nn.functional.interpolate(x.transpose(1, 2), size=n, mode="linear",
                                           align_corners=True).transpose(1, 2)


class Text2FLAME:
    """MotionDM + EmotionDM + text encoder. Build with :meth:`from_pretrained` or from modules."""

    def __init__(self, motion_model: MotionDenoiser, emotion_model: MotionDenoiser, text_encoder,
                 *, overlap: int = 20, eta: float = 0.0, timestep_spacing: str = "trailing",
                 backend: str | None = None, cache=None, distill: dict | None = None):
        from mvportrait.engine.backends import resolve_backend, stage1_models

        if motion_model.cfg.in_dim != MOTION_DIM:
            raise ValueError(f"motion model must have in_dim {MOTION_DIM}, got {motion_model.cfg.in_dim}")
        if text_encoder.dim != motion_model.cfg.text_dim or text_encoder.dim != emotion_model.cfg.text_dim:
            raise ValueError(f"text encoder dim {text_encoder.dim} does not match the models' text_dim")
        self.backend = resolve_backend("stage1", backend)
        motion_model, emotion_model, text_encoder = stage1_models(motion_model, emotion_model, text_encoder,
                                                                  self.backend, cache=cache)
        self.motion_model = motion_model.eval()
        self.emotion_model = emotion_model.eval()
        self.text_encoder = text_encoder
        self.window = min(motion_model.cfg.max_frames, emotion_model.cfg.max_frames)
        if not 0 < overlap < self.window:
            raise ValueError(f"overlap must be in [1, {self.window - 1}], got {overlap}")
        self.overlap = overlap
        self.eta = eta
        self.timestep_spacing = timestep_spacing
        self.model_fps = float(motion_model.cfg.fps)
        self.last_timings = Timings()
        self.distill = distill_info({"distill": distill}, "distill") if distill is not None else None
        self._samplers: dict[int, DDIMSampler | ConsistencySampler] = {}

    @property
    def is_student(self) -> bool:
        """True when the models are consistency students (few-step sampling, guidance folded in)."""
        return self.distill is not None

    @property
    def default_steps(self) -> int:
        """Sampling steps used when none are given: the students' ``default_steps``, else 50 (DDIM)."""
        return int(self.distill["default_steps"]) if self.distill else TEACHER_STEPS

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, student: bool = False, text_encoder=None,
                        text_model=None, device="cpu", **kwargs) -> "Text2FLAME":
        """Load ``motion.{safetensors,json}`` + ``emotion.{...}`` from ``path`` (default: the shipped
        ``mvportrait/weights/stage1``); with ``student=True`` the distilled ``motion_student`` +
        ``emotion_student`` of that folder instead (consistency sampling, guidance 1, the students'
        ``default_steps``; their teachers are read from the paths they name). The text encoder named in
        the JSON (MiniLM) unless given, read from the local folder ``text_model`` if set (else
        ``MVP_TEXT_MODEL`` / the package; see ``open_text_encoder``)."""
        from mvportrait.models.text_encoder import open_text_encoder

        folder = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not folder.is_dir():
            raise FileNotFoundError(f"no stage-1 weights folder at {folder}")
        stems = STUDENT_STEMS if student else ("motion", "emotion")
        motion, mmeta = _load(folder / stems[0])
        emotion, emeta = _load(folder / stems[1])
        infos = [distill_info(mmeta, folder / stems[0]), distill_info(emeta, folder / stems[1])]
        if (infos[0] is None) != (infos[1] is None):
            raise ValueError(f"{folder}: one of motion / emotion is a distilled student and the other is not; "
                             "load both teachers or both students")
        distill = None
        if infos[0] is not None:
            distill = dict(infos[0], default_steps=max(infos[0]["default_steps"], infos[1]["default_steps"]),
                           guidance_emotion=infos[1]["guidance"])
        if text_encoder is None:
            text_encoder = open_text_encoder(mmeta.get("text_encoder", "minilm"), text_model, device=device)
        pipe = cls(motion.to(device), emotion.to(device), text_encoder, distill=distill, **kwargs)
        pipe.meta = {"motion": mmeta, "emotion": emeta, "path": str(folder), "student": distill is not None}
        return pipe

    @property
    def n_expr(self) -> int:
        return self.emotion_model.cfg.in_dim

    def default_guidance(self) -> dict:
        """Guidance scale each model uses when none is given (its config's ``guidance``)."""
        return {"motion": float(self.motion_model.cfg.guidance), "emotion": float(self.emotion_model.cfg.guidance)}

    # --------------------------------------------------------------------------- stages
    def encode(self, motion_texts: list[str], emotion_texts: list[str]):
        """Text conditions of the motion and emotion texts, each in the form its model takes (a pooled
        (B, text_dim) tensor, or ``(tokens (B, L, text_dim), mask (B, L))``); encoder cache applies."""
        return (self._condition(self.motion_model, motion_texts),
                self._condition(self.emotion_model, emotion_texts))

    def _condition(self, model: MotionDenoiser, texts: list[str]):
        emb = self.text_encoder.encode(list(texts))
        if model.uses_tokens:
            return emb.tokens.float(), emb.mask
        return emb.pooled.float()

    def sampler_for(self, model: MotionDenoiser) -> DDIMSampler | ConsistencySampler:
        """DDIM for teachers; the consistency sampler (trailing spacing, the students' grid) for students."""
        key = id(model)
        if key not in self._samplers:
            cfg = model.cfg
            schedule = NoiseSchedule.from_kind(cfg.beta_schedule, cfg.train_timesteps)
            if self.is_student:
                self._samplers[key] = ConsistencySampler(schedule, prediction_type=cfg.prediction)
            else:
                self._samplers[key] = DDIMSampler(schedule, prediction_type=cfg.prediction,
                                                  timestep_spacing=self.timestep_spacing, eta=self.eta)
        return self._samplers[key]

    def text_pair(self, model: MotionDenoiser, text) -> tuple:
        """(cond, uncond) on the model's device for a text condition from :meth:`encode` (checked against
        the model's ``text_cond``); what :meth:`sample_window` takes."""
        if isinstance(text, tuple) != model.uses_tokens:
            raise ValueError(f"this {model.cfg.text_cond!r} model takes "
                             f"{'(tokens, mask)' if model.uses_tokens else 'a pooled (B, text_dim) tensor'}; "
                             "encode the text with Text2FLAME.encode")
        b = cond_batch(text)
        dev = next(model.parameters()).device
        if model.uses_tokens:
            tokens, mask = text[0].to(dev).float(), text[1].to(dev)
            return (tokens, mask), model.null(b, tokens.shape[1])
        text = text.to(dev)
        return text, model.null(b).to(text.dtype)

    @torch.no_grad()
    def sample_window(self, model: MotionDenoiser, cond, uncond, *, known: torch.Tensor | None = None,
                      steps: int | None = None, guidance: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """One window (B, max_frames, D) in normalised units (no smoothing) for ``(cond, uncond)`` from
        :meth:`text_pair`. ``known`` (B, overlap, D), normalised: the previous window's last frames,
        fixed as this window's first ``overlap`` frames through the sampler's inpainting hook. The
        building block of :meth:`sample` and of the streaming runtime's stage 1."""
        guidance = float(model.cfg.guidance) if guidance is None else float(guidance)
        steps = self.default_steps if steps is None else steps
        b, w, d = cond_batch(cond), model.cfg.max_frames, model.cfg.in_dim
        dev = next(model.parameters()).device
        sampler = self.sampler_for(model)

        def denoise(x, t, c):
            return model(x, t, *c) if isinstance(c, tuple) else model(x, t, c)

        mask = None
        if known is not None:
            o = known.shape[1]
            if known.dim() != 3 or known.shape[0] != b or known.shape[2] != d or not 0 < o < w:
                raise ValueError(f"known must have shape ({b}, overlap < {w}, {d}), got {tuple(known.shape)}")
            full = torch.zeros(b, w, d, device=dev)
            full[:, :o] = known
            known = full
            mask = torch.zeros(1, w, 1, device=dev)
            mask[:, :o] = 1.0
        return sampler.sample(denoise, (b, w, d), steps=steps, generator=generator, guidance_scale=guidance,
                              cond=cond, uncond=uncond, known=known, known_mask=mask, device=dev)

    @torch.no_grad()
    def sample(self, model: MotionDenoiser, text, frames: int, *, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None,
               smooth: bool = True) -> torch.Tensor:
        """(B, frames, D) in model units (radians / coefficients) for a text condition (from
        :meth:`encode`: (B, text_dim), or ``(tokens, mask)`` for a tokens model), at the model's fps.

        ``guidance`` None uses the model's default (``cfg.guidance``; 1.0 for a student, whose guidance is
        folded in); 1 disables classifier-free guidance. ``steps`` None: :attr:`default_steps`."""
        cond, uncond = self.text_pair(model, text)
        w = model.cfg.max_frames
        hop = w - self.overlap
        n_windows = 1 if frames <= w else 1 + math.ceil((frames - w) / hop)
        out = None  # normalised units, (B, L, D)
        for _ in range(n_windows):
            known = None if out is None else out[:, -self.overlap:]
            x = self.sample_window(model, cond, uncond, known=known, steps=steps, guidance=guidance,
                                   generator=generator)
            out = x if out is None else torch.cat([out, x[:, self.overlap:]], dim=1)
        x = model.denormalize(out[:, :frames])
        if smooth:
            x = smooth_frames(x, model.cfg.smooth)
        return x

    # -------------------------------------------------------------------------- generate
    def generate(self, prompt: str = "", *, motion: str | None = None, emotion: str | None = None,
                 seconds: float = 4.0, fps: float = 25.0, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, shape: torch.Tensor | None = None, n_shape: int = 300,
                 n_expr: int | None = None, smooth: bool = True) -> FlameParams:
        """One FLAME sequence (B=1) of ``round(seconds * fps)`` frames for ``prompt``.

        ``motion`` / ``emotion`` override that part of the prompt split. ``shape`` (n_shape,) or
        (1, n_shape) is the identity (zeros if None). ``n_expr`` (default: the model's) pads the
        expression with zeros (or truncates it) for a FLAME model with another count. The same
        ``seed`` and arguments give the same output.
        """
        for name, v in (("seconds", seconds), ("fps", fps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if seconds > MAX_SECONDS:
            raise ValueError(f"seconds must be at most {MAX_SECONDS:g}, got {seconds}")
        if not 1 <= fps <= 240:
            raise ValueError(f"fps must be in [1, 240], got {fps}")
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ValueError(f"steps must be an int in [1, 1000], got {steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        frames = int(round(seconds * fps))
        if frames < 1:
            raise ValueError(f"seconds * fps gives no frame ({seconds} s at {fps} fps)")
        parts = split_prompt(prompt, motion=motion, emotion=emotion)
        model_frames = max(2, int(round(seconds * self.model_fps)))

        t0 = time.perf_counter()
        m_text, e_text = self.encode([parts.motion], [parts.emotion])
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        pose = self.sample(self.motion_model, m_text, model_frames, steps=steps, guidance=guidance, generator=g,
                           smooth=smooth)
        t2 = time.perf_counter()
        g = torch.Generator().manual_seed(seed + 1_000_003)
        expr = self.sample(self.emotion_model, e_text, model_frames, steps=steps, guidance=guidance, generator=g,
                           smooth=smooth)
        t3 = time.perf_counter()
        self.last_timings = Timings(encode_s=t1 - t0, motion_s=t2 - t1, emotion_s=t3 - t2,
                                    extra={"frames": frames, "steps": steps, "parts": (parts.motion, parts.emotion)})
        pose, expr = resample_frames(pose.cpu(), frames), resample_frames(expr.cpu(), frames)
        want = self.n_expr if n_expr is None else int(n_expr)
        if want > expr.shape[-1]:
            expr = torch.nn.functional.pad(expr, (0, want - expr.shape[-1]))
        elif want < expr.shape[-1]:
            expr = expr[..., :want]
        if shape is None:
            shape_t = torch.zeros(1, n_shape)
        else:
            shape_t = torch.as_tensor(shape, dtype=torch.float32)
            if shape_t.ndim == 1:
                shape_t = shape_t[None]
            if shape_t.ndim != 2 or shape_t.shape[0] != 1:
                raise ValueError(f"shape must be (n_shape,) or (1, n_shape), got {tuple(shape_t.shape)}")
        return FlameParams(shape=shape_t, expression=expr, global_pose=pose[..., 0:3].contiguous(),
                           neck_pose=pose[..., 3:6].contiguous(), jaw_pose=pose[..., 6:9].contiguous(), fps=float(fps))


__all__ = ["Text2FLAME", "Timings", "resample_frames", "cond_rows", "DEFAULT_WEIGHTS", "STUDENT_STEMS"]
