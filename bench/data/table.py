"""The canonical table every dataset loader produces.

One row per sample (an image, or for IU X-ray a two-view study). Labels keep the publisher's raw
codes (1 positive, 0 negative, -1 uncertain, NaN not mentioned); tasks apply a label policy
(:func:`apply_uncertainty_policy`) to get 1/0/NaN. Boxes are in the original pixel coordinates of
the stored image; masks are COCO run-length encodings (pycocotools) at native resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

#: Columns of ``CanonicalTable.frame``, in this order.
COLUMNS: tuple[str, ...] = (
    "image_id",          # unique within the dataset (official id: dicom_id, patientId, file name...)
    "image_path",        # absolute path of the (first) image file
    "extra_image_paths", # tuple of further image paths of the sample (IU X-ray lateral), else ()
    "patient_id",        # str; splits never put one patient in two splits
    "study_id",          # str ("" where the dataset has no studies)
    "view",              # "PA" | "AP" | "LATERAL" | "LL" | "" (unknown)
    "split",             # official split: "train" | "val" | "test" | "" (none given)
    "height",            # native image height in pixels (int; -1 when not known without decoding)
    "width",             # native image width
    "findings",          # report FINDINGS section ("" when none)
    "impression",        # report IMPRESSION section ("" when none)
)


def encode_mask(mask: np.ndarray) -> dict:
    """COCO RLE of a bool/uint8 [H, W] mask (counts as str, JSON-friendly)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_mask(rle: Mapping) -> np.ndarray:
    """Inverse of :func:`encode_mask`: uint8 [H, W] with values 0/1."""
    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]),
                              "counts": counts.encode("ascii") if isinstance(counts, str) else counts})


def boxes_to_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Union of filled boxes (x1, y1, x2, y2; x2/y2 exclusive, rounded to pixels) as a uint8 mask."""
    out = np.zeros((height, width), dtype=np.uint8)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        out[max(int(round(y1)), 0):max(int(round(y2)), 0), max(int(round(x1)), 0):max(int(round(x2)), 0)] = 1
    return out


EMPTY_BOXES = np.zeros((0, 4), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class CanonicalTable:
    """A dataset as read from its official files, before any split or label policy."""

    dataset: str
    root: Path
    frame: pd.DataFrame                  # COLUMNS, one row per sample, RangeIndex
    classes: tuple[str, ...]             # label names (column order of ``labels``)
    labels: np.ndarray                   # float32 [N, C]: 1 / 0 / -1 / NaN (raw codes)
    boxes: tuple[np.ndarray, ...] = ()   # per row float32 [k, 4] xyxy; () when the dataset has none
    box_labels: tuple[np.ndarray, ...] = ()  # per row int64 [k] into ``box_classes``
    box_classes: tuple[str, ...] = ()
    masks: tuple[dict | None, ...] = ()  # per row COCO RLE (None = empty); () when no masks
    skipped_rows: int = 0                # malformed rows skipped under skip_bad
    source_files: tuple[str, ...] = ()   # official files read, relative to root
    notes: Mapping[str, str] = field(default_factory=dict)  # e.g. label policy facts

    def __post_init__(self) -> None:
        self.validate()

    # -- structure -------------------------------------------------------------------------
    def validate(self) -> None:
        n = len(self.frame)
        missing = [c for c in COLUMNS if c not in self.frame.columns]
        if missing:
            raise ValueError(f"{self.dataset}: canonical table lacks columns {missing}")
        if self.labels.shape != (n, len(self.classes)):
            raise ValueError(f"{self.dataset}: labels shape {self.labels.shape} != ({n}, {len(self.classes)})")
        for name, seq in (("boxes", self.boxes), ("box_labels", self.box_labels), ("masks", self.masks)):
            if seq and len(seq) != n:
                raise ValueError(f"{self.dataset}: {name} has {len(seq)} entries for {n} rows")
        dup = self.frame["image_id"][self.frame["image_id"].duplicated()]
        if len(dup):
            raise ValueError(f"{self.dataset}: duplicate image_id {dup.iloc[0]!r}")

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def has_boxes(self) -> bool:
        return bool(self.boxes)

    @property
    def has_masks(self) -> bool:
        return bool(self.masks)

    def mask(self, i: int) -> np.ndarray:
        """Mask of row ``i`` at native resolution (uint8 0/1)."""
        if not self.has_masks:
            raise ValueError(f"{self.dataset} has no masks")
        rle = self.masks[i]
        if rle is None:
            row = self.frame.iloc[i]
            return np.zeros((int(row["height"]), int(row["width"])), dtype=np.uint8)
        return decode_mask(rle)

    def mask_area(self, i: int) -> int:
        """Foreground pixels of row ``i`` without decoding the mask."""
        rle = self.masks[i] if self.has_masks else None
        return 0 if rle is None else int(mask_utils.area({"size": list(rle["size"]),
                                                          "counts": rle["counts"].encode("ascii")}))

    def subset(self, rows: Sequence[int] | np.ndarray) -> "CanonicalTable":
        rows = np.asarray(rows, dtype=np.int64)
        pick = lambda seq: tuple(seq[i] for i in rows) if seq else ()  # noqa: E731
        return replace(self, frame=self.frame.iloc[rows].reset_index(drop=True),
                       labels=self.labels[rows], boxes=pick(self.boxes),
                       box_labels=pick(self.box_labels), masks=pick(self.masks))

    def positives(self) -> dict[str, int]:
        """Number of rows with label == 1 per class."""
        return {c: int(np.sum(self.labels[:, j] == 1)) for j, c in enumerate(self.classes)}


def make_frame(rows: list[dict]) -> pd.DataFrame:
    """Build a canonical frame from row dicts, filling defaults for absent columns."""
    defaults = {"extra_image_paths": (), "study_id": "", "view": "", "split": "", "height": -1,
                "width": -1, "findings": "", "impression": ""}
    frame = pd.DataFrame([{**defaults, **r} for r in rows], columns=list(COLUMNS))
    if not rows:
        frame = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    for col in ("image_id", "image_path", "patient_id", "study_id", "view", "split", "findings", "impression"):
        frame[col] = frame[col].astype(object).map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    for col in ("height", "width"):
        frame[col] = frame[col].astype(np.int64)
    return frame


def apply_uncertainty_policy(labels: np.ndarray, classes: Sequence[str],
                             uncertain: Mapping[str, float] | float | None,
                             blank: float | None = 0.0) -> np.ndarray:
    """Map raw codes to 1/0/NaN.

    ``uncertain``: value for -1 per class (MGCA's U-ones/U-zeros map), one value for all, or None
    to turn -1 into NaN (ignored). ``blank``: value for NaN (MGCA: 0 via ``fillna(0)``) or None to
    keep NaN.
    """
    out = np.array(labels, dtype=np.float32, copy=True)
    if blank is not None:
        out[np.isnan(out)] = blank
    for j, c in enumerate(classes):
        value = uncertain.get(c, np.nan) if isinstance(uncertain, Mapping) else (np.nan if uncertain is None else uncertain)
        col = out[:, j]
        col[col == -1] = value
    return out
