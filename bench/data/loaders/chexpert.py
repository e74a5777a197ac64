"""CheXpert v1.0-small: ``train.csv`` and ``valid.csv`` with ``CheXpert-v1.0-small/...`` image paths.

Canonical rows are images. ``train.csv`` rows get split "train"; ``valid.csv`` rows get split
"test", because MGCA evaluates on the official validation set (202 frontal images) and carves its
own validation set out of train. Labels keep the raw codes (1 / 0 / -1 / NaN for blank) of the 14
observations in :data:`CHEXPERT_OBSERVATIONS` order; laterals stay in the table (view "LATERAL")
and tasks apply the frontal filter.

Views (vocabulary in :mod:`bench.data.table`): ``Frontal/Lateral`` decides frontal vs lateral, as
in MGCA; a Frontal row takes its projection from ``AP/PA`` (AP, PA; LL or RL there -> "OTHER", never
"LATERAL"; blank -> ""). ``view_raw`` is ``"<Frontal/Lateral> <AP/PA>"`` as written.

Root layouts: ``root`` is the unpacked ``CheXpert-v1.0-small/`` folder itself, or a folder holding
it (the paths inside the CSVs start with that folder's name); :func:`locate_root` maps the second
to the first, so both give the same table and split manifest.

The small CSV and label helpers here (:func:`read_csv_rows`, :func:`find_official_file`,
:func:`parse_label_code`) are shared with the MIMIC-CXR and NIH loaders, which read the same kind
of files.
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import re
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.label_lists import CHEXPERT_COMPETITION_TASKS, CHEXPERT_OBSERVATIONS
from bench.data.table import CanonicalTable, make_frame
from bench.errors import DataError, MissingDataError

logger = logging.getLogger(__name__)

NAME = "chexpert"

#: Header of the official train.csv / valid.csv, in file order.
CSV_COLUMNS: tuple[str, ...] = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)

#: The 5 competition tasks (MGCA / GLoRIA CheXpert-5).
COMPETITION_TASKS: tuple[str, ...] = CHEXPERT_COMPETITION_TASKS

#: MGCA's ``CHEXPERT_UNCERTAIN_MAPPINGS``: U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros otherwise.
MGCA_UNCERTAIN_POLICY: dict[str, float] = {
    "Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0, "Pleural Effusion": 1.0,
}

#: Observations that must be 0 (after ``fillna(0)``) in a 5x200 row besides the other 4 tasks.
FIVE_BY_200_ZERO: tuple[str, ...] = (
    "Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
    "Pleural Other", "Fracture", "Support Devices",
)

#: ``AP/PA`` of a Frontal row -> canonical view; any other non-blank code is "OTHER" (not LATERAL:
#: Frontal/Lateral, not AP/PA, decides laterality).
_VIEWS_FRONTAL = {"AP": "AP", "PA": "PA", "": ""}
#: Release folders a root may hold (small first: the benchmark uses v1.0-small).
RELEASE_DIRS: tuple[str, ...] = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_PATH_RE = re.compile(r"^(?P<split>train|valid)/(?P<patient>patient\d+)/(?P<study>study\d+)/(?P<file>[^/]+)$")


# --------------------------------------------------------------------------------------------
# helpers shared by the CSV-based loaders (CheXpert, MIMIC-CXR, NIH)
# --------------------------------------------------------------------------------------------
def find_official_file(root: Path, stem: str, expected: str) -> Path:
    """``root/stem.csv`` or ``root/stem.csv.gz`` (the plain file wins when both exist)."""
    for candidate in (root / f"{stem}.csv", root / f"{stem}.csv.gz"):
        if candidate.is_file():
            return candidate
    raise MissingDataError(root / f"{stem}.csv.gz", f"{expected} ({stem}.csv.gz or {stem}.csv)")


def require_root(root: Path, expected: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingDataError(root, expected)
    return root


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "rt", encoding="utf-8-sig", newline="")


class CsvRows(NamedTuple):
    header: list[str]
    rows: list[tuple[int, list[str]]]   # (1-based line number in the file, fields)

    def column(self, name: str, path: Path) -> int:
        try:
            return self.header.index(name)
        except ValueError:
            raise DataError(f"missing column {name!r} (header: {','.join(self.header)})", path=path, line=1) from None


def read_csv_rows(path: Path) -> CsvRows:
    """Read a (possibly gzipped) CSV keeping each row's line number; blank lines are skipped.

    Rows shorter than the header are padded with "" (trailing empty fields are often dropped).
    """
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError("empty file; expected a CSV header", path=path, line=1)
            rows: list[tuple[int, list[str]]] = []
            width = len(header)
            for fields in reader:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if len(fields) < width:
                    fields = fields + [""] * (width - len(fields))
                rows.append((reader.line_num, fields))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV: {exc}", path=path) from exc
    return CsvRows([h.strip() for h in header], rows)


_COMMON_CODES = {"1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "": math.nan}


def parse_label_code(value: str, *, path: Path, line: int, column: str,
                     allowed: Sequence[float] = (1.0, 0.0, -1.0)) -> float:
    """``"1.0"``/``"0.0"``/``"-1.0"`` -> float, blank -> NaN; anything else is a :class:`DataError`."""
    code = _COMMON_CODES.get(value)
    if code is not None and (code in allowed or math.isnan(code)):
        return code
    text = value.strip()
    if not text:
        return math.nan
    try:
        code = float(text)
    except ValueError:
        code = math.nan
    if math.isnan(code) or code not in allowed:
        want = "/".join(f"{a:.1f}" for a in allowed)
        raise DataError(f"column {column!r}: label value {text!r} is not one of {want} or blank", path=path, line=line)
    return code


# --------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------
def _strip_first_component(path_value: str) -> str:
    parts = path_value.strip().replace("\\", "/").split("/", 1)
    return parts[1] if len(parts) == 2 else ""


def _read_split_csv(root: Path, name: str, split: str, allowed: Sequence[float], skip_bad: bool,
                    seen: dict[str, tuple[str, int]], counters: dict[str, int]) -> Iterator[tuple[dict, np.ndarray]]:
    path = root / name
    if not path.is_file():
        raise MissingDataError(path, f"CheXpert {name} (root {root} should hold train.csv, valid.csv, train/, valid/)")
    table = read_csv_rows(path)
    col = {c: table.column(c, path) for c in ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS)}
    expect_dir = "train" if split == "train" else "valid"
    for line, fields in table.rows:
        try:
            rel = _strip_first_component(fields[col["Path"]])
            m = _PATH_RE.match(rel)
            if m is None or m["split"] != expect_dir:
                raise DataError(f"Path {fields[col['Path']]!r} is not '<prefix>/{expect_dir}/patientNNNNN/studyN/viewN_<frontal|lateral>.jpg'",
                                path=path, line=line)
            if rel in seen:
                first_file, first_line = seen[rel]
                raise DataError(f"duplicate image {rel!r} (first at {first_file}, line {first_line})", path=path, line=line)
            fl, appa = fields[col["Frontal/Lateral"]].strip(), fields[col["AP/PA"]].strip()
            if fl == "Lateral":
                view = "LATERAL"
            elif fl == "Frontal":
                view = _VIEWS_FRONTAL.get(appa.upper(), "OTHER")
            else:
                raise DataError(f"Frontal/Lateral is {fl!r}; expected 'Frontal' or 'Lateral'", path=path, line=line)
            labels = np.array([parse_label_code(fields[col[c]], path=path, line=line, column=c, allowed=allowed)
                               for c in CHEXPERT_OBSERVATIONS], dtype=np.float32)
        except DataError:
            if not skip_bad:
                raise
            counters["skipped"] += 1
            logger.warning("skipping malformed row %s line %d", path, line, exc_info=False)
            continue
        seen[rel] = (name, line)
        row = {"image_id": rel, "image_path": str(root / rel), "patient_id": m["patient"],
               "study_id": f"{m['patient']}/{m['study']}", "view": view, "view_raw": f"{fl} {appa}".strip(),
               "split": split}
        yield row, labels


def locate_root(root: Path) -> Path:
    """The release folder under ``root``: ``root`` itself when it holds ``train.csv``, else its
    ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``) child holding one; ``root`` when neither
    (the loader then names the missing file)."""
    root = Path(root).expanduser()
    if (root / "train.csv").is_file():
        return root
    for name in RELEASE_DIRS:
        if (root / name / "train.csv").is_file():
            return root / name
    return root


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read ``train.csv`` (split "train") and ``valid.csv`` (split "test") under ``root`` (the
    release folder, or a folder holding it: :func:`locate_root`)."""
    root = require_root(root, "the CheXpert-v1.0-small folder holding train.csv, valid.csv, train/ and valid/ "
                              "(or a folder holding CheXpert-v1.0-small/)")
    root = locate_root(root)
    rows: list[dict] = []
    labels: list[np.ndarray] = []
    seen: dict[str, tuple[str, int]] = {}
    counters = {"skipped": 0}
    for name, split, allowed in (("train.csv", "train", (1.0, 0.0, -1.0)), ("valid.csv", "test", (1.0, 0.0))):
        for row, lab in _read_split_csv(root, name, split, allowed, skip_bad, seen, counters):
            rows.append(row)
            labels.append(lab)
    train_patients = {r["patient_id"] for r in rows if r["split"] == "train"}
    overlap = sorted({r["patient_id"] for r in rows if r["split"] == "test"} & train_patients)
    if overlap:
        logger.warning("%d CheXpert patients appear in both train.csv and valid.csv (e.g. %s)", len(overlap), overlap[0])
    arr = np.stack(labels).astype(np.float32) if labels else np.zeros((0, len(CHEXPERT_OBSERVATIONS)), np.float32)
    logger.info("chexpert: %d images (%d skipped) from %s", len(rows), counters["skipped"], root)
    return CanonicalTable(
        dataset=NAME, root=root, frame=make_frame(rows), classes=CHEXPERT_OBSERVATIONS, labels=arr,
        skipped_rows=counters["skipped"], source_files=("train.csv", "valid.csv"),
        notes={"labels": "raw CheXpert labeler codes: 1 positive, 0 negative, -1 uncertain, NaN blank",
               "splits": "train.csv -> train; official valid.csv -> test (MGCA)"},
    )


