"""Stage-2 UNets: the multi-view video denoiser (:class:`MVUNet`) and the reference UNet.

Denoising UNet (SD geometry from :class:`~mvportrait.config.UNetConfig`), one call per step::

    sample (B, V, F, C, h, w) -> fold views and frames into the batch     (N = B*V*F, C, h, w)
    conv_in (+ FLAME features (B, V, F, C0, h, w), AniPortrait style)     (N, C0, h, w)
    temb = MLP(sinusoid(timestep)) per batch element, shared by its V*F rows
    down levels: per layer  ResnetBlock -> SpatialTransformer -> temporal module -> view module
                 (transformer only at ``attention_levels``), stride-2 conv between levels
    mid:         ResnetBlock -> SpatialTransformer -> temporal -> view -> ResnetBlock
    up levels:   per layer  concat skip -> ResnetBlock -> transformer -> temporal -> view; 2x up
    GroupNorm-SiLU-conv_out -> unfold                                     (B, V, F, C, h, w)

The spatial transformer's self-attention attends to the image's own tokens plus the reference
tokens of the same layer; cross-attention attends to ``encoder_hidden_states`` (B, L, D), the image
tokens of the reference (``models/stage2.py``, ``ImageEmbedder``). The temporal module attends along
frames at every (view, pixel) with sinusoidal frame positions, the view module along views at
every (frame, pixel); both call :func:`mvportrait.kernels.axis_attention.axis_attention` on the
(B, V, F, h*w, C) view of the activation (kernel choice from MVP_KERNELS; autograd, tracing and
axes longer than 32 use the PyTorch reference). Their output projections start at zero, so a
fresh module is the identity.

Reference path (ReferenceNet, "Animate Anyone"): :class:`ReferenceUNet` (same spatial layers, no
temporal / view modules, no FLAME input, no output head) runs once on the reference latent at
timestep 0 and records the normed hidden states entering each self-attention: a
:class:`ReferenceCache` of ``hidden`` tensors (B, h_l*w_l, C_l), one per self-attention layer of
the denoising UNet in forward order. :meth:`MVUNet.build_reference_cache` projects them with the
denoising UNet's own ``to_k`` / ``to_v`` once, giving a cache of ``keys`` / ``values``; every later
step, view and frame reuses those tensors (expanded over V*F inside the attention, never copied in
the cache). ``forward`` accepts either form: hidden states (projected on each call; what training
uses, so gradients reach the reference UNet) or projected keys / values (inference).

Staged training: :meth:`MVUNet.spatial_parameters` (train on V = F = 1), then
:meth:`~MVUNet.temporal_parameters`, then :meth:`~MVUNet.view_parameters`.

Everything is traceable: shapes come from the inputs, no ``.item()``, no branching on values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mvportrait.config import UNetConfig
from mvportrait.models.unet_blocks import (AxisTransformer, Downsample, RefKV, ResnetBlock, SpatialTransformer,
                                           TimestepEmbedding, TransformerBlock, Upsample, _norm_act)

__all__ = ["ReferenceCache", "MVUNet", "ReferenceUNet"]


# ------------------------------------------------------------------------------ reference cache
@dataclass
class ReferenceCache:
    """Reference tokens per self-attention layer of the denoising UNet, in forward order.

    Exactly one form is set: ``hidden`` (what :class:`ReferenceUNet` returns: the normed hidden states
    (R, N_l, C_l) entering each self-attention) or ``keys`` / ``values`` (R, N_l, C_l) already projected
    by the denoising UNet's ``to_k`` / ``to_v`` (:meth:`MVUNet.build_reference_cache`). A cache of
    batch R serves sample batches that are multiples of R (row b uses reference row b % R).
    """

    hidden: tuple[torch.Tensor, ...] | None = None
    keys: tuple[torch.Tensor, ...] | None = None
    values: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self):
        if (self.hidden is None) == (self.keys is None) or (self.keys is None) != (self.values is None):
            raise ValueError("ReferenceCache holds either hidden states or keys and values, not both or neither")
        for name in ("hidden", "keys", "values"):
            ts = getattr(self, name)
            if ts is None:
                continue
            ts = tuple(ts)
            object.__setattr__(self, name, ts)
            for t in ts:
                if not isinstance(t, torch.Tensor) or t.dim() != 3:
                    raise ValueError(f"ReferenceCache.{name}: every entry must be a (R, N, C) tensor, got "
                                     f"{getattr(t, 'shape', type(t).__name__)}")
            if ts and any(t.shape[0] != ts[0].shape[0] for t in ts):
                raise ValueError(f"ReferenceCache.{name}: every layer must have the same batch size")
        if self.keys is not None and (len(self.keys) != len(self.values) or any(
                k.shape != v.shape for k, v in zip(self.keys, self.values))):
            raise ValueError("ReferenceCache: keys and values must have one shape per layer")

    @property
    def projected(self) -> bool:
        """True when the cache holds keys / values (ready for the denoising UNet)."""
        return self.keys is not None

    @property
    def batch_size(self) -> int:
        ts = self.keys if self.projected else self.hidden
        return ts[0].shape[0] if ts else 0

    def __len__(self) -> int:
        return len(self.keys if self.projected else self.hidden)

    def layers(self) -> list[RefKV]:
        if self.projected:
            return [RefKV(key=k, value=v) for k, v in zip(self.keys, self.values)]
        return [RefKV(hidden=h) for h in self.hidden]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Flat tuple (hidden..., or keys..., values...) for export wrappers; inverse of :meth:`from_tensors`."""
        return self.hidden if not self.projected else self.keys + self.values

    @classmethod
    def from_tensors(cls, tensors, projected: bool) -> "ReferenceCache":
        tensors = tuple(tensors)
        if not projected:
            return cls(hidden=tensors)
        if len(tensors) % 2:
            raise ValueError(f"a projected cache needs keys and values: an even count, got {len(tensors)}")
        half = len(tensors) // 2
        return cls(keys=tensors[:half], values=tensors[half:])

    def to(self, device=None, dtype=None) -> "ReferenceCache":
        mv = lambda ts: None if ts is None else tuple(t.to(device=device, dtype=dtype) for t in ts)  # noqa: E731
        return ReferenceCache(mv(self.hidden), mv(self.keys), mv(self.values))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


