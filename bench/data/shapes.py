"""Rasterisation of annotated shapes, shared by the synthetic writer and the loaders.

Both sides call :func:`rasterize`, so a mask decoded from an official annotation equals the mask the
generator drew, pixel for pixel. Coordinates are pixel indices (x right, y down); rectangles and
ellipses are given by their bounding-box corners and include both corner pixels (PIL convention).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SHAPE_KINDS = ("rectangle", "ellipse", "polygon")


def rasterize(kind: str, points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Return a bool [height, width] mask of the filled shape."""
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    canvas = Image.new("1", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ("rectangle", "ellipse"):
        if len(pts) != 2:
            raise ValueError(f"a {kind} needs 2 corner points, got {len(pts)}")
        x1, x2 = sorted((int(pts[0, 0]), int(pts[1, 0])))
        y1, y2 = sorted((int(pts[0, 1]), int(pts[1, 1])))
        (draw.rectangle if kind == "rectangle" else draw.ellipse)([x1, y1, x2, y2], fill=1)
    elif kind == "polygon":
        if len(pts) < 3:
            raise ValueError(f"a polygon needs at least 3 vertices, got {len(pts)}")
        draw.polygon([(int(x), int(y)) for x, y in pts], fill=1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}")
    return np.array(canvas, dtype=bool)


def bounding_box(points: np.ndarray) -> tuple[float, float, float, float]:
    """Axis-aligned box (x1, y1, x2, y2) of the given points: min and max coordinates."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


def mask_bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Box (x1, y1, x2, y2) of a non-empty mask, with x2 and y2 exclusive."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask has no bounding box")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
