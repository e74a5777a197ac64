"""SIIM-ACR Pneumothorax Segmentation, stage 1 (Kaggle): ``train-rle.csv`` + nested DICOMs.

Official layout (datasets.md §4)::

    train-rle.csv      header "ImageId, EncodedPixels" (note the space), one row per mask instance
    dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

``ImageId`` is the SOPInstanceUID, i.e. the DICOM file stem. Column names and values are
whitespace-stripped (the Kaggle file writes `` -1`` and `` 123 4 ...``, the torchxrayvision copy
``-1``). An image with several pneumothoraces has several rows: the rows are merged into ONE
table row whose mask is the union of the decoded RLEs (MGCA splits RLE rows, which leaks images
across splits). ``patient_id`` comes from the DICOM PatientID header. Image files are found by
walking the tree and matched by stem.

A malformed row drops its whole image under ``skip_bad``; ``skipped_rows`` counts every CSV row
not used.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pydicom

from bench.data.rle import NEGATIVE, decode_siim_rle
from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.table import CanonicalTable, canonical_view, encode_mask, make_frame
from bench.errors import DataError, MissingDataError

log = logging.getLogger(__name__)

RLE_CSV = "train-rle.csv"
IMAGES_DIR = "dicom-images-train"


def _read_rle(path: Path) -> tuple[dict[str, list[tuple[int, str]]], list[tuple[str, int]]]:
    """ImageId -> [(line, stripped EncodedPixels)] in file order, plus row errors."""
    images: dict[str, list[tuple[int, str]]] = {}
    errors: list[tuple[str, int]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "ImageId" not in header or "EncodedPixels" not in header:
            raise DataError(f"header {header} lacks ImageId and EncodedPixels; expected "
                            "'ImageId, EncodedPixels'", path=path, line=1)
        i_id, i_rle = header.index("ImageId"), header.index("EncodedPixels")
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                errors.append((f"{len(values)} fields, expected {len(header)}", line))
                continue
            image_id, rle = values[i_id].strip(), values[i_rle].strip()
            if not image_id:
                errors.append(("blank ImageId", line))
                continue
            images.setdefault(image_id, []).append((line, rle))
    return images, errors


def _find_dicoms(images_dir: Path) -> dict[str, Path]:
    """File stem -> path of every ``*.dcm`` under the nested training folder."""
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(images_dir):
        for name in files:
            if name.lower().endswith(".dcm"):
                stem, path = name[:-4], Path(dirpath) / name
                if stem in found:
                    raise DataError(f"two DICOM files share the SOPInstanceUID {stem}: {found[stem]} and {path}",
                                    path=images_dir)
                found[stem] = path
    return found


def _check_rows(image_id: str, rows: list[tuple[int, str]]) -> tuple[str, int] | None:
    """Error (message, line) for contradictory rows of one image, else None."""
    negatives = [line for line, rle in rows if rle == NEGATIVE]
    if negatives and len(rows) > 1:
        other = next(line for line, _ in rows if line != negatives[0])
        what = "listed twice as negative" if len(negatives) > 1 else "both negative (-1) and positive"
        return f"ImageId {image_id} is {what} (lines {negatives[0]} and {other})", max(negatives[0], other)
    if any(rle == "" for _, rle in rows):
        line = next(line for line, rle in rows if rle == "")
        return f"ImageId {image_id}: blank EncodedPixels (expected -1 or an RLE)", line
    return None


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read ``train-rle.csv`` and the DICOM headers of ``dicom-images-train/`` under ``root``."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise MissingDataError(root, f"the SIIM-ACR root folder holding {RLE_CSV} and {IMAGES_DIR}/")
    rle_path, images_dir = root / RLE_CSV, root / IMAGES_DIR
    if not rle_path.is_file():
        raise MissingDataError(rle_path, "the Kaggle file train-rle.csv ('ImageId, EncodedPixels')")
    if not images_dir.is_dir():
        raise MissingDataError(images_dir, "the folder <Study>/<Series>/<SOPInstanceUID>.dcm of training DICOMs")

    images, row_errors = _read_rle(rle_path)
    skipped = 0

    def reject(message: str, line: int, n_rows: int) -> None:
        nonlocal skipped
        if not skip_bad:
            raise DataError(message, path=rle_path, line=line)
        log.warning("%s, line %d: %s; %d row(s) skipped", rle_path, line, message, n_rows)
        skipped += n_rows

    for message, line in row_errors:
        reject(message, line, 1)

    dicoms = _find_dicoms(images_dir)
    without = [(rows[0][0], image_id) for image_id, rows in images.items() if image_id not in dicoms]
    if without:
        listed = ", ".join(i for _, i in without[:3]) + (", ..." if len(without) > 3 else "")
        reject(f"{len(without)} ImageId(s) have no DICOM <stem>.dcm under {IMAGES_DIR}/: {listed}",
               without[0][0], sum(len(images[i]) for _, i in without))
        for _, image_id in without:
            del images[image_id]

    rows_out, labels, masks = [], [], []
    for image_id, rows in images.items():
        problem = _check_rows(image_id, rows)
        if problem:
            reject(*problem, len(rows))
            continue
        dcm = dicoms[image_id]
        try:
            header = pydicom.dcmread(dcm, stop_before_pixels=True,
                                     specific_tags=["PatientID", "Rows", "Columns", "ViewPosition"])
            height, width = int(header.Rows), int(header.Columns)
        except Exception as exc:  # noqa: BLE001 - any unreadable header is a data problem
            reject(f"ImageId {image_id}: unreadable DICOM header {dcm} ({exc})", rows[0][0], len(rows))
            continue
        mask = np.zeros((height, width), dtype=np.uint8)
        problem = None
        for line, rle in rows:
            try:
                mask |= decode_siim_rle(rle, height, width)
            except ValueError as exc:
                problem = (f"ImageId {image_id}: {exc}", line)
                break
        if problem:
            reject(*problem, len(rows))
            continue
        patient = str(getattr(header, "PatientID", "") or "").strip()
        if not patient:
            log.debug("%s has no PatientID; using the ImageId as patient", dcm)
        view = str(getattr(header, "ViewPosition", "") or "").strip()
        positive = bool(mask.any())
        rows_out.append({"image_id": image_id, "image_path": str(dcm), "patient_id": patient or image_id,
                         "view": canonical_view(view), "view_raw": view, "height": height, "width": width})
        labels.append([1.0 if positive else 0.0])
        masks.append(encode_mask(mask) if positive else None)

    log.info("siim: %d images (%d positive), %d rows skipped", len(rows_out), int(sum(l[0] for l in labels)), skipped)
    return CanonicalTable(
        dataset="siim", root=root, frame=make_frame(rows_out), classes=("Pneumothorax",),
        labels=np.array(labels, dtype=np.float32).reshape(-1, 1), masks=tuple(masks),
        skipped_rows=skipped, source_files=(RLE_CSV, IMAGES_DIR),
        notes={"masks": "union of all RLE rows of the ImageId (column-major relative SIIM RLE)",
               "rows": "one row per ImageId (several RLE rows merged), not per RLE row as in MGCA"},
    )


SPEC = register_dataset(DatasetSpec(
    name="siim",
    title="SIIM-ACR Pneumothorax Segmentation (stage 1)",
    official_layout=f"{RLE_CSV} + {IMAGES_DIR}/<Study>/<Series>/<SOPInstanceUID>.dcm",
    load=load,
    split=SplitProtocol(official=(), test_fraction=0.15, val_fraction=0.15, stratify=True,
                        note="70/15/15 by patient over ImageIds (MGCA splits RLE rows, so one image can "
                             "land in two splits; fixed here)"),
    synth_subdir="siim-acr-pneumothorax",
    tasks_hint="segmentation (pneumothorax masks), binary classification (Pneumothorax)",
))
