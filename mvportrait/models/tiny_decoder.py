"""Tiny distilled latent decoder (TAESD-style; Bohan 2023): a drop-in for :meth:`Autoencoder.decode`.

Same contract as ``Autoencoder.decode``: scaled latents (N, z, h, w), as ``Autoencoder.encode``
returns them and the UNet produces them, -> images (N, 3, h*f, w*f) in [-1, 1] (clamped). It is
trained (``mvportrait.train.tiny_decoder``) to reproduce both the ground-truth images and the
full decoder's output, so it serves one autoencoder's latent space (the config records which).

Architecture (widths ``channels = (c_0, ..., c_S)``, ``S = log2(factor)`` upsamplings, ``blocks[i]``
residual blocks per stage; ReLU everywhere, no normalisation, no attention)::

    latents (N, z, h, w) -> 3 tanh(x / 3) (soft clamp of outliers) -> conv3x3 z->c_0, ReLU
    stage i: blocks[i] x [x + conv3x3(ReLU(conv3x3(x))), ReLU]                 (N, c_i, h 2^i, w 2^i)
             then (i < S) nearest 2x -> conv3x3 c_i->c_{i+1}, ReLU
    conv3x3 c_S->3 -> clamp(-1, 1)                                             (N, 3, h f, w f)

The shipped ``weights/stage2_student/tiny_decoder.*`` (factor 4, 4 latent channels, channels
(64, 32, 16), blocks (2, 1, 1)) has 196,739 parameters and does 0.92 GFLOP per 128x128 image
(2 x multiply-adds of the convolutions, :func:`conv_flops`) vs 1,614,999 parameters and 8.02 GFLOP
for the ``tiny`` autoencoder's full decoder (post_quant_conv + Decoder): 8.2x fewer parameters,
8.7x fewer FLOPs. For SD's 8x latents, channels (64, 64, 32, 16) / blocks (2, 1, 1, 1) is a
307,523-parameter decoder.

Checkpoint (``save_pretrained`` / ``from_pretrained``): a folder with ``tiny_decoder.safetensors``
(weights in the saved dtype, float16 by default) and ``tiny_decoder.json`` (``format``, ``dtype``,
``config``, ``param_count``, ``flops_128``, and a free-form ``info`` dict of training facts).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mvportrait.fileio import read_checkpoint_meta, write_checkpoint

__all__ = ["TinyDecoderConfig", "TinyDecoder", "conv_flops", "WEIGHTS_FILE", "CONFIG_FILE", "CHECKPOINT_FORMAT",
           "DEFAULT_WEIGHTS"]

log = logging.getLogger(__name__)

WEIGHTS_FILE, CONFIG_FILE = "tiny_decoder.safetensors", "tiny_decoder.json"
CHECKPOINT_FORMAT = "mvportrait.tiny_decoder/1"
# the shipped tiny decoder of the shipped stage-2 model, beside the stage-2 student
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "stage2_student"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Shape of a :class:`TinyDecoder`. ``factor`` is the autoencoder's spatial factor (a power of 2);
    ``channels`` and ``blocks`` have one entry per resolution, ``log2(factor) + 1`` of them."""

    latent_channels: int = 4
    factor: int = 4
    channels: tuple[int, ...] = (64, 32, 16)
    blocks: tuple[int, ...] = (2, 1, 1)
    out_channels: int = 3

    def __post_init__(self):
        for name in ("latent_channels", "factor", "out_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TinyDecoderConfig.{name} must be a positive int, got {v!r}")
        if self.factor & (self.factor - 1):
            raise ValueError(f"TinyDecoderConfig.factor must be a power of 2, got {self.factor}")
        for name in ("channels", "blocks"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
                raise ValueError(f"TinyDecoderConfig.{name} must be a tuple of ints, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        stages = self.stages
        if len(self.channels) != stages or len(self.blocks) != stages:
            raise ValueError(f"TinyDecoderConfig: factor {self.factor} needs {stages} stages, got channels "
                             f"{self.channels} and blocks {self.blocks}")
        if any(c < 1 for c in self.channels) or any(b < 0 for b in self.blocks):
            raise ValueError(f"TinyDecoderConfig: channels must be >= 1 and blocks >= 0, got {self.channels}, "
                             f"{self.blocks}")

    @property
    def stages(self) -> int:
        return int(math.log2(self.factor)) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyDecoderConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a TinyDecoderConfig needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown TinyDecoderConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class Block(nn.Module):
    """``ReLU(x + conv(ReLU(conv(x))))`` at a fixed width."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class TinyDecoder(nn.Module):
    """Scaled latents -> images in [-1, 1]; ``forward = decode``. See the module docstring."""

    def __init__(self, config: TinyDecoderConfig | None = None):
        super().__init__()
        cfg = config if config is not None else TinyDecoderConfig()
        self.config = cfg
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.stages = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, c in enumerate(ch):
            self.stages.append(nn.Sequential(*[Block(c) for _ in range(cfg.blocks[i])]))
            if i < len(ch) - 1:
                self.ups.append(nn.Conv2d(c, ch[i + 1], 3, padding=1))
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)
        self.info: dict = {}

    @property
    def factor(self) -> int:
        return self.config.factor

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, latents: torch.Tensor) -> None:
        z = self.config.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != z:
            raise ValueError(f"latents must have shape (N, {z}, h, w), got {tuple(getattr(latents, 'shape', ()))}")

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder without the final clamp (training uses it so that no gradient is cut)."""
        self._check(latents)
        x = F.relu(self.conv_in(3.0 * torch.tanh(latents / 3.0)))  # (N, c_0, h, w)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.ups):
                x = F.relu(self.ups[i](F.interpolate(x, scale_factor=2.0, mode="nearest")))  # (N, c_i+1, 2h, 2w)
        return self.conv_out(x)  # (N, 3, h f, w f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, z, h, w) -> images (N, 3, h*f, w*f) in [-1, 1]."""
        return self.decode_raw(latents).clamp(-1.0, 1.0)

    forward = decode

    # -------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory, dtype: torch.dtype = torch.float16, info: dict | None = None) -> Path:
        """Write ``tiny_decoder.safetensors`` (weights in ``dtype``) and ``tiny_decoder.json`` into ``directory``."""
        names = {v: k for k, v in _DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        cfg = self.config
        side = max(1, 128 // cfg.factor)
        meta = {"format": CHECKPOINT_FORMAT, "dtype": names[dtype], "config": cfg.to_dict(),
                "param_count": self.param_count(),
                "flops_128": conv_flops(TinyDecoder(cfg), (1, cfg.latent_channels, side, side)),
                "info": {**self.info, **(info or {})}}
        folder = write_checkpoint(directory, state, meta, CONFIG_FILE, WEIGHTS_FILE)
        log.info("saved tiny decoder (%s) to %s", names[dtype], folder)
        return folder

    @classmethod
    def from_pretrained(cls, directory, *, device="cpu", dtype: torch.dtype = torch.float32) -> "TinyDecoder":
        """Load a folder written by :meth:`save_pretrained`; eval mode, no gradients, weights in ``dtype``."""
        from safetensors.torch import load_file

        folder = Path(directory)
        meta, cfg_path, w_path = read_checkpoint_meta(folder, CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_FORMAT,
                                                      "tiny-decoder")
        try:
            cfg = TinyDecoderConfig.from_dict(meta.get("config"))
        except TypeError as e:
            raise ValueError(f"{cfg_path}: bad config: {e}") from e
        try:
            loaded = load_file(str(w_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on bad files
            raise ValueError(f"{w_path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{w_path} does not match {cfg_path}: {len(missing)} missing keys {missing[:5]}, "
                             f"{len(unexpected)} unexpected keys {unexpected[:5]}")
        bad = [f"{k}: {tuple(t.shape)} vs {expected[k]}" for k, t in loaded.items() if tuple(t.shape) != expected[k]]
        if bad:
            raise ValueError(f"{w_path}: {len(bad)} tensors have shapes the config does not give: {bad[:5]}")
        model.load_state_dict({k: t.to(torch.float32) for k, t in loaded.items()})
        model.info = dict(meta.get("info") or {})
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def conv_flops(module: nn.Module, input_shape: tuple[int, ...], call=None) -> int:
    """FLOPs (2 x multiply-adds) of every ``nn.Conv2d`` / ``nn.Linear`` in one call of ``module``
    (``call(module, x)``, default ``module(x)``) on a zero input of ``input_shape``; norms, activations
    and resampling are not counted (they are a few percent)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total[0] += 2 * k * out.numel()
        elif isinstance(m, nn.Linear):
            total[0] += 2 * m.in_features * out.numel()

    hs = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        p = next(module.parameters(), None)
        x = torch.zeros(input_shape, dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else "cpu")
        (call or (lambda m, t: m(t)))(module, x)
    finally:
        for h in hs:
            h.remove()
    return total[0]