# --------------------------------------------------------------------------------------------
# CheXpert 5x200
# --------------------------------------------------------------------------------------------
class FiveBy200(NamedTuple):
    rows: np.ndarray      # int64 row indices into the table, grouped by task in COMPETITION_TASKS order
    targets: np.ndarray   # int64 index into COMPETITION_TASKS for each row
    per_class: int        # images per task actually drawn


def five_by_200_candidates(table: CanonicalTable) -> dict[str, np.ndarray]:
    """Rows eligible for each 5x200 task: train split, frontal (``Frontal/Lateral == "Frontal"``, i.e.
    view != "LATERAL", as MGCA), that task 1, the other 4 tasks and the 8 other listed observations
    0 after ``fillna(0)`` (so -1 rows are excluded)."""
    idx = {c: table.classes.index(c) for c in (*COMPETITION_TASKS, *FIVE_BY_200_ZERO)}
    lab = np.nan_to_num(table.labels, nan=0.0)
    frame = table.frame
    base = (frame["split"].to_numpy() == "train") & (frame["view"].to_numpy(dtype=object) != "LATERAL")
    zero_others = np.all(lab[:, [idx[c] for c in FIVE_BY_200_ZERO]] == 0, axis=1)
    out = {}
    for task in COMPETITION_TASKS:
        others = [idx[t] for t in COMPETITION_TASKS if t != task]
        ok = base & zero_others & (lab[:, idx[task]] == 1) & np.all(lab[:, others] == 0, axis=1)
        out[task] = np.flatnonzero(ok).astype(np.int64)
    return out


