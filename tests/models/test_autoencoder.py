"""Autoencoder: shapes, scaling, posterior sampling, bad input; SD preset size."""
import pytest
import torch

from mvportrait.config import AutoencoderConfig
from mvportrait.models.autoencoder import Autoencoder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig.from_name("tiny", scaling_factor=0.5, shift_factor=0.1)).eval()


def test_tiny_shapes_and_scaling(tiny):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = tiny.encode_dist(x)
        z = tiny.encode(x)
        y = tiny.decode(z)
    assert tiny.factor == 4 and mean.shape == logvar.shape == z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, (mean - 0.1) * 0.5)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with torch.no_grad():  # decode undoes the scaling: decoding (mean - shift) * scale == decoder(mean)
        torch.testing.assert_close(y, tiny.decoder(tiny.post_quant_conv(mean)), rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_differs_from_mean(tiny):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        c = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
        m = tiny.encode(x)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, m)
    mean, logvar = tiny.encode_dist(x)
    kl = Autoencoder.kl(mean, logvar)
    assert kl.shape == (1,) and (kl >= 0).all()


def test_bad_shapes(tiny):
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, H, W\)"):
        tiny.encode(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="multiples of the autoencoder factor 4"):
        tiny.encode(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"latents must have shape \(N, 4, h, w\)"):
        tiny.decode(torch.rand(1, 3, 8, 8))


def test_sd_preset_size_and_config():
    cfg = AutoencoderConfig.from_name("sd")
    assert cfg.factor == 8 and cfg.scaling_factor == 0.18215
    with torch.device("meta"):
        ae = Autoencoder(cfg)
    assert sum(p.numel() for p in ae.parameters()) == 83_653_863  # SD's AutoencoderKL
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(block_out=(30, 60), norm_groups=8)
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        AutoencoderConfig.from_name("xl")
