"""Backends: selection, clear errors, adapters with the modules' call signatures, and end-to-end parity
(the same seed through torch, onnxruntime and compile gives the same frames within a stated tolerance).

Tolerance for frames (uint8, 0-255): mean absolute pixel difference <= 0.5 against torch. ONNX Runtime
and inductor compute in fp32 like torch, so per-call differences are ~1e-6 and only a few pixels can
round the other way; a broken graph moves the mean by tens of levels.
"""
import importlib.util
import threading

import numpy as np
import pytest
import torch

from mvportrait import envs
from mvportrait.engine import backends
from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.export.cache import ArtifactCache
from mvportrait.flame.demo import demo_sequence

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="needs onnx + onnxruntime: pip install 'mvportrait[export]'")
try:
    backends.check_backend("compile")
    COMPILE_MISSING = ""
except backends.BackendUnavailable as _e:
    COMPILE_MISSING = str(_e)
needs_compile = pytest.mark.skipif(bool(COMPILE_MISSING), reason=f"compile backend unavailable: {COMPILE_MISSING}")
FRAME_MEAN_TOL = 0.5  # mean |frame - torch frame| in uint8 levels


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ArtifactCache(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def ref():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def torch_frames(stage2_micro_run, ref):
    out, _ = stage2_micro_run
    pipe = FLAME2Video.from_pretrained(out / "final", overlap=1, backend="torch")
    return pipe.generate(ref, demo_sequence(seconds=0.4), views="ring-2", steps=2, seed=5)


# ------------------------------------------------------------------------------ selection
def test_backend_spec_parsing(monkeypatch):
    assert envs.parse_backend_spec("onnxruntime") == {"stage1": "onnxruntime", "stage2": "onnxruntime"}
    assert envs.parse_backend_spec("stage2=onnxruntime") == {"stage1": "torch", "stage2": "onnxruntime"}
    assert envs.parse_backend_spec(" Stage1=compile , stage2=tensorrt") == {"stage1": "compile", "stage2": "tensorrt"}
    for bad in ("onnx", "stage3=torch", "stage1=foo", ""):
        with pytest.raises(ValueError):
            envs.parse_backend_spec(bad)
    monkeypatch.setenv("MVP_BACKEND", "stage1=torch,stage2=onnxruntime")
    assert backends.resolve_backend("stage2") == "onnxruntime" and backends.resolve_backend("stage1") == "torch"
    assert backends.resolve_backend("stage2", "compile") == "compile"  # the argument wins
    monkeypatch.setenv("MVP_BACKEND", "tensorrtx")
    with pytest.raises(ValueError, match="MVP_BACKEND"):
        envs.backend()
    monkeypatch.delenv("MVP_BACKEND")
    assert backends.resolve_backend("stage1") == "torch"


def test_unavailable_backends_say_what_to_install():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.check_backend("tvm")
    assert "torch" in backends.available_backends()
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(backends.BackendUnavailable, match="pip install 'tensorrt>=10'"):
            backends.check_backend("tensorrt")
        assert "tensorrt" not in backends.available_backends()


@needs_ort
def test_env_picks_the_stage2_backend(stage2_micro_run, monkeypatch, cache):
    out, _ = stage2_micro_run
    monkeypatch.setenv("MVP_BACKEND", "stage1=torch,stage2=onnxruntime")
    pipe = FLAME2Video.from_pretrained(out / "final", overlap=1, cache=cache)
    assert pipe.backend == "onnxruntime"
    assert isinstance(pipe.model, backends.BackendFLAME2VideoModel)
    assert isinstance(pipe.model.unet.runner, backends.OrtRunner)


# ------------------------------------------------------------------------------ end to end
@needs_ort
def test_onnxruntime_frames_match_torch(stage2_micro_run, ref, torch_frames, cache):
    out, summary = stage2_micro_run
    pipe = FLAME2Video.from_pretrained(out / "final", overlap=1, backend="onnxruntime", cache=cache)
    frames = pipe.generate(ref, demo_sequence(seconds=0.4), views="ring-2", steps=2, seed=5)
    assert frames.shape == torch_frames.shape and frames.dtype == torch.uint8
    diff = (frames.float() - torch_frames.float()).abs()
    assert diff.mean() <= FRAME_MEAN_TOL, f"mean abs pixel diff {diff.mean():.3f}"
    assert pipe.config.guidance != 1.0  # the guided (batch-doubled) UNet call was exercised
    # the exported networks are cached: a second pipeline builds nothing
    before = sorted(p.name for p in cache.entries("onnx"))
    assert len(before) == 5
    FLAME2Video.from_pretrained(out / "final", overlap=1, backend="onnxruntime", cache=cache)
    assert sorted(p.name for p in cache.entries("onnx")) == before


@needs_ort
def test_onnxruntime_matches_torch_with_other_views(stage2_micro_run, ref, cache):
    """The dynamic axes at work: 3 views, no guidance, inside the exported range."""
    out, _ = stage2_micro_run
    fp = demo_sequence(seconds=0.2)
    a = FLAME2Video.from_pretrained(out / "final", overlap=1, backend="torch").generate(
        ref, fp, views="ring-3", steps=1, seed=1, guidance=1.0)
    b = FLAME2Video.from_pretrained(out / "final", overlap=1, backend="onnxruntime", cache=cache).generate(
        ref, fp, views="ring-3", steps=1, seed=1, guidance=1.0)
    assert (a.float() - b.float()).abs().mean() <= FRAME_MEAN_TOL


@needs_compile
def test_compile_frames_match_torch(stage2_micro_run, ref, torch_frames):
    """torch.compile (inductor) end to end. Slow on a cold inductor cache (minutes on 2 CPU cores);
    seconds once /tmp/torchinductor_* holds the kernels."""
    out, _ = stage2_micro_run
    pipe = FLAME2Video.from_pretrained(out / "final", overlap=1, backend="compile")
    frames = pipe.generate(ref, demo_sequence(seconds=0.4), views="ring-2", steps=2, seed=5)
    diff = (frames.float() - torch_frames.float()).abs()
    assert diff.mean() <= FRAME_MEAN_TOL, f"mean abs pixel diff {diff.mean():.3f}"


@needs_ort
def test_stage1_onnxruntime_matches_torch(cache):
    from mvportrait.config import DenoiserConfig
    from mvportrait.engine.text2flame import Text2FLAME
    from mvportrait.models.motion_denoiser import MotionDenoiser
    from mvportrait.models.text_encoder import HashingEncoder

    torch.manual_seed(0)
    m = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion", text_cond="tokens")).eval()
    e = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")).eval()
    enc = HashingEncoder()
    a = Text2FLAME(m, e, enc, overlap=8, backend="torch")
    b = Text2FLAME(m, e, enc, overlap=8, backend="onnxruntime", cache=cache)
    assert isinstance(b.motion_model, backends.DenoiserBackend) and b.text_encoder is enc  # hashing: no net
    assert a.motion_model is m  # torch: the modules themselves
    pa = a.generate("nods twice, then smiles", seconds=1.6, steps=3, seed=2)  # 40 frames: two windows
    pb = b.generate("nods twice, then smiles", seconds=1.6, steps=3, seed=2)
    for name in ("global_pose", "neck_pose", "jaw_pose", "expression"):
        assert torch.allclose(getattr(pa, name), getattr(pb, name), atol=1e-4), name
    assert isinstance(m.decoder.layers[0].self_attn, torch.nn.MultiheadAttention)  # original untouched


# ------------------------------------------------------------------------------ adapters
@needs_ort
def test_text_net_adapter(cache):
    from mvportrait.models.text_encoder import BertConfig, BertEncoderNet, HashingEncoder

    torch.manual_seed(0)
    net = BertEncoderNet(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=32)).eval()
    from mvportrait.export.spec import stage1_specs

    spec = stage1_specs(text_net=net, max_tokens=32)["text_encoder"]
    adapter = backends.TextNetBackend(net, backends.make_runner("onnxruntime", spec, cache=cache), "onnxruntime")
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.arange(7)[None] < torch.tensor([[7], [3]])
    with torch.no_grad():
        want = net(ids, mask)
    assert torch.allclose(adapter(ids, mask), want, atol=1e-5)
    enc = HashingEncoder()
    enc.encode("warm the cache")
    clone = backends._with_text_net(enc, adapter)
    assert clone.net is adapter and clone.cache_info().currsize == 0 and enc.cache_info().currsize == 1


