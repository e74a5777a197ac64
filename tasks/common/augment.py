"""Batched, seeded training augmentation on [0, 1] image tensors."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, g: torch.Generator, *, scale: tuple[float, float], rotate_deg: float,
            hflip: bool, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Batched random resized crop + rotation + optional horizontal flip of [0,1] images.

    One affine warp per image (``grid_sample``); parameters are drawn on the CPU from ``g`` so the
    same seed gives the same augmentation on any device. Out-of-image pixels are black, as the
    letterbox padding is.
    """
    b = x.shape[0]
    u = torch.rand(b, 6, generator=g, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)      # crop width / image width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)                  # crop centre in [-1, 1] coordinates
    cy = (1 - h) * (2 * u[:, 3] - 1)
    theta_r = math.radians(rotate_deg) * (2 * u[:, 4] - 1)
    flip = torch.where((u[:, 5] < 0.5) & torch.tensor(bool(hflip)), -1.0, 1.0).double()
    cos, sin = torch.cos(theta_r), torch.sin(theta_r)
    theta = torch.stack([torch.stack([w * cos * flip, -h * sin, cx], 1),
                         torch.stack([w * sin * flip, h * cos, cy], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_fn(settings: Mapping[str, Any]) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """:func:`augment` bound to a protocol's ``aug_*`` settings."""
    return partial(augment, scale=(float(settings["aug_scale_min"]), float(settings["aug_scale_max"])),
                   rotate_deg=float(settings["aug_rotate_deg"]), hflip=bool(settings["aug_hflip"]))


def augmentation_record(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``aug_*`` settings, as recorded in result details."""
    return {k: settings[k] for k in settings if k.startswith("aug_")}
