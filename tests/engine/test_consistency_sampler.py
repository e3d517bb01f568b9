"""ConsistencySampler / consistency_x0: the LCM boundary condition and multistep sampling."""
import math

import pytest
import torch

from mvportrait.engine.schedulers import (ConsistencySampler, NoiseSchedule, consistency_boundary,
                                          consistency_x0)


@pytest.fixture()
def schedule():
    return NoiseSchedule.from_kind("cosine", 1000)


def test_boundary_values():
    x = torch.zeros(3, 2)
    c_skip, c_out = consistency_boundary(0, x)
    assert (c_skip, c_out) == (1.0, 0.0)
    c_skip, c_out = consistency_boundary(torch.tensor([0, 1, 999]), x)
    assert c_skip.shape == (3, 1)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    # t=1: s = 10 -> c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25)
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25)
    assert c_out[1].item() == pytest.approx(10 / math.sqrt(100.25))
    assert c_skip[2].item() < 1e-5 and c_out[2].item() == pytest.approx(1.0, abs=1e-5)


def test_x0_matches_prediction_far_from_boundary(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 5, generator=g)
    eps = torch.randn(2, 5, generator=g)
    t = 600
    xt = schedule.add_noise(x0, eps, t)
    v = schedule.velocity(x0, eps, t)
    got = consistency_x0(schedule, "v_prediction", v, xt, t)
    c_skip, c_out = consistency_boundary(t, xt)
    torch.testing.assert_close(got, c_skip * xt + c_out * x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(consistency_x0(schedule, "epsilon", eps, xt, t), got, atol=1e-5, rtol=1e-5)
    # at t = 0 the boundary condition returns x_t whatever the model says
    torch.testing.assert_close(consistency_x0(schedule, "sample", torch.randn(2, 5), xt, 0), xt)


def test_one_step_is_the_student_x0(schedule):
    sampler = ConsistencySampler(schedule, prediction_type="sample")
    assert sampler.timesteps(1).tolist() == [999]
    assert sampler.timesteps(2).tolist() == [999, 499]
    assert sampler.timesteps(4).tolist() == [999, 749, 499, 249]
    target = torch.linspace(-1, 1, 6).reshape(1, 6)
    seen = []

    def fn(x, t, cond):
        seen.append(t.tolist())
        return target.expand_as(x)

    out = sampler.sample(fn, (2, 6), steps=1, generator=torch.Generator().manual_seed(1))
    c_skip, c_out = consistency_boundary(999, out)
    assert seen == [[999, 999]]
    x_T = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, c_skip * x_T + c_out * target.expand(2, 6), atol=1e-6, rtol=1e-6)


def test_multistep_renoises_and_is_deterministic(schedule):
    sampler = ConsistencySampler(schedule, prediction_type="sample")
    calls = []

    def fn(x, t, cond):
        calls.append((x.clone(), int(t[0])))
        return torch.zeros_like(x) + 0.5

    a = sampler.sample(fn, (1, 4), steps=4, generator=torch.Generator().manual_seed(3))
    assert [t for _, t in calls] == [999, 749, 499, 249]
    # the input of step 2 is x0 of step 1 noised to 749: mean ~ sqrt(a_749) * x0, not x_T
    x0_1 = consistency_x0(schedule, "sample", torch.full((1, 4), 0.5), calls[0][0], 999)
    a749 = schedule.alphas_cumprod[749].item()
    resid = (calls[1][0] - a749**0.5 * x0_1) / (1 - a749) ** 0.5
    assert resid.abs().max() < 6  # a unit-variance draw, not the old sample
    assert not torch.allclose(calls[1][0], calls[0][0])
    b = sampler.sample(fn, (1, 4), steps=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_per_sample_timesteps_match_scalar(schedule):
    sampler = ConsistencySampler(schedule, prediction_type="v_prediction")
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 499])
    prev = torch.tensor([499, -1])
    batched = sampler.step(out, t, x, prev_t=prev, noise=noise)
    r0 = sampler.step(out[:1], 999, x[:1], prev_t=499, noise=noise[:1])
    r1 = sampler.step(out[1:], 499, x[1:], prev_t=-1, noise=noise[1:])
    torch.testing.assert_close(batched.prev_sample, torch.cat([r0.prev_sample, r1.prev_sample]))
    torch.testing.assert_close(r1.prev_sample, r1.pred_original_sample)


def test_bad_arguments(schedule):
    with pytest.raises(ValueError, match="prediction type"):
        ConsistencySampler(schedule, prediction_type="flow")
    with pytest.raises(ValueError, match="sigma_data"):
        ConsistencySampler(schedule, sigma_data=0.0)
    sampler = ConsistencySampler(schedule)
    with pytest.raises(ValueError, match="shape"):
        sampler.step(torch.zeros(2, 3), 10, torch.zeros(2, 4), prev_t=5)