def test_adapters_keep_signatures_and_refuse_what_the_export_lacks(stage2_micro_run):
    from mvportrait.models.stage2 import FLAME2VideoModel

    out, _ = stage2_micro_run
    model = FLAME2VideoModel.from_pretrained(out / "final")
    bm = backends.stage2_model(model, "compile")  # compile wraps lazily: nothing is compiled until a call
    assert isinstance(bm, FLAME2VideoModel) and bm.config is model.config
    assert type(model.unet).__name__ == "MVUNet"  # the torch model is untouched
    assert backends.stage2_model(model, "torch") is model
    with pytest.raises(ValueError, match="reference cache"):
        bm.unet(torch.zeros(model.latent_shape(1)), 10, torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="posterior"):
        bm.autoencoder.encode(torch.zeros(1, 3, 32, 32), sample=True)
    with pytest.raises(ValueError, match="images must have shape"):
        bm.autoencoder.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="already runs"):
        backends.stage2_model(bm, "onnxruntime")


@needs_ort
def test_cli_generate_backend(stage2_micro_run, tmp_path, capsys, monkeypatch):
    from mvportrait.cli import main
    from mvportrait.flame import io as flame_io

    from mvportrait.models.stage2 import FLAME2VideoModel

    monkeypatch.setenv("MVP_CACHE_DIR", str(tmp_path / "cache"))
    out, _ = stage2_micro_run
    micro = FLAME2VideoModel.from_pretrained(out / "final")
    model = FLAME2VideoModel(micro.config.replace(frames=4))  # windows of 4: the CLI's default overlap fits
    model.load_state_dict(micro.state_dict())
    model.save_pretrained(tmp_path / "w4")
    seq = tmp_path / "seq.npz"
    flame_io.save_sequence(seq, demo_sequence(seconds=0.2))
    args = ["generate", "--flame", str(seq), "--weights", str(tmp_path / "w4"), "--views", "ring-2", "--steps", "1",
            "--quiet", "--reference", str(tmp_path / "ref.png")]
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "ref.png")
    assert main(args + ["--out", str(tmp_path / "a.mp4"), "--backend", "stage2=onnxruntime"]) == 0
    assert "stage 2 (onnxruntime)" in capsys.readouterr().out and (tmp_path / "a.mp4").stat().st_size > 0
    assert main(args + ["--out", str(tmp_path / "b.mp4"), "--backend", "onnx"]) == 2
    assert "--backend" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor's CUDA graphs)")
