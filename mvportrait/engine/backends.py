"""Network backends with one call signature: the pipelines never know which one runs.

==============  ==========================================================================================
backend         what runs each network
==============  ==========================================================================================
``torch``       the PyTorch modules themselves (eager); the models are returned unchanged
``compile``     ``torch.compile`` of each network's flat-signature module (static shapes; on CUDA
                ``mode="reduce-overhead"`` adds CUDA graphs). Needs a C++ compiler on CPU (inductor)
``onnxruntime`` ONNX Runtime on the checked ONNX export from the artifact cache (CPU provider; the CUDA and
                TensorRT providers first when installed and the model is on CUDA)
``tensorrt``    TensorRT 10 engines built from the same ONNX files (``export/tensorrt.py``); CUDA only
==============  ==========================================================================================

Selection: ``--backend`` on the command line or ``MVP_BACKEND``; one name for every stage
(``onnxruntime``) or per stage (``stage1=torch,stage2=onnxruntime``; an unnamed stage runs ``torch``).
A backend that cannot run here raises :class:`BackendUnavailable` naming what to install.

How the swap works (StreamDiffusion's ``stream.unet = engine`` idea). Every network is a **runner**: a
callable on the flat tensors of its :class:`~mvportrait.export.spec.ExportSpec` (tensors in, tuple of
tensors out). **Adapters** put the module's own call signature back on a runner:

- stage 1: :class:`DenoiserBackend` is a ``MotionDenoiser`` (``forward(x_t, t, text, mask)``, ``cfg``,
  ``null``, ``denormalize``); :class:`TextNetBackend` replaces a text encoder's BERT (``net(ids, mask)``).
- stage 2: :func:`stage2_model` returns a :class:`BackendFLAME2VideoModel`, a ``FLAME2VideoModel`` whose
  ``autoencoder`` (``encode`` / ``decode``), ``flame_encoder``, ``unet`` (``forward(sample, timestep,
  encoder_hidden_states, flame_features, reference, reference_mask=)``) are adapters and whose
  ``prepare_reference`` runs the exported reference network (image tokens + projected K/V in one
  call). ``encode_renders`` and ``denoise`` (image guidance included) are the model's own code.

The original models are never modified; adapters keep only the small torch pieces the pipelines read
(config, null embeddings, normalisation statistics).
"""
from __future__ import annotations

import collections
import copy
import logging
import shutil
import threading
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from mvportrait import envs
from mvportrait.models.stage2 import FLAME2VideoModel, ReferenceContext
from mvportrait.models.unet import ReferenceCache

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "BackendUnavailable", "check_backend", "available_backends", "resolve_backend",
           "make_runner", "TorchRunner", "CompileRunner", "OrtRunner", "DenoiserBackend", "TextNetBackend",
           "AutoencoderBackend", "FlameEncoderBackend", "UNetBackend", "ReferenceBackend",
           "BackendFLAME2VideoModel", "stage1_models", "stage2_model"]

BACKENDS = envs.BACKEND_CHOICES
Runner = Callable[..., tuple]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says what to install."""


# ----------------------------------------------------------------------------------- availability
def check_backend(name: str, device=None) -> None:
    """Raise :class:`BackendUnavailable` (or ValueError for an unknown name) unless ``name`` can run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "compile":
        if not hasattr(torch, "compile"):
            raise BackendUnavailable("the compile backend needs torch >= 2.0 (torch.compile)")
        if dev.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise BackendUnavailable("the compile backend on CPU needs a C++ compiler for inductor: "
                                     "install g++ (e.g. apt-get install g++) or use --backend torch")
    elif name == "onnxruntime":
        missing = [m for m in ("onnx", "onnxruntime") if _missing(m)]
        if missing:
            raise BackendUnavailable(f"the onnxruntime backend needs {' and '.join(missing)}: "
                                     "pip install 'mvportrait[export]'  (onnx, onnxscript, onnxruntime; "
                                     "onnxruntime-gpu for CUDA)")
    elif name == "tensorrt":
        if _missing("tensorrt"):
            raise BackendUnavailable("the tensorrt backend needs TensorRT 10: pip install 'tensorrt>=10' "
                                     "(and an NVIDIA GPU with CUDA); TensorRT is not installed on this machine")
        if not torch.cuda.is_available():
            raise BackendUnavailable("the tensorrt backend needs an NVIDIA GPU with CUDA; none is available here")
        if _missing("onnx"):
            raise BackendUnavailable("the tensorrt backend builds engines from ONNX: pip install 'mvportrait[export]'")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def available_backends(device=None) -> list[str]:
    out = []
    for name in BACKENDS:
        try:
            check_backend(name, device)
            out.append(name)
        except BackendUnavailable:
            pass
    return out


