"""mmdet's and mmseg's data preprocessors with our seeded training augmentation added.

The library preprocessors stack, pad (to a multiple of 32; the padding is black and below/right of
the image, so boxes and masks keep their coordinates) and scale the uint8 images to [0, 1]; the
encoder backbone normalises them itself. For training batches these subclasses then draw one
affine warp per image (:mod:`tasks.dense.augment`) and apply it to the images and their boxes or
masks together. The warps come from a generator seeded by ``(aug_seed, step)``; ``step`` is a
buffer of the model, so it is saved in checkpoints and a resumed run draws the warps an
uninterrupted one would.
"""
from __future__ import annotations

from typing import Any

import torch
from mmdet.models.data_preprocessors import DetDataPreprocessor
from mmengine.registry import MODELS
from mmseg.models.data_preprocessor import SegDataPreProcessor

from tasks.common.seeding import generator
from tasks.dense.augment import random_theta, warp_boxes, warp_images, warp_masks


class _Augmenting:
    """Mixin: ``aug`` = dict(scale, rotate_deg, shift, p) or None; ``aug_seed`` from the run seed.

    In training, the images of a batch are warped by seeded random affines after the base class's
    preprocessing, and each subclass warps its targets (boxes, masks) by the same affines."""

    def __init__(self, *, aug: dict | None = None, aug_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aug = {k: float(v) for k, v in (aug or {}).items()} or None
        self.aug_seed = int(aug_seed)
        self.register_buffer("aug_step", torch.zeros((), dtype=torch.long))

    def _draw(self, n: int) -> torch.Tensor:
        g = generator(self.aug_seed, f"augment:{int(self.aug_step)}")
        self.aug_step += 1
        return random_theta(n, g, **self.aug)

    def forward(self, data: dict, training: bool = False) -> dict:
        out = super().forward(data, training)
        if training and self.aug:
            inputs = out["inputs"]
            theta = self._draw(len(inputs))
            out["inputs"] = warp_images(inputs, theta)
            for s, t in zip(out["data_samples"], theta):
                self._warp_targets(s, t, *inputs.shape[-2:])
        return out

    def _warp_targets(self, sample: Any, theta: torch.Tensor, h: int, w: int) -> None:
        raise NotImplementedError


@MODELS.register_module()
class AugmentedDetDataPreprocessor(_Augmenting, DetDataPreprocessor):
    def _warp_targets(self, sample: Any, theta: torch.Tensor, h: int, w: int) -> None:
        boxes, kept = warp_boxes(sample.gt_instances.bboxes, theta, h, w)
        sample.gt_instances = sample.gt_instances[kept]
        sample.gt_instances.bboxes = boxes


@MODELS.register_module()
class AugmentedSegDataPreProcessor(_Augmenting, SegDataPreProcessor):
    def _warp_targets(self, sample: Any, theta: torch.Tensor, h: int, w: int) -> None:
        sample.gt_sem_seg.data = warp_masks(sample.gt_sem_seg.data[None], theta[None])[0]