def build_5x200(table: CanonicalTable, per_class: int = 200, seed: int = 0) -> FiveBy200:
    """MGCA's CheXpert 5x200 selection (datasets.md §2), drawn with ``np.random.default_rng(seed)``.

    When a task has fewer than ``per_class`` eligible rows (small or synthetic data), every task
    gets ``min`` eligible count images so the set stays balanced; a task with none is an error.
    """
    candidates = five_by_200_candidates(table)
    counts = {t: len(v) for t, v in candidates.items()}
    empty = [t for t, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"no 5x200-eligible frontal train image for {', '.join(empty)} (eligible counts {counts})",
                        path=table.root)
    n = min(per_class, *counts.values())
    if n < per_class:
        logger.warning("CheXpert 5x200: only %d eligible images for some task (%s); using %d per task", n, counts, n)
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for k, task in enumerate(COMPETITION_TASKS):
        pick = rng.choice(candidates[task], size=n, replace=False)
        rows.append(pick)
        targets.append(np.full(n, k, dtype=np.int64))
    return FiveBy200(np.concatenate(rows).astype(np.int64), np.concatenate(targets), n)


SPEC = register_dataset(DatasetSpec(
    name=NAME,
    title="CheXpert v1.0-small",
    official_layout="train.csv, valid.csv, train/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg, valid/...",
    load=load,
    locate_root=locate_root,
    split=SplitProtocol(
        official=("train", "test"), val_size=5000, stratify=True,
        note="MGCA: test = official valid.csv; val = 5,000 images carved from train.csv (here by patient); "
             "5x200 images are taken from train.csv",
    ),
    synth_subdir="CheXpert-v1.0-small",
    tasks_hint="linear probe / fine-tune on the 5 competition tasks (frontal); 5x200 zero-shot and retrieval",
))
