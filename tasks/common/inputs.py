"""From the memory-mapped image cache to the encoder's input tensor.

The cache stores uint8 grayscale squares at the size the runner prepared (the task protocol's
``image_size``). The input size is a protocol setting, not the encoder card's: the card says what
a method was trained at, the protocol says what the benchmark feeds every method, and the two may
differ (``--set image_size=96``).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from bench.api import Encoder
from bench.errors import BenchError


def input_size(settings: Mapping[str, Any]) -> int:
    """The protocol's input resolution (``image_size`` setting), checked to be a usable size."""
    size = settings["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise BenchError(f"setting image_size={size!r}: expected a positive whole number of pixels")
    return size


def images_of(data: Any, rows: np.ndarray) -> torch.Tensor:
    """uint8 [B, 1, S, S] of table rows (sorted reads are fastest on a memmap)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    batch = np.empty((len(rows),) + tuple(data.images.array.shape[1:]), dtype=np.uint8)
    batch[order] = np.asarray(data.images.array[rows[order]])
    return torch.from_numpy(batch).unsqueeze(1)


def to_input(encoder: Encoder, x: torch.Tensor, device: torch.device, size: int) -> torch.Tensor:
    """uint8 or [0,1] float images -> normalised encoder input of ``size`` x ``size`` on ``device``."""
    x = x.to(device, non_blocking=True)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = encoder.prepare(x)
    if device.type == "cuda":   # cuDNN convolutions are faster on NHWC
        x = x.contiguous(memory_format=torch.channels_last)
    return x
