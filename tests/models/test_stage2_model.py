"""FLAME2VideoModel: FLAME encoder, reference preparation, guidance, checkpoints, configs."""
import json

import pytest
import torch

from micro import fill_zero_params, micro_stage2_config

from mvportrait.config import Stage2Config, UNetConfig
from mvportrait.models.flame_encoder import FlameEncoder
from mvportrait.models.stage2 import FLAME2VideoModel, ReferenceContext
from mvportrait.models.unet import ReferenceCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FLAME2VideoModel(micro_stage2_config()).eval()
    fill_zero_params(m)
    return m


def _data(model, b=1, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    renders = torch.rand(b, cfg.views, cfg.frames, 5, cfg.image_size, cfg.image_size, generator=g)
    x = torch.randn(model.latent_shape(b), generator=g)
    return ref, renders, x


def test_flame_encoder_zero_init_and_shapes():
    torch.manual_seed(0)
    enc = FlameEncoder(5, 32, (16, 32, 64), downsample=4)
    r = torch.rand(3, 5, 32, 32)
    out = enc(r)
    assert out.shape == (3, 32, 8, 8) and not out.any()
    fill_zero_params(enc)
    assert enc(r).abs().max() > 0
    with pytest.raises(ValueError, match="needs 4 widths"):
        FlameEncoder(5, 32, (16, 32, 64), downsample=8)
    with pytest.raises(ValueError, match="multiples of 4"):
        enc(torch.rand(1, 5, 30, 32))
    with pytest.raises(ValueError, match=r"renders must have shape \(N, 5, H, W\)"):
        enc(torch.rand(1, 3, 32, 32))


def test_fresh_model_ignores_flame_renders():
    torch.manual_seed(1)
    m = FLAME2VideoModel(micro_stage2_config()).eval()
    ref, renders, x = _data(m)
    with torch.no_grad():
        ctx = m.prepare_reference(ref)
        a = m.denoise(x, 500, m.encode_renders(renders), ctx)
        b = m.denoise(x, 500, None, ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pipeline_shapes_and_param_counts(model):
    ref, renders, x = _data(model)
    with torch.no_grad():
        ctx = model.prepare_reference(ref)
        feats = model.encode_renders(renders)
        out = model.denoise(x, torch.tensor(300), feats, ctx)
    assert isinstance(ctx, ReferenceContext) and isinstance(ctx.cache, ReferenceCache) and ctx.cache.projected
    assert ctx.latent.shape == (1, 4, 8, 8) and ctx.image_tokens.shape == ctx.null_tokens.shape == (1, 4, 16)
    assert feats.shape == (1, 2, 2, 16, 8, 8) and out.shape == x.shape
    counts = model.param_counts()
    parts = ("autoencoder", "flame_encoder", "image_embedder", "unet", "reference_unet")
    assert sum(counts[k] for k in parts) == counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["unet"] == counts["unet_spatial"] + counts["unet_temporal"] + counts["unet_view"]


def test_presets_on_meta_device():
    counts = {}
    for name in ("tiny", "sd15"):
        with torch.device("meta"):
            counts[name] = FLAME2VideoModel.from_name(name).param_counts()
    assert counts["tiny"]["total"] < 20_000_000 < 2_000_000_000 < counts["sd15"]["total"]
    assert counts["sd15"]["unet_spatial"] == 859_520_964 and counts["sd15"]["autoencoder"] == 83_653_863


def test_guidance_is_one_batched_call_of_cond_and_uncond(model):
    ref, renders, x = _data(model, b=2, seed=1)
    with torch.no_grad():
        ctx = model.prepare_reference(ref)
        feats = model.encode_renders(renders)
        t = torch.tensor([100, 800])
        cond = model.unet(x, t, ctx.image_tokens, feats, ctx.cache)
        uncond = model.unet(x, t, ctx.null_tokens, feats, None)  # null tokens, no reference
        guided = model.denoise(x, t, feats, ctx, guidance=3.0)
        plain = model.denoise(x, t, feats, ctx)
        one = model.denoise(x, t, feats, ctx, guidance=1.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, cond, rtol=1e-5, atol=1e-5)
    assert torch.equal(one, plain)
    assert (cond - uncond).abs().max() > 1e-3


def test_reference_context_serves_a_larger_batch(model):
    ref, renders, x = _data(model, b=1, seed=2)
    with torch.no_grad():
        ctx = model.prepare_reference(ref)
        feats = model.encode_renders(renders)
        x2 = torch.cat([x, x.flip(1)])
        f2 = torch.cat([feats, feats.flip(1)])
        both = model.denoise(x2, 400, f2, ctx, guidance=2.0)
        first = model.denoise(x, 400, feats, ctx, guidance=2.0)
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="ReferenceContext"):
        model.denoise(x, 400, feats, ctx.cache)


def test_save_load_roundtrip(model, tmp_path):
    ref, renders, x = _data(model, seed=3)
    with torch.no_grad():
        want = model.denoise(x, 250, model.encode_renders(renders), model.prepare_reference(ref), guidance=2.0)
    model.save_pretrained(tmp_path / "fp32", dtype=torch.float32)
    model.save_pretrained(tmp_path / "fp16")
    meta = json.loads((tmp_path / "fp16" / "config.json").read_text())
    assert meta["dtype"] == "float16" and meta["param_counts"]["total"] == model.param_counts()["total"]
    assert not list((tmp_path / "fp16").glob(".*.tmp"))
    exact = FLAME2VideoModel.from_pretrained(tmp_path / "fp32")
    assert exact.config == model.config and not exact.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), exact.state_dict().values()))
    half = FLAME2VideoModel.from_pretrained(tmp_path / "fp16", dtype=torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in half.parameters())
    with torch.no_grad():
        got = half.denoise(x, 250, half.encode_renders(renders), half.prepare_reference(ref), guidance=2.0)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert (got - want).abs().max() > 0  # fp16 storage really rounded
    h16 = FLAME2VideoModel.from_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert next(h16.parameters()).dtype == torch.float16


