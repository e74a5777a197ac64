"""One random affine warp applied alike to images, masks and boxes (MGCA's ShiftScaleRotate).

Conventions: images and masks are ``[..., H, W]`` tensors on the pixel grid; boxes are xyxy in
continuous pixel coordinates (a pixel ``i`` spans ``[i, i + 1)``), the frame mmdet and
:class:`bench.data.images.Geometry` use. ``theta`` is ``torch.nn.functional.affine_grid``'s
matrix (``align_corners=False``): it maps an *output* position in normalised coordinates
(``u = 2 x / W - 1``) to the *input* position sampled there, so boxes move by its inverse.

Out-of-image pixels are black (the letterbox padding's value) and background in masks; MGCA's
albumentations default reflects the border instead. Parameters are drawn on the CPU from a
generator the caller seeds, so the same seed gives the same warp on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_theta(n: int, g: torch.Generator, *, scale: float, rotate_deg: float, shift: float = 0.0,
                 p: float = 1.0) -> torch.Tensor:
    """``[n, 2, 3]`` warps: zoom in ``[1 - scale, 1 + scale]``, rotation in ``±rotate_deg``, shift in
    ``±shift`` (fraction of the side), each applied with probability ``p`` (identity otherwise)."""
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    zoom = 1.0 + scale * (2 * u[:, 0] - 1)
    angle = math.radians(rotate_deg) * (2 * u[:, 1] - 1)
    tx, ty = 2 * shift * (2 * u[:, 2] - 1), 2 * shift * (2 * u[:, 3] - 1)
    on = u[:, 4] < p
    zoom = torch.where(on, zoom, torch.ones_like(zoom))
    angle = torch.where(on, angle, torch.zeros_like(angle))
    tx, ty = torch.where(on, tx, torch.zeros_like(tx)), torch.where(on, ty, torch.zeros_like(ty))
    # the output shows the input zoomed by `zoom` about the centre: sample at (R^-1 u) / zoom - t
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, sin, -tx], 1), torch.stack([-sin, cos, -ty], 1)], 1)
    return theta.float()


def warp_images(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear warp of float images ``[B, C, H, W]``; outside the input is 0."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp_masks(m: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of label maps ``[B, 1, H, W]`` (any integer dtype); outside is 0."""
    grid = F.affine_grid(theta.to(m.device, torch.float32), list(m.shape), align_corners=False)
    out = F.grid_sample(m.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(m.dtype)


def warp_boxes(boxes: torch.Tensor, theta: torch.Tensor, height: int, width: int,
               min_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Move xyxy boxes ``[k, 4]`` by one warp ``theta [2, 3]``: the box enclosing the four moved
    corners, clipped to the image. Returns (boxes, kept) where boxes narrower or lower than
    ``min_size`` pixels after clipping are dropped (``kept`` is the bool mask over the input)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), torch.zeros(0, dtype=torch.bool, device=boxes.device)
    t = theta.to(torch.float64).cpu()
    a, b = t[:, :2], t[:, 2]
    inv = torch.linalg.inv(a)
    x1, y1, x2, y2 = boxes.to(torch.float64).cpu().unbind(1)
    corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1),
                           torch.stack([x1, y2], 1), torch.stack([x2, y2], 1)], 1)     # [k, 4, 2] pixels
    size = torch.tensor([width, height], dtype=torch.float64)
    u_in = 2 * corners / size - 1
    u_out = (u_in - b) @ inv.T
    moved = (u_out + 1) * size / 2
    lo, hi = moved.min(1).values, moved.max(1).values
    lo = torch.maximum(lo, torch.zeros(2, dtype=torch.float64))
    hi = torch.minimum(hi, size)
    out = torch.cat([lo, hi], 1)
    kept = ((out[:, 2] - out[:, 0]) >= min_size) & ((out[:, 3] - out[:, 1]) >= min_size)
    return out[kept].to(boxes.dtype).to(boxes.device), kept.to(boxes.device)
