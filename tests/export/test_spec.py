"""Export specs: shape expressions, ranges, profiles, sample inputs, and agreement with the networks."""
import pytest
import torch

from mvportrait.export.spec import Dim, ExportSpec, TensorSpec, eval_dim, stage1_specs, stage2_specs


def test_eval_dim_expressions_and_errors():
    p = {"h": 12, "w": 8, "B": 3}
    assert eval_dim(5, p) == 5
    assert eval_dim("B", p) == 3
    assert eval_dim("(h // 2) * (w // 2)", p) == 24
    assert eval_dim("h * 4 - w + 1", p) == 41
    with pytest.raises(KeyError, match="'V'"):
        eval_dim("V * 2", p)
    with pytest.raises(ValueError, match="only ints"):
        eval_dim("h ** 2", p)
    with pytest.raises(ValueError, match="only ints"):
        eval_dim("__import__('os')", p)
    with pytest.raises(TypeError):
        eval_dim(2.5, p)


def test_dim_and_spec_validation():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim("h", 4, 2, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        Dim("h", 4, 6, 8, multiple=4)
    d = Dim("h", 4, 8, 16, multiple=4)
    assert d.check(12) == 12
    with pytest.raises(ValueError, match="outside"):
        d.check(20)
    with pytest.raises(ValueError, match="multiple"):
        d.check(10)
    with pytest.raises(ValueError, match="undeclared dims"):
        ExportSpec("x", (TensorSpec("a", ("B", "Q")),), (), (Dim("B", 1, 1, 2),))
    with pytest.raises(ValueError, match="unique"):
        ExportSpec("x", (TensorSpec("a", (1,)),), (TensorSpec("a", (1,)),), ())
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("a", (1,), dtype="float64")


def _toy():
    return ExportSpec("toy", (TensorSpec("x", ("B", "h", "w")), TensorSpec("m", ("B", "L"), dtype="bool",
                                                                            sample="prefix_mask"),
                              TensorSpec("ids", ("B", "L"), dtype="int64", sample="int", low=0, high=7)),
                      (TensorSpec("y", ("B", "h * w // 4")),),
                      (Dim("B", 1, 2, 4), Dim("h", 4, 8, 16, 2), Dim("w", 4, 8, 8, 2), Dim("L", 1, 5, 9)))


def test_points_profile_axes_and_samples():
    s = _toy()
    assert s.point("opt") == {"B": 2, "h": 8, "w": 8, "L": 5}
    assert s.point("min", h=6) == {"B": 1, "h": 6, "w": 4, "L": 1}
    with pytest.raises(ValueError):
        s.point("opt", h=7)
    assert s.parity_points() == [s.point("opt"), s.point("min")]
    prof = s.profile()
    assert prof["x"] == ((1, 4, 4), (2, 8, 8), (4, 16, 8))
    assert set(prof) == {"x", "m", "ids"}
    assert s.shapes(s.point("max"))["y"] == (4, 32)
    axes = s.dynamic_axes()
    assert axes["x"] == {0: "B", 1: "h", 2: "w"} and axes["y"] == {0: "B", 1: "h*w//4"}
    x, m, ids = s.sample_inputs(s.point("max"), seed=1)
    assert x.shape == (4, 16, 8) and x.dtype == torch.float32
    assert m.dtype == torch.bool and m[:, 0].all()  # a padding mask: never empty
    assert (m.int().diff(dim=1) <= 0).all()  # True prefix then False
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 7
    a = s.sample_inputs(seed=3)
    b = s.sample_inputs(seed=3)
    c = s.sample_inputs()
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    w = s.with_dims(h=(2, 2, 4))
    assert w.dim("h").max == 4 and s.dim("h").max == 16
    with pytest.raises(KeyError):
        s.with_dims(Q=(1, 1, 1))
    d = s.to_dict()
    assert d["dims"]["h"] == [4, 8, 16, 2] and d["outputs"][0]["shape"] == ["B", "h * w // 4"]


def test_one_fixed_axis_spec_still_gets_two_parity_shapes(micro_model):
    ref = stage2_specs(micro_model)["reference"]
    pts = ref.parity_points()
    assert len(pts) == 2 and pts[0]["R"] == 1 and pts[1]["R"] == 2


@pytest.mark.parametrize("which", ["stage2", "stage1"])
def test_spec_shapes_match_the_networks(which, micro_model, stage1_nets):
    """At every parity point, the flat modules return the outputs the spec says, in order and shape."""
    specs = stage2_specs(micro_model) if which == "stage2" else stage1_specs(*stage1_nets, max_tokens=32)
    expect = {"stage2": {"vae_encoder", "reference", "flame_encoder", "unet", "vae_decoder"},
              "stage1": {"motion_dm", "emotion_dm", "text_encoder"}}[which]
    assert set(specs) == expect
    for spec in specs.values():
        for point in spec.parity_points():
            out = spec.module(*spec.sample_inputs(point, seed=0))
            out = out if isinstance(out, tuple) else (out,)
            shapes = spec.shapes(point)
            assert [tuple(o.shape) for o in out] == [shapes[n] for n in spec.output_names], spec.name
            assert all(torch.isfinite(o).all() for o in out)


def test_unet_spec_matches_the_pipeline_call(micro_model):
    """The reference network + flat UNet equal prepare_reference + denoise (guidance included)."""
    from mvportrait.models.unet import ReferenceCache

    m = micro_model
    specs = stage2_specs(m)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ctx = m.prepare_reference(img)
        tokens, *kv = specs["reference"].module(ctx.latent)
        assert torch.allclose(tokens, ctx.image_tokens)
        assert all(torch.equal(a, b) for a, b in zip(kv, ctx.cache.tensors()))
        lat = torch.randn(m.latent_shape(1), generator=g)
        feats = torch.randn(1, 2, 2, 16, 8, 8, generator=g)
        want = m.unet(lat, torch.tensor([500]), tokens, feats, ReferenceCache.from_tensors(kv, True))
        got = specs["unet"].module(lat, torch.tensor([500.0]), tokens, feats, torch.ones(1, dtype=torch.bool), *kv)
    assert torch.allclose(want, got, atol=1e-6)


def test_denoiser_wrapper_equals_the_model(stage1_nets):
    """The traceable attention swap leaves the math unchanged and the original model untouched."""
    motion, emotion, _ = stage1_nets
    for m in (motion, emotion):
        spec = next(iter(stage1_specs(m).values()))
        x = spec.sample_inputs(spec.point("min", B=3), seed=1)
        with torch.no_grad():
            assert torch.allclose(m(*x), spec.module(*x), atol=1e-5)
    assert isinstance(motion.decoder.layers[0].self_attn, torch.nn.MultiheadAttention)
