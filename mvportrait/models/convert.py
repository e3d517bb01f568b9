"""Load diffusers-format weights into the stage-2 networks (name tables, shape checks, a report).

Sources, as a safetensors / ``.bin`` / ``.ckpt`` file (tensors only: ``torch.load(weights_only=True)``)
or an in-memory state dict:

- ``UNet2DConditionModel`` (SD1.5 layout, e.g. ``unet/diffusion_pytorch_model.safetensors``) onto the
  spatial weights of :class:`~mvportrait.models.unet.MVUNet` and all of
  :class:`~mvportrait.models.unet.ReferenceUNet` (:func:`load_diffusers_unet`);
- ``AutoencoderKL`` (SD VAE, current or legacy attention names) onto
  :class:`~mvportrait.models.autoencoder.Autoencoder` with the "sd" preset (:func:`load_diffusers_autoencoder`);
- AnimateDiff motion modules, original (``motion_modules.*.temporal_transformer.*``) or diffusers
  ``MotionAdapter`` layout, onto the temporal modules (:func:`load_animatediff_motion`). The
  sinusoidal position tables (``pos_encoder.pe`` / ``pos_embed.pe``) are not weights here: the
  temporal module computes the same table (sin / cos interleaved) for the frame count it sees, so
  they are reported as ``ignored``. Note one behavioural difference: our temporal GroupNorm is per
  frame (original AnimateDiff); diffusers' port normalises over all frames.

Each returns a :class:`ConversionReport` (matched / missing / unexpected / shape-mismatch / ignored).
Matched tensors are copied into the module (cast to its dtype); nothing else changes. 1x1-conv and
linear weights of the same size are interchangeable (SD2-style linear ``proj_in``; legacy VAE
attention convs). Original CompVis/LDM single-file checkpoints are refused with a clear message.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ConversionReport", "read_state_dict", "rename_unet_key", "rename_autoencoder_key", "rename_motion_key",
           "load_diffusers_unet", "load_diffusers_autoencoder", "load_animatediff_motion", "load_into_stage2"]

# diffusers name -> ours, applied in order (plain substring replacements on dotted names)
_UNET_TABLE = (
    ("mid_block.", "mid."),
    (".transformer_blocks.", ".blocks."),
    (".to_out.0.", ".to_out."),
    (".ff.net.0.proj.", ".ff.proj_in."),
    (".ff.net.2.", ".ff.proj_out."),
    (".downsamplers.0.conv.", ".resample.conv."),
    (".upsamplers.0.conv.", ".resample.conv."),
)
_AUTOENCODER_TABLE = (
    ("coder.mid_block.attentions.0.", "coder.mid.attention."),
    ("coder.mid_block.", "coder.mid."),
    (".group_norm.", ".norm."),
    (".to_out.0.", ".to_out."),
    (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out."),  # legacy
    (".conv_norm_out.", ".norm_out."),
    (".downsamplers.0.conv.", ".resample.conv."),
    (".upsamplers.0.conv.", ".resample.conv."),
)
# inside a motion module (after ".motion_modules.{j}." -> ".temporal.{j}.")
_MOTION_TABLE = (
    (".temporal_transformer.", "."),               # original AnimateDiff wraps everything in it
    (".transformer_blocks.", ".blocks."),
    (".attention_blocks.", ".attns."),             # original: attention_blocks.{a} / norms.{a}
    (".norms.", ".attn_norms."),
    (".norm1.", ".attn_norms.0."), (".attn1.", ".attns.0."),  # diffusers MotionAdapter
    (".norm2.", ".attn_norms.1."), (".attn2.", ".attns.1."),
    (".norm3.", ".ff_norm."),
    (".to_out.0.", ".to_out."),
    (".ff.net.0.proj.", ".ff.proj_in."),
    (".ff.net.2.", ".ff.proj_out."),
)
_POSITION_KEY = re.compile(r"\.(pos_encoder|pos_embed)\.pe$")
_LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "input_blocks.", "encoder.down.")


@dataclass
class ConversionReport:
    """What a load did. Keys are ours (``missing``, ``matched``) or the source's (``unexpected``, ``ignored``)."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (ours, source shape, ours)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every target weight was found with the right shape."""
        return not self.missing and not self.shape_mismatch

    def summary(self) -> str:
        s = (f"{len(self.matched)} matched, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
             f"{len(self.shape_mismatch)} shape mismatches, {len(self.ignored)} ignored")
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.shape_mismatch)):
            if items:
                s += f"; {name}: {items[:3]}{' ...' if len(items) > 3 else ''}"
        return s


