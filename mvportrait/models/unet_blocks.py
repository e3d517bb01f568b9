"""Building blocks of the stage-2 UNets and the autoencoder (plain PyTorch, SD / AnimateDiff geometry).

Activations are channels-first images ``(N, C, h, w)`` with views and frames folded into the batch
(``N = B * V * F``, row ``(b * V + v) * F + f``) everywhere except inside :class:`AxisTransformer`,
which sees the same memory as ``(B, V, F, h*w, C)`` and attends along views or frames with
:func:`mvportrait.kernels.axis_attention.axis_attention`. On CUDA in eager inference the
GroupNorm(-SiLU) of ResnetBlock, SpatialTransformer, AxisTransformer (and the UNet's output head)
runs as one fused Triton kernel, :func:`mvportrait.kernels.group_norm.group_norm` (see ``_norm_act``).

Blocks and the diffusers modules whose weights they take (``models/convert.py`` holds the name
table; leaf names here are ours):

=====================  ======================================  ========================================
ours                   diffusers / AnimateDiff                  math
=====================  ======================================  ========================================
ResnetBlock            ResnetBlock2D                            GN-SiLU-conv (+ temb) GN-SiLU-conv + skip
Downsample / Upsample  Downsample2D / Upsample2D                stride-2 conv / nearest 2x + conv
Attention              Attention (attn1 / attn2, VAE mid attn)  softmax(QK^T/sqrt(d))V, heads
FeedForward            FeedForward (GEGLU)                      W2 (a * gelu(g)), [a; g] = W1 x
TransformerBlock       BasicTransformerBlock                    x += attn1(LN x | ref), attn2(LN x, ctx), ff
SpatialTransformer     Transformer2DModel (conv proj_in/out)    GN, 1x1 conv, blocks, 1x1 conv, + x
AxisTransformer        TemporalTransformer3DModel (motion mod.)  GN, linear, axis blocks, linear (zero), + x
=====================  ======================================  ========================================

Reference attention (ReferenceNet, Hu et al. 2023 "Animate Anyone"): the self-attention of every
spatial :class:`TransformerBlock` may get extra key/value tokens from a reference image. They are
passed as a :class:`RefKV`: either the reference UNet's normed hidden states (projected here with
this block's ``to_k`` / ``to_v``) or keys/values already projected (see ``models/unet.py``,
``ReferenceCache``). A reference of batch ``R`` serves a sample batch ``G * R``: sample row ``b``
attends to reference row ``b % R`` (so a classifier-free-guidance batch ``[cond; uncond]`` reuses
one cache), and ``ref_mask`` (``(N,)`` bool, per folded row) switches the reference off for rows
where it is False.
"""
from __future__ import annotations

import math

from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mvportrait import envs
from mvportrait.kernels._triton import triton_available
from mvportrait.kernels.axis_attention import MAX_AXIS_LEN, axis_attention, axis_attention_ref
from mvportrait.kernels.group_norm import group_norm
from mvportrait.models.motion_denoiser import timestep_embedding

__all__ = ["ResnetBlock", "Downsample", "Upsample", "Attention", "FeedForward", "TransformerBlock",
           "SpatialTransformer", "AxisAttention", "AxisBlock", "AxisTransformer", "RefKV", "TimestepEmbedding",
           "axis_positions", "timestep_embedding"]


class RefKV(NamedTuple):
    """Reference tokens of one self-attention layer: ``hidden`` (R, Nr, C) normed hidden states, or
    ``key`` / ``value`` (R, Nr, C) already projected by the layer's ``to_k`` / ``to_v``."""

    hidden: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None