def test_load_errors(model, tmp_path):
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no stage-2 checkpoint folder"):
        FLAME2VideoModel.from_pretrained(tmp_path / "missing")
    weights = folder / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        FLAME2VideoModel.from_pretrained(folder)
    weights.write_bytes(blob)
    cfg_path = folder / "config.json"
    meta = json.loads(cfg_path.read_text())
    other = micro_stage2_config(image_embed_width=12).to_dict()
    cfg_path.write_text(json.dumps({**meta, "config": other}))
    with pytest.raises(ValueError, match="shapes the config does not give"):
        FLAME2VideoModel.from_pretrained(folder)
    cfg_path.write_text(json.dumps({**meta, "config": micro_stage2_config(unet=micro_stage2_config().unet.replace(view=False))
                                    .to_dict()}))
    with pytest.raises(ValueError, match="unexpected keys"):
        FLAME2VideoModel.from_pretrained(folder)
    cfg_path.write_text("{bad json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FLAME2VideoModel.from_pretrained(folder)
    cfg_path.write_text(json.dumps({**meta, "format": "something/else"}))
    with pytest.raises(ValueError, match="expected 'mvportrait.stage2/1'"):
        FLAME2VideoModel.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        FLAME2VideoModel.from_pretrained(folder)


def test_stage2_config_presets_and_validation():
    for name in ("tiny", "sd15"):
        cfg = Stage2Config.from_name(name)
        assert Stage2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    tiny = Stage2Config.from_name("tiny")
    assert tiny.latent_size == 32 and tiny.prediction == "v_prediction"
    assert Stage2Config.from_name("sd15").prediction == "epsilon"
    with pytest.raises(ValueError, match="multiple of 16"):
        Stage2Config.from_name("tiny", image_size=120)
    with pytest.raises(ValueError, match="prediction"):
        Stage2Config.from_name("tiny", prediction="sample")
    with pytest.raises(ValueError, match="needs 3 widths"):
        Stage2Config.from_name("tiny", unet=UNetConfig.from_name("tiny", flame_widths=(8, 16)))
    with pytest.raises(ValueError, match="latent channels"):
        Stage2Config.from_name("tiny", unet=UNetConfig.from_name("tiny", in_channels=8))
    with pytest.raises(ValueError, match="unknown Stage2Config fields"):
        Stage2Config.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="unknown stage-2 preset"):
        Stage2Config.from_name("huge")
