"""KL autoencoder (Stable Diffusion's VAE geometry; Rombach et al. 2022) for stage 2.

Encoder (widths ``block_out``, ``L = layers_per_block``, groups ``norm_groups``, GroupNorm eps 1e-6)::

    image (N, 3, H, W) in [-1, 1] -> conv_in                              (N, c0, H, W)
    per level i: L ResnetBlocks (no time embedding) -> stride-2 conv with (0,1,0,1) padding
                 (all levels but the last)                               (N, c_last, H/f, W/f)
    mid: ResnetBlock -> single-head self-attention (if ``mid_attention``) -> ResnetBlock
    GroupNorm-SiLU-conv_out -> quant_conv (1x1)                           (N, 2 z, H/f, W/f)
    mean, logvar = split; logvar clamped to [-30, 20]

Decoder: post_quant_conv (1x1) -> conv_in -> mid -> per level (reversed widths) L + 1 ResnetBlocks,
nearest 2x + conv (all but the last) -> GroupNorm-SiLU-conv_out -> (N, 3, H, W), not clamped.

``encode`` returns the latents the UNet works on: ``(z - shift_factor) * scaling_factor`` with z the
posterior mean (or a sample with ``sample=True``); ``decode`` undoes the scaling first. Module names
follow diffusers' AutoencoderKL up to a rename table (``models/convert.py``), so SD VAE weights load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mvportrait.config import AutoencoderConfig
from mvportrait.models.unet_blocks import Downsample, ResnetBlock, Upsample

__all__ = ["Autoencoder"]

_EPS = 1e-6


class MidAttention(nn.Module):
    """Single-head self-attention over the h*w positions with a residual (the VAE's mid block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
        o = F.scaled_dot_product_attention(self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None])
        o = self.to_out(o[:, 0])  # (N, hw, C)
        return o.transpose(1, 2).reshape(n, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, None, groups, _EPS) for _ in range(2)])
        self.attention = MidAttention(channels, groups) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class CoderLevel(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.resample: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for res in self.resnets:
            x = res(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_out, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        cur = ch[0]
        for i, c in enumerate(ch):
            level = CoderLevel()
            for _ in range(cfg.layers_per_block):
                level.resnets.append(ResnetBlock(cur, c, None, g, _EPS))
                cur = c
            if i < len(ch) - 1:
                level.resample = Downsample(c, asymmetric=True)
            self.down_blocks.append(level)
        self.mid = MidBlock(cur, g, cfg.mid_attention)
        self.norm_out = nn.GroupNorm(g, cur, eps=_EPS)
        self.conv_out = nn.Conv2d(cur, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2 z, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out)), cfg.norm_groups
        cur = ch[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cur, 3, padding=1)
        self.mid = MidBlock(cur, g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            level = CoderLevel()
            for _ in range(cfg.layers_per_block + 1):
                level.resnets.append(ResnetBlock(cur, c, None, g, _EPS))
                cur = c
            if i < len(ch) - 1:
                level.resample = Upsample(c)
            self.up_blocks.append(level)
        self.norm_out = nn.GroupNorm(g, cur, eps=_EPS)
        self.conv_out = nn.Conv2d(cur, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 3, H, W)


class Autoencoder(nn.Module):
    """``encode`` images -> scaled latents, ``decode`` scaled latents -> images; see the module docstring."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def factor(self) -> int:
        return self.cfg.factor

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.cfg.in_channels, self.cfg.factor
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images must have shape (N, {c}, H, W), got {tuple(getattr(images, 'shape', ()))}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of the autoencoder factor {f}, got "
                             f"{images.shape[2]}x{images.shape[3]}")

    def encode_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (N, z, H/f, W/f), unscaled."""
        self._check_images(images)
        moments = self.quant_conv(self.encoder(images))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, z, H/f, W/f): posterior mean, or a sample."""
        mean, logvar = self.encode_dist(images)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, z, h, w) -> images (N, 3, h*f, w*f), about [-1, 1] (not clamped)."""
        z = self.cfg.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != z:
            raise ValueError(f"latents must have shape (N, {z}, h, w), got {tuple(getattr(latents, 'shape', ()))}")
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.decoder(self.post_quant_conv(z))

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, (N,)."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