class TimestepEmbedding(nn.Module):
    """(B,) timesteps -> (B, 4 C0): sinusoid (cos | sin, as diffusers' flip_sin_to_cos) then an MLP."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        e = timestep_embedding(t, self.channels).to(dtype)  # (B, C0)
        return self.linear_2(F.silu(self.linear_1(e)))  # (B, 4 C0)


_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _norm_triton(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    """Whether :func:`_norm_act` may run the fused Triton GroupNorm on ``x``.

    Only for contiguous float32/float16/bfloat16 CUDA tensors with MVP_KERNELS auto (and triton
    installed) or triton, and only in plain eager inference: autograd (no backward), tracing / ONNX
    export, torch.compile (inductor fuses GroupNorm + SiLU itself), autocast (GroupNorm runs in
    float32 there) and channels_last inputs keep the modules' own ops, so those paths are unchanged.
    Also used by the autoencoder's ResnetBlocks.
    """
    if not x.is_cuda or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cuda") or not x.is_contiguous():
        return False
    if x.dtype not in _NORM_DTYPES or (norm.weight is not None and norm.weight.dtype not in _NORM_DTYPES):
        return False
    impl = envs.kernels()
    return impl == "triton" or (impl == "auto" and triton_available() and _norm_triton_pays(x))


# auto: the fused kernel from this many elements per channel on (H*W): on an H200 (bf16, session 9) it took
# (32, 320, 64, 64) from 0.268 to 0.184 ms but (32, 1280, 16, 16) from 0.096 to 0.148 ms (session 8: 0.086 vs
# 0.091); the crossover between 16^2 and 64^2 is not measured, so 32^2 keeps torch's kernels
NORM_TRITON_MIN_HW = 64 * 64


def _norm_triton_pays(x: torch.Tensor) -> bool:
    """Whether the fused GroupNorm is the faster choice for ``x`` (N, C, *spatial) (``MVP_KERNELS=auto``)."""
    return x.dim() >= 3 and math.prod(x.shape[2:]) >= NORM_TRITON_MIN_HW


def _norm_act(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True) -> torch.Tensor:
    """``F.silu(norm(x))`` (``norm(x)`` with ``silu=False``); one fused Triton kernel where
    :func:`_norm_triton` allows, else exactly the module calls."""
    if _norm_triton(norm, x):
        return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu, impl="triton")
    h = norm(x)
    return F.silu(h) if silu else h


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, + projected time embedding, GroupNorm-SiLU-conv3x3, + (1x1 conv) skip."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout) if temb else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(_norm_act(self.norm1, x))  # GroupNorm-SiLU, (N, Cout, h, w)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(_norm_act(self.norm2, h))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; ``asymmetric`` pads (0, 1, 0, 1) instead of 1 all round (SD's VAE)."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, length, c = x.shape
    return x.view(n, length, heads, c // heads).transpose(1, 2)  # (N, H, L, D)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)  # (N, L, C)


class Attention(nn.Module):
    """Multi-head attention over tokens ``(N, L, C)``; ``context_dim`` set: cross-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain self-attention, (N, L, C) -> (N, L, C)."""
        q, k, v = (_split_heads(p(x), self.heads) for p in (self.to_q, self.to_k, self.to_v))
        return self.to_out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))

    def cross(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (N, L, C) attends to context (B, Lc, Dc) with N = B * group (rows of one b share it)."""
        n, b = x.shape[0], context.shape[0]
        k = self.to_k(context)  # (B, Lc, C): projected once per batch element, not per folded row
        v = self.to_v(context)
        k = k[:, None].expand(b, n // b, *k.shape[1:]).reshape(n, *k.shape[1:])
        v = v[:, None].expand(b, n // b, *v.shape[1:]).reshape(n, *v.shape[1:])
        q, k, v = (_split_heads(t, self.heads) for t in (self.to_q(x), k, v))
        return self.to_out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))

    def project_reference(self, hidden: torch.Tensor) -> RefKV:
        """(R, Nr, C) reference hidden states -> keys / values of this layer."""
        return RefKV(key=self.to_k(hidden), value=self.to_v(hidden))

    def with_reference(self, x: torch.Tensor, ref: RefKV, group: int, ref_mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention of x (N, L, C) whose keys / values also hold the reference tokens.

        ``group`` = V * F rows per batch element; rows of batch element b use reference row b % R.
        """
        if ref.hidden is not None:
            ref = self.project_reference(ref.hidden)
        n, length, c = x.shape
        r, nr = ref.key.shape[0], ref.key.shape[1]
        g = n // (r * group)  # sample batch = g * R
        kv = []
        for proj, rt in ((self.to_k, ref.key), (self.to_v, ref.value)):
            own = proj(x).view(g, r, group, length, c)
            rt = rt.to(own.dtype)[None, :, None].expand(g, r, group, nr, c)
            kv.append(torch.cat([own, rt], dim=3).view(n, length + nr, c))  # (N, L + Nr, C)
        mask = None
        if ref_mask is not None:  # (N,) bool -> (N, 1, 1, L + Nr): own tokens always, reference where True
            mask = torch.cat([torch.ones(n, length, dtype=torch.bool, device=x.device),
                              ref_mask[:, None].expand(n, nr)], dim=1)[:, None, None, :]
        q, k, v = (_split_heads(t, self.heads) for t in (self.to_q(x), *kv))
        return self.to_out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class FeedForward(nn.Module):
    """GEGLU feed-forward (SD): ``proj_out(a * gelu(g))`` with ``[a; g] = proj_in(x)``, inner = 4 C."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention (+ reference K/V), cross-attention to image tokens, GEGLU FF."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, group: int = 1, ref_in: Iterator | None = None, ref_out: list | None = None,
                ref_mask: torch.Tensor | None = None):
        h = self.norm1(x)  # (N, L, C)
        if ref_out is not None:  # reference UNet: record the input of this self-attention
            ref_out.append(h)
        ref = next(ref_in) if ref_in is not None else None
        x = x + (self.attn1(h) if ref is None else self.attn1.with_reference(h, ref, group, ref_mask))
        x = x + self.attn2.cross(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, ``layers`` TransformerBlocks over the h*w tokens, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, layers: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(layers))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, group: int = 1, ref_in=None, ref_out=None, ref_mask=None):
        n, c, hh, ww = x.shape
        h = self.proj_in(_norm_act(self.norm, x, silu=False))
        h = h.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # (N, hw, C)
        for blk in self.blocks:
            h = blk(h, context, group, ref_in, ref_out, ref_mask)
        h = h.reshape(n, hh, ww, c).permute(0, 3, 1, 2).contiguous()  # (N, C, h, w)
        return x + self.proj_out(h)


