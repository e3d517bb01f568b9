"""Frozen dataclass configs with named presets (gpt-fast style: ``DenoiserConfig.from_name("paper")``).

Organised by stage; each section owns its preset table. Configuration is never inferred from a
file name or path: a checkpoint carries its config as JSON (``to_dict`` / ``from_dict``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# ================================================================================================
# Stage 1: Text2FLAME (MotionDM + EmotionDM)

DENOISER_KINDS = ("motion", "emotion")
MOTION_DIM = 9  # global (3) + neck (3) + jaw (3) axis-angle per frame
DEFAULT_N_EXPR = 50


@dataclass(frozen=True)
class DenoiserConfig:
    """One MDM-style frame transformer (MotionDM or EmotionDM; same class, different ``in_dim``).

    ``width`` is the latent width, ``layers`` the number of transformer encoder layers, ``ff`` the
    feed-forward width, ``max_frames`` the training window (frames; 100 = 4 s at 25 fps).
    ``prediction`` is what the network outputs: ``"sample"`` (x0, as MDM), ``"v_prediction"`` (x0
    through a skip connection from x_t; see ``models/motion_denoiser.py``) or ``"epsilon"``.
    ``cond_drop`` is the probability of replacing the text by the learned null embedding during
    training (classifier-free guidance). ``velocity_weight`` weights the frame-difference loss
    (``L = L_simple + 0.5 L_velocity``). ``smooth`` is the window of the moving average applied to
    the generated output (3 as the paper reports; 1 = off).
    """

    kind: str = "motion"
    in_dim: int = MOTION_DIM
    width: int = 64
    layers: int = 1
    heads: int = 4
    ff: int = 256
    text_dim: int = 384
    max_frames: int = 100
    fps: float = 25.0
    prediction: str = "sample"
    cond_drop: float = 0.1
    dropout: float = 0.1
    velocity_weight: float = 0.5
    smooth: int = 3
    train_timesteps: int = 1000
    beta_schedule: str = "cosine"
    guidance: float = 2.5  # default classifier-free guidance scale at sampling time

    def __post_init__(self):
        if self.kind not in DENOISER_KINDS:
            raise ValueError(f"kind must be one of {DENOISER_KINDS}, got {self.kind!r}")
        if self.prediction not in ("sample", "epsilon", "v_prediction"):
            raise ValueError(f"prediction must be 'sample', 'epsilon' or 'v_prediction', got {self.prediction!r}")
        for name in ("in_dim", "width", "layers", "heads", "ff", "text_dim", "max_frames", "smooth",
                     "train_timesteps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DenoiserConfig.{name} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if self.smooth % 2 == 0:
            raise ValueError(f"smooth must be an odd window (1 = off), got {self.smooth}")

    @classmethod
    def from_name(cls, name: str, kind: str = "motion", **overrides: Any) -> "DenoiserConfig":
        """Preset ``name`` (see ``DENOISER_PRESETS``) for ``kind`` ("motion" | "emotion")."""
        if name not in DENOISER_PRESETS:
            raise ValueError(f"unknown denoiser preset {name!r}; expected one of {', '.join(DENOISER_PRESETS)}")
        if kind not in DENOISER_KINDS:
            raise ValueError(f"kind must be one of {DENOISER_KINDS}, got {kind!r}")
        in_dim = MOTION_DIM if kind == "motion" else DEFAULT_N_EXPR
        return cls(**{"kind": kind, "in_dim": in_dim, **DENOISER_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DenoiserConfig fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw: Any) -> "DenoiserConfig":
        return replace(self, **kw)


DENOISER_PRESETS: dict[str, dict[str, Any]] = {
    # MVPortrait's reported size: one encoder layer, latent width 64.
    "paper": dict(width=64, layers=1, heads=4, ff=256),
    # Larger reference models.
    "small": dict(width=128, layers=2, heads=4, ff=256),
    "base": dict(width=256, layers=4, heads=8, ff=1024),
    # For unit tests.
    "tiny": dict(width=32, layers=1, heads=2, ff=64, max_frames=32),
}


@dataclass(frozen=True)
class Stage1TrainConfig:
    """Training recipe for both stage-1 denoisers (each is trained separately with the same recipe)."""

    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup: int = 200
    ema: float = 0.995  # EMA decay of the exported weights (0 = off)
    grad_clip: float = 1.0
    corpus_size: int = 10000
    corpus_seed: int = 0
    captions_per_clip: int = 2  # the corpus caption + (n - 1) re-captions from the train wordings
    checkpoint_every: int = 500
    log_every: int = 25

    def to_dict(self) -> dict:
        return asdict(self)
