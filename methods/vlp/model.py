"""The model every vision-language method trains: an image tower, a text tower, projection heads.

State-dict layout (the converters in :mod:`methods.vlp.convert` target it):
``image.backbone.*`` (timm names), ``text.bert.*`` (Hugging Face BERT names), ``heads.<name>.*``
(method-specific; MGCA's keep the official inner layout ``head.{0,1,3,4}``) and, for MGCA,
``prototypes.weight``.

A method subclasses :class:`VLPModel` and implements ``image_embedding`` / ``text_embedding`` (the
joint space: zero-shot and retrieval) and ``losses(images, tokens)``, which computes the tensors its
objective needs and calls the objective (:mod:`methods.vlp.objectives`, pure functions).
"""
from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.vlp.text import TextTower, TokenBatch
from methods.vlp.towers import ImageTower


class MGCAEmbedding(nn.Module):
    """MGCA's Global/LocalEmbedding: Linear/Conv1d -> BN -> ReLU -> Linear/Conv1d -> BN(affine=False).

    Local embeddings take a flat ``[M, C]`` set of tokens (the real tokens of a batch, so padding
    never enters the BatchNorm statistics; the official code feeds zero-padded word slots too)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, conv: bool = False) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv1d(i, o, kernel_size=1)) if conv else nn.Linear
        self.conv = conv
        self.head = nn.Sequential(layer(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  layer(hidden, out_dim), nn.BatchNorm1d(out_dim, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return self.head(x)
        return self.head(x.t().unsqueeze(0)).squeeze(0).t()


class ProjectionMLP(nn.Module):
    """ConVIRT's projection: one hidden layer with ReLU."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def project_tokens(head: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a token-wise ``head`` to the real tokens of ``[B, N, C]`` (``mask`` [B, N]); zeros elsewhere."""
    b, n, _ = tokens.shape
    if mask is None:
        flat = head(tokens.reshape(b * n, -1))
        return flat.reshape(b, n, -1)
    out_rows = head(tokens[mask])
    out = out_rows.new_zeros(b, n, out_rows.shape[-1])
    out[mask] = out_rows
    return out


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along the batch, gradients flowing back to each rank's part
    (identity outside DDP). Used where a method's contrast is batch-wide."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


class VLPModel(nn.Module, abc.ABC):
    """Image tower + text tower + heads; ``current_epoch`` (1-based) is set by the training loop."""

    def __init__(self, image: ImageTower, text: TextTower, heads: dict[str, nn.Module], *, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.image = image
        self.text = text
        self.heads = nn.ModuleDict(heads)
        self.current_epoch = 1
        #: "rank" (each process contrasts its own batch, as MGCA's and GLoRIA's code) or "global"
        #: (embeddings all-gathered across DDP ranks before the batch-wide contrast).
        self.contrast_scope = "rank"

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_batch(x) if self.contrast_scope == "global" else x

    @abc.abstractmethod
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Prepared images -> L2-normalised joint-space vectors [B, E]."""

    @abc.abstractmethod
    def text_embedding(self, tokens: TokenBatch) -> torch.Tensor:
        """Tokens -> L2-normalised joint-space vectors [B, E]."""

    @abc.abstractmethod
    def losses(self, images: torch.Tensor, tokens: TokenBatch) -> dict[str, torch.Tensor]:
        """The named loss terms of one batch (their sum is optimised)."""

    def forward(self, images: torch.Tensor, tokens: TokenBatch) -> dict[str, torch.Tensor]:
        # the training loop calls the model (so DDP can wrap it); the losses are the forward pass
        return self.losses(images, tokens)

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters that must not learn at ``current_epoch`` (MGCA's prototypes in epoch 1)."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"image": self.image.spec.to_dict(), "text": self.text.spec.to_dict(),
                "contrast_scope": self.contrast_scope}


def l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
