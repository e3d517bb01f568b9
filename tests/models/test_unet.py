"""MVUNet / ReferenceUNet: shapes, zero-init identities, reference cache, kernels dispatch, bad input."""
import importlib.util

import pytest
import torch

from mvportrait.config import UNetConfig
from mvportrait.models import unet_blocks
from mvportrait.models.unet import MVUNet, ReferenceCache, ReferenceUNet

SMALL = dict(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), head_dim=8,
             cross_attention_dim=16, norm_groups=4, temporal_attentions=1, flame_widths=(8, 16))


def small_cfg(**kw) -> UNetConfig:
    return UNetConfig(**{**SMALL, **kw})


def randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Give every zero-initialised output projection non-zero weights (so temporal / view modules act)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("proj_out.weight") and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(b=1, v=2, f=3, s=8, seed=0, cfg=None):
    cfg = cfg or small_cfg()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, f, cfg.in_channels, s, s, generator=g)
    ehs = torch.randn(b, 5, cfg.cross_attention_dim, generator=g)
    flame = torch.randn(b, v, f, cfg.block_channels[0], s, s, generator=g)
    return x, ehs, flame


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cfg = small_cfg()
    unet, ref = MVUNet(cfg).eval(), ReferenceUNet(cfg).eval()
    randomize(unet, 1)
    return cfg, unet, ref


def test_tiny_preset_shapes():
    cfg = UNetConfig.from_name("tiny")
    torch.manual_seed(0)
    unet, ref = MVUNet(cfg).eval(), ReferenceUNet(cfg).eval()
    x, ehs, flame = inputs(1, 2, 2, 16, cfg=cfg)
    with torch.no_grad():
        cache = ref(torch.randn(1, 4, 16, 16), ehs)
        out = unet(x, torch.tensor(999), ehs, flame, unet.build_reference_cache(cache))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(cache) == unet.num_reference_layers == 7  # levels 1, 2 (1 + 2 up), mid
    assert [t.shape[1:] for t in cache.hidden] == [(64, 64), (16, 128), (16, 128), (16, 128), (16, 128),
                                                   (64, 64), (64, 64)]
    assert not hasattr(ref, "conv_out") and not any(".temporal." in n or ".views." in n
                                                    for n, _ in ref.named_parameters())


def test_sd15_parameter_count_on_meta():
    with torch.device("meta"):
        unet, ref = MVUNet(UNetConfig.from_name("sd15")), ReferenceUNet(UNetConfig.from_name("sd15"))
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    assert n(unet.spatial_parameters()) == 859_520_964  # SD1.5's UNet2DConditionModel
    assert n(unet.temporal_parameters()) == 453_209_280  # AnimateDiff v2 motion modules (incl. mid)
    assert n(unet.view_parameters()) > 0
    assert n(ref.parameters()) == 859_520_964 - (320 * 2 + 4 * 320 * 9 + 4)  # no conv_norm_out / conv_out


def test_parameter_groups_partition(nets):
    _, unet, _ = nets
    groups = [list(unet.spatial_parameters()), list(unet.temporal_parameters()), list(unet.view_parameters())]
    ids = [id(p) for g in groups for p in g]
    assert all(groups) and len(ids) == len(set(ids)) == len(list(unet.parameters()))


def test_temporal_and_view_modules_start_as_identity(nets):
    cfg, _, ref = nets
    torch.manual_seed(3)
    full = MVUNet(cfg).eval()
    spatial = MVUNet(cfg.replace(temporal=False, view=False)).eval()
    missing, unexpected = spatial.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(".temporal." in k or ".views." in k for k in unexpected)
    x, ehs, flame = inputs()
    with torch.no_grad():
        cache = ref(torch.randn(1, 4, 8, 8), ehs)
        a = full(x, torch.tensor(10), ehs, flame, cache)
        b = spatial(x, torch.tensor(10), ehs, flame, cache)
        randomize(full, 4)
        c = full(x, torch.tensor(10), ehs, flame, cache)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (c - a).abs().max() > 1e-3


