"""TensorRT 10 engines from the checked ONNX exports, and a runtime wrapper with the runner signature.

UNVERIFIED: TensorRT cannot be installed on the machines this was written on. The code follows the
TensorRT 10 Python API (``tensorrt`` >= 10.0); the parts that do not need TensorRT (profiles from the
specs, cache keys, manifest handling, layer-precision selection, the wrapper's shape and binding logic)
are tested with stand-in objects; the build and run tests are skipped with "TensorRT is not installed
on this machine" until a machine with TensorRT runs them.

Build (:func:`build_engine`, never a shell-out to trtexec):

- ``trt.Builder`` -> ``create_network(0)`` (TensorRT 10 networks are explicit-batch; weakly typed so the
  precision flags apply) -> ``trt.OnnxParser.parse_from_file`` (reads external data beside the file).
- One optimization profile from the spec: ``profile.set_shape(input, min, opt, max)`` for every input
  (:meth:`ExportSpec.profile`).
- ``precision``: ``fp32``, ``fp16`` (``BuilderFlag.FP16``) or ``bf16`` (``BuilderFlag.BF16``). In 16-bit
  builds the layer types in ``spec.fp32_layers`` (normalisation, softmax, reductions) are pinned to fp32
  (``layer.precision`` + output types, ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``).
- A timing cache shared by all builds on one GPU model and TensorRT version (loaded before, merged and
  saved atomically after each build); workspace limit and builder optimisation level from
  :class:`BuildOptions`; build progress through a ``trt.IProgressMonitor`` to a callback or the log.

Run (:class:`TRTEngine`, :class:`TRTRunner`): one execution context; input and output buffers allocated
once at the profile's max shapes with their addresses set once; per call the input shapes are checked
against the profile and set only when they change, inputs are copied into the bindings on the wrapper's
CUDA stream (ordered after the caller's stream, no host sync), ``execute_async_v3`` runs, and outputs are
views (or copies) of the output bindings. ``cuda_graph=True`` captures one CUDA graph per input shape and
replays it.

Cache (:func:`cached_engine`): key = hash(ONNX content, profile, precision, builder options, TensorRT
version, GPU compute capability), in the artifact cache with its manifest.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from mvportrait.export.spec import DEFAULT_FP32_LAYERS, ExportSpec

log = logging.getLogger(__name__)

__all__ = ["BuildOptions", "PRECISIONS", "build_engine", "cached_engine", "engine_key_fields", "onnx_digest",
           "mark_fp32_layers", "TRTEngine", "TRTRunner", "torch_dtype", "require_tensorrt", "INSTALL_HINT",
           "NOT_INSTALLED"]

PRECISIONS = ("fp32", "fp16", "bf16")
ENGINE_FILE = "model.engine"
INSTALL_HINT = "pip install 'tensorrt>=10' (needs an NVIDIA GPU with CUDA)"
NOT_INSTALLED = "TensorRT is not installed on this machine"

_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


def require_tensorrt():
    """The ``tensorrt`` module (>= 10), or ImportError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"{NOT_INSTALLED}: {INSTALL_HINT}") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise ImportError(f"TensorRT {trt.__version__} is installed; mvportrait needs TensorRT >= 10: {INSTALL_HINT}")
    return trt


def _type_name(x) -> str:
    """``DataType.HALF`` / ``TensorIOMode.INPUT`` -> ``"HALF"`` / ``"INPUT"`` (enums or stand-ins)."""
    return getattr(x, "name", str(x)).split(".")[-1].upper()


