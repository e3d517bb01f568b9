"""Test-session setup shared by every test folder.

Triton reads TRITON_INTERPRET when triton itself is imported, so it is set here, before any test
module can import it: without a CUDA GPU the Triton kernels run in the interpreter on the CPU.
"""
import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture()
def one_torch_thread():
    """Run the test with torch on one thread (small models: less contention, stable numerics)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def nan_empty(request, one_torch_thread):
    """torch.empty returns NaN (int max) while the test runs, so unwritten outputs fail; one torch thread.
    Not in ``gpu``-marked tests: they poison the graphs' static outputs themselves and keep the captured
    work as shipped."""
    import torch

    if request.node.get_closest_marker("gpu"):
        yield
        return
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])


@pytest.fixture(scope="session")
def stage2_micro_run(tmp_path_factory):
    """A stage-2 model trained for a few steps per stage at micro size (32 px, 2 views, 2 frames):
    (run folder, train summary). Shared by the training, pipeline, evaluation and CLI tests."""
    import torch

    from mvportrait.config import AutoencoderConfig, Stage2Config, UNetConfig
    from mvportrait.train.stage2 import train_stage2

    torch.manual_seed(0)
    unet = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), head_dim=8,
                      cross_attention_dim=16, norm_groups=4, temporal_attentions=1, flame_widths=(4, 8, 8))
    ae = AutoencoderConfig(block_out=(8, 16, 16), layers_per_block=1, norm_groups=4, mid_attention=False)
    cfg = Stage2Config(autoencoder=ae, unet=unet, image_size=32, views=2, frames=2, image_tokens=4,
                       image_embed_width=8, prediction="v_prediction", guidance=2.0)
    out = tmp_path_factory.mktemp("stage2_micro")
    summary = train_stage2("all", out, config=cfg, overrides={"steps": 4, "batch": 2, "pool_size": 3,
                                                              "log_every": 2, "checkpoint_every": 2})
    return out, summary
