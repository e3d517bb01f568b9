"""Micro networks for the export tests: every stage-2 network at 32 px and tiny stage-1 models.

Zero-initialised layers (FLAME encoder output, temporal / view output projections) are filled with
noise so every graph's output depends on every part of it (a parity check on an all-zero branch
would prove nothing)."""
import pytest
import torch

from micro import fill_zero_params, micro_stage2_config

from mvportrait.config import DenoiserConfig, Stage2Config
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.stage2 import FLAME2VideoModel
from mvportrait.models.text_encoder import BertConfig, BertEncoderNet


def micro_config(**kw) -> Stage2Config:
    return micro_stage2_config(ae_mid_attention=True, **kw)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def micro_model():
    torch.manual_seed(0)
    return fill_zero_params(FLAME2VideoModel(micro_config()).eval())


@pytest.fixture(scope="session")
def stage1_nets():
    """(motion tokens model, emotion pooled model, tiny BERT)."""
    torch.manual_seed(0)
    motion = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion", text_cond="tokens")).eval()
    emotion = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")).eval()
    bert = BertEncoderNet(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)).eval()
    return motion, emotion, bert
