"""ONNX export of the networks in :mod:`mvportrait.export.spec`, checked and compared with PyTorch.

Stages per network (each idempotent; :func:`cached_onnx` keeps the result in the artifact cache):

1. **export**: ``torch.onnx.export`` with the TorchScript tracer (``dynamo=False``), inputs / outputs
   named and dynamic axes labelled from the spec, traced at the spec's opt shape. Custom kernels trace
   through their PyTorch reference (``_axis_impl`` picks it under tracing); SDPA lowers to
   MatMul / Softmax. Opset 17 by default (17-20 run in ONNX Runtime and TensorRT 10; opset 23's
   ``Attention`` with a broadcast mask fails in ONNX Runtime's CPU provider).
2. **external data**: a graph over 2 GB cannot be one protobuf; the exporter then writes one file
   per tensor, which is folded here into one ``<model>.onnx.data`` (streamed, tensor by tensor).
   ``external_data=True`` forces that layout for any size.
3. **check**: ``onnx.checker.check_model`` on the path (works past 2 GB), then shape inference in
   place (``strict_mode``); the inferred static output sizes must equal the spec's.
4. **parity** (:func:`check_parity`): ONNX Runtime (CPU provider) against the PyTorch module on fresh
   random inputs at every parity point of the spec (opt and min: two shapes inside the dynamic
   range); per output max abs error, max abs error relative to the output's largest magnitude, mean
   abs error, and pass / fail against ``atol + rtol * max|ref|``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from mvportrait.export.networks import no_mha_fastpath
from mvportrait.export.spec import ExportSpec

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OPSET", "SUPPORTED_OPSETS", "export_onnx", "check_onnx", "check_parity", "cached_onnx",
           "module_fingerprint", "onnx_key_fields", "ort_session", "INSTALL_HINT"]

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = (17, 18, 19, 20)
MODEL_FILE = "model.onnx"
INSTALL_HINT = "pip install 'mvportrait[export]'  (onnx, onnxscript, onnxruntime)"
_PROTO_LIMIT = 2 ** 31 - 1


def _require(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the `{name}` package: {INSTALL_HINT}") from e


# ----------------------------------------------------------------------------------- identity
def module_fingerprint(module: nn.Module) -> str:
    """sha256 over the module's weights (names, dtypes, shapes, bytes) and the source of every module
    class in it: what the traced graph depends on besides the shapes and the exporter."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (load the weights first)")
        data = t.cpu().contiguous().reshape(-1)
        if data.numel():
            h.update(data.view(torch.uint8).numpy().tobytes() if data.dtype != torch.bool else data.numpy().tobytes())
    files = set()
    for m in module.modules():
        if type(m).__module__.split(".")[0] == "torch":
            continue  # torch's own modules are pinned by the torch version in the key
        try:
            files.add(inspect.getsourcefile(type(m)))
        except TypeError:
            continue
    for f in sorted(x for x in files if x):
        h.update(f"{Path(f).name}|".encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def onnx_key_fields(spec: ExportSpec, *, opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                    fingerprint: str | None = None) -> dict:
    """Cache key fields of one exported network (see ``export/cache.py``)."""
    from mvportrait.export.cache import library_versions

    return {"stage": "onnx", "network": spec.name, "graph": fingerprint or module_fingerprint(spec.module),
            "spec": spec.to_dict(), "opset": opset, "external_data": external_data,
            "exporter": "torchscript", "versions": library_versions("torch", "onnx")}


# ----------------------------------------------------------------------------------- export
def export_onnx(spec: ExportSpec, path, *, opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                check: bool = True) -> Path:
    """Export ``spec.module`` to ``path`` (stages 1-3 of the module docstring); returns the path.

    ``external_data``: None = only when the graph needs it (> 2 GB), True = always, False = never
    (a > 2 GB graph then raises)."""
    onnx = _require("onnx")
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be one of {SUPPORTED_OPSETS} (what ONNX Runtime and TensorRT 10 both run), "
                         f"got {opset}")
    if spec.module is None:
        raise ValueError(f"spec {spec.name!r} carries no module to export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = spec.module.eval()
    args = spec.sample_inputs(spec.point("opt"), seed=0)
    t0 = time.perf_counter()
    # nn.MultiheadAttention's fused inference path has no ONNX symbolic: trace the composite ops
    with no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-derived Python ints are expected
        torch.onnx.export(module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    split = _fold_external_data(path)
    if external_data and not split:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        split = True
    if external_data is False and split:
        raise ValueError(f"{spec.name}: the graph is over 2 GB and needs external data (external_data=False given)")
    log.info("exported %s to %s in %.1f s%s", spec.name, path, time.perf_counter() - t0,
             " (external data)" if split else "")
    if check:
        check_onnx(spec, path)
    return path


def _fold_external_data(path: Path) -> bool:
    """Fold the exporter's one-file-per-tensor external data into ``<name>.data``; True if external."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    if not tensors:
        return False
    base = path.parent
    data_name = path.name + ".data"
    if any(e.key == "location" and e.value == data_name for t in tensors for e in t.external_data):
        return True  # already folded
    offset, old = 0, []
    with open(base / data_name, "wb") as out:
        for t in tensors:
            info = {e.key: e.value for e in t.external_data}
            src = base / info["location"]
            with open(src, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                n = int(info["length"]) if "length" in info else None
                data = f.read() if n is None else f.read(n)
            pad = (-offset) % 4096  # page-aligned tensors (mmap-friendly)
            out.write(b"\0" * pad)
            offset += pad
            out.write(data)
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(data)
            old.append(src)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    for src in set(old):
        if src.name != data_name:
            src.unlink(missing_ok=True)
    return True


def check_onnx(spec: ExportSpec, path) -> dict:
    """onnx.checker + strict shape inference (in place); the inferred static output sizes must equal
    the spec's. Returns {output: inferred shape (ints, or dim labels for dynamic axes)}."""
    onnx = _require("onnx")
    path = str(path)
    onnx.checker.check_model(path)
    onnx.shape_inference.infer_shapes_path(path, path, check_type=True, strict_mode=True)
    model = onnx.load(path, load_external_data=False)
    inferred = {}
    for v in model.graph.output:
        dims = v.type.tensor_type.shape.dim
        inferred[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    if [v.name for v in model.graph.input] != spec.input_names:
        raise ValueError(f"{spec.name}: graph inputs {[v.name for v in model.graph.input]} differ from the spec "
                         f"{spec.input_names} (an input the network ignores is dropped by the exporter)")
    for out in spec.outputs:
        got = inferred.get(out.name)
        if got is None:
            raise ValueError(f"{spec.name}: output {out.name!r} is missing from the graph")
        if len(got) != len(out.shape):
            raise ValueError(f"{spec.name}: output {out.name!r} has rank {len(got)}, the spec says {len(out.shape)}")
        for i, (g, s) in enumerate(zip(got, out.shape)):
            if isinstance(s, int) and isinstance(g, int) and g and g != s:
                raise ValueError(f"{spec.name}: output {out.name!r} axis {i} is {g}, the spec says {s}")
    return inferred


# ----------------------------------------------------------------------------------- runtime
def ort_session(path, *, providers: Sequence[str] | None = None, threads: int | None = None,
                low_memory: bool = False):
    """An ONNX Runtime session (CPU provider unless ``providers`` says otherwise). ``low_memory``: no
    weight prepacking and basic graph optimisation only (multi-GB graphs: no second copy of the weights)."""
    ort = _require("onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if low_memory
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if low_memory:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or ["CPUExecutionProvider"]))


def check_parity(spec: ExportSpec, path, *, points: Sequence[dict] | None = None, seed: int | None = None,
                 atol: float = 1e-4, rtol: float = 1e-4, providers: Sequence[str] | None = None,
                 release: Callable[[], None] | None = None, low_memory: bool = False) -> dict:
    """ONNX Runtime vs PyTorch on fresh random inputs at each point (default: the spec's parity points).

    Returns ``{"network", "seed", "passed", "points": [{"point", "outputs": {name: {"max_abs",
    "max_rel", "mean_abs", "ref_max", "passed"}}}]}``; ``max_rel`` is max abs error / max |reference|.
    A fresh seed is drawn (and recorded) unless ``seed`` is given. The PyTorch outputs are computed first;
    ``release`` (e.g. moving the module to the meta device) then runs before the ONNX Runtime session is
    created, so a multi-GB network is never in memory twice (with ``low_memory`` for the session)."""
    import numpy as np

    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    g = torch.Generator().manual_seed(seed)
    report = {"network": spec.name, "seed": seed, "atol": atol, "rtol": rtol, "points": [], "passed": True}
    cases = []
    for point in points or spec.parity_points():
        point = spec.check_point(point)
        inputs = spec.sample_inputs(point, generator=g)
        with torch.inference_mode(), no_mha_fastpath():
            ref = spec.module.eval()(*inputs)
        cases.append((point, inputs, ref if isinstance(ref, (tuple, list)) else (ref,)))
    if release is not None:
        release()
    sess = ort_session(path, providers=providers, low_memory=low_memory)
    names = [i.name for i in sess.get_inputs()]
    for point, inputs, ref in cases:
        feed = {n: t.numpy() for n, t in zip(spec.input_names, inputs) if n in names}
        t0 = time.perf_counter()
        got = sess.run(spec.output_names, feed)
        ort_s = time.perf_counter() - t0
        outs, ok_all = {}, True
        for name, r, o in zip(spec.output_names, ref, got):
            r = r.float().numpy()
            if r.shape != o.shape:
                outs[name] = {"passed": False, "error": f"shape {tuple(o.shape)} vs torch {tuple(r.shape)}"}
                ok_all = False
                continue
            diff = np.abs(o.astype(np.float64) - r.astype(np.float64))
            ref_max = float(np.abs(r).max()) if r.size else 0.0
            max_abs = float(diff.max()) if r.size else 0.0
            ok = bool(np.isfinite(o).all()) and max_abs <= atol + rtol * ref_max
            outs[name] = {"shape": list(r.shape), "max_abs": max_abs, "max_rel": max_abs / max(ref_max, 1e-12),
                          "mean_abs": float(diff.mean()) if r.size else 0.0, "ref_max": ref_max, "passed": ok}
            ok_all &= ok
        report["points"].append({"point": point, "ort_s": round(ort_s, 4), "passed": ok_all, "outputs": outs})
        report["passed"] &= ok_all
    return report


# ----------------------------------------------------------------------------------- cache
def cached_onnx(spec: ExportSpec, cache=None, *, opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                fingerprint: str | None = None) -> Path:
    """Path of the checked ONNX file for ``spec`` from the artifact cache, exported on a miss."""
    from mvportrait.export.cache import ArtifactCache

    cache = cache if cache is not None else ArtifactCache()
    fields = onnx_key_fields(spec, opset=opset, external_data=external_data, fingerprint=fingerprint)
    entry = cache.get_or_build("onnx", spec.name, fields,
                               lambda d: _build_entry(spec, d, opset, external_data))
    return entry / MODEL_FILE


def _build_entry(spec, folder: Path, opset, external_data):
    export_onnx(spec, folder / MODEL_FILE, opset=opset, external_data=external_data)
    (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    return None
