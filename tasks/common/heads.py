"""Classification heads, targets, losses and scores shared by the linear probe and fine-tuning."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.data.labels import LabelSpace


def seeded_linear(in_dim: int, out_dim: int, g: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from ``g`` (not the global generator)."""
    head = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=g)
        bound = 1 / math.sqrt(in_dim) if in_dim > 0 else 0
        nn.init.uniform_(head.bias, -bound, bound, generator=g)
    return head


def n_outputs(space: LabelSpace) -> int:
    return len(space.classes)


def targets_tensor(space: LabelSpace, rows: np.ndarray) -> torch.Tensor:
    """Targets of ``rows``: int64 class indices (multiclass) or float 1/0/NaN (binary, multi-label)."""
    t = space.targets[rows]
    return torch.from_numpy(t.astype(np.int64) if space.kind == "multiclass" else t.astype(np.float32))


def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (multiclass) or BCE averaged over labelled entries only (NaN targets are ignored)."""
    logits = logits.float()
    if kind == "multiclass":
        return F.cross_entropy(logits, y)
    mask = torch.isfinite(y)
    per = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y, nan=0.0), reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def scores_of(kind: str, logits: torch.Tensor) -> np.ndarray:
    """Probabilities (float64): softmax for multiclass, sigmoid otherwise."""
    logits = logits.float()
    p = torch.softmax(logits, dim=1) if kind == "multiclass" else torch.sigmoid(logits)
    return p.cpu().numpy().astype(np.float64)


def prior_loss(kind: str, y: torch.Tensor, n_classes: int) -> float:
    """The loss of the best constant predictor of ``y`` (its label frequencies): what a head that
    learned nothing from the images scores. A training loss well below it shows learning."""
    if kind == "multiclass":
        freq = torch.bincount(y, minlength=n_classes).double()
        logits = torch.log((freq / freq.sum()).clamp_min(1e-12)).float()
    else:
        mask = torch.isfinite(y)
        pos = (torch.nan_to_num(y, nan=0.0) * mask).sum(0).double()
        rate = (pos / mask.sum(0).clamp(min=1)).clamp(1e-6, 1 - 1e-6)
        logits = torch.log(rate / (1 - rate)).float()
    return float(loss_fn(kind, logits.expand(len(y), -1), y))
