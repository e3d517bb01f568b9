"""The stage-2 pipelines with a distilled tiny latent decoder beside the model (``decoder=...``)."""
import shutil

import pytest
import torch

from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.engine.schedulers import ConsistencySampler, NoiseSchedule
from mvportrait.engine.stream import StreamingEngine
from mvportrait.flame.demo import demo_sequence
from mvportrait.models.tiny_decoder import TinyDecoder, TinyDecoderConfig


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def folders(stage2_micro_run, tmp_path_factory):
    """(a micro model folder with a tiny decoder, the same folder without one, the tiny decoder)."""
    out, _ = stage2_micro_run
    with_tiny = tmp_path_factory.mktemp("with_tiny") / "model"
    shutil.copytree(out / "final", with_tiny)
    torch.manual_seed(0)
    tiny = TinyDecoder(TinyDecoderConfig(latent_channels=4, factor=4, channels=(8, 8, 4), blocks=(1, 0, 0)))
    tiny.save_pretrained(with_tiny, dtype=torch.float32)
    return with_tiny, out / "final", tiny


@pytest.fixture(scope="module")
def ref():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_decoder_choice(folders):
    with_tiny, plain, tiny = folders
    assert FLAME2Video.from_pretrained(with_tiny, overlap=1).decoder_kind == "full"  # the default: quality
    auto = FLAME2Video.from_pretrained(with_tiny, overlap=1, decoder="auto")
    assert auto.decoder_kind == "tiny" and isinstance(auto.decoder, TinyDecoder)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(auto.decoder.decode(z), tiny.decode(z))
    full = FLAME2Video.from_pretrained(with_tiny, decoder="full", overlap=1)
    assert full.decoder_kind == "full" and full.decoder is full.model.autoencoder
    assert FLAME2Video.from_pretrained(plain, overlap=1, decoder="auto").decoder_kind == "full"  # no tiny file
    with pytest.raises(ValueError, match="no distilled tiny decoder"):
        FLAME2Video.from_pretrained(plain, decoder="tiny", overlap=1)
    with pytest.raises(ValueError, match="decoder must be one of"):
        FLAME2Video.from_pretrained(with_tiny, decoder="small", overlap=1)


def test_streaming_engine_defaults_to_the_tiny_decoder(folders):
    with_tiny, plain, _ = folders
    assert StreamingEngine.from_pretrained(with_tiny, stage1=False, overlap=1).stage2.decoder_kind == "tiny"
    assert StreamingEngine.from_pretrained(plain, stage1=False, overlap=1).stage2.decoder_kind == "full"
    assert StreamingEngine.from_pretrained(with_tiny, stage1=False, overlap=1,
                                           decoder="full").stage2.decoder_kind == "full"


def test_offline_and_stream_decode_with_the_chosen_decoder(folders, ref):
    with_tiny, _, _ = folders
    fp = demo_sequence(seconds=0.8)
    frames = {}
    for kind in ("tiny", "full"):
        pipe = FLAME2Video.from_pretrained(with_tiny, overlap=1, decoder=kind)
        pipe.sampler = ConsistencySampler(NoiseSchedule.from_kind(pipe.config.beta_schedule,
                                                                  pipe.config.train_timesteps),
                                          prediction_type=pipe.config.prediction)
        calls = []
        real = pipe.decoder.decode
        pipe.decoder.decode = lambda z, _real=real: (calls.append(z.shape), _real(z))[1]
        ctx = pipe.prepare(ref)
        maps, _ = pipe.render_conditions(fp, "ring-2")
        offline = pipe.generate_from_maps(ctx, maps, steps=1, guidance=1.0, seed=3)
        n_offline = len(calls)
        engine = StreamingEngine(pipe)
        engine.prepare(ref, flame=fp, views="ring-2", realtime=False, steps=1, seed=3, stream_batch=1)
        with engine.stream() as s:
            video = torch.stack([torch.as_tensor(f.views) for f in s])
        assert n_offline == offline.shape[0] and len(calls) == 2 * n_offline  # every frame through this decoder
        assert (video.int() - offline.int()).abs().max() <= 1  # the stream decodes like the offline pipeline
        frames[kind] = offline
    assert not torch.equal(frames["tiny"], frames["full"])  # the choice reaches the frames