@needs_compile
def test_gpu_compile_runner_outputs_survive_later_calls():
    """reduce-overhead on CUDA: an output kept by the caller (the reference latents, an x0 estimate) is not
    overwritten by later replays (on an H200 the pipeline once failed with "accessing tensor output of
    CUDAGraphs that has been overwritten by a subsequent run")."""
    import types

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8)).cuda()
    runner = backends.CompileRunner(types.SimpleNamespace(module=net), device="cuda")
    assert runner.graphs
    xs = [torch.randn(4, 8, device="cuda") for _ in range(5)]
    kept = [runner(x)[0] for x in xs]  # every output kept while the later calls replay the graph
    with torch.inference_mode():
        want = [net(x) for x in xs]
    for k, w in zip(kept, want):
        torch.testing.assert_close(k, w, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor's CUDA graphs)")
@needs_compile
def test_gpu_compile_runner_called_from_new_threads():
    """A stream's worker is a new Python thread per stream: the compiled network (CUDA graphs) must work
    there (torch 2.11 failed with ``assert torch._C._is_key_in_tls`` in the cudagraph trees, pytorch#123177)."""
    import types

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8)).cuda()
    runner = backends.CompileRunner(types.SimpleNamespace(module=net), device="cuda")
    x = torch.randn(4, 8, device="cuda")
    with torch.inference_mode():
        want = net(x)
    outs, errors = [], []

    def work():
        try:
            for _ in range(3):
                outs.append(runner(x)[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for _ in range(3):  # three threads one after the other, as three streams
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert not errors, errors
    assert len(outs) == 9
    for o in outs:
        torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-4)


def test_cudagraph_state_is_shared_with_new_threads(monkeypatch):
    """The mechanism behind the test above, on any machine: a thread that has no cudagraph-trees state
    of its own gets the state recorded in the thread that made the first CompileRunner."""
    from torch._inductor import cudagraph_trees as cgt

    monkeypatch.setattr(backends, "_CUDAGRAPH_TLS", {})
    backends._remember_cudagraph_tls()
    main = {n: getattr(cgt.local, n) for n in backends._CUDAGRAPH_TLS_NAMES}
    seen = {}

    def work():
        seen["before"] = [hasattr(cgt.local, n) for n in backends._CUDAGRAPH_TLS_NAMES]
        backends._share_cudagraph_tls()
        seen["after"] = {n: getattr(cgt.local, n, None) for n in backends._CUDAGRAPH_TLS_NAMES}

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["before"] == [False, False]  # a new thread starts without it (the failure on torch 2.11)
    assert all(seen["after"][n] is main[n] for n in main)