def resolve_backend(stage: str, backend: str | None = None) -> str:
    """The backend ``stage`` (``stage1`` | ``stage2``) runs: from ``backend`` (a name or a per-stage
    spec such as ``stage1=torch,stage2=onnxruntime``) or, when None, from ``MVP_BACKEND``."""
    spec = envs.parse_backend_spec(backend) if backend is not None else envs.parse_backend_spec(envs.backend())
    if stage not in envs.BACKEND_STAGES:
        raise ValueError(f"stage must be one of {', '.join(envs.BACKEND_STAGES)}, got {stage!r}")
    return spec[stage]


# ----------------------------------------------------------------------------------- runners
def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class TorchRunner:
    """The flat-signature module in eager PyTorch."""

    name = "torch"

    def __init__(self, spec):
        self.spec, self.module = spec, spec.module.eval()

    def __call__(self, *tensors):
        with torch.inference_mode():
            return _as_tuple(self.module(*tensors))


# Inductor's CUDA graphs (cudagraph trees) keep their tree managers in thread-locals that torch 2.11 sets
# up only in the thread that imported the module: a call from another Python thread (a stream's worker)
# fails with ``assert torch._C._is_key_in_tls(...)`` (pytorch#123177; later versions give each thread its
# own managers, so graphs would be recorded again per stream thread). Every thread that calls a compiled
# network gets the state of the thread that made the first CompileRunner instead, and the calls are
# serialised: one set of graphs per process, replayed from whichever thread streams.
_CUDAGRAPH_TLS_NAMES = ("tree_manager_containers", "tree_manager_locks")
_CUDAGRAPH_TLS: dict = {}
_COMPILED_CALLS = threading.RLock()


def _remember_cudagraph_tls() -> None:
    """Record this thread's cudagraph-trees state (importing the module here sets it up)."""
    if _CUDAGRAPH_TLS:
        return
    from torch._inductor import cudagraph_trees as cgt

    local = getattr(cgt, "local", None)
    if local is None:
        return
    if not all(hasattr(local, n) for n in _CUDAGRAPH_TLS_NAMES):  # imported by another thread: set up this one's
        local.tree_manager_containers = {}
        local.tree_manager_locks = collections.defaultdict(threading.Lock)
    _CUDAGRAPH_TLS.update({n: getattr(local, n) for n in _CUDAGRAPH_TLS_NAMES}, module=cgt)


def _share_cudagraph_tls() -> None:
    """Give the calling thread the recorded cudagraph-trees state where it has none of its own."""
    if not _CUDAGRAPH_TLS:
        return
    local = _CUDAGRAPH_TLS["module"].local
    for n in _CUDAGRAPH_TLS_NAMES:
        if not hasattr(local, n):
            setattr(local, n, _CUDAGRAPH_TLS[n])


class CompileRunner(TorchRunner):
    """``torch.compile`` of the flat module: static shapes (a new shape recompiles once); on CUDA
    ``mode="reduce-overhead"`` captures CUDA graphs (callable from any thread: see _share_cudagraph_tls)."""

    name = "compile"

    def __init__(self, spec, *, mode: str | None = None, device=None):
        super().__init__(spec)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        mode = mode or ("reduce-overhead" if dev.type == "cuda" else None)
        self.graphs = mode in ("reduce-overhead", "max-autotune")  # inductor's CUDA graphs (cudagraph trees)
        if self.graphs:
            _remember_cudagraph_tls()
        self.module = torch.compile(self.module, dynamic=False, mode=mode)

    def __call__(self, *tensors):
        if not self.graphs:
            return super().__call__(*tensors)
        # CUDA graphs: outputs live in the graph's memory pool and the next replay of any compiled network
        # overwrites them (the pipeline keeps some: the reference latents, an x0 estimate), so each call
        # starts a new step and hands out copies (~the output size; small beside a UNet call)
        with _COMPILED_CALLS, torch.inference_mode():
            _share_cudagraph_tls()
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(t.clone() for t in _as_tuple(self.module(*tensors)))


