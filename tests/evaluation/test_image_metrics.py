"""Stage-2 image metrics: PSNR, SSIM against an independent float64 implementation, view
consistency on ground-truth multi-view renders, temporal flicker."""
import math

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from mvportrait.data.multiview import MultiViewCorpus
from mvportrait.evaluation.image_metrics import psnr, ssim, temporal_flicker, view_consistency


def _ssim_numpy(a: np.ndarray, b: np.ndarray, data_range=1.0) -> float:
    """Straightforward SSIM (Wang et al. 2004) in float64: (C, H, W) images, valid 11x11 window."""
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ca, cb in zip(a.astype(np.float64), b.astype(np.float64)):
        f = lambda img: correlate2d(img, w, mode="valid")  # noqa: E731
        mu_a, mu_b = f(ca), f(cb)
        s_aa = f(ca * ca) - mu_a ** 2
        s_bb = f(cb * cb) - mu_b ** 2
        s_ab = f(ca * cb) - mu_a * mu_b
        m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


def test_psnr_values_and_shapes():
    a = torch.zeros(2, 3, 3, 8, 8)
    b = torch.full_like(a, 0.1)
    p = psnr(a, b)
    assert p.shape == (2, 3) and torch.allclose(p, torch.full((2, 3), 20.0), atol=1e-4)
    assert torch.allclose(psnr(a, b, data_range=2.0), p + 20 * math.log10(2), atol=1e-4)
    assert torch.isinf(psnr(a, a)).all()
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[..., :4])
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, data_range=0)
    with pytest.raises(TypeError):
        psnr(a.long(), b)


@pytest.mark.parametrize("shape", [(3, 24, 20), (1, 11, 11), (3, 31, 17)])
def test_ssim_matches_independent_float64_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(shape, generator=g)
    b = (a + 0.15 * torch.randn(shape, generator=g)).clamp(0, 1)
    smooth = torch.nn.functional.avg_pool2d(a[None], 3, 1, 1)[0]  # structured, not just noise
    for x, y in ((a, b), (smooth, b), (a, smooth)):
        want = _ssim_numpy(x.numpy(), y.numpy())
        assert float(ssim(x, y)) == pytest.approx(want, abs=2e-5)
        assert float(ssim(x.double(), y.double())) == pytest.approx(want, abs=1e-10)


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(4, 3, 40, 40, generator=g), 5, 1, 2)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = [(x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in (0.02, 0.05, 0.1, 0.2)]
    vals = [ssim(x, n) for n in noisy]
    for hi, lo in zip(vals, vals[1:]):
        assert (hi > lo).all()
    assert torch.allclose(ssim(x, noisy[1]), ssim(noisy[1], x), atol=1e-6)
    assert ssim(x, noisy[0]).shape == (4,)
    # scaling the images and data_range together changes nothing (a shift would: SSIM uses raw means)
    assert torch.allclose(ssim(x * 2, noisy[1] * 2, data_range=2.0), vals[1], atol=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(3, 10, 30), torch.rand(3, 10, 30))


@pytest.fixture(scope="module")
def mv():
    c = MultiViewCorpus("test", seed=0, image_size=64, views=4, frames=2, frame_stride=2, clip_frames=20)
    s = c.sample(0)
    return (s["target"] + 1) / 2, s["depth"], s["cameras"]


def test_view_consistency_gt_small_shuffled_large(mv):
    images, depth, cams = mv
    gt = view_consistency(images, depth, cams, reference=images)
    assert gt.error < 0.03 and gt.reference_error == pytest.approx(gt.error)
    assert gt.pair_error.shape == (4, 4) and torch.isnan(gt.pair_error.diagonal()).all()
    # neighbouring views (90 degrees apart) share a good part of the head
    assert gt.covisible[0, 1] > 100 and gt.covisible[1, 0] > 100 and gt.covisible[0, 3] > 100
    assert gt.covisible[0, 2] < gt.covisible[0, 1]  # front and back barely overlap
    shuffled = images[[1, 0, 2, 3]]
    bad = view_consistency(shuffled, depth, cams, reference=images)
    assert bad.reference_error == pytest.approx(gt.error)
    assert bad.error > 3 * gt.error and bad.error > 0.05
    assert bad.to_dict()["reference_error"] == pytest.approx(gt.error)
    # per-frame (F, V) cameras give the same result as a static (V,) rig
    frames = cams.expand(2, 4)
    assert view_consistency(images, depth, frames).error == pytest.approx(gt.error, abs=1e-6)


def test_view_consistency_bad_input(mv):
    images, depth, cams = mv
    with pytest.raises(ValueError, match="depth"):
        view_consistency(images, depth[:, :1], cams)
    with pytest.raises(ValueError, match="batch shape"):
        view_consistency(images, depth, cams[:3])
    with pytest.raises(ValueError, match="two views"):
        view_consistency(images[:1], depth[:1], cams[:1])
    with pytest.raises(ValueError, match="reference"):
        view_consistency(images, depth, cams, reference=images[:, :1])
    with pytest.raises(TypeError):
        view_consistency(images, depth, "cams")


def test_temporal_flicker():
    g = torch.Generator().manual_seed(0)
    gt = torch.cumsum(0.01 * torch.rand(2, 6, 3, 8, 8, generator=g), dim=1)  # (V, F, 3, H, W), smooth
    same = temporal_flicker(gt, gt)
    assert same["ratio"] == pytest.approx(1.0) and same["diff_error"] == 0
    assert same["gt_diff"] == pytest.approx(float((gt[:, 1:] - gt[:, :-1]).abs().mean()))
    static = temporal_flicker(gt[:, :1].expand_as(gt), gt)
    assert static["gen_diff"] == 0 and static["ratio"] == 0
    flicker = temporal_flicker(gt + 0.05 * torch.randn(gt.shape, generator=g), gt)
    assert flicker["ratio"] > 3 and flicker["diff_error"] > 0.03
    two = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5)])
    r = temporal_flicker(two, torch.zeros_like(two))
    assert r["gen_diff"] == pytest.approx(0.5) and r["gt_diff"] == 0 and math.isinf(r["ratio"])
    with pytest.raises(ValueError, match="2 frames"):
        temporal_flicker(gt[:, :1], gt[:, :1])