# ------------------------------------------------------------------------------ network
class UNetLevel(nn.Module):
    """One resolution level: per layer a res block, then (optional) spatial transformer, temporal and
    view modules; ``resample`` is the stride-2 conv (down) or 2x upsampler (up) after the level."""

    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.temporal = nn.ModuleList()
        self.views = nn.ModuleList()
        self.resample: nn.Module | None = None

    def after_resnet(self, j: int, h, ctx: "_Context"):
        if len(self.attentions):
            h = self.attentions[j](h, ctx.context, ctx.group, ctx.ref_in, ctx.ref_out, ctx.ref_mask)
        if len(self.temporal):
            h = self.temporal[j](h, ctx.views, ctx.frames)
        if len(self.views):
            h = self.views[j](h, ctx.views, ctx.frames)
        return h


@dataclass
class _Context:
    """Per-call inputs every level needs (plain Python holder; not part of the module state)."""

    temb: torch.Tensor
    context: torch.Tensor
    views: int = 1
    frames: int = 1
    ref_in: Iterator | None = None
    ref_out: list | None = None
    ref_mask: torch.Tensor | None = None
    stop_after: int | None = None  # reference UNet: stop once this many self-attention inputs are recorded

    @property
    def group(self) -> int:
        return self.views * self.frames

    def done(self) -> bool:
        return self.stop_after is not None and len(self.ref_out) >= self.stop_after


