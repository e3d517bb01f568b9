"""The stage-1 denoiser: one MDM-style transformer over frames, used for both MotionDM and EmotionDM.

Per-frame vector ``x`` (B, T, D):

- MotionDM: global (3) + neck (3) + jaw (3) axis-angle radians = 9 numbers (``MOTION_DIM``).
- EmotionDM: FLAME expression coefficients (50 by default).

Network (Tevet et al. 2022, "Human Motion Diffusion Model", with the sizes of ``DenoiserConfig``)::

    x (normalised)      -> Linear(D, W)                                  (B, T, W)
    + sinusoidal frame positions
    c = time_mlp(sinusoid(t)) + text summary                             (B, W)
    tokens = [c ; frames + c]                                            (B, 1 + T, W)
    ``layers`` pre-norm layers, ``heads`` heads, GELU ``ff``:
        pooled: self-attention -> feed-forward          (nn.TransformerEncoderLayer)
        tokens: self-attention -> cross-attention to the words -> feed-forward
                                                        (nn.TransformerDecoderLayer, memory = words)
    -> LayerNorm -> Linear(W, D) on the T frame tokens                   (B, T, D)

Text conditioning (``cfg.text_cond``):

- ``"pooled"``: the sentence embedding (B, text_dim) is projected to W and is the text summary: it
  is added to the timestep embedding, which is both prepended as an extra token (MDM) and added to
  every frame token (so a one-layer model sees it before its only attention).
- ``"tokens"``: the encoder's token features (B, L, text_dim) with their mask (B, L) (True = real
  token) are projected to W and layer-normed into the cross-attention memory (B, L, W); the text
  summary is the masked mean of that memory. Padding tokens are masked out of the cross-attention
  and the mean, so padding a caption to any length leaves the output unchanged. This lets the
  network read word order ("nods, then turns left"), counts ("twice") and modifiers that a single
  pooled vector blurs.

Classifier-free guidance: during training the text of a ``cond_drop`` fraction of the batch is
replaced by a learned null embedding ``null_text`` (text_dim): in ``"pooled"`` mode it replaces the
vector, in ``"tokens"`` mode it becomes a one-token caption (every other position masked). Sampling
uses :meth:`MotionDenoiser.null` as the unconditional input.

Output: with ``prediction="sample"`` (the presets' default) the network predicts the clean x0
(MDM); with ``"v_prediction"`` it predicts v and x0 is read as ``sqrt(a_t) x_t - sqrt(1 - a_t) v``
(an x0 prediction with a noise-level-dependent skip connection from x_t, so low-noise denoising is
nearly the identity); with ``"epsilon"`` the noise. The loss is on the implied x0 in every case::

    L = mean((x0_hat - x0)^2) + velocity_weight * mean((dx0_hat - dx0)^2),   d = frame difference

Normalisation: per-channel ``mean`` / ``std`` of the training corpus live in buffers (saved with the
weights); the network works in normalised units, ``normalize`` / ``denormalize`` convert.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mvportrait.config import DenoiserConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal features (cos | sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def frame_positions(frames: int, dim: int, device=None) -> torch.Tensor:
    """(frames, dim) sinusoidal frame-position encoding."""
    return timestep_embedding(torch.arange(frames, device=device), dim)


def smooth_frames(x: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Centred moving average over frames (dim -2) with edge replication; ``window`` odd, 1 = identity."""
    if window <= 1:
        return x
    if window % 2 == 0:
        raise ValueError(f"smoothing window must be odd, got {window}")
    r = window // 2
    shape = x.shape
    y = x.reshape(-1, shape[-2], shape[-1]).transpose(1, 2)  # (N, D, T)
    y = F.pad(y, (r, r), mode="replicate")
    y = F.avg_pool1d(y, window, stride=1)
    return y.transpose(1, 2).reshape(shape)


def diffusion_loss(pred_x0: torch.Tensor, x0: torch.Tensor, velocity_weight: float = 0.5) -> dict:
    """``L_simple = mean((pred - x0)^2)``, ``L_velocity = mean((diff(pred) - diff(x0))^2)`` over frames."""
    simple = F.mse_loss(pred_x0, x0)
    vel = F.mse_loss(pred_x0[:, 1:] - pred_x0[:, :-1], x0[:, 1:] - x0[:, :-1])
    return {"loss": simple + velocity_weight * vel, "simple": simple, "velocity": vel}