@pytest.mark.parametrize("axis", ["frame", "view"])
def test_axis_modules_mix_only_their_axis(nets, axis):
    cfg, _, _ = nets
    torch.manual_seed(5)
    unet = MVUNet(cfg.replace(temporal=axis == "frame", view=axis == "view")).eval()
    randomize(unet, 6)
    x, ehs, _ = inputs()
    x2 = x.clone()
    x2[:, 0, 0] += 1.0  # perturb view 0, frame 0
    with torch.no_grad():
        a, b = unet(x, 3, ehs), unet(x2, 3, ehs)
    diff = (a - b).abs().amax(dim=(3, 4, 5))  # (B, V, F)
    same_view_other_frame, other_view_same_frame, other_both = diff[0, 0, 1], diff[0, 1, 0], diff[0, 1, 1]
    assert other_both == 0
    if axis == "frame":
        assert same_view_other_frame > 1e-4 and other_view_same_frame == 0
    else:
        assert other_view_same_frame > 1e-4 and same_view_other_frame == 0


def test_frames_and_views_are_independent_without_axis_modules(nets):
    cfg, _, _ = nets
    unet = MVUNet(cfg.replace(temporal=False, view=False)).eval()
    x, ehs, flame = inputs()
    with torch.no_grad():
        whole = unet(x, 7, ehs, flame)
        one = unet(x[:, 1:2, 2:3], 7, ehs, flame[:, 1:2, 2:3])
    torch.testing.assert_close(whole[:, 1:2, 2:3], one, rtol=1e-5, atol=1e-5)


def test_reference_cache_reused_equals_recomputed(nets):
    cfg, unet, ref = nets
    x, ehs, flame = inputs()
    ref_latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        hidden = ref(ref_latent, ehs)
        cache = unet.build_reference_cache(hidden)
        ptrs = [t.data_ptr() for t in cache.tensors()]
        reused = [unet(x, t, ehs, flame, cache) for t in (900, 500, 10)]
        fresh = [unet(x, t, ehs, flame, ref(ref_latent, ehs)) for t in (900, 500, 10)]
        without = unet(x, 500, ehs, flame)
    assert cache.projected and not hidden.projected and len(cache) == len(hidden)
    assert [t.data_ptr() for t in cache.tensors()] == ptrs  # never rebuilt / copied by the calls
    for a, b in zip(reused, fresh):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (reused[1] - without).abs().max() > 1e-3  # the reference matters
    assert (reused[0] - reused[2]).abs().max() > 1e-3


def test_reference_batch_broadcast_and_mask(nets):
    cfg, unet, ref = nets
    x, ehs, flame = inputs(b=2)
    ehs1 = ehs[:1]
    with torch.no_grad():
        cache1 = unet.build_reference_cache(ref(torch.randn(1, 4, 8, 8), ehs1))
        cache2 = ReferenceCache(keys=tuple(k.expand(2, -1, -1) for k in cache1.keys),
                                values=tuple(v.expand(2, -1, -1) for v in cache1.values))
        a = unet(x, torch.tensor([10, 20]), ehs, flame, cache1)
        b = unet(x, torch.tensor([10, 20]), ehs, flame, cache2)
        masked = unet(x, torch.tensor([10, 20]), ehs, flame, cache1, reference_mask=torch.tensor([True, False]))
        none = unet(x, torch.tensor([10, 20]), ehs, flame)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[:1], a[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[1:], none[1:], rtol=1e-5, atol=1e-5)


def test_deterministic(nets):
    cfg, unet, ref = nets
    x, ehs, flame = inputs()
    with torch.no_grad():
        cache = ref(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), ehs)
        a = unet(x, 250, ehs, flame, cache)
        b = unet(x.clone(), torch.tensor(250), ehs.clone(), flame.clone(), cache)
    assert torch.equal(a, b)
    torch.manual_seed(11)
    u1 = MVUNet(cfg)
    torch.manual_seed(11)
    u2 = MVUNet(cfg)
    assert all(torch.equal(p, q) for p, q in zip(u1.state_dict().values(), u2.state_dict().values()))


def test_reference_unet_unused_parameters_get_no_gradient(nets):
    cfg, unet, _ = nets
    torch.manual_seed(2)
    ref = ReferenceUNet(cfg)
    x, ehs, _ = inputs(v=1, f=1)
    cache = ref(torch.randn(1, 4, 8, 8), ehs)
    unet(x, 5, ehs, reference=cache).square().mean().backward()
    no_grad = {id(p) for p in ref.parameters() if p.grad is None}
    unused = {id(p) for p in ref.unused_parameters()}
    assert unused and no_grad == unused


