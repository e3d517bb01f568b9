"""Fixtures shared by the engine tests."""
import pytest
import torch


class DecodeSpy:
    """Records the latents every decode call gets, as (T, V, C, h, w) in frame order."""

    def __init__(self, monkeypatch, pipe, views=2):
        self.views, self.seen = views, []
        real = pipe.decoder.decode  # the autoencoder's, or a distilled tiny decoder
        monkeypatch.setattr(pipe.decoder, "decode", lambda z: (self.seen.append(z.clone()), real(z))[1])

    def take(self) -> torch.Tensor:
        z = torch.cat(self.seen)
        self.seen.clear()
        return z.reshape(-1, self.views, *z.shape[1:])


@pytest.fixture()
def decode_spy(monkeypatch):
    """``decode_spy(pipe, views=2)`` -> a :class:`DecodeSpy` on ``pipe``'s decoder (undone after the test)."""
    return lambda pipe, views=2: DecodeSpy(monkeypatch, pipe, views)
