"""FLAME2Video pipeline: shapes, determinism, reference cache reuse, window seams, bad inputs."""
import numpy as np
import pytest
import torch

from mvportrait.engine.flame2video import FLAME2Video, _select_frames
from mvportrait.flame.demo import demo_sequence
from mvportrait.flame.params import FlameParams


@pytest.fixture(scope="module")
def pipe(stage2_micro_run):
    out, _ = stage2_micro_run
    return FLAME2Video.from_pretrained(out / "final", overlap=1)


@pytest.fixture(scope="module")
def ref():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 40, 40, generator=g) * 2 - 1


def test_shapes_fps_and_determinism(pipe, ref):
    fp = demo_sequence(seconds=0.5)  # 25 fps -> every other frame at the model's 12.5 fps
    n = (fp.num_frames - 1) // 2 + 1
    a = pipe.generate(ref, fp, views="ring-2", steps=2, seed=3)
    assert pipe.fps == pytest.approx(12.5)
    assert a.shape == (n, 2, 32, 32, 3) and a.dtype == torch.uint8
    b = pipe.generate(ref, fp, views="ring-2", steps=2, seed=3)
    assert torch.equal(a, b)
    c = pipe.generate(ref, fp, views="ring-2", steps=2, seed=4)
    assert not torch.equal(a, c)
    assert pipe.last_timings.extra["windows"] == n - 1  # window 2, overlap 1 -> hop 1
    other = pipe.generate(ref, fp, views="ring-3", steps=1, seed=3)
    assert other.shape[1] == 3


def test_bfloat16_and_channels_last_stay_close_to_float32(stage2_micro_run, pipe, ref):
    """The fast CPU setting (bfloat16 networks, channels_last picked automatically) gives the float32
    frames within bfloat16 rounding; channels_last alone changes float32 frames by rounding only."""
    out, _ = stage2_micro_run
    fp = demo_sequence(seconds=0.3)
    plain = FLAME2Video.from_pretrained(out / "final", overlap=1, channels_last=False)
    assert not plain.channels_last and pipe.channels_last  # float32 on a CPU: channels_last too by default
    base = plain.generate(ref, fp, views="ring-2", steps=2, seed=3).int()
    bf = FLAME2Video.from_pretrained(out / "final", overlap=1, dtype=torch.bfloat16)
    assert bf.channels_last and bf.dtype == torch.bfloat16
    conv = next(m for m in bf.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    d = (bf.generate(ref, fp, views="ring-2", steps=2, seed=3).int() - base).abs().float()
    assert d.mean() < 1.5 and d.max() <= 24  # measured 0.83 / 12 levels (a micro model: rough weights)
    cl = FLAME2Video.from_pretrained(out / "final", overlap=1, channels_last=True)
    d = (cl.generate(ref, fp, views="ring-2", steps=2, seed=3).int() - base).abs()
    assert cl.channels_last and d.max() <= 1 and d.float().mean() < 0.01


def test_prepared_reference_equals_recomputing(pipe, ref):
    fp = demo_sequence(seconds=0.2)
    ctx = pipe.prepare(ref)
    a = pipe.generate(None, fp, views="ring-2", steps=2, seed=1, ref_ctx=ctx)
    b = pipe.generate(ref, fp, views="ring-2", steps=2, seed=1)
    assert torch.equal(a, b)


def test_windows_continue_the_previous_latents(pipe, ref):
    """Overlap frames of window k are fixed to window k-1's latents: the joined sequence equals a
    run whose first window is the same, and no frame pair at a border jumps more than inside."""
    fp = demo_sequence(seconds=1.0)
    ctx = pipe.prepare(ref)
    maps, _ = pipe.render_conditions(fp, "ring-2")
    full = pipe.generate_from_maps(ctx, maps, steps=2, seed=0)
    first = pipe.generate_from_maps(ctx, maps[:, :, :2], steps=2, seed=0)
    assert torch.equal(full[:2], first)
    d = (full[1:].float() - full[:-1].float()).abs().mean((1, 2, 3, 4))
    assert torch.isfinite(d).all() and d.max() < 4 * d.mean() + 1.0


def test_model_frames_resample_by_fps(pipe):
    fp = demo_sequence(seconds=1.0, fps=50.0)  # 50 frames at 50 fps -> 13 at 12.5 fps
    idx = pipe.model_frames(fp)
    assert len(idx) == 13 and idx[0] == 0 and idx[1] == 4 and int(idx[-1]) == 48
    sel = _select_frames(fp, idx)
    assert sel.num_frames == 13 and torch.equal(sel.jaw_pose[0, 1], fp.jaw_pose[0, 4])


def test_bad_inputs(pipe, ref, tmp_path):
    fp = demo_sequence(seconds=0.2)
    with pytest.raises(ValueError, match="steps"):
        pipe.generate(ref, fp, steps=0)
    with pytest.raises(ValueError, match="guidance"):
        pipe.generate(ref, fp, guidance=float("nan"))
    with pytest.raises(TypeError, match="FlameParams"):
        pipe.generate(ref, np.zeros((3, 9)))
    with pytest.raises(ValueError, match="NaN"):
        pipe.prepare(torch.full((3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        pipe.prepare(torch.zeros(4, 32, 32))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError):
        pipe.prepare(bad)
    two = FlameParams.cat([fp, fp], dim=0)
    with pytest.raises(ValueError, match="one sequence"):
        pipe.render_conditions(two, "ring-2")
    with pytest.raises(ValueError, match="maps must have shape"):
        pipe.generate_from_maps(pipe.prepare(ref), torch.zeros(1, 2, 3, 4, 32, 32))


def test_auto_dtype_rule(monkeypatch):
    """dtype auto: bfloat16 with torch / compile on CUDA or a CPU with oneDNN bfloat16 kernels, else float32."""
    import argparse

    from mvportrait.cli_stage2 import dtype_arg
    from mvportrait.engine.flame2video import auto_dtype

    for backend in ("onnxruntime", "tensorrt"):
        assert auto_dtype("cpu", backend) == torch.float32 and auto_dtype("cuda", backend) == torch.float32
    assert auto_dtype("cuda", "torch") == torch.bfloat16 == auto_dtype("cuda", "compile") == auto_dtype("cuda", None)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert auto_dtype("cpu") == torch.bfloat16
    args = argparse.Namespace(dtype="auto", device="cpu", backend="stage1=torch,stage2=onnxruntime")
    assert dtype_arg(args) == torch.float32
    args.backend = None
    monkeypatch.setenv("MVP_BACKEND", "compile")
    assert dtype_arg(args) == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert auto_dtype("cpu", "torch") == torch.float32 and dtype_arg(args) == torch.float32
    args.dtype = "float16"
    assert dtype_arg(args) == torch.float16


def test_cli_dtype_defaults():
    """generate and stream default to auto (the fast setting); eval keeps float32 (its reported numbers)."""
    from mvportrait.cli import build_parser

    p = build_parser()
    assert p.parse_args(["generate", "--prompt", "nods"]).dtype == "auto"
    assert p.parse_args(["stream", "--prompt", "nods"]).dtype == "auto"
    assert p.parse_args(["eval", "stage2"]).dtype == "float32"
