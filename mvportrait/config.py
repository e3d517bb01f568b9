"""Frozen dataclass configs with named presets (gpt-fast style: ``DenoiserConfig.from_name("paper")``).

Organised by stage; each section owns its preset table. Configuration is never inferred from a
file name or path: a checkpoint carries its config as JSON (``to_dict`` / ``from_dict``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# ================================================================================================
# Stage 1: Text2FLAME (MotionDM + EmotionDM)

DENOISER_KINDS = ("motion", "emotion")
MOTION_DIM = 9  # global (3) + neck (3) + jaw (3) axis-angle per frame
DEFAULT_N_EXPR = 50
TEXT_CONDS = ("pooled", "tokens")


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

    ``text_cond`` is how the text enters: ``"pooled"`` (one sentence vector, added to the timestep
    embedding: MDM) or ``"tokens"`` (the encoder's per-token features, read by a cross-attention
    in every layer, plus their masked mean added to the timestep embedding). Checkpoints without the
    field are ``"pooled"`` (the first shipped models).
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
    text_cond: str = "pooled"

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
        if self.text_cond not in TEXT_CONDS:
            raise ValueError(f"text_cond must be one of {TEXT_CONDS}, got {self.text_cond!r}")

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
    # MVPortrait's reported size: one encoder layer, latent width 64; cross-attention to the words.
    "paper": dict(width=64, layers=1, heads=4, ff=256, text_cond="tokens"),
    # The first shipped models: the paper size conditioned on the pooled sentence vector.
    "paper-pooled": dict(width=64, layers=1, heads=4, ff=256, text_cond="pooled"),
    # Larger reference models.
    "small": dict(width=128, layers=2, heads=4, ff=512, text_cond="tokens"),
    "base": dict(width=256, layers=4, heads=8, ff=1024, text_cond="tokens"),
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


# ================================================================================================
# Stage 2: FLAME2Video (autoencoder, FLAME encoder, denoising UNet, reference UNet)


def _positive_ints(owner: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {v!r}")


def _int_tuple(owner: str, name: str, v: Any, min_len: int = 1) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or len(v) < min_len or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
        raise ValueError(f"{owner}.{name} must be a tuple of at least {min_len} positive ints, got {v!r}")
    return tuple(v)


def check_ints(cfg, names, minimum: int = 1) -> None:
    """Raise ValueError unless every field in ``names`` of dataclass ``cfg`` is an int >= ``minimum``."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise ValueError(f"{type(cfg).__name__}.{name} must be {what}, got {v!r}")