def axis_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, dim) sinusoidal positions, sin / cos interleaved on the channels (AnimateDiff's layout)."""
    e = timestep_embedding(torch.arange(length, device=device), dim)  # (L, dim) = [cos | sin]
    half = dim // 2
    return torch.stack([e[:, half:2 * half], e[:, :half]], dim=-1).reshape(length, 2 * half).to(dtype)


def _axis_impl() -> str:
    """Kernel choice for axis attention: MVP_KERNELS, except where only the reference works.

    The Triton kernel has no backward and cannot be traced, so autograd and ONNX export use the
    PyTorch reference; so does torch.compile (inductor traced the kernel on an H200 but rejected its
    float scale argument as fp64, session 9: the kernel now casts, not yet re-tried under inductor);
    MVP_KERNELS=cpp has no C++ axis attention and means "best available".
    """
    impl = envs.kernels()
    if impl == "cpp":
        impl = "auto"
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling():
        impl = "ref"
    return impl


class AxisAttention(nn.Module):
    """Self-attention along the view or frame axis of (B, V, F, N, C) tokens (optionally with positions)."""

    def __init__(self, dim: int, heads: int, axis: str, positions: bool):
        super().__init__()
        self.heads, self.axis, self.positions = heads, axis, positions
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, nv, nf, n, c = x.shape
        if self.positions:  # frame positions, added to the normed tokens before q / k / v (AnimateDiff)
            x = x + axis_positions(nf, c, x.device, x.dtype)[None, None, :, None, :]
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # (B, V, F, N, C), no permute copies
        if x.shape[1 if self.axis == "view" else 2] > MAX_AXIS_LEN:
            o = axis_attention_ref(q, k, v, self.heads, self.axis)
        else:
            o = axis_attention(q, k, v, self.heads, self.axis, impl=_axis_impl())
        return self.to_out(o)


class AxisBlock(nn.Module):
    """``attentions`` pre-LN axis self-attentions, then a pre-LN GEGLU FF (AnimateDiff's block)."""

    def __init__(self, dim: int, heads: int, axis: str, attentions: int, positions: bool):
        super().__init__()
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(attentions))
        self.attns = nn.ModuleList(AxisAttention(dim, heads, axis, positions) for _ in range(attentions))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, attn in zip(self.attn_norms, self.attns):
            x = x + attn(norm(x))
        return x + self.ff(self.ff_norm(x))


class AxisTransformer(nn.Module):
    """Temporal (``axis="frame"``) or view (``axis="view"``) module on (B*V*F, C, h, w) activations.

    GroupNorm per image (as the original AnimateDiff motion module; diffusers' port normalises over
    all frames together), linear in, one :class:`AxisBlock`, linear out initialised to zero, residual:
    a fresh module is the identity, so adding it leaves the spatial model's output unchanged.
    """

    def __init__(self, channels: int, heads: int, axis: str, attentions: int, groups: int, positions: bool):
        super().__init__()
        if axis not in ("view", "frame"):
            raise ValueError(f"axis must be 'view' or 'frame', got {axis!r}")
        self.axis = axis
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList([AxisBlock(channels, heads, axis, attentions, positions)])
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, views: int, frames: int) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h = _norm_act(self.norm, x, silu=False).permute(0, 2, 3, 1)
        h = h.reshape(n // (views * frames), views, frames, hh * ww, c)
        h = self.proj_in(h)  # (B, V, F, hw, C)
        for blk in self.blocks:
            h = blk(h)
        h = self.proj_out(h).reshape(n, hh, ww, c).permute(0, 3, 1, 2)  # (N, C, h, w)
        return x + h  # x first: the sum keeps x's contiguous layout
