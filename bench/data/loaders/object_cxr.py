"""Object-CXR (JF Healthcare foreign objects): ``train.csv`` / ``dev.csv`` + JPEG folders.

Official layout (datasets.md §6)::

    train.csv, dev.csv     image_name,annotation   (the README and test.csv name it image_path)
    train/00001.jpg ...    dev/08001.jpg ...

Annotation grammar: objects joined by ``;``, numbers by spaces, empty = no foreign object.
``0 x1 y1 x2 y2`` rectangle and ``1 x1 y1 x2 y2`` ellipse (given by their bounding box),
``2 x1 y1 ... xn yn`` polygon. Boxes are the bounding boxes of each shape's points; masks are
the union of the rasterised shapes (ellipses stay ellipses, unlike BenchX). Split: train.csv ->
"train", dev.csv -> "test" (MGCA uses dev as its test set). Image size from the JPEG header.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from bench.data.shapes import bounding_box, rasterize
from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.table import EMPTY_BOXES, CanonicalTable, encode_mask, make_frame
from bench.data.images import image_size
from bench.errors import DataError, MissingDataError

log = logging.getLogger(__name__)

CSVS: tuple[tuple[str, str, str], ...] = (  # (csv, image folder, split)
    ("train.csv", "train", "train"),
    ("dev.csv", "dev", "test"),
)
NAME_COLUMNS = ("image_name", "image_path")
SHAPE_TYPES = {"0": "rectangle", "1": "ellipse", "2": "polygon"}


def parse_annotation(text: str) -> list[tuple[str, np.ndarray]]:
    """Parse one annotation cell into [(kind, float64 [n, 2] points)]; ValueError if malformed."""
    shapes = []
    for part in text.split(";"):
        tokens = part.split()
        if not tokens:
            continue  # empty cell, or a trailing ';'
        kind = SHAPE_TYPES.get(tokens[0])
        if kind is None:
            raise ValueError(f"unknown shape type {tokens[0]!r} in {part.strip()!r}; expected "
                             "0 (rectangle), 1 (ellipse) or 2 (polygon)")
        try:
            coords = np.array([float(t) for t in tokens[1:]], dtype=np.float64)
        except ValueError:
            raise ValueError(f"non-numeric coordinate in {part.strip()!r}") from None
        if not np.all(np.isfinite(coords)):
            raise ValueError(f"non-finite coordinate in {part.strip()!r}")
        if kind == "polygon" and (len(coords) % 2 or len(coords) < 6):
            raise ValueError(f"a polygon needs an even number (>= 6) of coordinates, got {len(coords)}")
        if kind != "polygon" and len(coords) != 4:
            raise ValueError(f"a {kind} needs 4 coordinates (x1 y1 x2 y2), got {len(coords)}")
        shapes.append((kind, coords.reshape(-1, 2)))
    return shapes


def _image_file(root: Path, folder: str, name: str) -> Path:
    """The image of a CSV cell: ``<folder>/<basename>`` or, failing that, ``root/<cell>``."""
    candidates = [root / folder / Path(name).name, root / name]
    return next((p for p in candidates if p.is_file()), candidates[0])


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read ``train.csv`` and ``dev.csv`` under ``root`` (one table row per image)."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise MissingDataError(root, "the Object-CXR root folder holding train.csv, dev.csv, train/ and dev/")
    for csv_name, folder, _ in CSVS:
        if not (root / csv_name).is_file():
            raise MissingDataError(root / csv_name, f"the Object-CXR file {csv_name} (image_name,annotation)")
        if not (root / folder).is_dir():
            raise MissingDataError(root / folder, f"the folder of the JPEGs listed in {csv_name}")

    rows, labels, boxes, masks = [], [], [], []
    seen: dict[str, tuple[str, int]] = {}
    skipped = 0
    for csv_name, folder, split in CSVS:
        csv_path = root / csv_name
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            name_col = next((c for c in NAME_COLUMNS if c in header), None)
            if name_col is None or "annotation" not in header:
                raise DataError(f"header {header} lacks image_name (or image_path) and annotation",
                                path=csv_path, line=1)
            i_name, i_ann = header.index(name_col), header.index("annotation")
            for values in reader:
                line = reader.line_num
                if not any(v.strip() for v in values):
                    continue
                try:
                    if len(values) != len(header):
                        raise ValueError(f"{len(values)} fields, expected {len(header)}")
                    name, annotation = values[i_name].strip(), values[i_ann].strip()
                    image_id = Path(name).name
                    if not image_id:
                        raise ValueError(f"blank {name_col}")
                    if image_id in seen:
                        raise ValueError(f"image {image_id} is listed again (first in {seen[image_id][0]}, "
                                         f"line {seen[image_id][1]})")
                    shapes = parse_annotation(annotation)
                    image_path = _image_file(root, folder, name)
                    if not image_path.is_file():
                        raise ValueError(f"image {folder}/{image_id} not found")
                    try:
                        height, width = image_size(image_path)
                    except DataError as exc:
                        raise ValueError(f"unreadable image {image_path} ({exc})") from None
                    for kind, pts in shapes:
                        if pts.min() < 0 or pts[:, 0].max() > width or pts[:, 1].max() > height:
                            raise ValueError(f"{kind} {pts.ravel().tolist()} lies outside the "
                                             f"{width}x{height} image {image_id}")
                except ValueError as exc:
                    if not skip_bad:
                        raise DataError(str(exc), path=csv_path, line=line) from None
                    log.warning("%s, line %d: %s; row skipped", csv_path, line, exc)
                    skipped += 1
                    continue
                seen[image_id] = (csv_name, line)
                mask = np.zeros((height, width), dtype=bool)
                for kind, pts in shapes:
                    mask |= rasterize(kind, np.rint(pts).astype(np.int64), height, width)
                rows.append({"image_id": image_id, "image_path": str(image_path), "patient_id": image_id,
                             "split": split, "height": height, "width": width})
                labels.append([1.0 if shapes else 0.0])
                boxes.append(np.array([bounding_box(p) for _, p in shapes], dtype=np.float32).reshape(-1, 4)
                             if shapes else EMPTY_BOXES)
                masks.append(encode_mask(mask) if shapes else None)

    log.info("object-cxr: %d images (%d with objects), %d rows skipped", len(rows),
             int(sum(l[0] for l in labels)), skipped)
    return CanonicalTable(
        dataset="object-cxr", root=root, frame=make_frame(rows), classes=("foreign_object",),
        labels=np.array(labels, dtype=np.float32).reshape(-1, 1),
        boxes=tuple(boxes), box_labels=tuple(np.zeros(len(b), dtype=np.int64) for b in boxes),
        box_classes=("foreign_object",), masks=tuple(masks), skipped_rows=skipped,
        source_files=tuple(c for c, _, _ in CSVS) + tuple(d for _, d, _ in CSVS),
        notes={"boxes": "bounding box (min/max) of each annotated shape's points",
               "masks": "union of rasterised shapes; ellipses drawn as ellipses (BenchX fills boxes)"},
    )


SPEC = register_dataset(DatasetSpec(
    name="object-cxr",
    title="Object-CXR (JF Healthcare foreign objects)",
    official_layout="train.csv + dev.csv (image_name|image_path,annotation) + train/ + dev/",
    load=load,
    split=SplitProtocol(official=("train", "test"), val_fraction=0.1, stratify=True,
                        note="dev.csv is the test set (MGCA); val = 10% of train.csv (MGCA 7,200/800/1,000)"),
    synth_subdir="object-cxr",
    tasks_hint="detection and segmentation of foreign objects, binary classification",
))
