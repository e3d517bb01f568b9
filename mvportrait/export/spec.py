"""Export specs: what each exportable network takes and returns, and over which shapes.

An :class:`ExportSpec` names a network's inputs and outputs (:class:`TensorSpec`: name, dtype, shape)
and the ranges of its dynamic dimensions (:class:`Dim`: min / opt / max, plus a multiple the size must
be). A shape entry is an int (static), a dim name (``"B"``), or an integer expression of dim names
(``"h * w // 16"``), so derived sizes (a UNet level's token count) follow the dims they come from.
From this one description come:

- ONNX ``dynamic_axes`` (:meth:`ExportSpec.dynamic_axes`; the label of an axis is its expression),
- TensorRT optimization profiles (:meth:`ExportSpec.profile`: each input's shape at min, opt, max),
- fresh random sample inputs at any point of the range (:meth:`ExportSpec.sample_inputs`),
- the shapes parity checks run at (:meth:`ExportSpec.parity_points`: opt and min by default).

Spec builders: :func:`stage2_specs` (FLAME encoder, reference network, denoising UNet, autoencoder
encoder and decoder of a ``FLAME2VideoModel``) and :func:`stage1_specs` (text encoder, MotionDM,
EmotionDM). Every spec carries the flat-signature module to export (``export/networks.py``), which
shares the model's weights.

The reference network's spatial size is static (the reference image is always resized to the
model's image size, and the image embedder's adaptive pooling exports with a fixed kernel); the
denoising UNet's spatial size, batch, views and frames are dynamic.
"""
from __future__ import annotations

import ast
import operator
import os
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import nn