def test_gradients_flow_with_triton_requested(nets, monkeypatch):
    cfg, _, _ = nets
    monkeypatch.setenv("MVP_KERNELS", "triton")
    unet = MVUNet(cfg)
    randomize(unet, 8)
    x, ehs, _ = inputs(v=2, f=2)
    unet(x, 5, ehs).square().mean().backward()  # autograd uses the PyTorch reference, not the kernel
    assert all(p.grad is not None for p in unet.temporal_parameters())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_triton_kernels_match_reference(nets, monkeypatch):
    cfg, unet, ref = nets
    x, ehs, flame = inputs(v=2, f=3)
    impls = []
    real = unet_blocks.axis_attention

    def spy(*args, impl="auto", **kw):
        impls.append(impl)
        return real(*args, impl=impl, **kw)

    monkeypatch.setattr(unet_blocks, "axis_attention", spy)
    with torch.no_grad():
        cache = unet.build_reference_cache(ref(torch.randn(1, 4, 8, 8), ehs))
        monkeypatch.setenv("MVP_KERNELS", "ref")
        a = unet(x, 40, ehs, flame, cache)
        monkeypatch.setenv("MVP_KERNELS", "triton")
        b = unet(x, 40, ehs, flame, cache)
    n = len(impls) // 2
    assert n > 0 and set(impls[:n]) == {"ref"} and set(impls[n:]) == {"triton"}
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_axis_attention_kernel_choice_under_compile_trace_and_grad(monkeypatch):
    """The Triton axis kernel only in plain inference: autograd, tracing, ONNX export and torch.compile
    (inductor rejected the kernel's float argument on an H200) take the PyTorch reference."""
    monkeypatch.setenv("MVP_KERNELS", "triton")
    with torch.no_grad():
        assert unet_blocks._axis_impl() == "triton"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert unet_blocks._axis_impl() == "ref"
    monkeypatch.undo()
    monkeypatch.setenv("MVP_KERNELS", "triton")
    with torch.enable_grad():
        assert unet_blocks._axis_impl() == "ref"


def test_bad_inputs_raise_clear_errors(nets):
    cfg, unet, ref = nets
    x, ehs, flame = inputs()
    with torch.no_grad():
        cache = ref(torch.randn(1, 4, 8, 8), ehs)
        other = ReferenceUNet(cfg.replace(attention_levels=(True, True)))(torch.randn(1, 4, 8, 8), ehs)
    cases = [
        (lambda: unet(x[0], 1, ehs), r"sample must have shape \(B, V, F, 4, h, w\)"),
        (lambda: unet(x[:, :, :, :3], 1, ehs), r"sample must have shape"),
        (lambda: unet(torch.randn(1, 2, 3, 4, 7, 7), 1, ehs), r"multiples of 2"),
        (lambda: unet(x, 1, ehs[..., :8]), r"encoder_hidden_states must have shape \(1, L, 16\)"),
        (lambda: unet(x, 1, ehs, flame[:, :, :2]), r"flame_features must have shape"),
        (lambda: unet(x, torch.tensor([1, 2]), ehs), r"timestep must be a scalar or have shape \(1,\) or \(1,\)"),
        (lambda: unet(x, 1, ehs, reference=other), r"reference cache has \d+ layers"),
        (lambda: unet(torch.cat([x] * 3), 1, torch.cat([ehs] * 3),
                      reference=ReferenceCache(hidden=tuple(h.expand(2, -1, -1) for h in cache.hidden))),
         r"multiple of the reference batch 2"),
        (lambda: unet(x, 1, ehs, reference=cache, reference_mask=torch.tensor([True, False])), r"reference_mask"),
        (lambda: unet(torch.randn(1, 1, 33, 4, 8, 8), 1, ehs), r"33 frames exceed"),
        (lambda: ref(torch.randn(1, 4, 8), ehs), r"ref_latent must have shape"),
        (lambda: ReferenceCache(), r"either hidden states or keys and values"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    with pytest.raises(TypeError, match="ReferenceCache"):
        unet(x, 1, ehs, reference=list(cache.hidden))


def test_config_validation():
    with pytest.raises(ValueError, match="attention_levels"):
        small_cfg(attention_levels=(True,))
    with pytest.raises(ValueError, match="heads"):
        small_cfg(head_dim=0, heads=3)
    with pytest.raises(ValueError, match="norm_groups"):
        small_cfg(norm_groups=5)
    cfg = UNetConfig.from_name("tiny")
    import json
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
