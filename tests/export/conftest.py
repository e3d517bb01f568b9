"""Micro networks for the export tests: every stage-2 network at 32 px and tiny stage-1 models.

Zero-initialised layers (FLAME encoder output, temporal / view output projections) are filled with
noise so every graph's output depends on every part of it (a parity check on an all-zero branch
would prove nothing)."""
import pytest
import torch

from mvportrait.config import AutoencoderConfig, DenoiserConfig, Stage2Config, UNetConfig
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.stage2 import FLAME2VideoModel
from mvportrait.models.text_encoder import BertConfig, BertEncoderNet


def micro_config(**kw) -> Stage2Config:
    unet = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), head_dim=8,
                      cross_attention_dim=16, norm_groups=4, temporal_attentions=1, flame_widths=(4, 8, 8))
    ae = AutoencoderConfig(block_out=(8, 16, 16), layers_per_block=1, norm_groups=4, mid_attention=True,
                           scaling_factor=0.7)
    return Stage2Config(**{**dict(autoencoder=ae, unet=unet, image_size=32, views=2, frames=2, image_tokens=4,
                                  image_embed_width=8, prediction="v_prediction"), **kw})


def fill_zeros(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def micro_model():
    torch.manual_seed(0)
    return fill_zeros(FLAME2VideoModel(micro_config()).eval())


@pytest.fixture(scope="session")
def stage1_nets():
    """(motion tokens model, emotion pooled model, tiny BERT)."""
    torch.manual_seed(0)
    motion = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion", text_cond="tokens")).eval()
    emotion = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")).eval()
    bert = BertEncoderNet(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)).eval()
    return motion, emotion, bert
