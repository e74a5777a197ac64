"""RSNA Pneumonia Detection Challenge, stage 2 (Kaggle): ``stage_2_train_labels.csv`` + DICOMs.

Official layout (datasets.md §3)::

    stage_2_train_labels.csv           patientId,x,y,width,height,Target   (one row per box)
    stage_2_train_images/<patientId>.dcm

A negative patient has one row with blank box fields and ``Target`` 0; a positive patient has one
row per "Lung Opacity" box (top-left x, y, width, height in pixels). RSNA has one image per
patient, so ``image_id`` = ``patient_id`` = patientId. Boxes become xyxy ``(x, y, x+w, y+h)``;
the segmentation mask is the union of the filled boxes (MGCA/GLoRIA). Image size and view come
from the DICOM header, read without the pixel data.

A malformed row drops its whole patient under ``skip_bad`` (a partial set of boxes would be
wrong ground truth); ``skipped_rows`` counts every CSV row not used.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.table import (
    EMPTY_BOXES, CanonicalTable, boxes_to_mask, canonical_view, encode_mask, make_frame,
)
from bench.errors import DataError, MissingDataError

log = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")


@dataclass
class _Patient:
    first_line: int
    lines: list[int] = field(default_factory=list)
    boxes: list[tuple[int, tuple[float, float, float, float]]] = field(default_factory=list)  # (line, xywh)
    target: int | None = None
    error: tuple[str, int] | None = None   # (message, line) of the first problem


def _parse_row(row: dict[str, str]) -> tuple[int, tuple[float, float, float, float] | None]:
    """(Target, xywh box or None) of one CSV row; ValueError with a message if malformed."""
    raw_target = row["Target"]
    try:
        target = float(raw_target)
    except ValueError:
        raise ValueError(f"Target {raw_target!r} is not 0 or 1") from None
    if target not in (0.0, 1.0):
        raise ValueError(f"Target {raw_target!r} is not 0 or 1")
    fields = [row[c] for c in ("x", "y", "width", "height")]
    if target == 0:
        if any(fields):
            raise ValueError(f"a Target 0 row must have blank box fields, got {fields}")
        return 0, None
    try:
        x, y, w, h = (float(v) for v in fields)
    except ValueError:
        raise ValueError(f"a Target 1 row needs numeric x, y, width, height, got {fields}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"box {fields} must be finite with positive width and height")
    return 1, (x, y, w, h)


def _read_labels(path: Path) -> tuple[dict[str, _Patient], list[tuple[str, int]]]:
    """Group the CSV rows by patientId; returns (patients, errors of rows without a patientId)."""
    patients: dict[str, _Patient] = {}
    orphan_errors: list[tuple[str, int]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"missing column(s) {missing}; expected header {','.join(COLUMNS)}",
                            path=path, line=1)
        idx = {c: header.index(c) for c in COLUMNS}
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                orphan_errors.append((f"{len(values)} fields, expected {len(header)}", line))
                continue
            row = {c: values[i].strip() for c, i in idx.items()}
            pid = row["patientId"]
            if not pid:
                orphan_errors.append(("blank patientId", line))
                continue
            patient = patients.setdefault(pid, _Patient(first_line=line))
            patient.lines.append(line)
            if patient.error:
                continue
            try:
                target, box = _parse_row(row)
                if patient.target is not None and (target == 0 or patient.target == 0):
                    raise ValueError(f"patientId {pid} is listed again (first at line "
                                     f"{patient.first_line}); only positives have several rows")
            except ValueError as exc:
                patient.error = (f"patientId {pid}: {exc}", line)
                continue
            patient.target = target
            if box is not None:
                patient.boxes.append((line, box))
    return patients, orphan_errors


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read the RSNA stage-2 training labels and DICOM headers under ``root``."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise MissingDataError(root, f"the RSNA Pneumonia root folder holding {LABELS_CSV} and {IMAGES_DIR}/")
    labels_path, images_dir = root / LABELS_CSV, root / IMAGES_DIR
    if not labels_path.is_file():
        raise MissingDataError(labels_path, "the Kaggle file stage_2_train_labels.csv (patientId,x,y,width,height,Target)")
    if not images_dir.is_dir():
        raise MissingDataError(images_dir, "the folder of <patientId>.dcm training images")

    patients, orphan_errors = _read_labels(labels_path)
    skipped = 0
    for message, line in orphan_errors:
        if not skip_bad:
            raise DataError(message, path=labels_path, line=line)
        log.warning("%s, line %d: %s; row skipped", labels_path, line, message)
        skipped += 1

    rows, boxes, masks, labels = [], [], [], []
    for pid, patient in patients.items():
        dcm = images_dir / f"{pid}.dcm"
        if patient.error is None:
            if not dcm.is_file():
                patient.error = (f"patientId {pid} has no DICOM {IMAGES_DIR}/{pid}.dcm", patient.first_line)
            else:
                try:
                    header = pydicom.dcmread(dcm, stop_before_pixels=True,
                                             specific_tags=["Rows", "Columns", "ViewPosition"])
                    height, width = int(header.Rows), int(header.Columns)
                except Exception as exc:  # noqa: BLE001 - any unreadable header is a data problem
                    patient.error = (f"patientId {pid}: unreadable DICOM header {dcm} ({exc})",
                                     patient.first_line)
                for line, (x, y, w, h) in ([] if patient.error else patient.boxes):
                    if x < 0 or y < 0 or x + w > width or y + h > height:
                        patient.error = (f"patientId {pid}: box x={x:g} y={y:g} width={w:g} height={h:g} "
                                         f"lies outside the {width}x{height} image", line)
                        break
        if patient.error is not None:
            message, line = patient.error
            if not skip_bad:
                raise DataError(message, path=labels_path, line=line)
            log.warning("%s, line %d: %s; %d row(s) of this patient skipped",
                        labels_path, line, message, len(patient.lines))
            skipped += len(patient.lines)
            continue
        xyxy = np.array([(x, y, x + w, y + h) for _, (x, y, w, h) in patient.boxes],
                        dtype=np.float32).reshape(-1, 4) if patient.boxes else EMPTY_BOXES
        view = str(getattr(header, "ViewPosition", "") or "").strip()
        rows.append({"image_id": pid, "image_path": str(dcm), "patient_id": pid,
                     "view": canonical_view(view), "view_raw": view, "height": height, "width": width})
        labels.append([float(patient.target)])
        boxes.append(xyxy)
        masks.append(encode_mask(boxes_to_mask(xyxy, height, width)) if len(xyxy) else None)

    log.info("rsna: %d patients (%d positive), %d rows skipped", len(rows), int(sum(l[0] for l in labels)), skipped)
    return CanonicalTable(
        dataset="rsna", root=root, frame=make_frame(rows), classes=("Pneumonia",),
        labels=np.array(labels, dtype=np.float32).reshape(-1, 1),
        boxes=tuple(boxes), box_labels=tuple(np.zeros(len(b), dtype=np.int64) for b in boxes),
        box_classes=("Lung Opacity",), masks=tuple(masks), skipped_rows=skipped,
        source_files=(LABELS_CSV, IMAGES_DIR),
        notes={"labels": "Pneumonia = Target (1 iff the patient has a Lung Opacity box)",
               "masks": "union of the filled Lung Opacity boxes (MGCA/GLoRIA)"},
    )


SPEC = register_dataset(DatasetSpec(
    name="rsna",
    title="RSNA Pneumonia Detection Challenge (stage 2)",
    official_layout=f"{LABELS_CSV} + {IMAGES_DIR}/<patientId>.dcm",
    load=load,
    split=SplitProtocol(official=(), test_fraction=0.15, val_fraction=0.15, stratify=True,
                        note="no labelled official test set; 70/15/15 by patient, stratified on Target "
                             "(MGCA classification split, 18,678/4,003/4,003)"),
    synth_subdir="rsna-pneumonia",
    tasks_hint="binary classification (Pneumonia), detection (Lung Opacity boxes), segmentation (box masks)",
))
