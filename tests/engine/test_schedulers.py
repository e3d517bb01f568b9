"""Schedules and samplers, checked step by step against diffusers (a test-only dependency).

diffusers' DDIM / DDPM keep float32 tables; the step-parity tests promote the reference's tables
to float64 (same betas, cumprod in float64, as ``NoiseSchedule`` does) and feed float64 tensors,
so the comparison measures the update rule rather than float32 rounding. One test compares the
unmodified float32 reference end to end at a float32 tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch

from mvportrait.engine.schedulers import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    combine_guidance,
    make_betas,
    spaced_timesteps,
)

T = 1000
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
BETA_CONFIGS = {
    "linear": (dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), ("linear", 0.0001, 0.02)),
    "scaled_linear": (SD_BETAS, ("scaled_linear", 0.00085, 0.012)),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2"), ("cosine", None, None)),
}


def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is the test-only reference (pip install diffusers)")


def _promote(ref, set_alpha_to_one=None):
    """Recompute a diffusers scheduler's tables in float64 from its own betas."""
    ref.betas = ref.betas.double()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    if set_alpha_to_one is not None:  # DDIM
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ref.alphas_cumprod[0]
    else:  # DDPM
        ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _max_err(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("name", list(BETA_CONFIGS))
@pytest.mark.parametrize("num_train", [1000, 50])
def test_betas_match_diffusers(name, num_train):
    diffusers = _diffusers()
    ref_cfg, (kind, b0, b1) = BETA_CONFIGS[name]
    ref = diffusers.DDIMScheduler(num_train_timesteps=num_train, **ref_cfg)
    exact32 = make_betas(kind, num_train, b0, b1, dtype=torch.float32)
    assert torch.equal(exact32, ref.betas)
    betas64 = make_betas(kind, num_train, b0, b1)
    assert betas64.dtype == torch.float64 and betas64.shape == (num_train,)
    torch.testing.assert_close(betas64, ref.betas.double(), rtol=1e-6, atol=0)
    sched = NoiseSchedule(betas64)
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5, atol=0)
    if kind == "cosine":
        assert betas64.max().item() <= 0.999


def test_cosine_schedule_formula():
    betas = make_betas("cosine", 1000)
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # alphas_cumprod telescopes to abar(t / T) / abar(0) wherever the cap is not hit
    ac = NoiseSchedule(betas).alphas_cumprod
    for i in (0, 10, 500, 900):
        assert ac[i].item() == pytest.approx(abar((i + 1) / 1000) / abar(0), rel=1e-10)
    assert betas[-1].item() == 0.999  # capped


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_train", [1000, 997])
def test_timesteps_match_diffusers_for_every_step_count(spacing, num_train):
    diffusers = _diffusers()
    offsets = (0, 1) if spacing == "leading" else (0,)
    for offset in offsets:
        ref = diffusers.DDIMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=offset)
        for n in range(1, num_train + 1):
            ref.set_timesteps(n)
            expected = ref.timesteps
            if offset and expected[0] >= num_train:  # diffusers would index past the table
                with pytest.raises(ValueError, match="steps_offset"):
                    spaced_timesteps(num_train, n, spacing, offset)
                continue
            mine = spaced_timesteps(num_train, n, spacing, offset)
            assert mine.dtype == torch.int64 and mine.shape == (n,)
            if len(expected) != n:
                # diffusers' float arange sometimes yields one extra "trailing" timestep, -1
                assert spacing == "trailing" and expected[n:].tolist() == [-1]
                expected = expected[:n]
            assert torch.equal(mine, expected), (spacing, offset, n)