def check_numbers(cfg, names) -> None:
    """Raise ValueError unless every field in ``names`` of dataclass ``cfg`` is a finite number >= 0."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a finite number >= 0, got {v!r}")


def replace_known(cfg, **kw):
    """``dataclasses.replace`` that names unknown fields in its error."""
    known = {f.name for f in fields(cfg)}
    bad = sorted(set(kw) - known)
    if bad:
        raise ValueError(f"unknown {type(cfg).__name__} fields {bad}; known: {sorted(known)}")
    return replace(cfg, **kw)


def _from_flat_dict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class AutoencoderConfig:
    """KL autoencoder (``models/autoencoder.py``) in the module layout of diffusers' AutoencoderKL.

    The spatial factor is ``2 ** (len(block_out) - 1)``. Latents handed to the UNet are
    ``(z - shift_factor) * scaling_factor`` so that they have roughly unit variance.

    - ``"sd"``: Stable Diffusion's VAE (8x, 4 channels, widths 128/256/512/512, two res layers per
      block, mid attention, ``scaling_factor=0.18215``); loads diffusers AutoencoderKL weights
      with ``models/convert.py``.
    - ``"tiny"``: 4x, 4 channels, widths 32/64/128, one res layer per block, no mid attention;
      trainable on a CPU. Its ``scaling_factor`` is 1.0 until it is trained: the training recipe
      measures ``1 / std`` of the posterior means on its corpus and stores the value in the
      checkpoint's config (``cfg.replace(scaling_factor=...)``), as SD did to get 0.18215.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "block_out", _int_tuple("AutoencoderConfig", "block_out", self.block_out))
        _positive_ints("AutoencoderConfig", self, ("in_channels", "out_channels", "latent_channels",
                                                   "layers_per_block", "norm_groups"))
        bad = [c for c in self.block_out if c % self.norm_groups]
        if bad:
            raise ValueError(f"AutoencoderConfig: block_out {self.block_out} must be divisible by norm_groups "
                             f"{self.norm_groups}")
        if not (isinstance(self.scaling_factor, (int, float)) and self.scaling_factor > 0):
            raise ValueError(f"AutoencoderConfig.scaling_factor must be > 0, got {self.scaling_factor!r}")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor image -> latent."""
        return 2 ** (len(self.block_out) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "AutoencoderConfig":
        if name not in AUTOENCODER_PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}; expected one of {', '.join(AUTOENCODER_PRESETS)}")
        return cls(**{**AUTOENCODER_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        return _from_flat_dict(cls, d)

    def replace(self, **kw: Any) -> "AutoencoderConfig":
        return replace(self, **kw)


AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "sd": dict(),
    "tiny": dict(block_out=(32, 64, 128), layers_per_block=1, norm_groups=8, mid_attention=False,
                 scaling_factor=1.0),
}


@dataclass(frozen=True)
class UNetConfig:
    """Denoising UNet of stage 2 (``models/unet.py``): an SD-style spatial UNet plus temporal and view
    modules; the reference UNet uses the same spatial fields.

    ``block_channels`` per resolution level (level i works at latent size / 2**i), ``layers_per_block``
    res layers per down level (up levels have one more), ``attention_levels`` which down levels carry a
    spatial transformer after each res layer (up levels mirror them); the mid block has one when
    ``mid_attention``. Attention heads: ``channels // head_dim`` when ``head_dim`` > 0, else ``heads``
    at every level (SD1.5: 8 heads); the temporal and view modules use the same head count per level.
    ``cross_attention_dim`` is the width of the image tokens (``encoder_hidden_states``).

    ``temporal`` adds an AnimateDiff-style motion module after every (res layer, transformer) pair
    (``temporal_attentions`` self-attentions along frames, sinusoidal frame positions up to
    ``max_frames``); ``view`` adds a view module after it (``view_attentions`` attentions along views,
    no positions: views are told apart by their FLAME renders). ``motion_levels`` (one bool per level,
    None = all, as AnimateDiff) says which levels carry temporal / view modules; the mid block always
    does. ``flame_channels`` is the number of
    render channels (normal 3 + depth 1 + mask 1) the FLAME encoder takes, ``flame_widths`` its
    conv widths (one more than the number of stride-2 stages, i.e. ``log2(autoencoder factor) + 1``).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    mid_attention: bool = True
    transformer_layers: int = 1
    heads: int = 8
    head_dim: int = 0
    cross_attention_dim: int = 768
    norm_groups: int = 32
    norm_eps: float = 1e-5
    temporal: bool = True
    temporal_attentions: int = 2
    view: bool = True
    view_attentions: int = 1
    motion_levels: tuple[bool, ...] | None = None
    max_frames: int = 32
    flame_channels: int = 5
    flame_widths: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self):
        owner = "UNetConfig"
        object.__setattr__(self, "block_channels", _int_tuple(owner, "block_channels", self.block_channels))
        object.__setattr__(self, "flame_widths", _int_tuple(owner, "flame_widths", self.flame_widths))
        levels = tuple(self.attention_levels)
        if len(levels) != len(self.block_channels) or not all(isinstance(x, bool) for x in levels):
            raise ValueError(f"{owner}.attention_levels must hold one bool per level "
                             f"({len(self.block_channels)}), got {self.attention_levels!r}")
        object.__setattr__(self, "attention_levels", levels)
        if self.motion_levels is not None:
            ml = tuple(self.motion_levels)
            if len(ml) != len(self.block_channels) or not all(isinstance(x, bool) for x in ml):
                raise ValueError(f"{owner}.motion_levels must be None (every level) or one bool per level "
                                 f"({len(self.block_channels)}), got {self.motion_levels!r}")
            object.__setattr__(self, "motion_levels", ml)
        _positive_ints(owner, self, ("in_channels", "out_channels", "layers_per_block", "transformer_layers",
                                     "heads", "cross_attention_dim", "norm_groups", "temporal_attentions",
                                     "view_attentions", "max_frames", "flame_channels"))
        if not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise ValueError(f"{owner}.head_dim must be an int >= 0 (0 = use heads), got {self.head_dim!r}")
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ValueError(f"{owner}: block channel {c} is not divisible by norm_groups {self.norm_groups}")
            h = self.heads_at(c)
            if h < 1 or c % h:
                raise ValueError(f"{owner}: {c} channels cannot be split into {h} heads "
                                 f"(heads={self.heads}, head_dim={self.head_dim})")

    def heads_at(self, channels: int) -> int:
        """Attention heads of a block with ``channels`` channels."""
        return channels // self.head_dim if self.head_dim else self.heads

    @property
    def levels(self) -> int:
        return len(self.block_channels)

    @property
    def downsample(self) -> int:
        """Latent size must be a multiple of this (one factor 2 per down level but the last)."""
        return 2 ** (self.levels - 1)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "UNetConfig":
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; expected one of {', '.join(UNET_PRESETS)}")
        return cls(**{**UNET_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return _from_flat_dict(cls, d)

    def replace(self, **kw: Any) -> "UNetConfig":
        return replace(self, **kw)


UNET_PRESETS: dict[str, dict[str, Any]] = {
    # SD1.5 geometry (random init; spatial weights load from SD1.5, temporal ones from AnimateDiff).
    "sd15": dict(),
    # Shipped reference model: 128x128 images -> 32x32 latents; spatial attention and temporal / view
    # modules at 16x16, 8x8 and mid (at 32x32 they would cost 5x the spatial UNet on a CPU).
    "tiny": dict(block_channels=(32, 64, 128), layers_per_block=1, attention_levels=(False, True, True),
                 head_dim=32, cross_attention_dim=128, norm_groups=8, temporal_attentions=1,
                 motion_levels=(False, True, True), flame_widths=(16, 32, 64)),
}


@dataclass(frozen=True)
class Stage2Config:
    """FLAME2Video model (``models/stage2.py``): autoencoder + FLAME encoder + UNets + image embedder.

    ``image_size`` (square, pixels), ``views`` and ``frames`` are the training / default sampling shape.
    Diffusion: ``train_timesteps`` steps of a ``beta_schedule`` between ``beta_start`` and
    ``beta_end`` (SD's scaled-linear 0.00085 .. 0.012 by default). ``prediction``: ``"v_prediction"``
    for models trained here from scratch ("tiny": stable targets at every noise level and the usual
    choice for few-step distillation), ``"epsilon"`` for "sd15" (what SD1.5's spatial weights were
    trained to predict). ``guidance`` is the default image-guidance scale (1 = off); ``cond_drop`` the
    training probability of dropping the reference (null image tokens and no reference attention).
    ``image_tokens`` (a square number) tokens of width ``unet.cross_attention_dim`` come from the
    image embedder, a small conv net of width ``image_embed_width`` on the reference latent.
    """

    autoencoder: AutoencoderConfig = AutoencoderConfig()
    unet: UNetConfig = UNetConfig()
    image_size: int = 512
    views: int = 4
    frames: int = 8
    train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "epsilon"
    guidance: float = 3.5
    cond_drop: float = 0.1
    image_tokens: int = 16
    image_embed_width: int = 256

    def __post_init__(self):
        owner = "Stage2Config"
        if not isinstance(self.autoencoder, AutoencoderConfig) or not isinstance(self.unet, UNetConfig):
            raise TypeError(f"{owner}.autoencoder / .unet must be AutoencoderConfig / UNetConfig instances")
        _positive_ints(owner, self, ("image_size", "views", "frames", "train_timesteps", "image_tokens",
                                     "image_embed_width"))
        if self.beta_schedule not in ("linear", "scaled_linear", "cosine"):
            raise ValueError(f"{owner}.beta_schedule must be linear, scaled_linear or cosine, got {self.beta_schedule!r}")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"{owner}.prediction must be 'epsilon' or 'v_prediction', got {self.prediction!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"{owner}.cond_drop must be in [0, 1), got {self.cond_drop}")
        ae, un = self.autoencoder, self.unet
        if un.in_channels != ae.latent_channels or un.out_channels != ae.latent_channels:
            raise ValueError(f"{owner}: UNet in/out channels ({un.in_channels}/{un.out_channels}) must equal the "
                             f"autoencoder's latent channels ({ae.latent_channels})")
        stages = ae.factor.bit_length() - 1
        if len(un.flame_widths) != stages + 1:
            raise ValueError(f"{owner}: the FLAME encoder needs {stages + 1} widths for the autoencoder's "
                             f"{ae.factor}x factor ({stages} stride-2 stages), got {un.flame_widths}")
        unit = ae.factor * un.downsample
        if self.image_size % unit:
            raise ValueError(f"{owner}.image_size {self.image_size} must be a multiple of {unit} "
                             f"(autoencoder {ae.factor}x times UNet {un.downsample}x)")
        if self.frames > un.max_frames:
            raise ValueError(f"{owner}.frames {self.frames} exceeds unet.max_frames {un.max_frames}")
        g = int(round(self.image_tokens ** 0.5))
        latent = self.image_size // ae.factor
        if g * g != self.image_tokens or latent % g:
            raise ValueError(f"{owner}.image_tokens {self.image_tokens} must be a square g*g with g dividing the "
                             f"latent size {latent}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.factor

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Stage2Config":
        if name not in STAGE2_PRESETS:
            raise ValueError(f"unknown stage-2 preset {name!r}; expected one of {', '.join(STAGE2_PRESETS)}")
        p = dict(STAGE2_PRESETS[name])
        p["autoencoder"] = AutoencoderConfig.from_name(p["autoencoder"])
        p["unet"] = UNetConfig.from_name(p["unet"])
        return cls(**{**p, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Stage2Config":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Stage2Config fields {sorted(unknown)}")
        if isinstance(d.get("autoencoder"), dict):
            d["autoencoder"] = AutoencoderConfig.from_dict(d["autoencoder"])
        if isinstance(d.get("unet"), dict):
            d["unet"] = UNetConfig.from_dict(d["unet"])
        return cls(**d)

    def replace(self, **kw: Any) -> "Stage2Config":
        return replace(self, **kw)


STAGE2_PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(autoencoder="sd", unet="sd15", image_size=512, prediction="epsilon", guidance=3.5,
                 image_tokens=16, image_embed_width=256),
    "tiny": dict(autoencoder="tiny", unet="tiny", image_size=128, prediction="v_prediction", guidance=2.0,
                 image_tokens=16, image_embed_width=64),
}
