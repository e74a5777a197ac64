"""Boxes and masks keep their geometry through letterbox, resize, padding and augmentation.

Property tests on random shapes: a rectangle drawn into a mask and carried through each step must
stay where its box, carried through the same step by the box path, says it is.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.data.images import Geometry, letterbox, letterbox_mask
from bench.data.shapes import mask_bounding_box
from tasks.dense.augment import random_theta, warp_boxes, warp_images, warp_masks

SEEDS = range(25)


def _box_of(mask: np.ndarray) -> np.ndarray:
    return np.array(mask_bounding_box(mask), dtype=np.float64)


@pytest.mark.parametrize("seed", SEEDS)
def test_letterbox_moves_a_mask_where_geometry_moves_its_box(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(40, 300, 2))
    size = int(rng.choice([32, 64, 96, 128]))
    x1, y1 = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
    x2, y2 = int(rng.integers(x1 + 10, w + 1)), int(rng.integers(y1 + 10, h + 1))
    mask = np.zeros((h, w), np.uint8)
    mask[y1:y2, x1:x2] = 1
    geom, _, _ = Geometry.fit(h, w, size)
    box = geom.boxes(np.array([[x1, y1, x2, y2]], float))[0]
    lb = letterbox_mask(mask, size)
    if not lb.any():                      # a sliver thinner than half an output pixel may vanish
        assert min(box[2] - box[0], box[3] - box[1]) < 1.5
        return
    # the area rule puts each edge within half an output pixel (plus rounding of the short side)
    assert np.abs(_box_of(lb) - box).max() <= 1.0
    # the image follows the same geometry: a bright rectangle lands on the letterboxed mask
    img, g2 = letterbox(mask * 255, size)
    assert g2 == geom
    assert np.abs(_box_of(img > 127) - box).max() <= 1.0
    # and the box maps back to native pixels
    assert geom.unboxes(box[None])[0] == pytest.approx([x1, y1, x2, y2], abs=1e-3)


@pytest.mark.parametrize("seed", SEEDS)
def test_warp_without_rotation_moves_masks_and_boxes_alike(seed):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = 64
    x1, y1 = (int(v) for v in rng.integers(8, 36, 2))
    x2, y2 = x1 + int(rng.integers(6, 22)), y1 + int(rng.integers(6, 22))
    mask = torch.zeros(1, 1, size, size, dtype=torch.long)
    mask[..., y1:y2, x1:x2] = 1
    theta = random_theta(1, g, scale=0.3, rotate_deg=0.0, shift=0.1, p=1.0)
    warped = warp_masks(mask, theta)[0, 0].numpy()
    boxes, kept = warp_boxes(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), theta[0], size, size)
    if not warped.any():
        assert not kept.any()
        return
    assert kept.all()
    # nearest sampling places each edge within one pixel of the exact affine image of the box
    assert np.abs(_box_of(warped) - boxes[0].numpy()).max() <= 1.0 + 1e-4
    # the image warps like its mask
    img = warp_images(mask.float() * 255, theta)[0, 0].numpy()
    assert np.abs(_box_of(img > 127) - _box_of(warped)).max() <= 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_rotated_masks_stay_inside_their_warped_box(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    rng = np.random.default_rng(1000 + seed)
    size = 64
    x1, y1 = (int(v) for v in rng.integers(12, 32, 2))
    x2, y2 = x1 + int(rng.integers(6, 20)), y1 + int(rng.integers(6, 20))
    mask = torch.zeros(1, 1, size, size, dtype=torch.long)
    mask[..., y1:y2, x1:x2] = 1
    theta = random_theta(1, g, scale=0.1, rotate_deg=10.0, p=1.0)
    warped = warp_masks(mask, theta)[0, 0].numpy()
    boxes, kept = warp_boxes(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), theta[0], size, size)
    assert kept.all() and warped.any()
    bx = boxes[0].numpy()
    mb = _box_of(warped)
    assert mb[0] >= bx[0] - 1 and mb[1] >= bx[1] - 1 and mb[2] <= bx[2] + 1 and mb[3] <= bx[3] + 1
    # and the box is tight: a rotation of at most 10 degrees grows it by at most ~sin(10)*(w+h)
    grow = math.sin(math.radians(10)) * ((x2 - x1) + (y2 - y1)) * 1.1 + 2
    assert (bx[2] - bx[0]) - (mb[2] - mb[0]) <= grow and (bx[3] - bx[1]) - (mb[3] - mb[1]) <= grow


def test_identity_warp_changes_nothing_and_p_zero_is_identity():
    g = torch.Generator().manual_seed(0)
    theta = random_theta(4, g, scale=0.2, rotate_deg=10.0, shift=0.1, p=0.0)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3))
    x = torch.rand(4, 1, 32, 32)
    assert torch.allclose(warp_images(x, theta), x, atol=1e-5)
    m = (x > 0.5).long()
    assert torch.equal(warp_masks(m, theta), m)
    b = torch.tensor([[3.0, 4.0, 20.0, 30.0]])
    assert torch.allclose(warp_boxes(b, theta[0], 32, 32)[0], b, atol=1e-4)


def test_boxes_pushed_out_of_the_image_are_dropped():
    theta = torch.tensor([[1.0, 0.0, 0.9], [0.0, 1.0, 0.0]])      # samples far right: content moves left
    boxes, kept = warp_boxes(torch.tensor([[0.0, 0.0, 5.0, 5.0], [50.0, 10.0, 60.0, 20.0]]), theta, 64, 64)
    assert kept.tolist() == [False, True]
    assert boxes[0].tolist() == pytest.approx([50 - 0.9 * 32, 10, 60 - 0.9 * 32, 20], abs=1e-4)


def test_same_seed_same_warps():
    a = random_theta(8, torch.Generator().manual_seed(5), scale=0.1, rotate_deg=10, p=0.5)
    b = random_theta(8, torch.Generator().manual_seed(5), scale=0.1, rotate_deg=10, p=0.5)
    c = random_theta(8, torch.Generator().manual_seed(6), scale=0.1, rotate_deg=10, p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
