"""A toy PreparedData for the dense tests: bright rectangles (the findings) on noisy non-square films.

Like ``bench.data.prepare.PreparedData`` it has a CanonicalTable with native boxes and COCO-RLE
masks, a manifest with ``rows(split, fraction)`` and ``sha256``, and an image cache whose ``array``
holds the letterboxed squares and ``geometry`` their (scale, pad_x, pad_y). Each patient has one or
two images; splits are patient-level.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from bench.data.images import letterbox
from bench.data.table import CanonicalTable, boxes_to_mask, encode_mask, make_frame


@dataclass
class ToyManifest:
    split: np.ndarray
    min_fraction: np.ndarray
    sha256: str

    def rows(self, split: str, fraction: float = 1.0) -> np.ndarray:
        sel = self.split == split
        if split == "train":
            sel &= self.min_fraction <= fraction + 1e-9
        return np.flatnonzero(sel).astype(np.int64)


@dataclass
class ToyImages:
    array: np.ndarray
    geometry: np.ndarray
    fingerprint: str
    path: str = "/toy/cache"


@dataclass
class ToyPrepared:
    table: CanonicalTable
    manifest: ToyManifest
    images: ToyImages
    source: dict = field(default_factory=dict)


def make_toy(size: int = 64, n_patients: int = 60, seed: int = 0, dataset: str = "rsna",
             positive_rate: float = 0.6) -> ToyPrepared:
    """Films of 80-120 x 90-130 px (so letterboxing pads), ``positive_rate`` of them with one or two bright
    boxes."""
    rng = np.random.default_rng(seed)
    rows, labels, boxes, masks, squares, geoms, split, minf = [], [], [], [], [], [], [], []
    pattern = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    for p in range(n_patients):
        sp = pattern[p % 10]
        for k in range(int(rng.integers(1, 3))):
            h, w = int(rng.integers(80, 121)), int(rng.integers(90, 131))
            img = rng.normal(50, 12, (h, w))
            b = []
            if rng.random() < positive_rate:
                for _ in range(int(rng.integers(1, 3))):
                    bw, bh = int(rng.integers(18, 36)), int(rng.integers(18, 36))
                    x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                    img[y1:y1 + bh, x1:x1 + bw] += 140
                    b.append((x1, y1, x1 + bw, y1 + bh))
            b = np.array(b, np.float32).reshape(-1, 4)
            native = np.clip(img, 0, 255).astype(np.uint8)
            sq, geom = letterbox(native, size)
            squares.append(sq)
            geoms.append(geom.to_array())
            boxes.append(b)
            masks.append(encode_mask(boxes_to_mask(b, h, w)) if len(b) else None)
            labels.append([float(len(b) > 0)])
            rows.append({"image_id": f"p{p:03d}_{k}", "image_path": f"/toy/p{p:03d}_{k}.png", "patient_id": f"p{p:03d}",
                         "view": "PA", "split": sp, "height": h, "width": w})
            split.append(sp)
            minf.append((0.1 if p % 3 == 0 else 1.0) if sp == "train" else np.nan)
    table = CanonicalTable(dataset=dataset, root="/toy", frame=make_frame(rows), classes=("Finding",),
                           labels=np.array(labels, np.float32), boxes=tuple(boxes),
                           box_labels=tuple(np.zeros(len(b), np.int64) for b in boxes), box_classes=("finding",),
                           masks=tuple(masks))
    arr = np.stack(squares)
    sha = hashlib.sha256(("|".join(split) + str(seed)).encode()).hexdigest()
    return ToyPrepared(table, ToyManifest(np.array(split), np.array(minf), sha),
                       ToyImages(arr, np.stack(geoms).astype(np.float32), hashlib.sha256(arr.tobytes()).hexdigest()),
                       {"manifest_sha256": sha, "kind": "synthetic", "dataset": dataset})
