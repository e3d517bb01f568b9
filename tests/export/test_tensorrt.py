"""TensorRT path: what runs without TensorRT is tested with stand-ins (profiles, keys, caching, layer
precision, the runtime wrapper's shape and binding logic); building and running real engines needs
TensorRT and a GPU and is skipped here."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from mvportrait.export import tensorrt as trtx
from mvportrait.export.cache import ArtifactCache
from mvportrait.export.spec import Dim, ExportSpec, TensorSpec, stage2_specs

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason=trtx.NOT_INSTALLED)


# ------------------------------------------------------------------------------------ stand-ins
class _Name:
    def __init__(self, name):
        self.name = name


class FakeContext:
    """Execution context of an engine computing y = 2 x + 1 (x: (B, N) float32, y same shape)."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addr, self.set_calls, self.runs = engine, {}, {}, 0, 0

    def set_input_shape(self, name, shape):
        self.set_calls += 1
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"] if name == "y" else self.shapes[name]

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        self.runs += 1
        bufs = {t.data_ptr(): t for t in self.engine.wrapper_buffers()}
        x, y = bufs[self.addr["x"]], bufs[self.addr["y"]]
        n = 1
        for s in self.shapes["x"]:
            n *= s
        y[:n] = 2 * x[:n].float() + 1
        return True


class FakeEngine:
    num_io_tensors = 2

    def __init__(self):
        self.wrapper = None

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, name):
        return _Name("INPUT" if name == "x" else "OUTPUT")

    def get_tensor_dtype(self, name):
        return _Name("FLOAT")

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 2), (2, 4), (4, 8)]

    def create_execution_context(self):
        self.context = FakeContext(self)
        return self.context

    def wrapper_buffers(self):
        return list(self.wrapper.buffers.values())


def _spec():
    return ExportSpec("toy", (TensorSpec("x", ("B", "N")),), (TensorSpec("y", ("B", "N")),),
                      (Dim("B", 1, 2, 4), Dim("N", 2, 4, 8)))


def _engine(**kw):
    fake = FakeEngine()
    eng = trtx.TRTEngine(fake, device="cpu", **kw)
    fake.wrapper = eng
    return eng, fake


# ------------------------------------------------------------------------------------ wrapper
def test_wrapper_allocates_once_and_sets_shapes_only_on_change():
    eng, fake = _engine()
    assert eng.input_names == ["x"] and eng.output_names == ["y"]
    assert eng.profile["x"] == ((1, 2), (2, 4), (4, 8))
    assert eng.buffers["x"].numel() == 32 and eng.buffers["y"].numel() == 32  # max profile shape
    ptrs = {n: b.data_ptr() for n, b in eng.buffers.items()}
    assert fake.context.addr == ptrs
    x = torch.randn(2, 3)
    y = eng({"x": x})["y"]
    assert torch.allclose(y, 2 * x + 1) and y.shape == (2, 3)
    calls = fake.context.set_calls
    y2 = eng({"x": x + 1})["y"]
    assert fake.context.set_calls == calls  # same shape: no new set_input_shape
    assert torch.allclose(y2, 2 * x + 3) and torch.allclose(y, 2 * x + 1)  # outputs are copies
    y3 = eng({"x": torch.ones(4, 8)})["y"]
    assert y3.shape == (4, 8) and fake.context.set_calls == calls + 1
    assert {n: b.data_ptr() for n, b in eng.buffers.items()} == ptrs == fake.context.addr


def test_wrapper_rejects_shapes_outside_the_profile():
    eng, _ = _engine()
    for bad in ((5, 4), (2, 1), (2, 4, 1)):
        with pytest.raises(ValueError, match="outside the engine's profile"):
            eng({"x": torch.zeros(bad)})
    with pytest.raises(ValueError, match="missing"):
        eng({})


def test_views_without_copies_alias_the_binding():
    eng, _ = _engine(copy_outputs=False)
    y = eng({"x": torch.zeros(2, 2)})["y"]
    assert y.data_ptr() == eng.buffers["y"].data_ptr()


