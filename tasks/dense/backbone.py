"""Any of our Encoders as an OpenMMLab backbone (mmdet and mmseg build it by its registry name).

:class:`EncoderBackbone` is registered once in mmengine's root ``MODELS`` registry, which mmdet's and
mmseg's registries fall back to, so a detector or segmentor config names it like any backbone
(``backbone=dict(type="MedVLPEncoder", encoder=<Encoder>, ...)``). It takes the images as the data
preprocessor leaves them (float in [0, 1], one channel, letterbox padding black), applies the
encoder's own normalisation (:meth:`bench.api.Encoder.prepare`, so preprocessing travels with the
weights) and returns the levels of ``encoder.image_features(x).pyramid``.

* **Levels.** ``levels`` picks pyramid levels (negative indices count from the coarsest);
  ``extra_levels`` adds coarser ones by stride-2 max pooling of the last (as mmdet's FPN does for
  its extra outputs), so a head that needs C3-C5 also runs on a one-level pyramid (ViT, pixels).
* **Strides.** Measured once at the run's input size with a probe forward. At the card's own image
  size they must equal the card's declared strides and channels (a card that disagrees with its
  network is an error); at other sizes a fixed-grid encoder (``pixels``: always 16 x 16 cells) has a
  stride that scales with the input, and the measured one is what anchors need.
* **Frozen** (MGCA's and BenchX's protocol, the default): no gradient, no BatchNorm statistics
  update, and the encoder stays in eval mode whatever ``train()`` the runner calls. **Fine-tuned**:
  the encoder's :meth:`~bench.api.Encoder.backbone_parameters` train, the rest stays frozen.
* ``init_weights`` never touches the encoder: mmengine calls it on every module before training,
  and timm models answer it by re-initialising themselves.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from bench.api import Encoder
from bench.errors import BenchError

log = logging.getLogger(__name__)

REGISTRY_NAME = "MedVLPEncoder"


def probe_pyramid(encoder: Encoder, size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(channels, strides, feature sizes) of the encoder's pyramid for a ``size`` x ``size`` input.

    A stride is ``size / feature size`` when that divides evenly, else ``size / feature size``
    rounded up to the next power of two (a padded convolution gives ceil(size / stride) cells).
    """
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            x = encoder.prepare(torch.zeros(1, 1, size, size, device=device))
            pyramid = encoder.image_features(x).pyramid
    finally:
        encoder.train(was_training)
    channels = tuple(int(f.shape[1]) for f in pyramid)
    sizes = tuple(int(f.shape[-1]) for f in pyramid)
    strides = []
    for s in sizes:
        if size % s == 0:
            strides.append(size // s)
        else:
            stride = 1
            while -(-size // stride) > s:
                stride *= 2
            strides.append(stride)
    return channels, tuple(strides), sizes


def check_card_pyramid(encoder: Encoder) -> None:
    """The pyramid at the card's image size has exactly the card's channels and strides."""
    card = encoder.card
    channels, strides, _ = probe_pyramid(encoder, card.image_size)
    if channels != tuple(card.feature_channels) or strides != tuple(card.feature_strides):
        raise BenchError(f"method {card.name!r}: at its card's image size {card.image_size} the encoder's pyramid "
                         f"has channels {channels} and strides {strides}, but the card declares "
                         f"{tuple(card.feature_channels)} and {tuple(card.feature_strides)}")


@MODELS.register_module(name=REGISTRY_NAME)
class EncoderBackbone(BaseModule):
    """An :class:`~bench.api.Encoder` as a backbone returning a tuple of NCHW maps (fine to coarse)."""

    def __init__(self, encoder: Encoder, input_size: int, levels: Sequence[int] | None = None,
                 extra_levels: int = 0, frozen: bool = True, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(encoder, Encoder):
            raise TypeError(f"{REGISTRY_NAME}: encoder must be a bench.api.Encoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.frozen = bool(frozen)
        check_card_pyramid(encoder)
        channels, strides, _ = probe_pyramid(encoder, int(input_size))
        n = len(channels)
        picked = list(range(n)) if levels is None else [i % n for i in levels]
        if levels is not None and any(not -n <= i < n for i in levels):
            raise BenchError(f"{REGISTRY_NAME}: levels {tuple(levels)} do not exist in the {n}-level pyramid of "
                             f"method {encoder.card.name!r}")
        if len(set(picked)) != len(picked) or picked != sorted(picked):
            raise BenchError(f"{REGISTRY_NAME}: levels {tuple(levels or ())} must be distinct and fine to coarse")
        self.levels = tuple(picked)
        self.extra_levels = int(extra_levels)
        self.out_channels = tuple(channels[i] for i in picked) + (channels[picked[-1]],) * self.extra_levels
        self.out_strides = tuple(strides[i] for i in picked) + tuple(
            strides[picked[-1]] * 2 ** (k + 1) for k in range(self.extra_levels))
        self.input_size = int(input_size)
        self._set_trainable()

    def _set_trainable(self) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        if not self.frozen:
            for p in self.encoder.backbone_parameters():
                p.requires_grad_(True)

    def init_weights(self) -> None:
        self._is_init = True   # the encoder's weights are the method's; never re-initialised here

    def train(self, mode: bool = True) -> "EncoderBackbone":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.encoder.prepare(x)
        if self.frozen:
            with torch.no_grad():
                pyramid = self.encoder.image_features(x).pyramid
        else:
            pyramid = self.encoder.image_features(x).pyramid
        outs = [pyramid[i] for i in self.levels]
        for _ in range(self.extra_levels):
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
