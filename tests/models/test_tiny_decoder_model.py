"""TinyDecoder: the Autoencoder.decode contract at any factor / latent width, checkpoints and their errors."""
import json

import pytest
import torch

from mvportrait.config import AutoencoderConfig
from mvportrait.models.autoencoder import Autoencoder
from mvportrait.models.tiny_decoder import (CONFIG_FILE, DEFAULT_WEIGHTS, WEIGHTS_FILE, TinyDecoder, TinyDecoderConfig,
                                            conv_flops)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


def _small(z=4, factor=4):
    stages = factor.bit_length()
    return TinyDecoderConfig(latent_channels=z, factor=factor, channels=(8,) * stages, blocks=(1,) * stages)


@pytest.mark.parametrize("z, factor, h, w", [(4, 4, 8, 8), (4, 8, 3, 5), (16, 2, 5, 4), (1, 1, 7, 7), (3, 16, 1, 2)])
def test_shapes_and_range_like_autoencoder_decode(z, factor, h, w):
    torch.manual_seed(0)
    dec = TinyDecoder(_small(z, factor))
    lat = torch.randn(2, z, h, w) * 5  # large latents: the output stays clamped
    out = dec(lat)
    assert out.shape == (2, 3, h * factor, w * factor)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, dec.decode(lat)) and torch.equal(out, dec.decode_raw(lat).clamp(-1, 1))


def test_same_shapes_as_the_autoencoder_it_replaces():
    ae_cfg = AutoencoderConfig(block_out=(8, 16, 16), layers_per_block=1, norm_groups=4, mid_attention=False)
    ae = Autoencoder(ae_cfg).eval()
    dec = TinyDecoder(TinyDecoderConfig(latent_channels=ae_cfg.latent_channels, factor=ae.factor, channels=(8, 8, 8),
                                        blocks=(1, 1, 1)))
    with torch.no_grad():
        z = ae.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert dec.decode(z).shape == ae.decode(z).shape == (2, 3, 32, 32)


def test_bad_latents_and_configs_raise():
    dec = TinyDecoder(_small())
    with pytest.raises(ValueError, match=r"latents must have shape \(N, 4, h, w\)"):
        dec(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="latents must have shape"):
        dec(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="factor must be a power of 2"):
        TinyDecoderConfig(factor=6)
    with pytest.raises(ValueError, match="factor 4 needs 3 stages"):
        TinyDecoderConfig(factor=4, channels=(8, 8), blocks=(1, 1))
    with pytest.raises(ValueError, match="latent_channels must be a positive int"):
        TinyDecoderConfig(latent_channels=0)
    with pytest.raises(ValueError, match="unknown TinyDecoderConfig fields"):
        TinyDecoderConfig.from_dict({"width": 3})


def test_default_is_much_cheaper_than_the_tiny_autoencoder_decoder():
    ae = Autoencoder(AutoencoderConfig.from_name("tiny"))
    dec = TinyDecoder()
    full = conv_flops(ae, (1, 4, 32, 32), lambda m, x: m.decode(x))
    tiny = conv_flops(dec, (1, 4, 32, 32))
    assert tiny == 924_844_032 and dec.param_count() == 196_739
    assert full / tiny > 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_save_load_round_trip(tmp_path, dtype):
    torch.manual_seed(1)
    dec = TinyDecoder(_small(4, 8)).eval()
    dec.save_pretrained(tmp_path, dtype=dtype, info={"steps": 7})
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["info"] == {"steps": 7}
    assert meta["param_count"] == dec.param_count() and meta["flops_128"] > 0
    back = TinyDecoder.from_pretrained(tmp_path)
    assert back.config == dec.config and back.info == {"steps": 7} and not back.training
    z = torch.randn(2, 4, 3, 4)
    tol = 0 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(back(z), dec(z).detach(), atol=tol, rtol=0)
    for k, v in dec.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(dtype).float())
    assert TinyDecoder.from_pretrained(tmp_path, dtype=torch.bfloat16)(z.bfloat16()).dtype == torch.bfloat16


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    dec = TinyDecoder(_small())
    with pytest.raises(FileNotFoundError, match="no tiny-decoder folder"):
        TinyDecoder.from_pretrained(tmp_path / "nope")
    dec.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_FILE} is missing"):
        TinyDecoder.from_pretrained(tmp_path / "a")
    dec.save_pretrained(tmp_path / "b")
    w = tmp_path / "b" / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TinyDecoder.from_pretrained(tmp_path / "b")
    dec.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TinyDecoder.from_pretrained(tmp_path / "c")
    dec.save_pretrained(tmp_path / "d")
    cfg = tmp_path / "d" / CONFIG_FILE
    meta = json.loads(cfg.read_text())
    meta["config"]["channels"] = [16, 8, 8]  # shapes no longer match the weights
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tensors have shapes the config does not give"):
        TinyDecoder.from_pretrained(tmp_path / "d")
    meta["config"]["channels"], meta["config"]["blocks"] = [8, 8, 8], [2, 1, 1]  # extra block: missing keys
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing keys"):
        TinyDecoder.from_pretrained(tmp_path / "d")
    meta["format"] = "something/else"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expected 'mvportrait.tiny_decoder/1'"):
        TinyDecoder.from_pretrained(tmp_path / "d")


@pytest.mark.skipif(not (DEFAULT_WEIGHTS / WEIGHTS_FILE).is_file(), reason="no shipped tiny decoder")
def test_shipped_tiny_decoder_loads_and_is_small():
    dec = TinyDecoder.from_pretrained(DEFAULT_WEIGHTS)
    assert (DEFAULT_WEIGHTS / WEIGHTS_FILE).stat().st_size < 1_000_000
    assert dec.config.latent_channels == 4 and dec.factor == 4
    assert dec(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)