def test_runner_maps_spec_order():
    eng, _ = _engine()
    run = trtx.TRTRunner(eng, spec=_spec())
    (y,) = run(torch.ones(1, 2))
    assert torch.equal(y, torch.full((1, 2), 3.0))
    with pytest.raises(ValueError, match="expected 1 inputs"):
        run()
    other = ExportSpec("o", (TensorSpec("z", (2,)),), (TensorSpec("y", (2,)),), ())
    with pytest.raises(ValueError, match="not inputs of the spec"):
        trtx.TRTRunner(eng, spec=other)


def test_dtype_mapping():
    assert trtx.torch_dtype(_Name("HALF")) == torch.float16
    assert trtx.torch_dtype(_Name("BF16")) == torch.bfloat16
    assert trtx.torch_dtype(_Name("BOOL")) == torch.bool
    assert trtx.torch_dtype(torch.int64) == torch.int64
    with pytest.raises(TypeError):
        trtx.torch_dtype(_Name("FP4"))


# ------------------------------------------------------------------------------------ build side
def test_profiles_from_the_specs(micro_model):
    specs = stage2_specs(micro_model, views=2)
    prof = specs["unet"].profile()
    lo, opt, hi = prof["sample"]
    assert lo == (1, 1, 1, 4, 4, 4) and opt == (2, 2, 2, 4, 8, 8) and hi == (2, 8, 2, 4, 8, 8)
    assert prof["reference_mask"] == ((1,), (2,), (2,))
    assert prof["key_0"][0] == prof["key_0"][2]  # reference tokens: static spatial size
    assert set(prof) == set(specs["unet"].input_names)
    assert specs["reference"].profile()["ref_latent"] == ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 8, 8))


def test_build_options_and_keys(micro_model, tmp_path):
    spec = stage2_specs(micro_model)["vae_decoder"]
    with pytest.raises(ValueError):
        trtx.BuildOptions(precision="int4")
    with pytest.raises(ValueError):
        trtx.BuildOptions(optimization_level=7)
    assert trtx.BuildOptions(precision="fp32").layers_for(spec) == ()
    assert "NORMALIZATION" in trtx.BuildOptions().layers_for(spec)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph-1")
    base = trtx.engine_key_fields(spec, onnx_file, trtx.BuildOptions(), trt_version="10.9", capability="9.0")
    assert base["compute_capability"] == "9.0" and base["versions"] == {"tensorrt": "10.9"}
    assert "timing_cache" not in base["builder"]
    variants = [
        trtx.engine_key_fields(spec, onnx_file, trtx.BuildOptions(precision="bf16"), trt_version="10.9",
                               capability="9.0"),
        trtx.engine_key_fields(spec, onnx_file, trtx.BuildOptions(), trt_version="10.10", capability="9.0"),
        trtx.engine_key_fields(spec, onnx_file, trtx.BuildOptions(), trt_version="10.9", capability="8.9"),
        trtx.engine_key_fields(spec.with_dims(N=(1, 1, 8)), onnx_file, trtx.BuildOptions(), trt_version="10.9",
                               capability="9.0"),
        trtx.engine_key_fields(spec, onnx_file, trtx.BuildOptions(workspace_gb=2), trt_version="10.9",
                               capability="9.0"),
    ]
    assert all(v != base for v in variants)
    same = trtx.engine_key_fields(spec, onnx_file, trtx.BuildOptions(timing_cache="/elsewhere"), trt_version="10.9",
                                  capability="9.0")
    assert same == base  # where the timing cache lives does not change the engine
    onnx_file.write_bytes(b"graph-2")
    assert trtx.engine_key_fields(spec, onnx_file, trtx.BuildOptions(), trt_version="10.9",
                                  capability="9.0")["onnx"] != base["onnx"]