def _apply_table(key: str, table) -> str:
    for old, new in table:
        key = key.replace(old, new)
    return key


def rename_unet_key(key: str) -> str:
    """diffusers UNet2DConditionModel key -> MVUNet / ReferenceUNet key."""
    if ".motion_modules." in key:
        return rename_motion_key(key)
    return _apply_table(key, _UNET_TABLE)


def rename_autoencoder_key(key: str) -> str:
    return _apply_table(key, _AUTOENCODER_TABLE)


def rename_motion_key(key: str) -> str:
    """AnimateDiff motion-module key (original or MotionAdapter) -> MVUNet temporal key."""
    key = key.replace("mid_block.", "mid.").replace(".motion_modules.", ".temporal.")
    return _apply_table(key, _MOTION_TABLE)


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """A state dict from a dict or a safetensors / .bin / .ckpt / .pt file (tensors only)."""
    if isinstance(source, dict):
        sd = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                sd = load_file(str(path))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
        elif path.suffix in (".bin", ".ckpt", ".pt", ".pth"):
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path} could not be read as a tensors-only checkpoint: {e}") from e
        else:
            raise ValueError(f"unsupported weights file {path}: expected .safetensors, .bin, .ckpt, .pt or .pth")
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state dict entries must be tensors; not tensors: {bad[:5]}")
    if any(k.startswith(_LDM_PREFIXES) for k in sd):
        raise ValueError("these weights are in the original CompVis/LDM layout (model.diffusion_model.*, "
                         "first_stage_model.*, input_blocks.*); convert them to the diffusers layout first")
    return sd


def _load(model: nn.Module, renamed: dict[str, tuple[str, torch.Tensor]], targets: set[str],
          report: ConversionReport, strict: bool, what: str) -> ConversionReport:
    """Copy ``renamed`` (ours -> (source key, tensor)) into ``model`` for keys in ``targets``."""
    params = model.state_dict()
    with torch.no_grad():
        for ours, (src, t) in renamed.items():
            if ours not in params or ours not in targets:
                report.unexpected.append(src)
                continue
            dst = params[ours]
            if tuple(t.shape) != tuple(dst.shape):
                if t.numel() == dst.numel() and t.squeeze().shape == dst.squeeze().shape:
                    t = t.reshape(dst.shape)  # 1x1 conv <-> linear
                else:
                    report.shape_mismatch.append((ours, tuple(t.shape), tuple(dst.shape)))
                    continue
            dst.copy_(t.to(dst.dtype))
            report.matched.append(ours)
    found = set(report.matched) | {m[0] for m in report.shape_mismatch}
    report.missing = sorted(targets - found)
    log.info("%s: %s", what, report.summary())
    if strict and not report.ok:
        raise ValueError(f"{what}: {report.summary()}")
    return report


def _rename_all(sd: dict, rename) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    renamed, ignored = {}, []
    for k, v in sd.items():
        if _POSITION_KEY.search(k):
            ignored.append(k)
            continue
        renamed[rename(k)] = (k, v)
    return renamed, ignored