def test_sd_leading_timesteps_by_hand():
    assert spaced_timesteps(1000, 10, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert spaced_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert spaced_timesteps(1000, 3, "linspace").tolist() == [999, 500, 0]  # 499.5 rounds to even


def test_add_noise_and_velocity_match_diffusers():
    diffusers = _diffusers()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    for dtype, promote, tol in ((torch.float32, False, 1e-6), (torch.float64, True, 1e-12)):
        ref = diffusers.DDIMScheduler(**SD_BETAS)
        if promote:
            _promote(ref, set_alpha_to_one=True)
        sched = NoiseSchedule(ref.betas)
        x0 = torch.randn(6, 4, 3, 5, generator=g, dtype=dtype)
        noise = torch.randn(6, 4, 3, 5, generator=g, dtype=dtype)
        mine = sched.add_noise(x0, noise, t)
        assert mine.dtype == dtype
        assert _max_err(mine, ref.add_noise(x0, noise, t)) < tol
        assert _max_err(sched.velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) < tol
        # scalar t == the same t for every sample
        assert _max_err(sched.add_noise(x0, noise, 321), ref.add_noise(x0, noise, torch.full((6,), 321))) < tol


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_conversions_round_trip(kind):
    sched = NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 250, 750, 999])
    x_t = sched.add_noise(x0, eps, t)
    v = sched.velocity(x0, eps, t)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sched.pred_x0_from_eps(x_t, eps, t), x0, **tol)
    torch.testing.assert_close(sched.eps_from_x0(x_t, x0, t), eps, **tol)
    torch.testing.assert_close(sched.pred_x0_from_v(x_t, v, t), x0, **tol)
    torch.testing.assert_close(sched.eps_from_v(x_t, v, t), eps, **tol)
    target = sched.training_target(kind, x0, eps, t)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": v}[kind]
    assert torch.equal(target, expected)
    px0, peps = sched.split_prediction(kind, target, x_t, t)
    torch.testing.assert_close(px0, x0, **tol)
    torch.testing.assert_close(peps, eps, **tol)
    # v-target identity: v = sqrt(a) eps - sqrt(1 - a) x0, and snr = a / (1 - a)
    a = sched.alphas_cumprod[250].item()
    torch.testing.assert_close(sched.velocity(x0, eps, 250), a**0.5 * eps - (1 - a) ** 0.5 * x0, **tol)
    assert sched.snr(250) == pytest.approx(a / (1 - a))


# ----------------------------------------------------------------------------------------------
# DDIM vs diffusers, step by step

SPACINGS = [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]


@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_steps_match_diffusers(spacing, offset, prediction_type, set_alpha_to_one, steps):
    diffusers = _diffusers()
    betas_cfg = SD_BETAS if prediction_type != "v_prediction" else BETA_CONFIGS["linear"][0]
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, **betas_cfg, clip_sample=False,
                                  set_alpha_to_one=set_alpha_to_one, steps_offset=offset,
                                  timestep_spacing=spacing, prediction_type=prediction_type)
    _promote(ref, set_alpha_to_one)
    ref.set_timesteps(steps)
    # diffusers always jumps by T // steps ("fixed_stride"); "next" coincides where it should
    rules = ["fixed_stride"]
    if spacing == "leading" or (spacing == "trailing" and T % steps == 0):
        rules.append("next")
    for rule in rules:
        mine = DDIMSampler(NoiseSchedule(ref.betas), prediction_type=prediction_type, timestep_spacing=spacing,
                           steps_offset=offset, set_alpha_to_one=set_alpha_to_one, prev_rule=rule)
        pairs = mine.timestep_pairs(steps)
        assert [t for t, _ in pairs] == ref.timesteps.tolist()
        g = torch.Generator().manual_seed(steps)
        x_ref = x_mine = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
        for t, prev_t in pairs:
            out = torch.randn(x_ref.shape, generator=g, dtype=torch.float64)
            r = ref.step(out, t, x_ref, eta=0.0)
            m = mine.step(out, t, x_mine, prev_t=prev_t)
            assert _max_err(m.prev_sample, r.prev_sample) < 1e-6, (rule, t)
            assert _max_err(m.pred_original_sample, r.pred_original_sample) < 1e-6, (rule, t)
            x_ref, x_mine = r.prev_sample, m.prev_sample


