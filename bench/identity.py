"""The weights part of a result's identity: which weights the encoder was actually built with.

A result is only current while the weights behind it are the same. The spec names where weights
come from (a method, a ``--checkpoint`` path), not what they are: the file behind
``$MEDVLP_IMAGENET_WEIGHTS`` or a hub cache can be replaced, a pretrained method can re-pretrain its
cached checkpoint, and a seeded random init changes with the library that draws it. So the runner
asks, for every method, once the encoder is built:

1. ``card.weights_sha256``: the method read a weights file and says which (imagenet, a cached
   pretrained or supervised checkpoint) -> origin ``"method-card"``;
2. else the sha256 of ``--checkpoint`` (a method that loads it without filling its card) ->
   origin ``"checkpoint"``;
3. else a fingerprint of the built weights themselves (``state_fingerprint``: names, dtypes, shapes
   and bytes of the state dict), so even a changed initialisation is caught -> origin
   ``"state-fingerprint"``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ORIGIN_CARD = "method-card"
ORIGIN_CHECKPOINT = "checkpoint"
ORIGIN_STATE = "state-fingerprint"


@dataclass(frozen=True)
class WeightsIdentity:
    sha256: str
    origin: str                 # ORIGIN_CARD, ORIGIN_CHECKPOINT or ORIGIN_STATE
    file: str | None            # the weights file, where one was read

    def describe(self) -> str:
        where = f" ({self.file})" if self.file else ""
        return f"{self.sha256[:12]} from {self.origin}{where}"


def weights_identity(encoder: nn.Module, checkpoint: str | None, checkpoint_sha256: str | None) -> WeightsIdentity:
    """The identity of ``encoder``'s weights (rules in the module docstring)."""
    card = getattr(encoder, "card", None)
    card_sha = getattr(card, "weights_sha256", None)
    # methods that read a file record its path for provenance (imagenet: checkpoint_path)
    read_from = getattr(encoder, "checkpoint_path", None) or checkpoint
    if card_sha:
        return WeightsIdentity(str(card_sha), ORIGIN_CARD, None if read_from is None else str(read_from))
    if checkpoint_sha256:
        return WeightsIdentity(checkpoint_sha256, ORIGIN_CHECKPOINT, checkpoint)
    from methods.backbones import state_fingerprint   # lazy: pulls in timm

    return WeightsIdentity(state_fingerprint(encoder), ORIGIN_STATE, None)