class MotionDenoiser(nn.Module):
    """MotionDM / EmotionDM network; ``forward(x_t, t, text, mask) -> prediction`` in normalised units.

    ``text`` is (B, text_dim) pooled embeddings for a ``"pooled"`` model, or (B, L, text_dim) token
    features with ``mask`` (B, L) bool for a ``"tokens"`` model.
    """

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.input_proj = nn.Linear(cfg.in_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.text_proj = nn.Linear(cfg.text_dim, w)
        self.null_text = nn.Parameter(torch.zeros(cfg.text_dim))
        if cfg.text_cond == "tokens":
            self.text_norm = nn.LayerNorm(w)
            layer = nn.TransformerDecoderLayer(w, cfg.heads, cfg.ff, cfg.dropout, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.decoder = nn.TransformerDecoder(layer, cfg.layers)
        else:
            layer = nn.TransformerEncoderLayer(w, cfg.heads, cfg.ff, cfg.dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(w)
        self.output_proj = nn.Linear(w, cfg.in_dim)
        self.register_buffer("mean", torch.zeros(cfg.in_dim))
        self.register_buffer("std", torch.ones(cfg.in_dim))
        self.register_buffer("pos", frame_positions(cfg.max_frames, w), persistent=False)

    # ---------------------------------------------------------------------------- data
    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor, floor: float = 1e-4) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp(min=floor))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    @property
    def uses_tokens(self) -> bool:
        return self.cfg.text_cond == "tokens"

    def drop_text(self, text: torch.Tensor, mask: torch.Tensor | None = None, *, p: float | None = None,
                  generator: torch.Generator | None = None):
        """Classifier-free-guidance dropout: each caption becomes the null caption with probability ``p``.

        Pooled: ``text`` (B, text_dim) -> (B, text_dim). Tokens: ``text`` (B, L, text_dim) and ``mask``
        (B, L) -> ``(tokens, mask)``, where a dropped row holds ``null_text`` at position 0 and only that
        position is unmasked.
        """
        p = self.cfg.cond_drop if p is None else p
        if self.uses_tokens and mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if p <= 0:
            return text if mask is None else (text, mask)
        drop = torch.rand(text.shape[0], generator=generator, device=text.device) < p  # (B,)
        if mask is None:
            return torch.where(drop[:, None], self.null_text.to(text.dtype).expand_as(text), text)
        null_tokens, null_mask = self.null(text.shape[0], text.shape[1])
        tokens = torch.where(drop[:, None, None], null_tokens.to(text.dtype), text)
        return tokens, torch.where(drop[:, None], null_mask.to(mask.device), mask)

    def null(self, batch: int = 1, length: int = 1):
        """Unconditional text input: (batch, text_dim) for a pooled model; ``(tokens, mask)`` of
        (batch, length, text_dim) / (batch, length) for a tokens model (null token first, rest masked)."""
        if not self.uses_tokens:
            return self.null_text[None].expand(batch, -1)
        tokens = torch.zeros(batch, max(1, length), self.cfg.text_dim, device=self.null_text.device,
                             dtype=self.null_text.dtype)
        tokens[:, 0] = self.null_text
        mask = torch.zeros(batch, max(1, length), dtype=torch.bool, device=self.null_text.device)
        mask[:, 0] = True
        return tokens, mask

    # ------------------------------------------------------------------------- network
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, T, D) normalised, t (B,) int timesteps, text (B, text_dim) or (B, L, text_dim) with
        mask (B, L) bool (True = real token) -> (B, T, D)."""
        b, frames, d = x_t.shape
        if d != self.cfg.in_dim:
            raise ValueError(f"expected {self.cfg.in_dim} channels per frame, got {d}")
        want = 3 if self.uses_tokens else 2
        if text.dim() != want:
            raise ValueError(f"a {self.cfg.text_cond!r} model takes text of {want} dims "
                             f"({'(B, L, text_dim) tokens + mask' if want == 3 else '(B, text_dim)'}), "
                             f"got shape {tuple(text.shape)}")
        if frames > self.pos.shape[0]:
            pos = frame_positions(frames, self.cfg.width, x_t.device)
        else:
            pos = self.pos[:frames]
        c = self.time_mlp(timestep_embedding(t, self.cfg.width).to(x_t.dtype))  # (B, W)
        if self.uses_tokens:
            if mask is None:
                mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            if mask.shape != text.shape[:2]:
                raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(text.shape)}")
            mask = mask.to(torch.bool)
            memory = self.text_norm(self.text_proj(text.to(x_t.dtype)))  # (B, L, W)
            keep = mask[..., None].to(memory.dtype)
            c = c + (memory * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # masked mean (B, W)
        else:
            c = c + self.text_proj(text.to(x_t.dtype))
        h = self.input_proj(x_t) + pos.to(x_t.dtype) + c[:, None]  # (B, T, W)
        h = torch.cat([c[:, None], h], dim=1)  # (B, 1 + T, W)
        if self.uses_tokens:
            h = self.decoder(h, memory, memory_key_padding_mask=~mask)  # cross-attends to the real tokens
        else:
            h = self.encoder(h)
        return self.output_proj(self.out_norm(h[:, 1:]))  # (B, T, D)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["MotionDenoiser", "diffusion_loss", "smooth_frames", "timestep_embedding", "frame_positions"]