def test_ddim_next_rule_differs_from_diffusers_for_linspace():
    sampler = DDIMSampler(NoiseSchedule.from_kind(), timestep_spacing="linspace")
    pairs = sampler.timestep_pairs(10)
    assert pairs[0] == (999, 888) and pairs[-1] == (0, -1)
    fixed = DDIMSampler(NoiseSchedule.from_kind(), timestep_spacing="linspace", prev_rule="fixed_stride")
    assert fixed.timestep_pairs(10)[0] == (999, 899)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers(prediction_type):
    diffusers = _diffusers()
    ref = _promote(diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, prediction_type=prediction_type,
                                           set_alpha_to_one=False, steps_offset=1), False)
    ref.set_timesteps(20)
    mine = DDIMSampler(NoiseSchedule(ref.betas), prediction_type=prediction_type, steps_offset=1,
                       set_alpha_to_one=False, eta=0.7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    g_ref, g_mine = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for t, prev_t in mine.timestep_pairs(20):
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        r = ref.step(out, t, x, eta=0.7, variance_noise=z)
        m = mine.step(out, t, x, prev_t=prev_t, noise=z)
        assert _max_err(m.prev_sample, r.prev_sample) < 1e-6
        # the generator path draws the same noise as diffusers' randn_tensor
        r = ref.step(out, t, x, eta=0.7, generator=g_ref)
        m = mine.step(out, t, x, prev_t=prev_t, generator=g_mine)
        assert _max_err(m.prev_sample, r.prev_sample) < 1e-6
        x = r.prev_sample


@pytest.mark.parametrize("mode", ["clip", "threshold", "clip_recompute"])
def test_ddim_clip_and_threshold_match_diffusers(mode):
    diffusers = _diffusers()
    ref_kw = dict(clip_sample=mode != "threshold", clip_sample_range=1.5, thresholding=mode == "threshold",
                  dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    ref = _promote(diffusers.DDIMScheduler(**SD_BETAS, **ref_kw), True)
    ref.set_timesteps(10)
    mine = DDIMSampler(NoiseSchedule(ref.betas), recompute_eps=mode == "clip_recompute", **ref_kw)
    g = torch.Generator().manual_seed(4)
    x = 3 * torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    for t, prev_t in mine.timestep_pairs(10):
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        r = ref.step(out, t, x, use_clipped_model_output=mode == "clip_recompute")
        m = mine.step(out, t, x, prev_t=prev_t)
        assert _max_err(m.prev_sample, r.prev_sample) < 1e-6
        assert _max_err(m.pred_original_sample, r.pred_original_sample) < 1e-6
        x = r.prev_sample


def test_ddim_float32_end_to_end_matches_unmodified_diffusers():
    diffusers = _diffusers()
    ref = diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(50)
    mine = DDIMSampler(NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012),
                       steps_offset=1, set_alpha_to_one=False)
    g = torch.Generator().manual_seed(5)
    x_ref = x_mine = torch.randn(1, 4, 8, 8, generator=g)
    for t, prev_t in mine.timestep_pairs(50):
        out = torch.randn(x_ref.shape, generator=g)
        x_ref = ref.step(out, t, x_ref).prev_sample
        x_mine = mine.step(out, t, x_mine, prev_t=prev_t).prev_sample
        assert x_mine.dtype == torch.float32
    torch.testing.assert_close(x_mine, x_ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# DDPM vs diffusers


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [T, 25])
def test_ddpm_steps_match_diffusers(variance_type, prediction_type, steps):
    diffusers = _diffusers()
    ref = _promote(diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False,
                                           variance_type=variance_type, prediction_type=prediction_type))
    ref.set_timesteps(steps)
    mine = DDPMSampler(NoiseSchedule(ref.betas), variance_type=variance_type, prediction_type=prediction_type)
    pairs = mine.timestep_pairs(steps)
    assert [t for t, _ in pairs] == ref.timesteps.tolist() and pairs[-1] == (0, -1)
    g = torch.Generator().manual_seed(6)
    g_ref, g_mine = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_ref = x_mine = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for t, prev_t in pairs:
        out = torch.randn(x_ref.shape, generator=g, dtype=torch.float64)
        r = ref.step(out, t, x_ref, generator=g_ref)
        m = mine.step(out, t, x_mine, prev_t=prev_t, generator=g_mine)
        assert _max_err(m.prev_sample, r.prev_sample) < 1e-6, t
        assert _max_err(m.pred_original_sample, r.pred_original_sample) < 1e-6, t
        x_ref, x_mine = r.prev_sample, m.prev_sample


