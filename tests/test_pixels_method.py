"""The raw-pixel reference method: exposure-invariant thumbnails, and refused by fine-tuning."""
import pytest
import torch

from bench.api import METHODS, Capability
from bench.errors import CheckpointError
import methods  # noqa: F401  (registers the methods)
from methods.pixels import GRID


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 200, (3, 1, 128, 128), generator=g, dtype=torch.uint8)


def test_features_are_per_image_standardised_thumbnails():
    enc = METHODS.get("pixels").factory("tiny", None, 0)
    x = enc.prepare(_images())
    pooled = enc.image_features(x).pooled
    assert pooled.shape == (3, GRID * GRID)
    # a thumbnail cell is the mean of its 8x8 block of the standardised image
    gray = x[0, 0]
    z = (gray - gray.mean()) / gray.std()
    assert torch.allclose(pooled[0, 0], z[:8, :8].mean(), atol=1e-5)
    assert torch.allclose(pooled[0, GRID + 1], z[8:16, 8:16].mean(), atol=1e-5)


def test_exposure_changes_do_not_change_the_features():
    enc = METHODS.get("pixels").factory("tiny", None, 0)
    imgs = _images(1)
    brighter = (imgs.float() * 1.2 + 10).round().clamp(0, 255).to(torch.uint8)
    a = enc.image_features(enc.prepare(imgs)).pooled
    b = enc.image_features(enc.prepare(brighter)).pooled
    assert torch.allclose(a, b, atol=0.05)
    assert not torch.allclose(a, enc.image_features(enc.prepare(_images(2))).pooled, atol=0.05)


def test_not_trainable_and_takes_no_checkpoint(tmp_path):
    entry = METHODS.get("pixels")
    assert Capability.TRAINABLE not in entry.capabilities
    assert entry.factory("paper", None, 0).card.image_size == 224
    with pytest.raises(CheckpointError):
        entry.factory("tiny", tmp_path / "w.pth", 0)
