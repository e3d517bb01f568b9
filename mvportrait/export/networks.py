"""Flat-signature views of the exportable networks: tensors in, tensors out, nothing else.

An exporter (ONNX, TensorRT) and a compiled graph need a ``forward`` whose arguments and results
are plain tensors. The networks themselves take dataclasses (``ReferenceCache``), optional
arguments and Python scalars, so each gets a thin wrapper here. The wrappers share the wrapped
module's weights (nothing is copied) and add no math of their own: a wrapper's output equals
what the pipeline computes with the module.

==================  =====================================================  =============================
wrapper             inputs                                                 outputs
==================  =====================================================  =============================
BertEncoderNet      ids (B, L) int64, mask (B, L) bool                     hidden (B, L, D)  (as is)
DenoiserNet         x_t (B, T, D), timestep (B,) f32, text (B, L, E),      out (B, T, D)
                    mask (B, L) bool -- or text (B, E) for a pooled model
FlameEncoder        renders (N, 5, H, W)                                   features (N, C0, H/f, W/f) (as is)
ReferenceNet        ref_latent (R, C, h, w)                                image_tokens (R, T, D),
                                                                           key_i, value_i (R, N_i, C_i)
UNetNet             sample (B, V, F, C, h, w), timestep (B,) f32,          out (B, V, F, C, h, w)
                    encoder_hidden_states (B, T, D), flame_features
                    (B, V, F, C0, h, w), reference_mask (B,) bool,
                    key_i..., value_i... (R, N_i, C_i)
VAEEncoderNet       images (N, 3, H, W)                                    latents (N, z, H/f, W/f)
VAEDecoderNet       latents (N, z, h, w)                                   images (N, 3, h*f, w*f)
==================  =====================================================  =============================
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mvportrait.models.autoencoder import Autoencoder
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.unet import ReferenceCache

__all__ = ["DenoiserNet", "ReferenceNet", "UNetNet", "VAEEncoderNet", "VAEDecoderNet", "TraceableMultiheadAttention",
           "replace_modules", "no_mha_fastpath"]


class TraceableMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first, packed q/k/v, no bias_k / zero-attn) in plain ops.

    The TorchScript tracer bakes the query length of ``nn.MultiheadAttention`` into a Reshape (an
    exported graph then fails at any other sequence length); this module computes the same thing
    with Linear + ``scaled_dot_product_attention`` on shapes taken from the inputs. It shares the
    wrapped module's parameters. ``key_padding_mask``: bool (True = ignore that key) or additive float.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("TraceableMultiheadAttention supports batch_first attention with packed q/k/v "
                             "weights and no bias_k / add_zero_attn")
        self.num_heads, self.embed_dim, self.batch_first = mha.num_heads, mha.embed_dim, True
        self._qkv_same_embed_dim = True  # read by nn.TransformerEncoderLayer's fast-path checks
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("TraceableMultiheadAttention takes no attn_mask / is_causal")
        b, e, h = query.shape[0], self.embed_dim, self.num_heads
        ws = self.in_proj_weight.chunk(3)
        bs = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (F.linear(x, w, bias).reshape(b, x.shape[1], h, e // h).transpose(1, 2)
                   for x, w, bias in zip((query, key, value), ws, bs))  # (B, H, L, D)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :]
            mask = ~mask if mask.dtype == torch.bool else mask.to(q.dtype)  # bool: True = attend for SDPA
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, D)
        return self.out_proj(o.transpose(1, 2).reshape(b, query.shape[1], e)), None


@contextlib.contextmanager
def no_mha_fastpath():
    """Turn off ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``'s fused inference path
    (it has no ONNX symbolic and reads the attention's weights directly)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def replace_modules(root: nn.Module, match: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``root`` where every submodule ``match`` accepts is replaced by ``make(sub)``.

    Only the modules on the paths to a replaced one are (shallowly) copied; all parameters and buffers
    are shared with ``root``, which is left unchanged."""
    if match(root):
        return make(root)
    new_children, changed = {}, False
    for name, child in root._modules.items():
        new = child if child is None else replace_modules(child, match, make)
        changed |= new is not child
        new_children[name] = new
    if not changed:
        return root
    clone = copy.copy(root)
    clone._modules = new_children
    return clone


class DenoiserNet(nn.Module):
    """MotionDM / EmotionDM with a float timestep: (x_t, timestep, text[, mask]) -> (B, T, D).

    Runs a copy of the model whose ``nn.MultiheadAttention`` modules are
    :class:`TraceableMultiheadAttention` (same weights, same math) so the export keeps dynamic
    batch, frame and token counts."""

    def __init__(self, model: MotionDenoiser):
        super().__init__()
        self.model = replace_modules(model, lambda m: isinstance(m, nn.MultiheadAttention),
                                     TraceableMultiheadAttention)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        with no_mha_fastpath():  # the fused encoder-layer kernel would bypass the traceable attention
            return self.model(x_t, timestep, text, mask)


class ReferenceNet(nn.Module):
    """Reference latent -> image tokens + the denoising UNet's projected reference keys / values.

    image embedder -> reference UNet (timestep 0) -> ``unet.build_reference_cache`` in one graph:
    everything ``FLAME2VideoModel.prepare_reference`` does after the autoencoder.
    """

    def __init__(self, image_embedder: nn.Module, reference_unet: nn.Module, unet: nn.Module):
        super().__init__()
        self.image_embedder, self.reference_unet, self.unet = image_embedder, reference_unet, unet

    def forward(self, ref_latent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = self.image_embedder(ref_latent)  # (R, T, D)
        cache = self.unet.build_reference_cache(self.reference_unet(ref_latent, tokens))
        return (tokens, *cache.tensors())  # keys..., values...


class UNetNet(nn.Module):
    """The denoising UNet with a flat reference cache and an explicit reference mask."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                flame_features: torch.Tensor, reference_mask: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        cache = ReferenceCache.from_tensors(kv, projected=True)
        return self.unet(sample, timestep, encoder_hidden_states, flame_features, cache,
                         reference_mask=reference_mask)


class VAEEncoderNet(nn.Module):
    """Images in [-1, 1] -> scaled latents (posterior mean), as ``Autoencoder.encode``."""

    def __init__(self, autoencoder: Autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images)


class VAEDecoderNet(nn.Module):
    """Scaled latents -> images (not clamped), as ``Autoencoder.decode``."""

    def __init__(self, autoencoder: Autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)