# ----------------------------------------------------------------------------------------------
# per-sample timesteps, dtypes


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, DDPMSampler])
def test_per_sample_timesteps_equal_scalar_steps(sampler_cls):
    sampler = sampler_cls(NoiseSchedule.from_kind("linear"), prediction_type="v_prediction")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    out = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    t, prev = torch.tensor([999, 500, 20]), torch.tensor([899, 400, -1])
    kw = dict(eta=0.5) if sampler_cls is DDIMSampler else {}
    batched = sampler.step(out, t, x, prev_t=prev, noise=noise, **kw)
    for i in range(3):
        single = sampler.step(out[i:i + 1], int(t[i]), x[i:i + 1], prev_t=int(prev[i]), noise=noise[i:i + 1], **kw)
        torch.testing.assert_close(batched.prev_sample[i:i + 1], single.prev_sample, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.pred_original_sample[i:i + 1], single.pred_original_sample,
                                   rtol=1e-12, atol=1e-12)


def test_half_precision_step_keeps_dtype():
    sampler = DDIMSampler(NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 4, 6, 6, generator=g)
    out = torch.randn(1, 4, 6, 6, generator=g)
    full = sampler.step(out, 501, x, prev_t=401).prev_sample
    for dt in (torch.float16, torch.bfloat16):
        half = sampler.step(out.to(dt), 501, x.to(dt), prev_t=401).prev_sample
        assert half.dtype == dt
        torch.testing.assert_close(half.float(), full, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------
# sampling loop: guidance, determinism, inpainting hook


def _toy_denoiser(calls=None):
    """eps-model that depends on x, t and the condition (so guidance changes the result)."""
    def fn(x, t, cond):
        if calls is not None:
            calls.append((x.shape[0], t.clone(), cond))
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        c = cond["emb"] if isinstance(cond, dict) else cond
        bias = c.reshape(c.shape[0], *([1] * (x.ndim - 1))) if c is not None else 0.0
        return 0.3 * x + 0.1 * bias + 1e-4 * t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return fn


def test_combine_guidance_math():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(combine_guidance(u, c, 1.0), c)
    assert torch.equal(combine_guidance(u, c, 0.0), u)
    torch.testing.assert_close(combine_guidance(u, c, 7.5), torch.tensor([1 + 7.5 * 2, -2 + 7.5 * 2.5]))
    with pytest.raises(ValueError, match="shape"):
        combine_guidance(u, c[:1], 2.0)


def test_guidance_batches_cond_and_uncond_in_one_call():
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear"))
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([-1.0])  # batch-1 uncond is expanded
    calls = []
    x = sampler.sample(_toy_denoiser(calls), (2, 3), steps=5, generator=torch.Generator().manual_seed(0),
                       guidance_scale=4.0, cond=cond, uncond=uncond)
    assert len(calls) == 5 and all(b == 4 for b, _, _ in calls)
    assert torch.equal(calls[0][2], torch.tensor([-1.0, -1.0, 1.0, 2.0]))  # [uncond; cond]
    assert [int(ts[0]) for _, ts, _ in calls] == sampler.timesteps(5).tolist()
    # the same loop by hand
    fn = _toy_denoiser()
    ref = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for t, prev_t in sampler.timestep_pairs(5):
        tb = torch.full((2,), t)
        out = combine_guidance(fn(ref, tb, uncond.expand(2)), fn(ref, tb, cond), 4.0)
        ref = sampler.step(out, t, ref, prev_t=prev_t).prev_sample
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)
    # guidance_scale == 1: one call per step on cond only, batch B
    calls.clear()
    x1 = sampler.sample(_toy_denoiser(calls), (2, 3), steps=5, generator=torch.Generator().manual_seed(0),
                        cond={"emb": cond}, uncond={"emb": uncond})
    assert len(calls) == 5 and all(b == 2 for b, _, _ in calls) and calls[0][2]["emb"] is cond
    assert not torch.allclose(x1, x)
    # dict conditions concatenate leaf by leaf
    calls.clear()
    sampler.sample(_toy_denoiser(calls), (2, 3), steps=2, guidance_scale=2.0,
                   cond={"emb": cond}, uncond={"emb": uncond.expand(2)})
    assert torch.equal(calls[0][2]["emb"], torch.tensor([-1.0, -1.0, 1.0, 2.0]))


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, DDPMSampler])
def test_sampling_is_deterministic_with_a_seed(sampler_cls):
    kw = dict(eta=1.0) if sampler_cls is DDIMSampler else {}
    sampler = sampler_cls(NoiseSchedule.from_kind("cosine"), **kw)
    run = lambda seed: sampler.sample(_toy_denoiser(), (2, 4, 5), steps=12,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed), guidance_scale=3.0,
                                      cond=torch.ones(2), uncond=torch.zeros(2))
    a, b, c = run(42), run(42), run(43)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_eta_noise_comes_from_the_generator():
    sched = NoiseSchedule.from_kind("linear")
    x_T = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    run = lambda eta, seed: DDIMSampler(sched, eta=eta).sample(  # noqa: E731
        _toy_denoiser(), (2, 6), steps=10, x_T=x_T, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0.0, 1), run(0.0, 2))  # eta = 0: x_T fixes everything
    assert torch.equal(run(0.8, 1), run(0.8, 1))
    assert not torch.allclose(run(0.8, 1), run(0.8, 2))
    assert not torch.allclose(run(0.8, 1), run(0.0, 1))


