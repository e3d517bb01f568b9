"""Converters: diffusers UNet / AutoencoderKL / AnimateDiff weights give the same numbers in our modules.

The diffusers models are built from config with random weights (no downloads).
"""
import logging

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
logging.getLogger("diffusers").setLevel(logging.ERROR)

from mvportrait.config import AutoencoderConfig, UNetConfig  # noqa: E402
from mvportrait.models.autoencoder import Autoencoder  # noqa: E402
from mvportrait.models.convert import (load_animatediff_motion, load_diffusers_autoencoder,  # noqa: E402
                                       load_diffusers_unet, read_state_dict)
from mvportrait.models.unet import MVUNet, ReferenceUNet  # noqa: E402
from mvportrait.models.unet_blocks import axis_positions  # noqa: E402

OUR_UNET = UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, False), heads=8,
                      cross_attention_dim=32, norm_groups=8, temporal=False, view=False, temporal_attentions=2,
                      flame_widths=(8,))


@pytest.fixture(scope="module")
def sd_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8).eval()


def _unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g)


@pytest.mark.parametrize("axes", [False, True])
def test_unet_matches_diffusers(sd_unet, axes):
    ours = MVUNet(OUR_UNET.replace(temporal=axes, view=axes)).eval()
    report = load_diffusers_unet(ours, sd_unet.state_dict(), strict=True)
    assert report.ok and not report.unexpected and len(report.matched) == len(sd_unet.state_dict())
    x, t, ehs = _unet_inputs()
    with torch.no_grad():
        want = sd_unet(x, t, ehs).sample
        got = ours(x[:, None, None], t, ehs)[:, 0, 0]  # V = F = 1, no reference, no FLAME
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_unet_records_the_self_attention_inputs(sd_unet):
    ref = ReferenceUNet(OUR_UNET).eval()
    report = load_diffusers_unet(ref, sd_unet.state_dict(), strict=True)
    assert sorted(report.ignored) == ["conv_norm_out.bias", "conv_norm_out.weight", "conv_out.bias", "conv_out.weight"]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("hidden_states", args[0] if args
                                                                                    else None)), with_kwargs=True)
             for name, m in sd_unet.named_modules() if name.endswith("attn1")]
    x, _, ehs = _unet_inputs(1)
    try:
        with torch.no_grad():
            sd_unet(x, torch.zeros(2), ehs)
            cache = ref(x, ehs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(cache) == 4
    for a, b in zip(cache.hidden, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sd_vae():
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=8).eval()


def _our_vae(sd_vae):
    return Autoencoder(AutoencoderConfig(block_out=(32, 64), layers_per_block=1, norm_groups=8,
                                         scaling_factor=sd_vae.config.scaling_factor)).eval()


def test_autoencoder_matches_diffusers(sd_vae):
    ours = _our_vae(sd_vae)
    assert load_diffusers_autoencoder(ours, sd_vae.state_dict(), strict=True).ok
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dist = sd_vae.encode(x).latent_dist
        mean, logvar = ours.encode_dist(x)
        want_img = sd_vae.decode(z).sample
        got_img = ours.decode(z * ours.cfg.scaling_factor)
        scaled = ours.encode(x)
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, dist.logvar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled, dist.mean * sd_vae.config.scaling_factor, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_img, want_img, rtol=1e-5, atol=1e-5)


def test_autoencoder_legacy_attention_names(sd_vae):
    legacy = {}
    for k, v in sd_vae.state_dict().items():
        if ".attentions.0." in k:  # old diffusers: query/key/value/proj_attn as 1x1 convs
            for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                             (".to_out.0.", ".proj_attn.")):
                k = k.replace(new, old)
            v = v[:, :, None, None] if v.dim() == 2 else v
        legacy[k] = v
    a, b = _our_vae(sd_vae), _our_vae(sd_vae)
    assert load_diffusers_autoencoder(a, sd_vae.state_dict(), strict=True).ok
    assert load_diffusers_autoencoder(b, legacy, strict=True).ok
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


class _PerFrameGroupNorm(nn.Module):
    """Test shim: diffusers' motion module normalises over all frames; AnimateDiff (and we) per frame."""

    def __init__(self, gn):
        super().__init__()
        self.gn = gn

    def forward(self, x):  # (B, C, F, H, W)
        b, c, f, h, w = x.shape
        y = self.gn(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def motion_adapter():
    torch.manual_seed(2)
    ma = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                 motion_mid_block_layers_per_block=1, motion_num_attention_heads=8,
                                 motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero everywhere (proj_out starts at zero), norms near one
        for name, p in ma.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.05)
    return ma


