"""Mixed precision: bf16 autocast on CUDA, fp32 on CPU (golden numbers are CPU fp32 numbers).

The autocast rule itself lives in :func:`bench.env.autocast` (the runner and pretraining use it
too); tasks take it from here together with the label that records it.
"""
from __future__ import annotations

import torch

from bench.env import autocast

__all__ = ["autocast", "precision_label"]


def precision_label(device: torch.device) -> str:
    """How numbers were computed on ``device``, recorded in details and in feature-cache keys."""
    return "bf16-autocast" if device.type == "cuda" else "fp32"
