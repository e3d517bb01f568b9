"""Micro stage-2 networks shared by test modules (importable as ``micro``: pytest puts ``tests/`` on
``sys.path`` when it loads ``tests/conftest.py``)."""
import torch

from mvportrait.config import AutoencoderConfig, Stage2Config, UNetConfig


def micro_stage2_config(*, ae_mid_attention: bool = False, **kw) -> Stage2Config:
    """Every stage-2 network at 32 px, 2 views, 2 frames; ``kw`` overrides Stage2Config fields."""
    unet = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), head_dim=8,
                      cross_attention_dim=16, norm_groups=4, temporal_attentions=1, flame_widths=(4, 8, 8))
    ae = AutoencoderConfig(block_out=(8, 16, 16), layers_per_block=1, norm_groups=4, mid_attention=ae_mid_attention,
                           scaling_factor=0.7)
    return Stage2Config(**{**dict(autoencoder=ae, unet=unet, image_size=32, views=2, frames=2, image_tokens=4,
                                  image_embed_width=8, prediction="v_prediction"), **kw})


def fill_zero_params(model, seed: int = 0, std: float = 0.05):
    """Noise in every all-zero parameter (zero-initialised FLAME encoder output, temporal / view output
    projections), so every part of the network affects its output; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