def torch_dtype(dtype) -> torch.dtype:
    """torch dtype of a TensorRT ``DataType`` (matched by name, so stand-ins work too)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _type_name(dtype)
    if name not in _TRT_TO_TORCH:
        raise TypeError(f"no torch dtype for TensorRT data type {dtype!r}")
    return _TRT_TO_TORCH[name]


# ================================================================================== build
@dataclass(frozen=True)
class BuildOptions:
    """Engine builder options (all but ``timing_cache`` are part of the cache key).

    ``precision`` fp32 | fp16 | bf16; ``workspace_gb`` the builder's workspace pool; ``optimization_level``
    0-5 (TensorRT's default 3); ``fp32_layers`` TensorRT layer type names kept in fp32 in 16-bit builds
    (None: the spec's); ``timing_cache`` file path (None: beside the cache entries)."""

    precision: str = "fp16"
    workspace_gb: float = 8.0
    optimization_level: int = 3
    fp32_layers: tuple[str, ...] | None = None
    timing_cache: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must be in [0, 5], got {self.optimization_level}")
        if not self.workspace_gb > 0:
            raise ValueError(f"workspace_gb must be > 0, got {self.workspace_gb}")
        if self.fp32_layers is not None:
            object.__setattr__(self, "fp32_layers", tuple(self.fp32_layers))

    def layers_for(self, spec: ExportSpec) -> tuple[str, ...]:
        if self.precision == "fp32":
            return ()
        return tuple(self.fp32_layers if self.fp32_layers is not None else spec.fp32_layers or DEFAULT_FP32_LAYERS)

    def key_fields(self, spec: ExportSpec) -> dict:
        d = asdict(self)
        d.pop("timing_cache")
        d["fp32_layers"] = list(self.layers_for(spec))
        return d


def mark_fp32_layers(network, layer_types: Sequence[str], float32) -> int:
    """Pin every layer whose type name is in ``layer_types`` and whose outputs are float to fp32
    (``layer.precision`` and each output type); returns how many were pinned."""
    wanted, n = set(layer_types), 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type.name not in wanted:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(_type_name(o.dtype) not in ("FLOAT", "HALF", "BF16") for o in outs):
            continue  # shape / index arithmetic: leave it alone
        layer.precision = float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, float32)
        n += 1
    return n


def _progress_monitor(trt, report: Callable[[str, int, int], None]):
    """A ``trt.IProgressMonitor`` calling ``report(phase, step, steps)``; never cancels the build."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            report(phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            report(phase_name, step + 1, self.steps.get(phase_name, 0))
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()


def _log_progress(phase: str, step: int, steps: int) -> None:
    if step == 0 or step == steps:
        log.info("TensorRT build: %s %d/%d", phase, step, steps)


def build_engine(onnx_path, spec: ExportSpec, options: BuildOptions = BuildOptions(), *,
                 progress: Callable[[str, int, int], None] | None = None) -> bytes:
    """Serialized engine for ``spec`` built from its ONNX file (module docstring)."""
    trt = require_tensorrt()
    from mvportrait.fileio import atomic_write

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    layers = options.layers_for(spec)
    if layers:
        pinned = mark_fp32_layers(network, layers, trt.float32)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("%s: %d layers kept in fp32 (%s)", spec.name, pinned, ", ".join(layers))
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile().items():
        if name in names:
            profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    timing = config.create_timing_cache(blob)
    config.set_timing_cache(timing, ignore_mismatch=False)
    config.progress_monitor = _progress_monitor(trt, progress or _log_progress)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {spec.name} from {onnx_path} (see its log)")
    log.info("built TensorRT engine %s (%s) in %.0f s", spec.name, options.precision, time.perf_counter() - t0)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        data = bytes(memoryview(config.get_timing_cache().serialize()))
        atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(data))
    return bytes(memoryview(serialized))


def onnx_digest(onnx_path) -> str:
    """Content hash of an ONNX export (model + external data): from its cache manifest when it has one."""
    import hashlib

    from mvportrait.export.cache import MANIFEST, file_sha256

    path = Path(onnx_path)
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        if path.name in files:
            return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    parts = [path] + sorted(p for p in path.parent.glob(path.name + ".data"))
    return hashlib.sha256("".join(file_sha256(p) for p in parts).encode()).hexdigest()


def engine_key_fields(spec: ExportSpec, onnx_path, options: BuildOptions, *, trt_version: str | None = None,
                      capability: str | None = None) -> dict:
    """Cache key fields of one engine (see ``export/cache.py``)."""
    from mvportrait.export.cache import compute_capability

    if trt_version is None:
        trt_version = require_tensorrt().__version__
    return {"stage": "tensorrt", "network": spec.name, "onnx": onnx_digest(onnx_path),
            "profile": {k: [list(s) for s in v] for k, v in spec.profile().items()},
            "builder": options.key_fields(spec), "versions": {"tensorrt": trt_version},
            "compute_capability": capability if capability is not None else compute_capability()}


def cached_engine(spec: ExportSpec, onnx_path, *, cache=None, precision: str = "fp16",
                  options: BuildOptions | None = None, progress=None) -> Path:
    """Path of the engine for ``spec`` from the artifact cache, built on a miss."""
    from dataclasses import replace

    from mvportrait.export.cache import ArtifactCache

    cache = cache if cache is not None else ArtifactCache()
    options = options or BuildOptions(precision=precision)
    fields = engine_key_fields(spec, onnx_path, options)
    if options.timing_cache is None:
        tag = f"{fields['compute_capability']}-trt{fields['versions']['tensorrt']}".replace("/", "_")
        options = replace(options, timing_cache=str(cache.root / "tensorrt" / f"timing-{tag}.cache"))

    def build(folder: Path):
        (folder / ENGINE_FILE).write_bytes(build_engine(onnx_path, spec, options, progress=progress))
        (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1) + "\n")

    return cache.get_or_build("tensorrt", spec.name, fields, build) / ENGINE_FILE


# ================================================================================== run
class TRTEngine:
    """One engine + execution context with bindings allocated once (module docstring).

    ``engine``: a deserialised ``ICudaEngine`` (or anything with its tensor-query methods), or the path /
    bytes of a serialised engine. ``copy_outputs``: return copies (default) rather than views of the
    output bindings, which the next call overwrites. ``cuda_graph``: capture and replay one CUDA graph per
    input shape (static-shape loops)."""

    def __init__(self, engine, *, device="cuda", cuda_graph: bool = False, copy_outputs: bool = True):
        self.device = torch.device(device)
        if isinstance(engine, (str, Path, bytes, bytearray, memoryview)):
            trt = require_tensorrt()
            data = Path(engine).read_bytes() if isinstance(engine, (str, Path)) else bytes(engine)
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise RuntimeError("TensorRT could not deserialize the engine (built by another TensorRT version "
                                   "or for another GPU?)")
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if _type_name(engine.get_tensor_mode(n)) == "INPUT"}
        self.input_names = [n for n in names if n in inputs]
        self.output_names = [n for n in names if n not in inputs]
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: tuple(tuple(int(x) for x in s) for s in engine.get_tensor_profile_shape(n, 0))
                        for n in self.input_names}
        self.context = engine.create_execution_context()
        self.cuda_graph, self.copy_outputs = cuda_graph, copy_outputs
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # allocate once at the profile's max shapes; the addresses never change afterwards
        self.buffers: dict[str, torch.Tensor] = {}
        for n in self.input_names:
            hi = self.profile[n][2]
            self.context.set_input_shape(n, hi)
            self.buffers[n] = torch.empty(_numel(hi), dtype=self.dtypes[n], device=self.device)
        for n in self.output_names:
            shape = tuple(int(x) for x in self.context.get_tensor_shape(n))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"output {n} has a data-dependent shape {shape}; not supported")
            self.buffers[n] = torch.empty(_numel(shape), dtype=self.dtypes[n], device=self.device)
        for n, buf in self.buffers.items():
            self.context.set_tensor_address(n, buf.data_ptr())
        self._shapes: dict[str, tuple] | None = None
        self._out_shapes: dict[str, tuple] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def check_shapes(self, shapes: Mapping[str, tuple]) -> None:
        """Raise ValueError unless every input is given with a shape inside the profile."""
        missing = [n for n in self.input_names if n not in shapes]
        if missing:
            raise ValueError(f"missing engine inputs {missing}")
        for n in self.input_names:
            s, (lo, _, hi) = tuple(shapes[n]), self.profile[n]
            if len(s) != len(lo) or any(not a <= x <= b for x, a, b in zip(s, lo, hi)):
                raise ValueError(f"input {n} has shape {s}, outside the engine's profile [{lo} .. {hi}]; "
                                 "rebuild the engine with a wider ExportSpec range")

    def set_shapes(self, shapes: Mapping[str, tuple]) -> dict[str, tuple]:
        """Set the input shapes (only when they change); returns the output shapes."""
        shapes = {n: tuple(int(x) for x in shapes[n]) for n in self.input_names}
        if shapes != self._shapes:
            self.check_shapes(shapes)
            for n, s in shapes.items():
                self.context.set_input_shape(n, s)
            self._out_shapes = {n: tuple(int(x) for x in self.context.get_tensor_shape(n)) for n in self.output_names}
            self._shapes = shapes
        return self._out_shapes

    def view(self, name: str, shape: tuple) -> torch.Tensor:
        return self.buffers[name][:_numel(shape)].view(shape)

    def __call__(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"missing engine inputs {missing}")
        out_shapes = self.set_shapes({n: tuple(feed[n].shape) for n in self.input_names})
        caller = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if caller is not None:
            self.stream.wait_stream(caller)  # inputs written on the caller's stream come first
        with torch.cuda.stream(self.stream) if self.stream is not None else _nullcontext():
            for n in self.input_names:
                self.view(n, self._shapes[n]).copy_(feed[n], non_blocking=True)
            self._execute()
            outs = {n: self.view(n, s) for n, s in out_shapes.items()}
            if self.copy_outputs:
                outs = {n: t.clone() for n, t in outs.items()}
        if caller is not None:
            caller.wait_stream(self.stream)
            for t in outs.values():
                t.record_stream(caller)
        return outs

    def _execute(self) -> None:
        handle = self.stream.cuda_stream if self.stream is not None else 0
        if not self.cuda_graph or self.stream is None:
            if not self.context.execute_async_v3(handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            return
        key = tuple(sorted(self._shapes.items()))
        graph = self._graphs.get(key)
        if graph is None:
            if not self.context.execute_async_v3(handle):  # warm-up run for this shape, outside the capture
                raise RuntimeError("TensorRT execute_async_v3 failed")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.context.execute_async_v3(self.stream.cuda_stream)
            self._graphs[key] = graph
        graph.replay()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class TRTRunner:
    """Runner (flat tensors in spec order -> tuple of outputs in spec order) over a :class:`TRTEngine`."""

    name = "tensorrt"

    def __init__(self, engine, *, spec: ExportSpec, device=None, cuda_graph: bool = False):
        self.spec = spec
        self.engine = engine if isinstance(engine, TRTEngine) else TRTEngine(engine, device=device or "cuda",
                                                                               cuda_graph=cuda_graph)
        unknown = set(self.engine.input_names) - set(spec.input_names)
        if unknown:
            raise ValueError(f"engine inputs {sorted(unknown)} are not inputs of the spec {spec.name}")

    def __call__(self, *tensors):
        if len(tensors) != len(self.spec.inputs):
            raise ValueError(f"{self.spec.name}: expected {len(self.spec.inputs)} inputs, got {len(tensors)}")
        feed = {n: t for n, t in zip(self.spec.input_names, tensors) if n in self.engine.input_names}
        outs = self.engine(feed)
        return tuple(outs[n] for n in self.spec.output_names)
