"""FLAME2Video model: every stage-2 network in one module, with its own checkpoint format.

Components (config :class:`~mvportrait.config.Stage2Config`):

- ``autoencoder``   :class:`~mvportrait.models.autoencoder.Autoencoder` images <-> scaled latents
- ``flame_encoder`` :class:`~mvportrait.models.flame_encoder.FlameEncoder` renders -> (C0, h, w) features
- ``unet``          :class:`~mvportrait.models.unet.MVUNet` the multi-view video denoiser
- ``reference_unet``:class:`~mvportrait.models.unet.ReferenceUNet` reference latent -> reference tokens
- ``image_embedder``:class:`ImageEmbedder` reference latent -> image tokens for cross-attention

Image embedding. The paper feeds CLIP image features to the cross-attention. No CLIP model ships
with the engine, so the image tokens come from :class:`ImageEmbedder`, a small conv net on the
reference *latent* (already computed, cheap) pooled to a g x g grid: (B, g*g, cross_attention_dim)
tokens plus learned grid positions and a LayerNorm. Anything else that yields (B, L, D) tokens (a
CLIP vision tower with a projection) can replace ``ReferenceContext.image_tokens``. Its learned
``null_tokens`` are the unconditional input.

Guidance. :meth:`FLAME2VideoModel.denoise` with ``guidance=s`` runs one batched call on
``[cond; uncond]`` and returns ``uncond + s (cond - uncond)``, where the unconditional half has the
null image tokens and ignores the reference (``reference_mask`` False); both halves keep the FLAME
features, so guidance pushes towards the reference's appearance, not the motion. Training drops the
reference with probability ``config.cond_drop`` in the same way.

Checkpoint (``save_pretrained`` / ``from_pretrained``): a folder with ``model.safetensors`` (every
weight, keys prefixed by component, in the saved dtype) and ``config.json`` (``format``, the
``Stage2Config`` dict, dtype, parameter counts); both written atomically. Loading builds the model
on the meta device, checks keys and shapes against the config, and fills it from the file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mvportrait.config import Stage2Config
from mvportrait.fileio import read_checkpoint_meta, write_checkpoint
from mvportrait.models.autoencoder import Autoencoder
from mvportrait.models.flame_encoder import FlameEncoder
from mvportrait.models.students import distill_info, overlay, teacher_path
from mvportrait.models.unet import MVUNet, ReferenceCache, ReferenceUNet

log = logging.getLogger(__name__)

__all__ = ["ImageEmbedder", "ReferenceContext", "FLAME2VideoModel", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "mvportrait.stage2/1"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ImageEmbedder(nn.Module):
    """Reference latent (B, C, h, w) -> image tokens (B, tokens, dim); see the module docstring.

    conv 3x3 (C -> width) - SiLU - conv 3x3 - SiLU - conv 1x1 (width -> dim) - average pool to a
    g x g grid (g = sqrt(tokens), must divide h and w) - flatten - + grid positions - LayerNorm.
    """

    def __init__(self, latent_channels: int, dim: int, tokens: int, width: int):
        super().__init__()
        g = int(round(tokens ** 0.5))
        if g * g != tokens:
            raise ValueError(f"tokens must be a square number, got {tokens}")
        self.grid, self.latent_channels = g, latent_channels
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.proj = nn.Conv2d(width, dim, 1)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.null_tokens = nn.Parameter(torch.zeros(tokens, dim))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        c, g = self.latent_channels, self.grid
        if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[1] != c:
            raise ValueError(f"latent must have shape (B, {c}, h, w), got {tuple(getattr(latent, 'shape', ()))}")
        if latent.shape[2] % g or latent.shape[3] % g:
            raise ValueError(f"latent height and width must be multiples of the {g}x{g} token grid, got "
                             f"{latent.shape[2]}x{latent.shape[3]}")
        h = self.proj(F.silu(self.conv_mid(F.silu(self.conv_in(latent)))))  # (B, D, h, w)
        h = F.adaptive_avg_pool2d(h, g).flatten(2).transpose(1, 2)  # (B, g*g, D)
        return self.norm(h + self.pos.to(h.dtype))

    def null(self, batch: int) -> torch.Tensor:
        """(batch, tokens, dim) unconditional tokens."""
        return self.null_tokens[None].expand(batch, *self.null_tokens.shape)


@dataclass
class ReferenceContext:
    """Everything computed once per reference image (prepare once, stream many).

    ``latent`` (B, C, h, w) scaled reference latent; ``image_tokens`` / ``null_tokens`` (B, L, D);
    ``cache`` the projected :class:`ReferenceCache` for the denoising UNet.
    """

    latent: torch.Tensor
    image_tokens: torch.Tensor
    null_tokens: torch.Tensor
    cache: ReferenceCache

    @property
    def batch_size(self) -> int:
        return self.latent.shape[0]

    def to(self, device=None, dtype=None) -> "ReferenceContext":
        mv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return ReferenceContext(mv(self.latent), mv(self.image_tokens), mv(self.null_tokens),
                                self.cache.to(device, dtype))


class FLAME2VideoModel(nn.Module):
    """The stage-2 networks; see the module docstring."""

    def __init__(self, config: Stage2Config):
        super().__init__()
        if not isinstance(config, Stage2Config):
            raise TypeError(f"config must be a Stage2Config, got {type(config).__name__}")
        self.config = config
        ae, un = config.autoencoder, config.unet
        self.autoencoder = Autoencoder(ae)
        self.flame_encoder = FlameEncoder(un.flame_channels, un.block_channels[0], un.flame_widths, ae.factor)
        self.unet = MVUNet(un)
        self.reference_unet = ReferenceUNet(un)
        self.image_embedder = ImageEmbedder(ae.latent_channels, un.cross_attention_dim, config.image_tokens,
                                            config.image_embed_width)
        self.distill: dict | None = None  # the "distill" object of a consistency student's checkpoint

    @classmethod
    def from_name(cls, preset: str, **overrides) -> "FLAME2VideoModel":
        return cls(Stage2Config.from_name(preset, **overrides))

    # ------------------------------------------------------------------------------ sizes
    def param_counts(self) -> dict[str, int]:
        n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        counts = {
            "autoencoder": n(self.autoencoder.parameters()),
            "flame_encoder": n(self.flame_encoder.parameters()),
            "image_embedder": n(self.image_embedder.parameters()),
            "unet_spatial": n(self.unet.spatial_parameters()),
            "unet_temporal": n(self.unet.temporal_parameters()),
            "unet_view": n(self.unet.view_parameters()),
            "reference_unet": n(self.reference_unet.parameters()),
        }
        counts["unet"] = counts["unet_spatial"] + counts["unet_temporal"] + counts["unet_view"]
        counts["total"] = n(self.parameters())
        return counts

    def latent_shape(self, batch: int, views: int | None = None, frames: int | None = None,
                     image_size: int | None = None) -> tuple[int, ...]:
        """(B, V, F, C, h, w) of the latents for ``image_size`` images (defaults from the config)."""
        cfg = self.config
        s = (image_size or cfg.image_size) // cfg.autoencoder.factor
        return (batch, views or cfg.views, frames or cfg.frames, cfg.autoencoder.latent_channels, s, s)

    # --------------------------------------------------------------------------- inference
    def prepare_reference(self, ref_images: torch.Tensor) -> ReferenceContext:
        """(B, 3, H, W) reference images in [-1, 1] -> latent, image tokens and projected reference cache.

        Run once per identity (under ``torch.inference_mode()`` for inference); the result serves every
        denoising step, view and frame."""
        latent = self.autoencoder.encode(ref_images)  # (B, C, h, w)
        tokens = self.image_embedder(latent)  # (B, L, D)
        hidden = self.reference_unet(latent, tokens)
        cache = self.unet.build_reference_cache(hidden)
        return ReferenceContext(latent, tokens, self.image_embedder.null(latent.shape[0]).to(tokens.dtype), cache)

    def encode_renders(self, renders: torch.Tensor) -> torch.Tensor:
        """(B, V, F, Cin, H, W) FLAME renders -> (B, V, F, C0, H/f, W/f) features for the UNet."""
        if not isinstance(renders, torch.Tensor) or renders.dim() != 6:
            raise ValueError(f"renders must have shape (B, V, F, {self.flame_encoder.in_channels}, H, W), got "
                             f"{tuple(getattr(renders, 'shape', ()))}")
        b, nv, nf, c, hh, ww = renders.shape
        out = self.flame_encoder(renders.reshape(b * nv * nf, c, hh, ww))
        return out.reshape(b, nv, nf, *out.shape[1:])

    def denoise(self, latents: torch.Tensor, timestep, flame_features: torch.Tensor | None,
                ref_ctx: ReferenceContext, guidance: float | None = None) -> torch.Tensor:
        """One model call on noisy latents (B, V, F, C, h, w) -> model output of the same shape
        (``config.prediction``). ``guidance`` s (None or 1 = off) adds image guidance in one batched
        call (module docstring)."""
        if not isinstance(ref_ctx, ReferenceContext):
            raise TypeError(f"ref_ctx must be a ReferenceContext (from prepare_reference), got "
                            f"{type(ref_ctx).__name__}")
        b, r = latents.shape[0], ref_ctx.batch_size
        if b % r:
            raise ValueError(f"latent batch {b} must be a multiple of the reference batch {r}")
        tokens = ref_ctx.image_tokens
        if b != r:  # row i uses reference row i % r, as the reference cache does
            tokens = tokens.repeat(b // r, 1, 1)
        if guidance is None or float(guidance) == 1.0:
            return self.unet(latents, timestep, tokens, flame_features, ref_ctx.cache)
        null = ref_ctx.null_tokens[:1].expand(b, *tokens.shape[1:])
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and timestep.shape[0] != 1:  # (B,) -> (2B,)
            timestep = torch.cat([timestep, timestep])
        flame2 = None if flame_features is None else torch.cat([flame_features, flame_features])
        mask = torch.cat([torch.ones(b, dtype=torch.bool, device=latents.device),
                          torch.zeros(b, dtype=torch.bool, device=latents.device)])
        out = self.unet(torch.cat([latents, latents]), timestep, torch.cat([tokens, null]), flame2,
                        ref_ctx.cache, reference_mask=mask)
        cond, uncond = out.chunk(2)
        return uncond + float(guidance) * (cond - uncond)

    # -------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory, dtype: torch.dtype = torch.float16) -> Path:
        """Write ``model.safetensors`` (weights in ``dtype``) and ``config.json`` into ``directory``."""
        names = {v: k for k, v in _DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        meta = {"format": CHECKPOINT_FORMAT, "dtype": names[dtype], "config": self.config.to_dict(),
                "param_counts": self.param_counts()}
        folder = write_checkpoint(directory, state, meta, CONFIG_FILE, WEIGHTS_FILE)
        log.info("saved stage-2 model (%s) to %s", names[dtype], folder)
        return folder

    @classmethod
    def from_pretrained(cls, directory, *, device="cpu", dtype: torch.dtype = torch.float32) -> "FLAME2VideoModel":
        """Load a folder written by :meth:`save_pretrained`; eval mode, weights in ``dtype`` on ``device``."""
        from safetensors import safe_open

        folder = Path(directory)
        meta, cfg_path, w_path = read_checkpoint_meta(folder, CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_FORMAT,
                                                      "stage-2 checkpoint")
        if not isinstance(meta.get("config"), dict):
            raise ValueError(f"{cfg_path} has no 'config' object")
        config = Stage2Config.from_dict(meta["config"])
        info = distill_info(meta, cfg_path)
        if info is not None:
            return cls._student_from_pretrained(folder, meta, info, config, device=device, dtype=dtype)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        try:
            with safe_open(str(w_path), framework="pt", device="cpu") as f:
                loaded = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on bad files
            raise ValueError(f"{w_path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{w_path} does not match its config: {len(missing)} missing keys {missing[:5]}, "
                             f"{len(unexpected)} unexpected keys {unexpected[:5]}")
        bad = [f"{k}: {tuple(t.shape)} vs {expected[k]}" for k, t in loaded.items() if tuple(t.shape) != expected[k]]
        if bad:
            raise ValueError(f"{w_path}: {len(bad)} tensors have shapes the config does not give: {bad[:5]}")
        state = {k: t.to(device=device, dtype=dtype) for k, t in loaded.items()}
        model.load_state_dict(state, assign=True)
        return model.eval()

    @classmethod
    def _student_from_pretrained(cls, folder: Path, meta: dict, info: dict, config: Stage2Config, *, device,
                                 dtype) -> "FLAME2VideoModel":
        """A distilled student folder: its stored tensors (the denoising UNet) over the teacher it names
        (:mod:`mvportrait.models.students`); the config is the student's (guidance 1.0, folded)."""
        from safetensors.torch import load_file

        teacher = teacher_path(folder, info)
        if teacher.resolve() == folder.resolve():
            raise ValueError(f"{folder / CONFIG_FILE}: a student cannot be its own teacher")
        tmeta_path = teacher / CONFIG_FILE
        if tmeta_path.is_file() and distill_info(json.loads(tmeta_path.read_text())) is not None:
            raise ValueError(f"{folder}: teacher {teacher} is itself a student")
        model = cls.from_pretrained(teacher, device=device, dtype=dtype)
        if {k: v for k, v in model.config.to_dict().items() if k != "guidance"} != \
                {k: v for k, v in config.to_dict().items() if k != "guidance"}:
            raise ValueError(f"{folder}: the student's config differs from its teacher's ({teacher}) beyond guidance")
        w_path = folder / WEIGHTS_FILE
        if not w_path.is_file():
            raise FileNotFoundError(f"stage-2 student weights {w_path} are missing")
        try:
            tensors = load_file(str(w_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on bad files
            raise ValueError(f"{w_path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        overlay(model, tensors, w_path)
        model.config = config
        model.distill = info
        return model.eval()