class _SpatialUNet(nn.Module):
    """The SD-style UNet body shared by :class:`MVUNet` (``motion=True``) and :class:`ReferenceUNet`."""

    def __init__(self, cfg: UNetConfig, motion: bool, head: bool):
        super().__init__()
        self.cfg = cfg
        ch, n = cfg.block_channels, cfg.levels
        axes = cfg.motion_levels or (True,) * n
        c0, temb, groups, eps = ch[0], 4 * ch[0], cfg.norm_groups, cfg.norm_eps

        def add_layer(level: UNetLevel, cin: int, cout: int, attention: bool, with_axes: bool = True):
            level.resnets.append(ResnetBlock(cin, cout, temb, groups, eps))
            heads = cfg.heads_at(cout)
            if attention:
                level.attentions.append(SpatialTransformer(cout, heads, cfg.cross_attention_dim, groups,
                                                           cfg.transformer_layers))
            if motion and with_axes and cfg.temporal:
                level.temporal.append(AxisTransformer(cout, heads, "frame", cfg.temporal_attentions, groups, True))
            if motion and with_axes and cfg.view:
                level.views.append(AxisTransformer(cout, heads, "view", cfg.view_attentions, groups, False))

        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, temb)
        self.down_blocks = nn.ModuleList()
        skips, cur = [c0], c0
        for i in range(n):
            level = UNetLevel()
            for j in range(cfg.layers_per_block):
                add_layer(level, cur, ch[i], cfg.attention_levels[i], axes[i])
                cur = ch[i]
                skips.append(cur)
            if i < n - 1:
                level.resample = Downsample(cur)
                skips.append(cur)
            self.down_blocks.append(level)
        self.mid = UNetLevel()
        add_layer(self.mid, cur, cur, cfg.mid_attention)
        self.mid.resnets.append(ResnetBlock(cur, cur, temb, groups, eps))
        self.up_blocks = nn.ModuleList()
        for li in reversed(range(n)):
            level = UNetLevel()
            for j in range(cfg.layers_per_block + 1):
                add_layer(level, cur + skips.pop(), ch[li], cfg.attention_levels[li], axes[li])
                cur = ch[li]
            if li > 0:
                level.resample = Upsample(cur)
            self.up_blocks.append(level)
        if head:
            self.conv_norm_out = nn.GroupNorm(groups, c0, eps=eps)
            self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)

    # ----------------------------------------------------------------------------- structure
    def transformer_blocks(self) -> list[TransformerBlock]:
        """Spatial transformer blocks in forward order (one reference layer each)."""
        levels = [*self.down_blocks, self.mid, *self.up_blocks]
        return [blk for lv in levels for st in lv.attentions for blk in st.blocks]

    @property
    def num_reference_layers(self) -> int:
        return len(self.transformer_blocks())

    def reference_channels(self) -> list[int]:
        return [blk.norm1.normalized_shape[0] for blk in self.transformer_blocks()]

    # ------------------------------------------------------------------------------- forward
    def _timestep(self, timestep, batch: int, device) -> torch.Tensor:
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.as_tensor(timestep, device=device)
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be a scalar or have shape (1,) or ({batch},), got "
                             f"{tuple(timestep.shape)}")
        if timestep.dtype.is_complex or timestep.dtype == torch.bool:
            raise ValueError(f"timestep must be a real number tensor, got {timestep.dtype}")
        return timestep.to(device).reshape(-1).expand(batch)  # (B,)

    def _body(self, h: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """conv_in output (N, C0, h, w) -> last up level output (N, C0, h, w) (or early exit)."""
        skips = [h]
        for level in self.down_blocks:
            for j, res in enumerate(level.resnets):
                h = level.after_resnet(j, res(h, ctx.temb), ctx)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid.after_resnet(0, self.mid.resnets[0](h, ctx.temb), ctx)
        h = self.mid.resnets[1](h, ctx.temb)
        for level in self.up_blocks:
            for j, res in enumerate(level.resnets):
                if ctx.done():
                    return h
                h = level.after_resnet(j, res(torch.cat([h, skips.pop()], dim=1), ctx.temb), ctx)
            if level.resample is not None:
                h = level.resample(h)
        return h

    def _check_context(self, ehs, batch: int) -> None:
        d = self.cfg.cross_attention_dim
        if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3 or ehs.shape[0] != batch or ehs.shape[2] != d:
            raise ValueError(f"encoder_hidden_states must have shape ({batch}, L, {d}), got "
                             f"{tuple(getattr(ehs, 'shape', ()))}")

    def _check_latent_size(self, hh: int, ww: int) -> None:
        unit = self.cfg.downsample
        if hh % unit or ww % unit or hh < unit or ww < unit:
            raise ValueError(f"latent height and width must be positive multiples of {unit} (one factor 2 per "
                             f"down level), got {hh}x{ww}")


class MVUNet(_SpatialUNet):
    """Multi-view video denoising UNet; see the module docstring."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg, motion=True, head=True)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                flame_features: torch.Tensor | None = None, reference: ReferenceCache | None = None, *,
                reference_mask: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, V, F, C, h, w), timestep scalar or (B,), encoder_hidden_states (B, L, D),
        flame_features (B, V, F, C0, h, w) or None, reference cache or None -> (B, V, F, C, h, w).

        ``reference_mask`` (B,) bool: rows where False ignore the reference (classifier-free guidance's
        unconditional rows); None = every row uses it.
        """
        cfg = self.cfg
        if not isinstance(sample, torch.Tensor) or sample.dim() != 6 or sample.shape[3] != cfg.in_channels:
            raise ValueError(f"sample must have shape (B, V, F, {cfg.in_channels}, h, w), got "
                             f"{tuple(getattr(sample, 'shape', ()))}")
        b, nv, nf, c, hh, ww = sample.shape
        self._check_latent_size(hh, ww)
        if cfg.temporal and nf > cfg.max_frames:
            raise ValueError(f"{nf} frames exceed the temporal module's max_frames {cfg.max_frames}")
        self._check_context(encoder_hidden_states, b)
        c0 = cfg.block_channels[0]
        if flame_features is not None and tuple(flame_features.shape) != (b, nv, nf, c0, hh, ww):
            raise ValueError(f"flame_features must have shape {(b, nv, nf, c0, hh, ww)}, got "
                             f"{tuple(flame_features.shape)}")
        n = b * nv * nf
        ref_in = ref_mask = None
        if reference is not None:
            self._check_reference(reference, b)
            ref_in = iter(reference.layers())
            if reference_mask is not None:
                if not isinstance(reference_mask, torch.Tensor) or tuple(reference_mask.shape) != (b,):
                    raise ValueError(f"reference_mask must be a ({b},) bool tensor, got "
                                     f"{tuple(getattr(reference_mask, 'shape', ()))}")
                ref_mask = reference_mask.to(torch.bool)[:, None].expand(b, nv * nf).reshape(n)  # (N,)
        t = self._timestep(timestep, b, sample.device)
        temb = self.time_embedding(t, sample.dtype)  # (B, 4 C0)
        temb = temb[:, None].expand(b, nv * nf, temb.shape[-1]).reshape(n, -1)  # (N, 4 C0)
        ctx = _Context(temb, encoder_hidden_states.to(sample.dtype), nv, nf, ref_in, None, ref_mask)

        h = self.conv_in(sample.reshape(n, c, hh, ww))  # (N, C0, h, w)
        if flame_features is not None:
            h = h + flame_features.reshape(n, c0, hh, ww).to(h.dtype)
        h = self._body(h, ctx)
        h = self.conv_out(_norm_act(self.conv_norm_out, h))  # GroupNorm-SiLU, (N, C, h, w)
        return h.reshape(b, nv, nf, cfg.out_channels, hh, ww)

    def _check_reference(self, ref: ReferenceCache, batch: int) -> None:
        if not isinstance(ref, ReferenceCache):
            raise TypeError(f"reference must be a ReferenceCache, got {type(ref).__name__}")
        chans = self.reference_channels()
        if len(ref) != len(chans):
            raise ValueError(f"reference cache has {len(ref)} layers, this UNet has {len(chans)} self-attention "
                             "layers (was it built by a reference UNet of another config?)")
        r = ref.batch_size
        if r < 1 or batch % r:
            raise ValueError(f"sample batch {batch} must be a multiple of the reference batch {r}")
        for i, (kv, c) in enumerate(zip(ref.layers(), chans)):
            t = kv.hidden if kv.hidden is not None else kv.key
            if t.shape[2] != c:
                raise ValueError(f"reference layer {i} has {t.shape[2]} channels, expected {c}")

    def build_reference_cache(self, reference: ReferenceCache) -> ReferenceCache:
        """Hidden-state cache (from :class:`ReferenceUNet`) -> keys / values projected by this UNet's
        self-attentions. Run once per reference image; the result serves every step, view and frame."""
        if reference.projected:
            return reference
        self._check_reference(reference, reference.batch_size)
        kvs = [blk.attn1.project_reference(h) for blk, h in zip(self.transformer_blocks(), reference.hidden)]
        return ReferenceCache(keys=tuple(kv.key for kv in kvs), values=tuple(kv.value for kv in kvs))

    # ------------------------------------------------------------------------ parameter groups
    def _group(self, which: str) -> Iterator[nn.Parameter]:
        for name, p in self.named_parameters():
            kind = "temporal" if ".temporal." in name else "view" if ".views." in name else "spatial"
            if kind == which:
                yield p

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        """Everything but the temporal and view modules (stage-2 training step 1, on V = F = 1)."""
        return self._group("spatial")

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        return self._group("temporal")

    def view_parameters(self) -> Iterator[nn.Parameter]:
        return self._group("view")


class ReferenceUNet(_SpatialUNet):
    """Spatial UNet run once on the reference latent; returns the :class:`ReferenceCache` (hidden form).

    It stops as soon as the last self-attention input is recorded, so the weights after it (the rest of
    that transformer block and of the up path, see :meth:`unused_parameters`) get no gradient; they are
    kept so the layout equals the denoising UNet's spatial layout (and SD weights load 1:1).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg, motion=False, head=False)

    def forward(self, ref_latent: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep=None) -> ReferenceCache:
        """ref_latent (B, C, h, w) scaled latents, encoder_hidden_states (B, L, D), timestep (default 0)."""
        cfg = self.cfg
        if not isinstance(ref_latent, torch.Tensor) or ref_latent.dim() != 4 or ref_latent.shape[1] != cfg.in_channels:
            raise ValueError(f"ref_latent must have shape (B, {cfg.in_channels}, h, w), got "
                             f"{tuple(getattr(ref_latent, 'shape', ()))}")
        b, _, hh, ww = ref_latent.shape
        self._check_latent_size(hh, ww)
        self._check_context(encoder_hidden_states, b)
        t = torch.zeros(b, device=ref_latent.device) if timestep is None else timestep
        t = self._timestep(t, b, ref_latent.device)
        temb = self.time_embedding(t, ref_latent.dtype)  # (B, 4 C0)
        ctx = _Context(temb, encoder_hidden_states.to(ref_latent.dtype), ref_out=[],
                       stop_after=self.num_reference_layers)
        self._body(self.conv_in(ref_latent), ctx)
        return ReferenceCache(hidden=tuple(ctx.ref_out))

    def unused_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the early exit never reaches (freeze them in training)."""
        blocks = self.transformer_blocks()
        if not blocks:
            yield from self.parameters()
            return
        last = blocks[-1]
        used = {id(last.norm1.weight), id(last.norm1.bias)}
        seen_last = False
        for level in self.up_blocks:
            for j, res in enumerate(level.resnets):
                if seen_last:
                    yield from res.parameters()
                if len(level.attentions):
                    st = level.attentions[j]
                    if seen_last:
                        yield from st.parameters()
                    elif last in list(st.blocks):
                        seen_last = True
                        yield from (p for p in st.blocks[-1].parameters() if id(p) not in used)
                        yield from st.proj_out.parameters()
            if seen_last and level.resample is not None:
                yield from level.resample.parameters()
        if not seen_last:  # the last self-attention is the mid block's: the rest of mid and the up path
            st = self.mid.attentions[0]
            yield from (p for p in st.blocks[-1].parameters() if id(p) not in used)
            yield from st.proj_out.parameters()
            yield from self.mid.resnets[1].parameters()
            yield from self.up_blocks.parameters()
