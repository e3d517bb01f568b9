"""FLAME encoder: multi-view FLAME renders -> features added to the UNet's first activation.

A small conv net in the style of AniPortrait's pose guider (Wei et al. 2024; itself after
ControlNet's conditioning embedding)::

    renders (N, Cin, H, W)          normal (3) + depth (1) + mask (1) by default
    conv_in 3x3 -> SiLU                                         (N, w0, H, W)
    per stage i: conv 3x3 (w_i -> w_i) -> SiLU, conv 3x3 stride 2 (w_i -> w_{i+1}) -> SiLU
    conv_out 3x3 (w_last -> C0), zero-initialised               (N, C0, H/f, W/f)

with ``log2(downsample)`` stages, so ``len(widths) == log2(downsample) + 1``. The zero-initialised
last conv makes a fresh encoder add nothing: the UNet starts out as the unconditioned model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FlameEncoder"]


class FlameEncoder(nn.Module):
    """renders (N, in_channels, H, W) -> (N, out_channels, H/downsample, W/downsample)."""

    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, ...], downsample: int):
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {downsample}")
        stages = downsample.bit_length() - 1
        widths = tuple(widths)
        if len(widths) != stages + 1:
            raise ValueError(f"downsample {downsample} needs {stages + 1} widths ({stages} stride-2 stages), "
                             f"got {widths}")
        self.in_channels, self.out_channels, self.downsample = in_channels, out_channels, downsample
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, renders: torch.Tensor) -> torch.Tensor:
        c, f = self.in_channels, self.downsample
        if not isinstance(renders, torch.Tensor) or renders.dim() != 4 or renders.shape[1] != c:
            raise ValueError(f"renders must have shape (N, {c}, H, W), got {tuple(getattr(renders, 'shape', ()))}")
        if renders.shape[2] % f or renders.shape[3] % f:
            raise ValueError(f"render height and width must be multiples of {f}, got "
                             f"{renders.shape[2]}x{renders.shape[3]}")
        h = F.silu(self.conv_in(renders))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)  # (N, C0, H/f, W/f)