__all__ = ["Dim", "TensorSpec", "ExportSpec", "stage2_specs", "stage1_specs", "DTYPES", "eval_dim"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "bool": torch.bool}
SAMPLERS = ("normal", "uniform", "int", "prefix_mask", "bool")
# TensorRT layer types kept in fp32 when an engine is built in fp16 / bf16 (norm statistics and
# softmax overflow or lose too much in 16 bits; see export/tensorrt.py)
DEFAULT_FP32_LAYERS = ("NORMALIZATION", "SOFTMAX", "REDUCE")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def eval_dim(expr: int | str, point: Mapping[str, int]) -> int:
    """Value of a shape entry at ``point`` (dim name -> size): an int, a name, or + - * // of them."""
    if isinstance(expr, int) and not isinstance(expr, bool):
        return expr
    if not isinstance(expr, str):
        raise TypeError(f"a shape entry is an int or a str expression, got {expr!r}")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in point:
                raise KeyError(f"shape expression {expr!r} uses dim {node.id!r}, which has no value "
                               f"(known: {', '.join(sorted(point))})")
            return int(point[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"shape expression {expr!r}: only ints, dim names and + - * // are allowed")

    return ev(ast.parse(expr, mode="eval"))


def _names(expr) -> set[str]:
    if not isinstance(expr, str):
        return set()
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: sizes from ``min`` to ``max`` that are multiples of ``multiple``; ``opt``
    is the size engines are tuned for (and the first parity shape)."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self):
        for k in ("min", "opt", "max", "multiple"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Dim {self.name!r}: {k} must be a positive int, got {v!r}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"Dim {self.name!r}: need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        bad = [v for v in (self.min, self.opt, self.max) if v % self.multiple]
        if bad:
            raise ValueError(f"Dim {self.name!r}: min / opt / max must be multiples of {self.multiple}, got {bad}")

    def check(self, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"dim {self.name} must be an int, got {value!r}")
        if not self.min <= value <= self.max or value % self.multiple:
            raise ValueError(f"dim {self.name}={value} is outside its range [{self.min}, {self.max}]"
                             + (f" or not a multiple of {self.multiple}" if self.multiple > 1 else ""))
        return value


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``name``, ``shape`` (ints, dim names or expressions), ``dtype`` (a key of
    :data:`DTYPES`), and how sample inputs are drawn: ``normal``, ``uniform`` in [low, high), ``int``
    in [low, high), ``prefix_mask`` (bool, each row True on a random non-empty prefix: a padding mask)
    or ``bool`` (random)."""

    name: str
    shape: tuple
    dtype: str = "float32"
    sample: str = "normal"
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"TensorSpec {self.name!r}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.sample not in SAMPLERS:
            raise ValueError(f"TensorSpec {self.name!r}: sample must be one of {', '.join(SAMPLERS)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolve(self, point: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(s, point) for s in self.shape)

    def draw(self, point: Mapping[str, int], generator: torch.Generator, device=None) -> torch.Tensor:
        shape = self.resolve(point)
        if self.sample == "normal":
            t = torch.randn(shape, generator=generator)
        elif self.sample == "uniform":
            t = torch.rand(shape, generator=generator) * (self.high - self.low) + self.low
        elif self.sample == "int":
            t = torch.randint(int(self.low), int(self.high), shape, generator=generator)
        elif self.sample == "bool":
            t = torch.rand(shape, generator=generator) < 0.5
        else:  # prefix_mask over the last axis
            n = shape[-1]
            lengths = torch.randint(1, n + 1, shape[:-1], generator=generator)
            t = torch.arange(n) < lengths[..., None]
        return t.to(device=device, dtype=self.torch_dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ExportSpec:
    """One exportable network; see the module docstring. ``module`` is its flat-signature
    ``nn.Module`` (not part of equality or :meth:`to_dict`)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...]
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    fp32_layers: tuple[str, ...] = DEFAULT_FP32_LAYERS
    description: str = ""

    def __post_init__(self):
        for k in ("inputs", "outputs", "dims", "fp32_layers"):
            object.__setattr__(self, k, tuple(getattr(self, k)))
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"ExportSpec {self.name!r}: input / output names must be unique, got {names}")
        dim_names = [d.name for d in self.dims]
        if len(set(dim_names)) != len(dim_names):
            raise ValueError(f"ExportSpec {self.name!r}: dim names must be unique, got {dim_names}")
        used = set().union(*(_names(s) for t in self.inputs + self.outputs for s in t.shape))
        unknown = used - set(dim_names)
        if unknown:
            raise ValueError(f"ExportSpec {self.name!r}: shapes use undeclared dims {sorted(unknown)}")

    # ------------------------------------------------------------------------------ lookups
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(f"{self.name} has no dim {name!r} (dims: {', '.join(d.name for d in self.dims) or 'none'})")

    # ------------------------------------------------------------------------------ points
    def point(self, which: str = "opt", **sizes: int) -> dict[str, int]:
        """Dim sizes: every dim at ``which`` (min | opt | max), then ``sizes`` overrides; checked."""
        if which not in ("min", "opt", "max"):
            raise ValueError(f"which must be min, opt or max, got {which!r}")
        p = {d.name: getattr(d, which) for d in self.dims}
        for k, v in sizes.items():
            self.dim(k)
            p[k] = v
        return self.check_point(p)

    def check_point(self, point: Mapping[str, int]) -> dict[str, int]:
        missing = [d.name for d in self.dims if d.name not in point]
        if missing:
            raise ValueError(f"{self.name}: no size given for dims {missing}")
        return {d.name: d.check(point[d.name]) for d in self.dims}

    def parity_points(self) -> list[dict[str, int]]:
        """Shapes a parity check runs at: opt, then min (or max when min is opt): two shapes whenever
        the spec has a dynamic range."""
        pts = [self.point("opt")]
        for which in ("min", "max"):
            p = self.point(which)
            if p != pts[0]:
                pts.append(p)
                break
        return pts

    def shapes(self, point: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Every input's and output's shape at ``point``."""
        point = self.check_point(point)
        return {t.name: t.resolve(point) for t in self.inputs + self.outputs}

    def with_dims(self, **ranges) -> "ExportSpec":
        """A copy with some dim ranges replaced: ``h=(8, 32, 64)`` (min, opt, max)."""
        dims = []
        for d in self.dims:
            if d.name in ranges:
                lo, opt, hi = ranges[d.name]
                d = replace(d, min=int(lo), opt=int(opt), max=int(hi))
            dims.append(d)
        unknown = set(ranges) - {d.name for d in self.dims}
        if unknown:
            raise KeyError(f"{self.name} has no dims {sorted(unknown)}")
        return replace(self, dims=tuple(dims))

    # ------------------------------------------------------------------------------ exporters
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes: every non-int shape entry, labelled by its expression."""
        out = {}
        for t in self.inputs + self.outputs:
            axes = {i: s.replace(" ", "") for i, s in enumerate(t.shape) if isinstance(s, str)}
            if axes:
                out[t.name] = axes
        return out

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Engine optimization profile: each input's (min, opt, max) shape."""
        pts = [self.point(w) for w in ("min", "opt", "max")]
        return {t.name: tuple(t.resolve(p) for p in pts) for t in self.inputs}

    def sample_inputs(self, point: Mapping[str, int] | None = None, *, generator: torch.Generator | None = None,
                      seed: int | None = None, device=None) -> tuple[torch.Tensor, ...]:
        """Fresh random inputs at ``point`` (default opt), drawn as each TensorSpec says."""
        point = self.point("opt") if point is None else self.check_point(point)
        if generator is None:
            if seed is None:  # fresh, without touching the global RNG
                seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
            generator = torch.Generator().manual_seed(seed)
        return tuple(t.draw(point, generator, device) for t in self.inputs)

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "dims": {d.name: [d.min, d.opt, d.max, d.multiple] for d in self.dims},
                "fp32_layers": list(self.fp32_layers)}


