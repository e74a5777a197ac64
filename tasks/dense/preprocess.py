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
    """Mixin: ``aug`` = dict(scale, rotate_deg, shift, p) or None; ``aug_seed`` from the run seed."""

    def _init_aug(self, aug: dict | None, aug_seed: int) -> None:
        self.aug = {k: float(v) for k, v in (aug or {}).items()} or None
        self.aug_seed = int(aug_seed)
        self.register_buffer("aug_step", torch.zeros((), dtype=torch.long))

    def _draw(self, n: int) -> torch.Tensor:
        g = generator(self.aug_seed, f"augment:{int(self.aug_step)}")
        self.aug_step += 1
        return random_theta(n, g, **self.aug)


@MODELS.register_module()
class AugmentedDetDataPreprocessor(_Augmenting, DetDataPreprocessor):
    def __init__(self, *, aug: dict | None = None, aug_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_aug(aug, aug_seed)

    def forward(self, data: dict, training: bool = False) -> dict:
        out = super().forward(data, training)
        if training and self.aug:
            inputs, samples = out["inputs"], out["data_samples"]
            theta = self._draw(len(inputs))
            out["inputs"] = warp_images(inputs, theta)
            h, w = inputs.shape[-2:]
            for s, t in zip(samples, theta):
                boxes, kept = warp_boxes(s.gt_instances.bboxes, t, h, w)
                s.gt_instances = s.gt_instances[kept]
                s.gt_instances.bboxes = boxes
        return out


@MODELS.register_module()
class AugmentedSegDataPreProcessor(_Augmenting, SegDataPreProcessor):
    def __init__(self, *, aug: dict | None = None, aug_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_aug(aug, aug_seed)

    def forward(self, data: dict, training: bool = False) -> dict:
        out = super().forward(data, training)
        if training and self.aug:
            inputs, samples = out["inputs"], out["data_samples"]
            theta = self._draw(len(inputs))
            out["inputs"] = warp_images(inputs, theta)
            for s, t in zip(samples, theta):
                s.gt_sem_seg.data = warp_masks(s.gt_sem_seg.data[None], t[None])[0]
        return out
