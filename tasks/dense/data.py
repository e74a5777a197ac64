"""Prepared data (image cache, canonical table, split manifest) as mmdet / mmseg samples.

The image cache holds letterboxed uint8 squares at the task's input size, and the cache's
:class:`~bench.data.images.Geometry` of each row maps native pixels into that square. Targets are
moved into the same square once per run:

* boxes: ``Geometry.boxes`` of the table's native xyxy boxes (continuous pixel coordinates);
* masks: ``letterbox_mask`` of the table's native mask (the area rule: an input pixel is foreground
  when at least half of its footprint is);
* the content box (where the image lies in the square, padding excluded), kept in the metainfo so
  metrics never count letterbox padding.

Samples carry no randomness: training augmentation happens batch-wise in the data preprocessor
(:mod:`tasks.dense.preprocess`), seeded from the run seed and the step, so a resumed run draws the
same warps. Every sample's ``img_id`` is its table row.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.data.images import Geometry, letterbox_mask
from bench.errors import DataError


def geometry_of(data: Any, row: int) -> Geometry:
    return Geometry.from_array(data.images.geometry[int(row)])


def content_box(data: Any, row: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the image inside its letterboxed square (x2/y2 exclusive)."""
    frame = data.table.frame
    h, w = int(frame["height"].iat[int(row)]), int(frame["width"].iat[int(row)])
    x1, y1, x2, y2 = geometry_of(data, row).content_box(h, w)
    size = int(data.images.array.shape[-1])
    return max(0, x1), max(0, y1), min(size, x2), min(size, y2)


def native_boxes(data: Any, row: int) -> np.ndarray:
    """The table's boxes of ``row`` (float32 [k, 4], native pixels)."""
    table = data.table
    if not table.has_boxes:
        raise DataError(f"dataset {table.dataset!r} has no boxes; a detection task needs them", path=table.root)
    return np.asarray(table.boxes[int(row)], dtype=np.float32).reshape(-1, 4)


def input_boxes(data: Any, row: int) -> np.ndarray:
    """Boxes of ``row`` in the letterboxed input square."""
    return geometry_of(data, row).boxes(native_boxes(data, row))


def input_mask(data: Any, row: int, size: int) -> np.ndarray:
    """uint8 0/1 mask of ``row`` letterboxed to ``size`` (the image cache's placement)."""
    table = data.table
    if not table.has_masks:
        raise DataError(f"dataset {table.dataset!r} has no masks; a segmentation task needs them", path=table.root)
    if table.masks[int(row)] is None:
        return np.zeros((size, size), dtype=np.uint8)
    return letterbox_mask(table.mask(int(row)), size)


def _check_square(data: Any, size: int) -> None:
    have = tuple(data.images.array.shape[1:])
    if have != (size, size):
        raise DataError(f"image cache holds {have[0]}x{have[1]} images but the task's input size is {size}; the "
                        f"runner prepares the cache at the task's image_size", path=getattr(data.images, "path", None))


class _Samples(Dataset):
    """Rows of the letterboxed image cache at the task's input size, with each row's content box."""

    def __init__(self, data: Any, rows: np.ndarray, size: int) -> None:
        _check_square(data, size)
        self.data, self.rows, self.size = data, np.asarray(rows, dtype=np.int64), int(size)
        self.content = [content_box(data, r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, i: int) -> tuple[int, torch.Tensor]:
        row = int(self.rows[i])
        return row, torch.from_numpy(np.array(self.data.images.array[row], dtype=np.uint8)).unsqueeze(0)


class DetectionSamples(_Samples):
    """Rows as mmdet ``dict(inputs=uint8 [1, S, S], data_samples=DetDataSample)``."""

    def __init__(self, data: Any, rows: np.ndarray, size: int) -> None:
        from mmdet.structures import DetDataSample  # noqa: F401  (fail early without mmdet)

        super().__init__(data, rows, size)
        self.boxes = [input_boxes(data, r) for r in self.rows]

    def __getitem__(self, i: int) -> dict:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        row, image = self._image(i)
        s = self.size
        sample = DetDataSample(metainfo={"img_id": row, "img_shape": (s, s), "ori_shape": (s, s),
                                         "scale_factor": (1.0, 1.0), "content_box": self.content[i]})
        boxes = torch.from_numpy(self.boxes[i]).float()
        sample.gt_instances = InstanceData(bboxes=boxes, labels=torch.zeros(len(boxes), dtype=torch.long))
        sample.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        return {"inputs": image, "data_samples": sample}


class SegmentationSamples(_Samples):
    """Rows as mmseg ``dict(inputs=uint8 [1, S, S], data_samples=SegDataSample)`` with 0/1 labels."""

    def __init__(self, data: Any, rows: np.ndarray, size: int) -> None:
        from mmseg.structures import SegDataSample  # noqa: F401  (fail early without mmseg)

        super().__init__(data, rows, size)
        self.masks = np.stack([input_mask(data, r, self.size) for r in self.rows]) if len(self.rows) else \
            np.zeros((0, self.size, self.size), np.uint8)

    def __getitem__(self, i: int) -> dict:
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        row, image = self._image(i)
        s = self.size
        sample = SegDataSample(metainfo={"img_id": row, "img_shape": (s, s), "ori_shape": (s, s),
                                         "pad_shape": (s, s), "content_box": self.content[i]})
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(self.masks[i].astype(np.int64)).unsqueeze(0))
        return {"inputs": image, "data_samples": sample}