def test_cached_engine_builds_once_and_rebuilds_corrupt(micro_model, tmp_path, monkeypatch):
    """The caching around build_engine, with the TensorRT calls stood in."""
    spec = stage2_specs(micro_model)["flame_encoder"]
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph")
    built = []

    def fake_build(path, s, options, progress=None):
        built.append(options)
        return b"ENGINE" * 100

    monkeypatch.setattr(trtx, "build_engine", fake_build)
    monkeypatch.setattr(trtx, "require_tensorrt", lambda: SimpleNamespace(__version__="10.9.0"))
    cache = ArtifactCache(tmp_path / "cache")
    p1 = trtx.cached_engine(spec, onnx_file, cache=cache, precision="fp16")
    p2 = trtx.cached_engine(spec, onnx_file, cache=cache, precision="fp16")
    assert p1 == p2 and p1.read_bytes() == b"ENGINE" * 100 and len(built) == 1
    assert built[0].timing_cache.endswith("-trt10.9.0.cache") and "tensorrt" in built[0].timing_cache
    p1.write_bytes(b"ENGINE" * 50)  # truncated engine: never loaded, rebuilt
    assert trtx.cached_engine(spec, onnx_file, cache=cache, precision="fp16").read_bytes() == b"ENGINE" * 100
    assert len(built) == 2
    trtx.cached_engine(spec, onnx_file, cache=cache, precision="bf16")
    assert len(built) == 3


def test_fp32_layers_are_pinned():
    class Layer:
        def __init__(self, kind, out_dtype="FLOAT"):
            self.type, self.precision, self.num_outputs = _Name(kind), None, 1
            self._out, self.out_types = SimpleNamespace(dtype=_Name(out_dtype)), {}

        def get_output(self, j):
            return self._out

        def set_output_type(self, j, dt):
            self.out_types[j] = dt

    layers = [Layer("NORMALIZATION"), Layer("CONVOLUTION"), Layer("SOFTMAX"), Layer("REDUCE", "INT64")]
    net = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert trtx.mark_fp32_layers(net, ("NORMALIZATION", "SOFTMAX", "REDUCE"), "f32") == 2
    assert [la.precision for la in layers] == ["f32", None, "f32", None]
    assert layers[0].out_types == {0: "f32"}


def test_missing_tensorrt_is_a_clear_error():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(ImportError, match="TensorRT is not installed on this machine.*pip install"):
        trtx.require_tensorrt()


# ------------------------------------------------------------------------------------ real TensorRT
@pytest.mark.gpu
@needs_trt
def test_engine_matches_torch(micro_model, tmp_path):
    from mvportrait.export.onnx import export_onnx

    spec = stage2_specs(micro_model.cuda())["unet"]
    path = export_onnx(spec, tmp_path / "model.onnx")
    engine = trtx.build_engine(path, spec, trtx.BuildOptions(precision="fp32", timing_cache=str(tmp_path / "t.cache")))
    assert (tmp_path / "t.cache").is_file()
    run = trtx.TRTRunner(engine, spec=spec, device="cuda")
    for point in spec.parity_points():
        x = spec.sample_inputs(point, seed=0, device="cuda")
        with torch.no_grad():
            want = spec.module(*x)
        (got,) = run(*x)
        assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_trt
def test_fp16_engine_with_cuda_graph(micro_model, tmp_path):
    from mvportrait.export.onnx import export_onnx

    spec = stage2_specs(micro_model.cuda())["vae_decoder"]
    path = export_onnx(spec, tmp_path / "model.onnx")
    engine = trtx.build_engine(path, spec, trtx.BuildOptions(precision="fp16"))
    run = trtx.TRTRunner(trtx.TRTEngine(engine, device="cuda", cuda_graph=True), spec=spec)
    x = spec.sample_inputs(seed=0, device="cuda")
    with torch.no_grad():
        want = spec.module(*x)
    for _ in range(3):  # capture, then replays
        (got,) = run(*x)
    assert (got.float() - want).abs().max() < 0.05
