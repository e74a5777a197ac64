"""MIMIC-CXR-JPG 2.0.0 with the MIMIC-CXR free-text reports unzipped into the same ``files/`` tree.

Root (MGCA's ``.../physionet.org/files/mimic-cxr-jpg/2.0.0``)::

    mimic-cxr-2.0.0-metadata.csv(.gz)  dicom_id,subject_id,study_id,...,ViewPosition,Rows,Columns,...
    mimic-cxr-2.0.0-split.csv(.gz)     dicom_id,study_id,subject_id,split   (other column order)
    mimic-cxr-2.0.0-chexpert.csv(.gz)  subject_id,study_id,<14 observations>   (one row per study)
    files/pXX/p<subject_id>/s<study_id>/<dicom_id>.jpg
    files/pXX/p<subject_id>/s<study_id>.txt                                     (report)

Canonical rows are images (all views; pretraining keeps PA/AP images whose study has text, see
:func:`frontal_with_text`). ``split`` follows split.csv: train -> "train", validate -> "val",
test -> "test". Findings and impression come from :func:`findings_impression`, a section parser
following the MIT-LCP / MGCA convention: a header is a newline, one space, a run of upper-case
letters, spaces and ``( ) / , -``, then a colon and whitespace; of several sections with one name
the last non-empty one wins.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from bench.data.loaders.chexpert import find_official_file, parse_label_code, read_csv_rows, require_root
from bench.data.spec import DatasetSpec, SplitProtocol, register_dataset
from bench.data.label_lists import CHEXPERT_OBSERVATIONS
from bench.data.table import CanonicalTable, canonical_view, make_frame
from bench.errors import DataError

logger = logging.getLogger(__name__)

NAME = "mimic-cxr"
METADATA = "mimic-cxr-2.0.0-metadata"
SPLIT = "mimic-cxr-2.0.0-split"
CHEXPERT = "mimic-cxr-2.0.0-chexpert"

SPLIT_VALUES = {"train": "train", "validate": "val", "test": "test"}

# --------------------------------------------------------------------------------------------
# report sectioning
# --------------------------------------------------------------------------------------------
#: A section header: newline, exactly one space, upper-case words (with ``( ) / , -``), colon, whitespace.
#: The whitespace is a look-ahead so that an empty section ("FINDINGS:\n IMPRESSION: ...") does not
#: swallow the newline that starts the next header.
SECTION_HEADER = re.compile(r"\n ([A-Z ()/,-]+):(?=\s)")

#: Header spellings (lower-cased) folded onto one section name; others keep their own name.
SECTION_ALIASES: dict[str, str] = {
    "impressions": "impression", "conclusion": "impression", "conclusions": "impression",
    "findings and impression": "impression", "findings/impression": "impression",
    "findings/ impression": "impression", "impresson": "impression", "impession": "impression",
    "impresion": "impression", "imprression": "impression", "imoression": "impression",
    "impressoin": "impression", "imprssion": "impression", "imperssion": "impression",
    "mpression": "impression",
    "finding": "findings", "findins": "findings", "findindgs": "findings", "findgings": "findings",
    "findngs": "findings", "findnings": "findings", "finidngs": "findings", "reference findings": "findings",
    "chest, two views": "findings",
    "comparisons": "comparison", "comparison exam": "comparison", "comparison film": "comparison",
    "reference exam": "comparison", "comparision": "comparison", "comparsion": "comparison",
    "comparrison": "comparison", "comparisions": "comparison",
    "reason for examination": "indication", "reason for exam": "indication", "clinical indication": "indication",
    "idication": "indication",
    "clinical history": "history", "clinical information": "history", "patient history": "history", "pfi": "history",
    "exam": "examination", "type of examination": "examination",
    "recommendation": "recommendations", "recommendation(s)": "recommendations", "wetread": "wet read",
}


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def split_sections(text: str) -> list[tuple[str, str]]:
    """``[(section name, raw text), ...]`` in report order; text before the first header is
    ``"preamble"``; a report without any header is one ``"full report"`` section."""
    matches = list(SECTION_HEADER.finditer(text))
    if not matches:
        return [("full report", text)]
    out = [("preamble", text[:matches[0].start()])]
    for k, m in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        name = m.group(1).lower()   # not stripped: "\n  FINDINGS:" (two spaces) is no FINDINGS header
        out.append((SECTION_ALIASES.get(name, name), text[m.end():end]))
    return out


def findings_impression(text: str) -> tuple[str, str]:
    """(findings, impression) of a MIMIC-CXR report, whitespace-normalised; "" when absent.

    Empty sections are ignored and the last non-empty section of each name wins (MGCA).
    """
    found = {"findings": "", "impression": ""}
    for name, body in split_sections(text):
        if name in found:
            body = normalize_whitespace(body)
            if body:
                found[name] = body
    return found["findings"], found["impression"]


def report_path(root: Path, subject_id: str, study_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"


def image_path(root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


# --------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------
def _digits(value: str, column: str, path: Path, line: int) -> str:
    v = value.strip()
    if v.endswith(".0"):   # ids written as floats by a spreadsheet round trip
        v = v[:-2]
    if not (v.isdigit() and len(v) == 8):
        raise DataError(f"{column} {value!r} is not an 8-digit id", path=path, line=line)
    return v


def _int_or_missing(value: str, column: str, path: Path, line: int) -> int:
    v = value.strip()
    if not v:
        return -1
    try:
        f = float(v)
    except ValueError:
        raise DataError(f"{column} {value!r} is not an integer", path=path, line=line) from None
    if f != int(f) or f <= 0:
        raise DataError(f"{column} {value!r} is not a positive integer", path=path, line=line)
    return int(f)


def _new_dicom_id(value: str, first_line: dict[str, int], path: Path, line: int) -> str:
    """The row's dicom_id; DataError when it is empty or already listed in this file."""
    dicom = value.strip()
    if not dicom:
        raise DataError("empty dicom_id", path=path, line=line)
    if dicom in first_line:
        raise DataError(f"duplicate dicom_id {dicom!r} (first at line {first_line[dicom]})", path=path, line=line)
    return dicom


