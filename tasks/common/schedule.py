"""Learning-rate schedules."""
from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR factor: linear warmup, cosine decay to ``min_ratio``, then **held** there (clamped).

    Clamped on purpose: BenchX's WarmupCosineScheduler rises again after ``t_total``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