@pytest.mark.parametrize("sampler", [
    DDIMSampler(NoiseSchedule.from_kind("linear")),
    DDIMSampler(NoiseSchedule.from_kind("linear"), set_alpha_to_one=False, eta=0.5, steps_offset=1),
    DDPMSampler(NoiseSchedule.from_kind("linear")),
])
def test_inpainting_hook_keeps_known_frames(sampler):
    # (B, frames, C): the first 3 frames are known (e.g. the tail of the previous window)
    g = torch.Generator().manual_seed(0)
    known = torch.randn(2, 3, 4, generator=g)
    values = torch.zeros(2, 8, 4)
    values[:, :3] = known
    mask = torch.zeros(1, 8, 1)
    mask[:, :3] = 1

    def mixing(x, t, cond):  # couples frames, so the known frames steer the unknown ones
        return 0.5 * x + 0.2 * x.mean(dim=1, keepdim=True)

    seen = []
    out = sampler.sample(mixing, (2, 8, 4), steps=10, generator=torch.Generator().manual_seed(1),
                         known=values, known_mask=mask, callback=lambda i, t, x, x0: seen.append(i))
    assert seen == list(range(10))
    assert torch.equal(out[:, :3], known)
    free = sampler.sample(mixing, (2, 8, 4), steps=10, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out[:, 3:], free[:, 3:])


# ----------------------------------------------------------------------------------------------
# validation