def test_animatediff_motion_modules_match_diffusers(sd_unet, motion_adapter):
    ours = MVUNet(OUR_UNET.replace(temporal=True)).eval()
    load_diffusers_unet(ours, sd_unet.state_dict(), strict=True)
    report = load_animatediff_motion(ours, motion_adapter.state_dict(), strict=True)
    assert report.ok and not report.unexpected and len(report.ignored) == 7  # the 7 positional tables
    pe = motion_adapter.state_dict()["down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"][0]
    torch.testing.assert_close(axis_positions(32, 32), pe, rtol=0, atol=1e-6)

    motion = diffusers.UNetMotionModel.from_unet2d(sd_unet, motion_adapter).eval()
    for m in motion.modules():
        if type(m).__name__ == "AnimateDiffTransformer3D":
            m.norm = _PerFrameGroupNorm(m.norm)
    g = torch.Generator().manual_seed(6)
    x, ehs = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)  # (B, C, F, h, w)
    with torch.no_grad():
        want = motion(x, torch.tensor([50]), ehs.repeat_interleave(3, 0)).sample  # it takes (B*F, L, D)
        got = ours(x.permute(0, 2, 1, 3, 4)[:, None], torch.tensor([50]), ehs)[:, 0].permute(0, 2, 1, 3, 4)
        spatial_only = sd_unet(x[:, :, 1], torch.tensor([50]), ehs).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[:, :, 1] - spatial_only).abs().max() > 1e-3  # the motion modules did something


def _to_original_animatediff(sd):
    """diffusers MotionAdapter keys -> original AnimateDiff checkpoint keys."""
    out = {}
    for k, v in sd.items():
        head, rest = k.split(".motion_modules.", 1)
        j, rest = rest.split(".", 1)
        for new, old in ((".norm1.", ".norms.0."), (".attn1.", ".attention_blocks.0."),
                         (".norm2.", ".norms.1."), (".attn2.", ".attention_blocks.1."), (".norm3.", ".ff_norm.")):
            rest = ("." + rest).replace(new, old)[1:]
        if rest.endswith("pos_embed.pe"):
            for a in (0, 1):
                out[f"{head}.motion_modules.{j}.temporal_transformer."
                    + rest.replace("pos_embed.pe", f"attention_blocks.{a}.pos_encoder.pe")] = v
            continue
        out[f"{head}.motion_modules.{j}.temporal_transformer.{rest}"] = v
    return out


def test_original_animatediff_layout_loads_the_same(motion_adapter, tmp_path):
    a, b = MVUNet(OUR_UNET.replace(temporal=True)), MVUNet(OUR_UNET.replace(temporal=True))
    original = _to_original_animatediff(motion_adapter.state_dict())
    assert any(".temporal_transformer.attention_blocks" in k or ".attention_blocks." in k for k in original)
    path = tmp_path / "mm.ckpt"
    torch.save({"state_dict": original}, path)
    assert load_animatediff_motion(a, motion_adapter.state_dict(), strict=True).ok
    rb = load_animatediff_motion(b, path, strict=True)
    assert rb.ok and len(rb.ignored) == 14
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if ".temporal." in k)


def test_reports_and_errors(sd_unet, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in sd_unet.state_dict().items()}, str(path))
    wrong = MVUNet(OUR_UNET.replace(cross_attention_dim=48))
    report = load_diffusers_unet(wrong, path)
    assert not report.ok and report.shape_mismatch and not report.missing
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k, _, _ in report.shape_mismatch)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_diffusers_unet(wrong, path, strict=True)
    partial = {k: v for k, v in sd_unet.state_dict().items() if not k.startswith("conv_out.")}
    partial["extra.weight"] = torch.zeros(1)
    r = load_diffusers_unet(MVUNet(OUR_UNET), partial)
    assert r.missing == ["conv_out.bias", "conv_out.weight"] and r.unexpected == ["extra.weight"]
    with pytest.raises(ValueError, match="CompVis/LDM"):
        read_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_state_dict(bad)
    with pytest.raises(TypeError, match="Autoencoder"):
        load_diffusers_autoencoder(MVUNet(OUR_UNET), {})
