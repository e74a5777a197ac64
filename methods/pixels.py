"""Method ``pixels``: a non-learned reference point, the image itself.

Each image is standardised on its own (zero mean, unit variance: synthetic and real radiographs vary
in exposure far more than in content) and average-pooled to a 16 x 16 thumbnail; the flattened
thumbnail is the global feature. It answers "how much of the task does a linear model on raw
intensities already solve?", which any pretrained encoder must beat to be worth its features, and
it checks the pipeline end to end (the synthetic corpus's learnability test uses the same features).

It has no parameters, so it cannot be fine-tuned: fine-tuning tasks show it as n/a.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.api import METHODS, Capability, Encoder, Features, MethodCard, MethodEntry
from bench.errors import CheckpointError
from methods.backbones import HALF_MEAN, HALF_STD, backbone_preset

NAME = "pixels"
GRID = 16
CAPABILITIES = frozenset({Capability.IMAGE_GLOBAL, Capability.IMAGE_DENSE})


class PixelEncoder(Encoder):
    """Per-image standardised GRID x GRID thumbnails as features."""

    def __init__(self, image_size: int) -> None:
        if image_size % GRID:
            raise ValueError(f"image size {image_size} is not a multiple of the {GRID}-cell grid")
        stride = image_size // GRID
        card = MethodCard(
            name=NAME, backbone=f"pixels{GRID}", weights_tag="none", weights_sha256=None,
            image_size=image_size, mean=HALF_MEAN, std=HALF_STD, embed_dim=GRID * GRID,
            feature_channels=(1,), feature_strides=(stride,), patch_dim=1, capabilities=CAPABILITIES,
            reference="raw-intensity baseline: per-image standardised 16x16 thumbnails")
        super().__init__(card)
        self.stride = stride

    def image_features(self, x: torch.Tensor) -> Features:
        gray = x[:, :1]
        flat = gray.flatten(1)
        gray = (gray - flat.mean(1).view(-1, 1, 1, 1)) / flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
        # adaptive: the feature is the GRID x GRID thumbnail at whatever input size the task protocol feeds
        thumb = F.adaptive_avg_pool2d(gray, GRID)                     # [B, 1, GRID, GRID]
        return Features(pooled=thumb.flatten(1), patches=thumb.flatten(2).transpose(1, 2), pyramid=[thumb])

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        return []


def factory(preset: str = "tiny", checkpoint: Path | str | None = None, seed: int = 0,
            data: str = "synth") -> PixelEncoder:
    if checkpoint is not None:
        raise CheckpointError(f"method {NAME!r} has no weights and takes no checkpoint (got {checkpoint})")
    return PixelEncoder(backbone_preset(preset).image_size)


METHODS.add(NAME, MethodEntry(
    name=NAME, factory=factory, capabilities=CAPABILITIES,
    description=f"no learning: per-image standardised {GRID}x{GRID} thumbnails (raw-intensity reference point)"))