def load_diffusers_unet(model: nn.Module, source, *, strict: bool = False) -> ConversionReport:
    """diffusers UNet2DConditionModel weights -> ``model``'s spatial weights (MVUNet) or all (ReferenceUNet).

    Temporal / view modules are left as they are (and not reported missing); motion-module keys in the
    source (a UNetMotionModel) load too. For a ReferenceUNet the unused output head (``conv_norm_out``,
    ``conv_out``) is ignored.
    """
    from mvportrait.models.unet import MVUNet, ReferenceUNet

    if not isinstance(model, (MVUNet, ReferenceUNet)):
        raise TypeError(f"model must be an MVUNet or ReferenceUNet, got {type(model).__name__}")
    sd = read_state_dict(source)
    renamed, ignored = _rename_all(sd, rename_unet_key)
    report = ConversionReport(ignored=ignored)
    if isinstance(model, ReferenceUNet):
        for k in [k for k in renamed if k.startswith(("conv_norm_out.", "conv_out."))]:
            report.ignored.append(renamed.pop(k)[0])
    names = set(model.state_dict())
    targets = {k for k in names if ".temporal." not in k and ".views." not in k}
    targets |= {k for k in names if ".temporal." in k and k in renamed}
    return _load(model, renamed, targets, report, strict, f"UNet weights -> {type(model).__name__}")


def load_diffusers_autoencoder(model: nn.Module, source, *, strict: bool = False) -> ConversionReport:
    """diffusers AutoencoderKL weights -> :class:`Autoencoder` (geometry from its config, e.g. "sd")."""
    from mvportrait.models.autoencoder import Autoencoder

    if not isinstance(model, Autoencoder):
        raise TypeError(f"model must be an Autoencoder, got {type(model).__name__}")
    sd = read_state_dict(source)
    renamed, ignored = _rename_all(sd, rename_autoencoder_key)
    report = ConversionReport(ignored=ignored)
    return _load(model, renamed, set(model.state_dict()), report, strict, "AutoencoderKL weights -> Autoencoder")


def load_animatediff_motion(model: nn.Module, source, *, strict: bool = False) -> ConversionReport:
    """AnimateDiff motion-module weights -> the temporal modules of an :class:`MVUNet` where shapes match.

    AnimateDiff v1 has no mid-block module (``mid.temporal.0.*`` then stays as initialised and is
    reported missing); v2 has one.
    """
    from mvportrait.models.unet import MVUNet

    if not isinstance(model, MVUNet):
        raise TypeError(f"model must be an MVUNet, got {type(model).__name__}")
    if not model.cfg.temporal:
        raise ValueError("this MVUNet has no temporal modules (UNetConfig.temporal=False)")
    sd = read_state_dict(source)
    motion = {k: v for k, v in sd.items() if ".motion_modules." in k}
    report = ConversionReport(unexpected=[k for k in sd if k not in motion])
    renamed, report.ignored = _rename_all(motion, rename_motion_key)
    targets = {k for k in model.state_dict() if ".temporal." in k}
    return _load(model, renamed, targets, report, strict, "AnimateDiff motion modules -> MVUNet")


def load_into_stage2(model, *, unet=None, autoencoder=None, motion=None, strict: bool = False
                     ) -> dict[str, ConversionReport]:
    """Fill a :class:`~mvportrait.models.stage2.FLAME2VideoModel` from SD-family weights: ``unet`` into
    both the denoising and the reference UNet (as Animate Anyone initialises its ReferenceNet),
    ``autoencoder`` into the autoencoder, ``motion`` into the temporal modules. Reports by component."""
    reports = {}
    if unet is not None:
        sd = read_state_dict(unet)
        reports["unet"] = load_diffusers_unet(model.unet, sd, strict=strict)
        reports["reference_unet"] = load_diffusers_unet(model.reference_unet, sd, strict=strict)
    if autoencoder is not None:
        reports["autoencoder"] = load_diffusers_autoencoder(model.autoencoder, autoencoder, strict=strict)
    if motion is not None:
        reports["motion"] = load_animatediff_motion(model.unet, motion, strict=strict)
    return reports