def test_bad_arguments_raise_clear_errors():
    sched = NoiseSchedule.from_kind("linear")
    ddim = DDIMSampler(sched)
    x = torch.zeros(2, 3)
    for bad in (0, -1, T + 1):
        with pytest.raises(ValueError, match="steps"):
            ddim.timesteps(bad)
    for bad in (2.5, True, "10"):
        with pytest.raises(TypeError, match="steps"):
            ddim.timesteps(bad)
    with pytest.raises(ValueError, match="beta schedule"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        make_betas("linear", beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="finite"):
        make_betas("linear", beta_start=float("nan"))
    with pytest.raises(ValueError, match="cosine"):
        make_betas("cosine", beta_start=0.001)
    with pytest.raises(ValueError, match="NaN"):
        NoiseSchedule(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="timestep spacing"):
        DDIMSampler(sched, timestep_spacing="even")
    with pytest.raises(ValueError, match="prediction type"):
        DDIMSampler(sched, prediction_type="x0")
    with pytest.raises(ValueError, match="prediction type"):
        sched.training_target("score", x, x, 3)
    with pytest.raises(ValueError, match="variance type"):
        DDPMSampler(sched, variance_type="learned")
    with pytest.raises(ValueError, match="prev_rule"):
        DDIMSampler(sched, prev_rule="previous")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(sched, eta=-0.1)
    with pytest.raises(ValueError, match="steps_offset"):
        DDIMSampler(sched, steps_offset=1).timesteps(T)
    with pytest.raises(ValueError, match="outside"):
        sched.add_noise(x, x, T)
    with pytest.raises(ValueError, match="timesteps must lie"):
        sched.add_noise(x, x, torch.tensor([0, T]))
    with pytest.raises(TypeError, match="integer dtype"):
        sched.add_noise(x, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch"):
        sched.add_noise(x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="same shape"):
        sched.add_noise(x, torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="model_output shape"):
        ddim.step(torch.zeros(2, 4), 10, x, prev_t=0)
    with pytest.raises(ValueError, match="noise or generator"):
        ddim.step(x, 10, x, prev_t=0, eta=1.0, noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="descending"):
        ddim.timestep_pairs(timesteps=[10, 20])
    with pytest.raises(ValueError, match="exactly one"):
        ddim.timestep_pairs(10, [999, 500])


def test_sample_validates_inputs_and_outputs():
    ddim = DDIMSampler(NoiseSchedule.from_kind("linear"))
    fn = _toy_denoiser()
    with pytest.raises(ValueError, match="cond and uncond"):
        ddim.sample(fn, (2, 3), steps=3, guidance_scale=5.0, cond=torch.ones(2))
    with pytest.raises(ValueError, match="x_T contains NaN"):
        ddim.sample(fn, (2, 3), steps=3, x_T=torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="x_T has shape"):
        ddim.sample(fn, (2, 3), steps=3, x_T=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="together"):
        ddim.sample(fn, (2, 3), steps=3, known=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="known contains NaN"):
        ddim.sample(fn, (2, 3), steps=3, known=torch.full((2, 3), float("nan")), known_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="broadcast"):
        ddim.sample(fn, (2, 3), steps=3, known=torch.zeros(2, 3), known_mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ddim.sample(fn, (2, 3), steps=3, known=torch.zeros(2, 3), known_mask=torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="batch 1, expected 2|batch 3, expected 2"):
        ddim.sample(fn, (2, 3), steps=3, guidance_scale=2.0, cond=torch.ones(3), uncond=torch.ones(3))
    with pytest.raises(ValueError, match="steps"):
        ddim.sample(fn, (2, 3), steps=0)
    nan_fn = lambda x, t, c: torch.full_like(x, float("nan"))  # noqa: E731
    with pytest.raises(FloatingPointError, match="check_finite"):
        ddim.sample(nan_fn, (2, 3), steps=3)
    with pytest.raises(FloatingPointError, match="step 0"):
        ddim.sample(nan_fn, (2, 3), steps=3, check_finite=True)
