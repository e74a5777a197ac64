"""The canonical table every dataset loader produces.

One row per sample (an image, or for IU X-ray a two-view study). Labels keep the publisher's raw
codes (1 positive, 0 negative, -1 uncertain, NaN not mentioned); tasks apply a label policy
(:func:`apply_uncertainty_policy`) to get 1/0/NaN. Boxes are in the original pixel coordinates of
the stored image; masks are COCO run-length encodings (pycocotools) at native resolution.

Views
-----
``view`` has one meaning in every dataset, from :data:`VIEWS`:

* ``"PA"`` / ``"AP"``: a frontal film of that projection;
* ``"LATERAL"``: a lateral film (MIMIC ``ViewPosition`` LATERAL, LL, RL, XTABLE LATERAL; CheXpert
  ``Frontal/Lateral`` == Lateral);
* ``"OTHER"``: a projection the publisher names that is none of those (MIMIC decubitus ``AP LLD``,
  obliques ``LAO``/``RAO``, ``AP AXIAL``, ``SWIMMERS``...; a CheXpert row marked Frontal whose
  ``AP/PA`` column says ``LL`` or ``RL``);
* ``""``: the publisher gives no projection (CheXpert frontal rows with a blank ``AP/PA``, COVIDx,
  Object-CXR, IU X-ray).

``view_raw`` keeps what the publisher wrote (stripped), so nothing is lost by the mapping. Why
CheXpert's ``AP/PA`` ``LL`` is not LATERAL: CheXpert's ``Frontal/Lateral`` column is authoritative
(MGCA keeps ``Frontal/Lateral == "Frontal"``), so a row it calls Frontal must pass the frontal
filter ``view != "LATERAL"``, whereas a MIMIC ``LL`` is a left-lateral film. Loaders map codes
with :func:`canonical_view`; :meth:`CanonicalTable.validate` refuses any other value.
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
    "view",              # canonical projection, one of VIEWS (see module notes)
    "view_raw",          # the publisher's own view code(s), stripped ("" when none)
    "split",             # official split: "train" | "val" | "test" | "" (none given)
    "height",            # native image height in pixels (int; -1 when not known without decoding)
    "width",             # native image width
    "findings",          # report FINDINGS section ("" when none)
    "impression",        # report IMPRESSION section ("" when none)
)

#: The canonical ``view`` vocabulary (module notes): frontal projections, lateral, another named
#: projection, or not given.
VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL", "OTHER", "")

#: Publisher codes (upper-cased) that are lateral films. LL / RL: left / right lateral (MIMIC
#: ViewPosition); a CheXpert frontal row's AP/PA never goes through this (see canonical_view).
LATERAL_CODES: frozenset[str] = frozenset({"LATERAL", "LL", "RL", "XTABLE LATERAL", "LAT"})


def canonical_view(raw: str | None) -> str:
    """A publisher's projection code (DICOM ViewPosition, MIMIC / NIH CSV) -> one of :data:`VIEWS`."""
    code = " ".join(str(raw or "").split()).upper()
    if code in ("PA", "AP"):
        return code
    if code in LATERAL_CODES:
        return "LATERAL"
    return "OTHER" if code else ""


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
    skipped_rows: int = 0                # rows left out under skip_bad, all reasons together
    #: ``skipped_rows`` by reason ("missing_image", "undecodable_image"); the rest of
    #: ``skipped_rows`` are rows the loader found malformed (see :meth:`skipped_by_reason`).
    skip_reasons: Mapping[str, int] = field(default_factory=dict)
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
        bad_views = sorted(set(self.frame["view"].map(str)) - set(VIEWS))
        if bad_views:
            raise ValueError(f"{self.dataset}: view values {bad_views} are not canonical; expected one of "
                             f"{list(VIEWS)} (map publisher codes with canonical_view)")
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

    def skipped_by_reason(self) -> dict[str, int]:
        """``{"malformed_row": n, "missing_image": n, "undecodable_image": n}`` summing to ``skipped_rows``."""
        known = {k: int(v) for k, v in self.skip_reasons.items()}
        return {"malformed_row": int(self.skipped_rows) - sum(known.values()),
                "missing_image": known.get("missing_image", 0),
                "undecodable_image": known.get("undecodable_image", 0)}

    def without_rows(self, rows: Sequence[int] | np.ndarray, reason: str) -> "CanonicalTable":
        """This table less ``rows``, counted in ``skipped_rows`` under ``reason`` (skip_bad)."""
        drop = np.zeros(len(self), dtype=bool)
        drop[np.asarray(rows, dtype=np.int64)] = True
        if not drop.any():
            return self
        reasons = {**self.skip_reasons, reason: int(self.skip_reasons.get(reason, 0)) + int(drop.sum())}
        return replace(self.subset(np.flatnonzero(~drop)), skipped_rows=int(self.skipped_rows) + int(drop.sum()),
                       skip_reasons=reasons)

    def positives(self) -> dict[str, int]:
        """Number of rows with label == 1 per class."""
        return {c: int(np.sum(self.labels[:, j] == 1)) for j, c in enumerate(self.classes)}


def make_frame(rows: list[dict]) -> pd.DataFrame:
    """Build a canonical frame from row dicts, filling defaults for absent columns."""
    defaults = {"extra_image_paths": (), "study_id": "", "view": "", "view_raw": "", "split": "", "height": -1,
                "width": -1, "findings": "", "impression": ""}
    frame = pd.DataFrame([{**defaults, **r} for r in rows], columns=list(COLUMNS))
    if not rows:
        frame = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    for col in ("image_id", "image_path", "patient_id", "study_id", "view", "view_raw", "split", "findings",
                "impression"):
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
