"""COVIDx 9A (the version MGCA's code reads): two space-separated lists and two image folders.

Official layout (datasets.md §5)::

    train_COVIDx9A.txt, test_COVIDx9A.txt   "patient_id filename class source", NO header line
    train/<filename>, test/<filename>       PNG/JPEG, varied sizes, some RGB

The first line of each list is data (BenchX drops it by reading without ``header=None``).
``image_id`` is the FULL file name: names such as ``DX.1.2.840....png`` share the stem before the
first dot, which BenchX collapses to ``DX.png``. Classes are one-hot over
("normal", "pneumonia", "COVID-19") and the class index (MGCA's label map) is kept in the extra
frame column ``class_index``. Official split: train / test from the two lists. Image size comes
from the image header (no decode).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.table import CanonicalTable, make_frame
from bench.data.images import image_size
from bench.data.label_lists import COVIDX_CLASSES
from bench.errors import DataError, MissingDataError

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = COVIDX_CLASSES
LISTS: tuple[tuple[str, str, str], ...] = (  # (list file, image folder, split)
    ("train_COVIDx9A.txt", "train", "train"),
    ("test_COVIDx9A.txt", "test", "test"),
)
_CLASS_INDEX = {c.lower(): i for i, c in enumerate(CLASSES)}


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read both COVIDx 9A lists under ``root`` (one table row per listed image)."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise MissingDataError(root, "the COVIDx root folder holding train_COVIDx9A.txt, "
                                     "test_COVIDx9A.txt, train/ and test/")
    for list_name, folder, _ in LISTS:
        if not (root / list_name).is_file():
            raise MissingDataError(root / list_name, f"the COVIDx 9A list {list_name} "
                                                     "('patient_id filename class source', no header)")
        if not (root / folder).is_dir():
            raise MissingDataError(root / folder, f"the folder of the images listed in {list_name}")

    rows, class_index = [], []
    seen: dict[str, tuple[str, int]] = {}
    skipped = 0
    for list_name, folder, split in LISTS:
        list_path = root / list_name
        with open(list_path, encoding="utf-8-sig") as f:
            for line, raw in enumerate(f, start=1):
                fields = raw.split()
                if not fields:
                    continue
                try:
                    if len(fields) != 4:
                        raise ValueError(f"{len(fields)} fields, expected 4 "
                                         "(patient_id filename class source, space-separated)")
                    patient, filename, label, source = fields
                    if label.lower() not in _CLASS_INDEX:
                        raise ValueError(f"unknown class {label!r}; expected one of {list(CLASSES)}")
                    if filename in seen:
                        first_file, first_line = seen[filename]
                        raise ValueError(f"file {filename!r} is listed again (first in {first_file}, "
                                         f"line {first_line})")
                    image_path = root / folder / filename
                    if not image_path.is_file():
                        raise ValueError(f"image {folder}/{filename} not found")
                    try:
                        height, width = image_size(image_path)
                    except DataError as exc:
                        raise ValueError(f"unreadable image {folder}/{filename} ({exc})") from None
                except ValueError as exc:
                    if not skip_bad:
                        raise DataError(str(exc), path=list_path, line=line) from None
                    log.warning("%s, line %d: %s; row skipped", list_path, line, exc)
                    skipped += 1
                    continue
                seen[filename] = (list_name, line)
                # COVIDx pools sources whose patient ids overlap (small integers in several of them), so
                # a patient is identified within its source.
                rows.append({"image_id": filename, "image_path": str(image_path),
                             "patient_id": f"{source}:{patient}",
                             "split": split, "height": height, "width": width})
                class_index.append(_CLASS_INDEX[label.lower()])

    index = np.array(class_index, dtype=np.int64)
    labels = np.zeros((len(index), len(CLASSES)), dtype=np.float32)
    labels[np.arange(len(index)), index] = 1.0
    frame = make_frame(rows)
    frame["class_index"] = index
    log.info("covidx: %d images (%s), %d rows skipped", len(rows),
             ", ".join(f"{c} {int((index == i).sum())}" for i, c in enumerate(CLASSES)), skipped)
    return CanonicalTable(
        dataset="covidx", root=root, frame=frame, classes=CLASSES, labels=labels,
        skipped_rows=skipped, source_files=tuple(n for n, _, _ in LISTS) + tuple(d for _, d, _ in LISTS),
        notes={"labels": "single-label 3-class, one-hot; frame column class_index = 0 normal, "
                         "1 pneumonia, 2 COVID-19 (MGCA label map)",
               "image_id": "full file name (not the stem before the first dot)"},
    )


SPEC = register_dataset(DatasetSpec(
    name="covidx",
    title="COVIDx (version 9A)",
    official_layout="train_COVIDx9A.txt + test_COVIDx9A.txt (no header) + train/ + test/",
    load=load,
    split=SplitProtocol(official=("train", "test"), val_fraction=0.2, stratify=True,
                        note="official test list; val = 20% of the train patients "
                             "(MGCA: 80/20 train_test_split of train, 24,104/6,026/400)"),
    synth_subdir="covidx",
    tasks_hint="3-class single-label classification (normal / pneumonia / COVID-19)",
))