# ================================================================================= builders
def _round_down(x: int, m: int) -> int:
    return max(m, x // m * m)


def _reference_scales(unet) -> list[int]:
    """Downsampling factor (relative to the latent) of every self-attention layer, in forward order
    (the order of the reference cache)."""
    n = len(unet.down_blocks)
    scales = []
    for i, level in enumerate(unet.down_blocks):
        scales += [2 ** i for st in level.attentions for _ in st.blocks]
    scales += [2 ** (n - 1) for st in unet.mid.attentions for _ in st.blocks]
    for k, level in enumerate(unet.up_blocks):
        scales += [2 ** (n - 1 - k) for st in level.attentions for _ in st.blocks]
    return scales


def stage2_specs(model, *, views: int | None = None, frames: int | None = None, max_views: int = 8,
                 max_batch: int = 2) -> dict[str, ExportSpec]:
    """Specs of a ``FLAME2VideoModel``'s networks: ``vae_encoder``, ``reference``, ``flame_encoder``,
    ``unet``, ``vae_decoder``.

    opt shapes are the pipeline's: ``views`` x ``frames`` (default: the config's) at the model's image
    size, batch 2 for the UNet (image guidance doubles the batch). Spatial sizes range from half the
    image size to the image size; views from 1 to ``max(max_views, views)``; frames from 1 to the
    window; UNet batch from 1 to ``max_batch`` (one reference, batch 1, serves every row).
    """
    from mvportrait.export.networks import ReferenceNet, UNetNet, VAEDecoderNet, VAEEncoderNet

    cfg = model.config
    ae, un = cfg.autoencoder, cfg.unet
    f, lat, unit, z = ae.factor, cfg.latent_size, un.downsample, ae.latent_channels
    nv, nf = views or cfg.views, frames or cfg.frames
    c0, d, ntok = un.block_channels[0], un.cross_attention_dim, cfg.image_tokens
    h_dim = lambda n: Dim(n, _round_down(lat // 2, unit), lat, lat, unit)  # noqa: E731
    img_dim = lambda n: Dim(n, f * _round_down(lat // 2, unit), f * lat, f * lat, f)  # noqa: E731
    chans = model.unet.reference_channels()
    scales = _reference_scales(model.unet)
    if len(scales) != len(chans):
        raise RuntimeError(f"reference layer walk found {len(scales)} layers, the UNet has {len(chans)}")
    kv = [TensorSpec(f"{kind}_{i}", ("R", (lat // s) * (lat // s), c))
          for kind in ("key", "value") for i, (s, c) in enumerate(zip(scales, chans))]
    specs = [
        ExportSpec("vae_encoder", (TensorSpec("images", ("N", 3, "H", "W"), sample="uniform"),),
                   (TensorSpec("latents", ("N", z, "H // %d" % f, "W // %d" % f)),),
                   (Dim("N", 1, 1, 4), img_dim("H"), img_dim("W")), VAEEncoderNet(model.autoencoder),
                   description="images in [-1, 1] -> scaled latents (posterior mean)"),
        ExportSpec("reference", (TensorSpec("ref_latent", ("R", z, lat, lat)),),
                   (TensorSpec("image_tokens", ("R", ntok, d)), *kv), (Dim("R", 1, 1, 2),),
                   ReferenceNet(model.image_embedder, model.reference_unet, model.unet),
                   description="reference latent -> image tokens + projected reference keys / values"),
        ExportSpec("flame_encoder", (TensorSpec("renders", ("N", un.flame_channels, "H", "W"), sample="uniform",
                                                low=0.0, high=1.0),),
                   (TensorSpec("features", ("N", c0, "H // %d" % f, "W // %d" % f)),),
                   (Dim("N", 1, nv * nf, max_batch * max(max_views, nv) * nf), img_dim("H"), img_dim("W")),
                   model.flame_encoder, description="FLAME renders (normal, depth, mask) -> UNet input features"),
        ExportSpec("unet", (TensorSpec("sample", ("B", "V", "F", z, "h", "w")),
                            TensorSpec("timestep", ("B",), sample="uniform", low=0.0, high=float(cfg.train_timesteps)),
                            TensorSpec("encoder_hidden_states", ("B", ntok, d)),
                            TensorSpec("flame_features", ("B", "V", "F", c0, "h", "w")),
                            TensorSpec("reference_mask", ("B",), dtype="bool", sample="bool"), *kv),
                   (TensorSpec("out", ("B", "V", "F", z, "h", "w")),),
                   (Dim("B", 1, min(2, max_batch), max_batch), Dim("R", 1, 1, 1), Dim("V", 1, nv, max(max_views, nv)),
                    Dim("F", 1, nf, nf), h_dim("h"), h_dim("w")),
                   UNetNet(model.unet), description="multi-view video denoiser with the reference cache"),
        ExportSpec("vae_decoder", (TensorSpec("latents", ("N", z, "h", "w")),),
                   (TensorSpec("images", ("N", 3, "h * %d" % f, "w * %d" % f)),),
                   (Dim("N", 1, nv, max(max_views, nv)), h_dim("h"), h_dim("w")), VAEDecoderNet(model.autoencoder),
                   description="scaled latents -> images (one frame, all views)"),
    ]
    return {s.name: s for s in specs}


def stage1_specs(motion=None, emotion=None, text_net=None, *, max_tokens: int = 256,
                 max_batch: int = 8) -> dict[str, ExportSpec]:
    """Specs of the stage-1 networks given: ``motion_dm`` / ``emotion_dm`` (``MotionDenoiser``) and
    ``text_encoder`` (a ``BertEncoderNet``: token ids + mask -> hidden states).

    Denoisers: batch 1..``max_batch`` (opt 2: classifier-free guidance), frames from 8 (or fewer for
    short models) to the training window, text tokens 1..``max_tokens`` (opt 16).
    """
    from mvportrait.export.networks import DenoiserNet

    specs = {}
    for name, m in (("motion_dm", motion), ("emotion_dm", emotion)):
        if m is None:
            continue
        c = m.cfg
        t_dim = Dim("T", min(8, c.max_frames), c.max_frames, c.max_frames)
        ins = [TensorSpec("x_t", ("B", "T", c.in_dim)),
               TensorSpec("timestep", ("B",), sample="uniform", low=0.0, high=float(c.train_timesteps))]
        dims = [Dim("B", 1, 2, max_batch), t_dim]
        if c.text_cond == "tokens":
            ins += [TensorSpec("text", ("B", "L", c.text_dim)), TensorSpec("mask", ("B", "L"), dtype="bool",
                                                                            sample="prefix_mask")]
            dims.append(Dim("L", 1, min(16, max_tokens), max_tokens))
        else:
            ins.append(TensorSpec("text", ("B", c.text_dim)))
        specs[name] = ExportSpec(name, tuple(ins), (TensorSpec("out", ("B", "T", c.in_dim)),), tuple(dims),
                                 DenoiserNet(m), description=f"{c.kind} denoiser ({c.text_cond} text)")
    if text_net is not None:
        bc = text_net.cfg
        n = min(max_tokens, bc.max_position_embeddings)
        specs["text_encoder"] = ExportSpec(
            "text_encoder", (TensorSpec("ids", ("B", "L"), dtype="int64", sample="int", low=0, high=bc.vocab_size),
                             TensorSpec("mask", ("B", "L"), dtype="bool", sample="prefix_mask")),
            (TensorSpec("hidden", ("B", "L", bc.hidden_size)),),
            (Dim("B", 1, 1, max_batch), Dim("L", 2, min(16, n), n)), text_net,
            description="BERT token ids + mask -> last hidden states")
    return specs
