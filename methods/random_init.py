"""Method ``random``: the preset's backbone with a seeded random initialisation (the floor of
every table; MGCA's "Random" row). Normalisation 0.5/0.5 as in MGCA's pipelines.

The initialisation is torchvision's, as MGCA's and GLoRIA's ``resnet50(pretrained=False)``: He-normal
convolutions and every residual branch active. timm zero-initialises the last BatchNorm of each
residual block by default (``zero_init_last``), which makes every block an identity: the "random"
encoder is then a 7x7 stem followed by strided 1x1 projections, a multi-scale copy of the pixels
with an 11-pixel receptive field at every level, not a random deep network. That copy localised the
synthetic pneumothoraces and foreign objects as well as trained encoders did (issue 9).
"""
from __future__ import annotations

from pathlib import Path

from bench.api import METHODS, Capability, MethodEntry
from bench.errors import CheckpointError
from methods.backbones import (HALF_MEAN, HALF_STD, BackbonePreset, TimmEncoder, backbone_preset, make_card,
                               seeded_backbone)

NAME = "random"
CAPABILITIES = frozenset({Capability.IMAGE_GLOBAL, Capability.IMAGE_DENSE, Capability.TRAINABLE})


def build_encoder(preset: BackbonePreset, seed: int = 0) -> TimmEncoder:
    """A randomly initialised timm backbone, residual branches active (torchvision's initialisation);
    the weights are a pure function of ``seed``."""
    model = seeded_backbone(preset.arch, preset.out_indices, seed, zero_init_last=False, **preset.kwargs)
    card = make_card(name=NAME, model=model, arch=preset.describe(), image_size=preset.image_size, weights_tag="random-init",
                     weights_sha256=None, mean=HALF_MEAN, std=HALF_STD, capabilities=CAPABILITIES,
                     reference="random initialisation as torchvision's (residual branches active), seeded by the run seed")
    return TimmEncoder(card, model)


def factory(preset: str = "tiny", checkpoint: Path | str | None = None, seed: int = 0,
            data: str = "synth") -> TimmEncoder:
    if checkpoint is not None:
        raise CheckpointError(f"method {NAME!r} takes no checkpoint (got {checkpoint}); "
                              "use method 'imagenet' or a pretrained method to load weights")
    return build_encoder(backbone_preset(preset), seed)


METHODS.add(NAME, MethodEntry(
    name=NAME, factory=factory, capabilities=CAPABILITIES,
    description="random init (seeded), half-width resnet18@64 (tiny) / resnet50@224 (paper), mean/std 0.5"))