def load(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """Read the three CSVs and the reports of a MIMIC-CXR-JPG 2.0.0 root (``.csv`` or ``.csv.gz``)."""
    root = require_root(root, "the MIMIC-CXR-JPG 2.0.0 folder holding mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz and files/")
    meta_path = find_official_file(root, METADATA, "MIMIC-CXR-JPG image metadata")
    split_path = find_official_file(root, SPLIT, "MIMIC-CXR-JPG official split")
    chex_path = find_official_file(root, CHEXPERT, "MIMIC-CXR-JPG CheXpert labels")
    skipped = 0

    def bad(exc: DataError) -> None:
        nonlocal skipped
        if not skip_bad:
            raise exc
        skipped += 1
        logger.warning("skipping malformed row: %s", exc)

    # split.csv: dicom_id -> (split, subject, study)
    split_rows = read_csv_rows(split_path)
    sc = {c: split_rows.column(c, split_path) for c in ("dicom_id", "study_id", "subject_id", "split")}
    split_of: dict[str, tuple[str, str, str]] = {}
    split_line: dict[str, int] = {}
    skipped_split: set[str] = set()   # images whose split row was skipped: dropped without a second count
    for line, f in split_rows.rows:
        dicom = ""
        try:
            dicom = _new_dicom_id(f[sc["dicom_id"]], split_line, split_path, line)
            value = f[sc["split"]].strip()
            if value not in SPLIT_VALUES:
                raise DataError(f"split {value!r} is not one of train/validate/test", path=split_path, line=line)
            split_of[dicom] = (SPLIT_VALUES[value], _digits(f[sc["subject_id"]], "subject_id", split_path, line),
                               _digits(f[sc["study_id"]], "study_id", split_path, line))
            split_line[dicom] = line
        except DataError as exc:
            bad(exc)
            if dicom and dicom not in split_of:
                skipped_split.add(dicom)

    # chexpert.csv: (subject, study) -> labels
    chex_rows = read_csv_rows(chex_path)
    cc = {c: chex_rows.column(c, chex_path) for c in ("subject_id", "study_id", *CHEXPERT_OBSERVATIONS)}
    labels_of: dict[tuple[str, str], np.ndarray] = {}
    label_line: dict[tuple[str, str], int] = {}
    for line, f in chex_rows.rows:
        try:
            key = (_digits(f[cc["subject_id"]], "subject_id", chex_path, line),
                   _digits(f[cc["study_id"]], "study_id", chex_path, line))
            if key in labels_of:
                raise DataError(f"duplicate study s{key[1]} (first at line {label_line[key]})", path=chex_path, line=line)
            labels_of[key] = np.array([parse_label_code(f[cc[c]], path=chex_path, line=line, column=c)
                                       for c in CHEXPERT_OBSERVATIONS], dtype=np.float32)
            label_line[key] = line
        except DataError as exc:
            bad(exc)

    # metadata.csv: one canonical row per image
    meta_rows = read_csv_rows(meta_path)
    mc = {c: meta_rows.column(c, meta_path) for c in ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns")}
    rows: list[dict] = []
    labels: list[np.ndarray] = []
    seen: dict[str, int] = {}
    no_labels = 0
    unlabelled = np.full(len(CHEXPERT_OBSERVATIONS), np.nan, dtype=np.float32)
    for line, f in meta_rows.rows:
        try:
            dicom = _new_dicom_id(f[mc["dicom_id"]], seen, meta_path, line)
            subject = _digits(f[mc["subject_id"]], "subject_id", meta_path, line)
            study = _digits(f[mc["study_id"]], "study_id", meta_path, line)
            height = _int_or_missing(f[mc["Rows"]], "Rows", meta_path, line)
            width = _int_or_missing(f[mc["Columns"]], "Columns", meta_path, line)
            if dicom not in split_of and dicom in skipped_split:
                continue
            if dicom not in split_of:
                raise DataError(f"dicom_id {dicom!r} has no row in {split_path.name}", path=meta_path, line=line)
            split, s_subject, s_study = split_of[dicom]
            if (s_subject, s_study) != (subject, study):
                raise DataError(f"dicom_id {dicom!r} is p{subject}/s{study} here but p{s_subject}/s{s_study} in "
                                f"{split_path.name} line {split_line[dicom]}", path=meta_path, line=line)
        except DataError as exc:
            bad(exc)
            continue
        seen[dicom] = line
        lab = labels_of.get((subject, study))
        if lab is None:
            no_labels += 1
            lab = unlabelled
        labels.append(lab)
        rows.append({"image_id": dicom, "image_path": str(image_path(root, subject, study, dicom)),
                     "patient_id": subject, "study_id": study,
                     # ViewPosition LL (left lateral) is a lateral film: view LATERAL (bench.data.table)
                     "view": canonical_view(f[mc["ViewPosition"]]), "view_raw": f[mc["ViewPosition"]].strip(),
                     "split": split, "height": height, "width": width})

    # reports, one per study
    text_of: dict[tuple[str, str], tuple[str, str]] = {}
    missing_reports = 0
    for r in rows:
        key = (r["patient_id"], r["study_id"])
        if key in text_of:
            continue
        path = report_path(root, *key)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            missing_reports += 1
            text_of[key] = ("", "")
            continue
        text_of[key] = findings_impression(text)
    for r in rows:
        r["findings"], r["impression"] = text_of[(r["patient_id"], r["study_id"])]

    if no_labels:
        logger.warning("mimic-cxr: %d images belong to studies without a row in %s (labels left blank)",
                       no_labels, chex_path.name)
    if text_of and missing_reports == len(text_of):
        logger.warning("mimic-cxr: no report found (expected files/pXX/p<subject_id>/s<study_id>.txt from "
                       "mimic-cxr-reports.zip unzipped into %s); findings/impression are empty", root / "files")
    elif missing_reports:
        logger.warning("mimic-cxr: %d of %d studies have no report .txt", missing_reports, len(text_of))
    subject_splits: dict[str, set[str]] = {}
    for r in rows:
        subject_splits.setdefault(r["patient_id"], set()).add(r["split"])
    mixed = [s for s, v in subject_splits.items() if len(v) > 1]
    if mixed:
        logger.warning("mimic-cxr: %d subjects have images in more than one official split (e.g. %s)", len(mixed), mixed[0])

    arr = np.stack(labels).astype(np.float32) if labels else np.zeros((0, len(CHEXPERT_OBSERVATIONS)), np.float32)
    logger.info("mimic-cxr: %d images, %d studies (%d skipped rows) from %s", len(rows), len(text_of), skipped, root)
    return CanonicalTable(
        dataset=NAME, root=root, frame=make_frame(rows), classes=CHEXPERT_OBSERVATIONS, labels=arr,
        skipped_rows=skipped,
        source_files=(meta_path.name, split_path.name, chex_path.name),
        notes={"labels": "study-level CheXpert labeler codes: 1 positive, 0 negative, -1 uncertain, NaN blank",
               "splits": "split.csv: train -> train, validate -> val, test -> test",
               "text": "findings/impression: last non-empty section of each name (MIT-LCP/MGCA section parser)"},
    )


def frontal_with_text(table: CanonicalTable) -> np.ndarray:
    """Row indices of PA/AP images whose study has findings or impression (MGCA's ``master.csv``)."""
    frame = table.frame
    frontal = np.isin(frame["view"].to_numpy(), ["PA", "AP"])
    has_text = (frame["findings"].str.len().to_numpy() > 0) | (frame["impression"].str.len().to_numpy() > 0)
    return np.flatnonzero(frontal & has_text).astype(np.int64)


SPEC = register_dataset(DatasetSpec(
    name=NAME,
    title="MIMIC-CXR-JPG 2.0.0 (with MIMIC-CXR reports)",
    official_layout="mimic-cxr-2.0.0-{metadata,split,chexpert}.csv(.gz), files/pXX/p<subject>/s<study>/<dicom_id>.jpg, "
                    "files/pXX/p<subject>/s<study>.txt",
    load=load,
    split=SplitProtocol(
        official=("train", "val", "test"), stratify=False,
        note="official split.csv (patient-level): train / validate / test; MGCA pretraining trains on train "
             "PA/AP images with text and validates on validate + test",
    ),
    synth_subdir="mimic-cxr-jpg/2.0.0",
    tasks_hint="image-report pretraining; 5-task classification; retrieval and report generation",
))