class OrtRunner:
    """ONNX Runtime session on a checked ONNX file. Inputs are cast to the spec's dtypes and copied to
    host memory; outputs come back as torch tensors on the first input's device, in its float dtype."""

    name = "onnxruntime"

    def __init__(self, spec, path, *, providers: Sequence[str] | None = None, threads: int | None = None):
        from mvportrait.export.onnx import ort_session

        self.spec, self.path = spec, path
        self.session = ort_session(path, providers=providers, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._dtypes = {t.name: t.torch_dtype for t in spec.inputs}
        self._lock = threading.Lock()  # one session, one run at a time per runner

    def __call__(self, *tensors):
        if len(tensors) != len(self.spec.inputs):
            raise ValueError(f"{self.spec.name}: expected {len(self.spec.inputs)} inputs "
                             f"({', '.join(self.spec.input_names)}), got {len(tensors)}")
        device = tensors[0].device
        feed = {n: t.detach().to("cpu", self._dtypes[n]).contiguous().numpy()
                for n, t in zip(self.spec.input_names, tensors) if n in self.input_names}
        with self._lock:
            outs = self.session.run(self.spec.output_names, feed)
        return tuple(torch.from_numpy(o).to(device) for o in outs)


def ort_providers(device=None) -> list[str]:
    """ONNX Runtime providers for ``device``: TensorRT / CUDA first on CUDA when installed, then CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    wanted = (["TensorrtExecutionProvider", "CUDAExecutionProvider"] if dev.type == "cuda" else []) + \
        ["CPUExecutionProvider"]
    return [p for p in wanted if p in have]


def make_runner(backend: str, spec, *, cache=None, device=None, precision: str = "fp16") -> Runner:
    """A runner for ``spec`` on ``backend`` (ONNX / engines from the artifact cache, built on a miss)."""
    check_backend(backend, device)
    if backend == "torch":
        return TorchRunner(spec)
    if backend == "compile":
        return CompileRunner(spec, device=device)
    from mvportrait.export.onnx import cached_onnx

    path = cached_onnx(spec, cache)
    if backend == "onnxruntime":
        return OrtRunner(spec, path, providers=ort_providers(device))
    from mvportrait.export.tensorrt import TRTRunner, cached_engine

    return TRTRunner(cached_engine(spec, path, cache=cache, precision=precision), spec=spec, device=device)


# ----------------------------------------------------------------------------------- stage-1 adapters
class DenoiserBackend(nn.Module):
    """A ``MotionDenoiser`` whose ``forward`` runs a runner; ``cfg``, ``null``, ``normalize`` and
    ``denormalize`` are the wrapped model's (its small torch pieces stay: null text, statistics)."""

    def __init__(self, model: nn.Module, runner: Runner, backend: str):
        super().__init__()
        self.module, self.runner, self.backend = model, runner, backend

    @property
    def cfg(self):
        return self.module.cfg

    @property
    def uses_tokens(self) -> bool:
        return self.module.uses_tokens

    def null(self, batch: int = 1, length: int = 1):
        return self.module.null(batch, length)

    def normalize(self, x):
        return self.module.normalize(x)

    def denormalize(self, x):
        return self.module.denormalize(x)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        if x_t.dim() != 3 or x_t.shape[-1] != c.in_dim:
            raise ValueError(f"x_t must have shape (B, T, {c.in_dim}), got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).float().reshape(-1).expand(b)
        if self.uses_tokens:
            if text.dim() != 3:
                raise ValueError(f"a 'tokens' model takes text (B, L, {c.text_dim}) + mask, got {tuple(text.shape)}")
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None else mask.bool()
            out = self.runner(x_t, t, text, mask)[0]
        else:
            if text.dim() != 2:
                raise ValueError(f"a 'pooled' model takes text (B, {c.text_dim}), got {tuple(text.shape)}")
            out = self.runner(x_t, t, text)[0]
        return out.to(x_t.dtype)


class TextNetBackend(nn.Module):
    """Replaces a text encoder's BERT network: ``forward(ids (B, L), mask (B, L)) -> (B, L, D)``."""

    def __init__(self, net: nn.Module, runner: Runner, backend: str):
        super().__init__()
        self.cfg, self.runner, self.backend = net.cfg, runner, backend

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.runner(ids, mask.bool())[0]


def _with_text_net(encoder, net: nn.Module):
    """A copy of a text encoder with another network and its own (empty) embedding cache."""
    clone = copy.copy(encoder)
    clone.net = net
    clone._cache, clone._lock = OrderedDict(), threading.Lock()
    clone._hits = clone._misses = 0
    return clone


def stage1_models(motion, emotion, text_encoder, backend: str, *, cache=None, device=None):
    """(motion, emotion, text_encoder) running on ``backend``: the inputs themselves for ``torch``.

    The text encoder's BERT runs on the backend when it has one (MiniLM, local BERT folders); the
    hashing fallback has no network and stays as it is."""
    if backend == "torch":
        return motion, emotion, text_encoder
    from mvportrait.export.spec import stage1_specs
    from mvportrait.models.text_encoder import BertEncoderNet

    net = getattr(text_encoder, "net", None)
    specs = stage1_specs(motion, emotion, net if isinstance(net, BertEncoderNet) else None,
                         max_tokens=getattr(text_encoder, "max_tokens", 256))
    run = lambda name: make_runner(backend, specs[name], cache=cache, device=device)  # noqa: E731
    motion = DenoiserBackend(motion, run("motion_dm"), backend)
    emotion = DenoiserBackend(emotion, run("emotion_dm"), backend)
    if "text_encoder" in specs:
        text_encoder = _with_text_net(text_encoder, TextNetBackend(net, run("text_encoder"), backend))
    else:
        log.info("text encoder %s has no exportable network: it runs as it is", getattr(text_encoder, "name", "?"))
    return motion, emotion, text_encoder


# ----------------------------------------------------------------------------------- stage-2 adapters
class AutoencoderBackend(nn.Module):
    """``Autoencoder.encode`` (posterior mean) / ``decode`` on runners."""

    def __init__(self, cfg, encoder: Runner, decoder: Runner):
        super().__init__()
        self.cfg, self.encoder_runner, self.decoder_runner = cfg, encoder, decoder

    @property
    def factor(self) -> int:
        return self.cfg.factor

    def encode(self, images: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
        if sample:
            raise ValueError("the exported autoencoder returns the posterior mean; sampling the posterior "
                             "(sample=True, a training-time option) needs the torch backend")
        c, f = self.cfg.in_channels, self.cfg.factor
        if images.dim() != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images must have shape (N, {c}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(images.shape)}")
        return self.encoder_runner(images)[0].to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.cfg.latent_channels
        if latents.dim() != 4 or latents.shape[1] != z:
            raise ValueError(f"latents must have shape (N, {z}, h, w), got {tuple(latents.shape)}")
        return self.decoder_runner(latents)[0].to(latents.dtype)


class FlameEncoderBackend(nn.Module):
    """``FlameEncoder.forward(renders (N, Cin, H, W)) -> (N, C0, H/f, W/f)`` on a runner."""

    def __init__(self, module: nn.Module, runner: Runner):
        super().__init__()
        self.in_channels, self.out_channels = module.in_channels, module.out_channels
        self.downsample = module.downsample
        self.runner = runner

    def forward(self, renders: torch.Tensor) -> torch.Tensor:
        c, f = self.in_channels, self.downsample
        if renders.dim() != 4 or renders.shape[1] != c or renders.shape[2] % f or renders.shape[3] % f:
            raise ValueError(f"renders must have shape (N, {c}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(renders.shape)}")
        return self.runner(renders)[0].to(renders.dtype)


class UNetBackend(nn.Module):
    """``MVUNet.forward`` on a runner of the exported UNet (which always takes the projected reference
    cache, FLAME features and a reference mask: absent ones are filled with what the module implies)."""

    def __init__(self, unet: nn.Module, runner: Runner):
        super().__init__()
        self.cfg, self.runner = unet.cfg, runner
        self._channels = unet.reference_channels()

    def reference_channels(self) -> list[int]:
        return list(self._channels)

    def build_reference_cache(self, reference: ReferenceCache) -> ReferenceCache:
        if not reference.projected:
            raise ValueError("this UNet backend takes the projected reference cache (keys / values) that the "
                             "exported reference network returns, not hidden states")
        return reference

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                flame_features: torch.Tensor | None = None, reference: ReferenceCache | None = None, *,
                reference_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        if sample.dim() != 6 or sample.shape[3] != cfg.in_channels:
            raise ValueError(f"sample must have shape (B, V, F, {cfg.in_channels}, h, w), got {tuple(sample.shape)}")
        if reference is None:
            raise ValueError("the exported UNet runs with a reference cache (ReferenceContext.cache); "
                             "the torch backend runs without one")
        reference = self.build_reference_cache(reference)
        if len(reference) != len(self._channels):
            raise ValueError(f"reference cache has {len(reference)} layers, this UNet has {len(self._channels)}")
        b, nv, nf, _, hh, ww = sample.shape
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(b)
        if flame_features is None:
            flame_features = sample.new_zeros(b, nv, nf, cfg.block_channels[0], hh, ww)
        if reference_mask is None:
            reference_mask = torch.ones(b, dtype=torch.bool, device=sample.device)
        out = self.runner(sample, t, encoder_hidden_states, flame_features, reference_mask.bool(),
                          *reference.tensors())[0]
        return out.to(sample.dtype)


class ReferenceBackend(nn.Module):
    """Reference latent (R, C, h, w) -> (image tokens (R, T, D), projected ReferenceCache)."""

    def __init__(self, runner: Runner):
        super().__init__()
        self.runner = runner

    def forward(self, latent: torch.Tensor):
        tokens, *kv = self.runner(latent)
        return tokens.to(latent.dtype), ReferenceCache.from_tensors([t.to(latent.dtype) for t in kv], projected=True)


class BackendFLAME2VideoModel(FLAME2VideoModel):
    """A ``FLAME2VideoModel`` whose networks run on a backend (module docstring). Built by
    :func:`stage2_model`; inference only (``encode_renders`` / ``denoise`` / ``latent_shape`` are
    inherited, ``prepare_reference`` runs the exported reference network)."""

    def __init__(self, model: FLAME2VideoModel, runners: dict[str, Runner], backend: str):
        nn.Module.__init__(self)  # the networks come from runners, not from the config
        self.config, self.backend = model.config, backend
        self.autoencoder = AutoencoderBackend(model.autoencoder.cfg, runners["vae_encoder"], runners["vae_decoder"])
        self.flame_encoder = FlameEncoderBackend(model.flame_encoder, runners["flame_encoder"])
        self.unet = UNetBackend(model.unet, runners["unet"])
        self.reference = ReferenceBackend(runners["reference"])
        self.image_embedder = model.image_embedder  # only its learned null tokens are read

    def prepare_reference(self, ref_images: torch.Tensor) -> ReferenceContext:
        latent = self.autoencoder.encode(ref_images)  # (B, C, h, w)
        tokens, cache = self.reference(latent)
        return ReferenceContext(latent, tokens, self.image_embedder.null(latent.shape[0]).to(tokens.dtype), cache)

    def param_counts(self) -> dict[str, int]:
        raise NotImplementedError(f"parameter counts come from the torch model; this one runs on {self.backend}")


def stage2_model(model: FLAME2VideoModel, backend: str, *, cache=None, device=None,
                 views: int | None = None) -> FLAME2VideoModel:
    """``model`` running on ``backend`` (the model itself for ``torch``); see the module docstring."""
    if backend == "torch":
        return model
    if isinstance(model, BackendFLAME2VideoModel):
        raise ValueError(f"the model already runs on {model.backend}; start from the torch model")
    from mvportrait.export.spec import stage2_specs

    if device is None:
        device = next(model.parameters()).device
    specs = stage2_specs(model.eval(), views=views)
    runners = {name: make_runner(backend, spec, cache=cache, device=device) for name, spec in specs.items()}
    log.info("stage 2 runs on %s (%s)", backend, ", ".join(specs))
    return BackendFLAME2VideoModel(model, runners, backend)
