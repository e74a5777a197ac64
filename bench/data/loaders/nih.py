"""NIH ChestX-ray14: ``Data_Entry_2017.csv`` (or ``_v2020``), ``BBox_List_2017.csv``, split lists, ``images/``.

Canonical rows are images; labels are the 14 NIH labels as 1/0 (the labels are text-mined, there is
no uncertainty code; ``No Finding`` is all zeros). The official split comes from
``train_val_list.txt`` ("train") and ``test_list.txt`` ("test"). Boxes (``Bbox [x,y,w,h]`` in the
stored image's pixels) become xyxy boxes with classes :data:`BOX_CLASSES`, the 8 box labels spelt
as in the entry file (the box file's ``Infiltrate`` is ``Infiltration``).

Quirks handled: the bracketed headers ``OriginalImage[Width,Height]`` split into two columns by
the commas; the 2017 file's trailing comma (an extra unnamed column); ages like ``058Y`` (2017)
or ``58`` (v2020).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from bench.data.loaders.chexpert import read_csv_rows, require_root
from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.label_lists import NIH_LABELS
from bench.data.table import EMPTY_BOXES, CanonicalTable, canonical_view, make_frame
from bench.data.images import image_size
from bench.errors import DataError, MissingDataError

logger = logging.getLogger(__name__)

NAME = "nih"
ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
BBOX_FILE = "BBox_List_2017.csv"
SPLIT_FILES = (("train_val_list.txt", "train"), ("test_list.txt", "test"))

#: Labels that have boxes in BBox_List_2017.csv, in the entry file's spelling.
BOX_CLASSES: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                                "Pneumonia", "Pneumothorax")
#: Box-file spellings that differ from the entry file.
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}

_AGE_RE = re.compile(r"^(\d+)\s*([YMD]?)$", re.IGNORECASE)


def parse_age(value: str) -> float:
    """Age in years: ``"058Y"`` -> 58, ``"011M"`` -> 11/12, ``"002D"`` -> 2/365, ``"58"`` -> 58."""
    m = _AGE_RE.match(value.strip())
    if m is None:
        raise ValueError(f"age {value!r} is not like '058Y' or '58'")
    n, unit = int(m.group(1)), m.group(2).upper()
    return n / 12.0 if unit == "M" else n / 365.0 if unit == "D" else float(n)


def find_entry_file(root: Path) -> Path:
    for name in ENTRY_FILES:
        if (root / name).is_file():
            return root / name
        if (root / f"{name}.gz").is_file():
            return root / f"{name}.gz"
    raise MissingDataError(root / ENTRY_FILES[0], "the NIH label file Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv)")


def read_entry(path: Path) -> list[dict]:
    """Rows of a Data_Entry file as dicts (``line``, ``image``, ``labels`` list, ``patient``,
    ``age`` in years, ``sex``, ``view``), raising :class:`DataError` with the line on a bad row.

    This is the strict reader; :func:`load` uses it row by row so ``skip_bad`` can skip rows.
    """
    return [r for r in _iter_entry(path, skip_bad=False, counter=[0])]


def _iter_entry(path: Path, *, skip_bad: bool, counter: list[int], skipped_images: set[str] | None = None):
    table = read_csv_rows(path)
    col = {c: table.column(c, path) for c in ("Image Index", "Finding Labels", "Patient ID", "Patient Age",
                                              "Patient Gender", "View Position")}
    known = set(NIH_LABELS)
    for line, f in table.rows:
        try:
            image = f[col["Image Index"]].strip()
            if not image.lower().endswith(".png"):
                raise DataError(f"Image Index {image!r} is not a .png file name", path=path, line=line)
            raw = f[col["Finding Labels"]].strip()
            labels = [] if raw == "No Finding" else [x.strip() for x in raw.split("|")]
            unknown = [x for x in labels if x not in known]
            if unknown or not raw:
                raise DataError(f"Finding Labels {raw!r}: {unknown[0] if unknown else 'empty'!r} is not one of the "
                                f"14 NIH labels or 'No Finding'", path=path, line=line)
            patient = f[col["Patient ID"]].strip()
            if not patient.isdigit():
                raise DataError(f"Patient ID {patient!r} is not an integer", path=path, line=line)
            try:
                age = parse_age(f[col["Patient Age"]])
            except ValueError as exc:
                raise DataError(str(exc), path=path, line=line) from None
        except DataError:
            if not skip_bad:
                raise
            counter[0] += 1
            if skipped_images is not None:
                skipped_images.add(f[col["Image Index"]].strip())
            logger.warning("skipping malformed row %s line %d", path, line)
            continue
        yield {"line": line, "image": image, "labels": labels, "patient": str(int(patient)), "age": age,
               "sex": f[col["Patient Gender"]].strip(), "view": canonical_view(f[col["View Position"]]),
               "view_raw": f[col["View Position"]].strip()}


def _read_list(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise MissingDataError(path, f"the NIH official split list {path.name}")
    out = []
    with open(path, encoding="utf-8") as fh:
        for k, text in enumerate(fh, start=1):
            name = text.strip()
            if name:
                out.append((k, name))
    return out


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read an NIH ChestX-ray14 root (entry file, split lists, optional BBox_List_2017.csv)."""
    root = require_root(root, "the NIH ChestX-ray14 folder holding Data_Entry_2017.csv, train_val_list.txt, "
                              "test_list.txt and images/")
    entry_path = find_entry_file(root)
    counter = [0]
    rows: list[dict] = []
    labels: list[np.ndarray] = []
    index: dict[str, int] = {}
    class_idx = {c: j for j, c in enumerate(NIH_LABELS)}
    skipped_images: set[str] = set()   # their split-list entries and boxes are dropped silently
    for e in _iter_entry(entry_path, skip_bad=skip_bad, counter=counter, skipped_images=skipped_images):
        if e["image"] in index:
            exc = DataError(f"duplicate Image Index {e['image']!r} (first at line {rows[index[e['image']]]['_line']})",
                            path=entry_path, line=e["line"])
            if not skip_bad:
                raise exc
            counter[0] += 1
            logger.warning("skipping malformed row: %s", exc)
            continue
        vec = np.zeros(len(NIH_LABELS), dtype=np.float32)
        for lab in e["labels"]:
            vec[class_idx[lab]] = 1.0
        index[e["image"]] = len(rows)
        labels.append(vec)
        rows.append({"image_id": e["image"], "image_path": str(root / "images" / e["image"]),
                     "patient_id": e["patient"], "view": e["view"], "view_raw": e["view_raw"], "split": "",
                     "_line": e["line"]})

    # official split lists
    listed: dict[str, tuple[str, int]] = {}
    not_in_entry = 0
    for name, split in SPLIT_FILES:
        for line, image in _read_list(root / name):
            if image in listed:
                exc = DataError(f"{image!r} is also listed in {listed[image][0]} line {listed[image][1]}",
                                path=root / name, line=line)
                if not skip_bad:
                    raise exc
                counter[0] += 1
                continue
            listed[image] = (name, line)
            if image in index:
                rows[index[image]]["split"] = split
            elif image not in skipped_images:
                not_in_entry += 1
    if not_in_entry:
        logger.warning("nih: %d images of the split lists are not in %s", not_in_entry, entry_path.name)
    unlisted = sum(1 for r in rows if not r["split"])
    if unlisted:
        logger.warning("nih: %d images are in neither train_val_list.txt nor test_list.txt (split left empty)", unlisted)
    patient_splits: dict[str, set[str]] = {}
    for r in rows:
        if r["split"]:
            patient_splits.setdefault(r["patient_id"], set()).add(r["split"])
    mixed = [p for p, s in patient_splits.items() if len(s) > 1]
    if mixed:
        logger.warning("nih: %d patients have images in both split lists (e.g. %s)", len(mixed), mixed[0])

    # boxes
    boxes: list[list[list[float]]] = [[] for _ in rows]
    box_labels: list[list[int]] = [[] for _ in rows]
    bbox_path = root / BBOX_FILE
    if not bbox_path.is_file() and (root / f"{BBOX_FILE}.gz").is_file():
        bbox_path = root / f"{BBOX_FILE}.gz"
    source = [entry_path.name, "train_val_list.txt", "test_list.txt"]
    if bbox_path.is_file():
        source.append(bbox_path.name)
        table = read_csv_rows(bbox_path)
        bc = {c: table.column(c, bbox_path) for c in ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")}
        sizes: dict[str, tuple[int, int] | None] = {}
        box_idx = {c: j for j, c in enumerate(BOX_CLASSES)}
        for line, f in table.rows:
            try:
                image = f[bc["Image Index"]].strip()
                if image in skipped_images:
                    continue
                if image not in index:
                    raise DataError(f"box for {image!r}, which is not in {entry_path.name}", path=bbox_path, line=line)
                raw_label = f[bc["Finding Label"]].strip()
                label = BOX_LABEL_ALIASES.get(raw_label, raw_label)
                if label not in box_idx:
                    raise DataError(f"Finding Label {raw_label!r} is not a box label ({', '.join(BOX_CLASSES)}; "
                                    f"'Infiltrate' for Infiltration)", path=bbox_path, line=line)
                try:
                    x, y, w, h = (float(f[bc[c]]) for c in ("Bbox [x", "y", "w", "h]"))
                except ValueError:
                    raise DataError("Bbox [x,y,w,h] values are not numbers", path=bbox_path, line=line) from None
                if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0 or x < 0 or y < 0:
                    raise DataError(f"box [x,y,w,h]=[{x},{y},{w},{h}] is empty or starts outside the image",
                                    path=bbox_path, line=line)
                if image not in sizes:
                    sizes[image] = _png_size(root / "images" / image)
                size = sizes[image]
                if size is not None and (x + w > size[1] + 1e-3 or y + h > size[0] + 1e-3):
                    raise DataError(f"box [x,y,w,h]=[{x},{y},{w},{h}] leaves the {size[1]}x{size[0]} image {image}",
                                    path=bbox_path, line=line)
            except DataError as exc:
                if not skip_bad:
                    raise
                counter[0] += 1
                logger.warning("skipping malformed row: %s", exc)
                continue
            i = index[image]
            boxes[i].append([x, y, x + w, y + h])
            box_labels[i].append(box_idx[label])
            if size is not None:
                rows[i]["height"], rows[i]["width"] = size
    else:
        logger.info("nih: %s not found; no boxes", bbox_path)
    for r in rows:
        r.pop("_line")

    arr = np.stack(labels) if labels else np.zeros((0, len(NIH_LABELS)), np.float32)
    logger.info("nih: %d images (%d skipped rows) from %s", len(rows), counter[0], root)
    return CanonicalTable(
        dataset=NAME, root=root, frame=make_frame(rows), classes=NIH_LABELS, labels=arr.astype(np.float32),
        boxes=tuple(np.asarray(b, dtype=np.float32).reshape(-1, 4) if b else EMPTY_BOXES for b in boxes),
        box_labels=tuple(np.asarray(b, dtype=np.int64) for b in box_labels),
        box_classes=BOX_CLASSES, skipped_rows=counter[0], source_files=tuple(source),
        notes={"labels": "text-mined NIH labels, 1/0 (No Finding = all 0)",
               "splits": "train_val_list.txt -> train, test_list.txt -> test",
               "size": "height/width known only for images with boxes (read from the PNG header), else -1"},
    )


def _png_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the image header, or None when the image is absent (partial download)."""
    return image_size(path) if path.is_file() else None


SPEC = register_dataset(DatasetSpec(
    name=NAME,
    title="NIH ChestX-ray14",
    official_layout="Data_Entry_2017.csv (or _v2020), train_val_list.txt, test_list.txt, images/*.png, BBox_List_2017.csv",
    load=load,
    split=SplitProtocol(
        official=("train", "test"), val_fraction=0.125, stratify=True,
        note="official train_val_list / test_list (patient-disjoint); val carved by patient from train_val "
             "(BenchX's MRM split has 78,468 / 11,219 / 22,433, i.e. val = 12.5% of train_val)",
    ),
    synth_subdir="nih-chestxray14",
    tasks_hint="14-label multi-label classification (BenchX); boxes for 8 labels on a subset",
))
