"""IU X-ray in the R2Gen release: ``annotation.json`` plus ``images/<id>/0.png`` and ``1.png``.

``annotation.json`` is ``{"train": [...], "val": [...], "test": [...]}``; each entry has ``id``,
``report`` (the findings text), ``image_path`` (two paths relative to ``images/``: frontal, then
lateral) and ``split``. Canonical rows are studies: ``image_path`` is the first (frontal) image and
``extra_image_paths`` holds the rest; ``findings`` is the report. There are no labels.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from bench.data.loaders.chexpert import require_root
from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.table import CanonicalTable, make_frame
from bench.errors import DataError, MissingDataError

logger = logging.getLogger(__name__)

NAME = "iu-xray"
ANNOTATION = "annotation.json"
SPLITS = ("train", "val", "test")


def _line_of(text: str, needle: str, start: int = 0) -> tuple[int | None, int]:
    """1-based line of the first ``needle`` at or after ``start`` (and the position after it)."""
    pos = text.find(needle, start)
    if pos < 0:
        pos = text.find(needle)
    if pos < 0:
        return None, start
    return text.count("\n", 0, pos) + 1, pos + len(needle)


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read ``annotation.json`` of an R2Gen ``iu_xray`` folder."""
    root = require_root(root, "the R2Gen iu_xray folder holding annotation.json and images/<id>/{0,1}.png")
    path = root / ANNOTATION
    if not path.is_file():
        raise MissingDataError(path, "R2Gen annotation.json ({'train': [...], 'val': [...], 'test': [...]})")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=exc.lineno) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in SPLITS):
        raise DataError("expected an object with 'train', 'val' and 'test' lists", path=path, line=1)
    extra = sorted(set(data) - set(SPLITS))
    if extra:
        logger.warning("iu-xray: ignoring unexpected keys %s in %s", extra, path)

    rows: list[dict] = []
    seen: dict[str, str] = {}
    skipped = 0
    cursor = 0
    for split in SPLITS:
        for k, entry in enumerate(data[split]):
            where = f"entry {k} of {split!r}"
            line = None
            try:
                if not isinstance(entry, dict):
                    raise DataError(f"{where} is not an object", path=path)
                missing = [key for key in ("id", "report", "image_path") if key not in entry]
                ident = str(entry.get("id", "")).strip()
                line, cursor = _line_of(text, json.dumps(ident), cursor) if ident else (None, cursor)
                if missing:
                    raise DataError(f"{where} lacks {', '.join(repr(m) for m in missing)}", path=path, line=line)
                if not ident:
                    raise DataError(f"{where} has an empty id", path=path, line=line)
                if ident in seen:
                    raise DataError(f"duplicate id {ident!r} ({where}; first in {seen[ident]})", path=path, line=line)
                declared = entry.get("split", split)
                if declared != split:
                    raise DataError(f"{where} (id {ident!r}) says split {declared!r}", path=path, line=line)
                images = entry["image_path"]
                if (not isinstance(images, list) or not images
                        or not all(isinstance(p, str) and p.strip() for p in images)):
                    raise DataError(f"{where} (id {ident!r}): image_path must be a non-empty list of paths",
                                    path=path, line=line)
                if not isinstance(entry["report"], str):
                    raise DataError(f"{where} (id {ident!r}): report is not a string", path=path, line=line)
            except DataError:
                if not skip_bad:
                    raise
                skipped += 1
                logger.warning("skipping malformed %s of %s", where, path)
                continue
            seen[ident] = where
            paths = [str(root / "images" / p.strip()) for p in images]
            rows.append({"image_id": ident, "image_path": paths[0], "extra_image_paths": tuple(paths[1:]),
                         "patient_id": ident, "study_id": ident, "view": "", "split": split,
                         "findings": " ".join(entry["report"].split())})
    frame = make_frame(rows)
    logger.info("iu-xray: %d studies (%d skipped) from %s", len(rows), skipped, root)
    return CanonicalTable(
        dataset=NAME, root=root, frame=frame, classes=(), labels=np.zeros((len(rows), 0), dtype=np.float32),
        skipped_rows=skipped, source_files=(ANNOTATION,),
        notes={"rows": "one row per study: image_path = first (frontal) image, extra_image_paths = lateral",
               "patients": "IU X-ray has no patient ids; each study is its own patient"},
    )


SPEC = register_dataset(DatasetSpec(
    name=NAME,
    title="IU X-ray (R2Gen annotation.json)",
    official_layout="annotation.json ({'train','val','test'} lists), images/<id>/0.png, images/<id>/1.png",
    load=load,
    split=SplitProtocol(official=("train", "val", "test"), stratify=False,
                        note="R2Gen split as given in annotation.json (2,069 / 296 / 590 studies)"),
    synth_subdir="iu_xray",
    tasks_hint="report generation (frontal + lateral pair -> findings)",
))
