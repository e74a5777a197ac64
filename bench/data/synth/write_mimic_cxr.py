"""Write a synthetic MIMIC-CXR-JPG 2.0.0 root (with MIMIC-CXR reports) in the official layout.

Files (datasets.md §1, §13)::

    mimic-cxr-2.0.0-metadata.csv.gz   mimic-cxr-2.0.0-split.csv.gz   mimic-cxr-2.0.0-chexpert.csv.gz
    files/p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg      8-bit grayscale JPEG, quality 95
    files/p1X/p<subject_id>/s<study_id>.txt                 report: centred FINAL REPORT header,
                                                            every line starting with one space

Each study draws one frontal case (PA or AP) whose findings drive the study's report and CheXpert
row; a lateral image (and sometimes a repeated frontal exposure with a blank ``ViewPosition``) is
added with the study's text and labels. The repeated exposure's case has ``view == ""``; every
case's ``meta`` holds ``subject_id``, ``study_id`` and ``report_shape``. Reports cover the quirks:
impression only, findings only, neither (free text only), and a repeated IMPRESSION section (the
last one is the real one). The returned cases' ``findings_text`` / ``impression_text`` are what
the report holds (whitespace-normalised; "" for an omitted section).

The small helpers (:func:`save_jpeg`, :func:`save_png`, :func:`write_csv`...)
are shared with the CheXpert, NIH and IU X-ray writers.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import gzip
import io
import logging
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.synth.case import CHEXPERT_OBSERVATIONS, DrawnCase

logger = logging.getLogger(__name__)

METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_OBSERVATIONS)

#: scale -> (patients, (min height, max height), (min width, max width))
SCALES = {
    "micro": (8, (96, 112), (80, 96)),
    "tiny": (300, (240, 288), (208, 256)),
    "small": (1200, (240, 288), (208, 256)),
    "bench": (2000, (160, 192), (144, 176)),
}
JPEG_QUALITY = 95

_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "": ""}
_INDICATIONS = (
    "___-year-old {sex} with cough and fever.  Evaluate for pneumonia.",
    "___ year old {sex} with shortness of breath  // ?effusion",
    "History: ___ with chest pain",
    "___-year-old {sex} status post line placement.  Assess position.",
    "___ with hypoxia, evaluate for edema",
    "Preoperative chest radiograph for ___.",
)
_COMPARISONS = ("___.", "None.", "Chest radiograph from ___.", "___ and ___.")


# --------------------------------------------------------------------------------------------
# shared I/O helpers
# --------------------------------------------------------------------------------------------
def save_jpeg(path: Path, image: np.ndarray, quality: int = JPEG_QUALITY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(path, format="JPEG", quality=quality)


def save_png(path: Path, image: np.ndarray, *, rgba: bool = False) -> None:
    """8-bit grayscale PNG, or RGBA (gray in R=G=B, opaque alpha) as a few real NIH files are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.asarray(image, dtype=np.uint8)
    if rgba:
        pil = Image.fromarray(np.stack([img, img, img, np.full_like(img, 255)], axis=-1), mode="RGBA")
    else:
        pil = Image.fromarray(img, mode="L")
    pil.save(path, format="PNG", compress_level=1)


def write_csv(path: Path, header: list[str] | tuple[str, ...] | str, rows: list[list[str]],
              *, trailing: str = "") -> None:
    """Write a CSV (gzipped, reproducibly, when the name ends in ``.gz``).

    ``header`` may be a ready-made line (for headers the csv module would quote); ``trailing`` is
    appended to every data line (e.g. the NIH files' trailing commas).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if isinstance(header, str):
        buf.write(header + "\n")
    else:
        writer.writerow(header)
    for row in rows:
        line = io.StringIO()
        csv.writer(line, lineterminator="").writerow(row)
        buf.write(line.getvalue() + trailing + "\n")
    data = buf.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(data)
    else:
        path.write_bytes(data)


def label_code(value: float) -> str:
    """CheXpert labeler code as written in the official CSVs: 1.0 / 0.0 / -1.0 / blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):.1f}"


def size_for(rng: np.random.Generator, hs: tuple[int, int], ws: tuple[int, int]) -> tuple[int, int]:
    return int(rng.integers(hs[0], hs[1] + 1)), int(rng.integers(ws[0], ws[1] + 1))


def normalize(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
def _block(text: str) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, width=76, break_long_words=False, break_on_hyphens=False)]


def _section(name: str, text: str, inline: bool) -> list[str]:
    lines = _block(text)
    if inline and lines:
        return [f" {name}:  {lines[0][1:]}", *lines[1:], " "]
    return [f" {name}: ", " ", *lines, " "]


def compose_report(rng: np.random.Generator, *, exam: str, sex: str, findings: str, impression: str,
                   shape: str) -> str:
    """A report in the MIMIC-CXR format. ``shape``: "both" | "impression" | "findings" | "neither" | "repeat"."""
    lines = [" " * 33 + "FINAL REPORT"]
    lines += [f" EXAMINATION:  {exam}", " "]
    lines += _section("INDICATION", str(rng.choice(_INDICATIONS)).format(sex="man" if sex == "M" else "woman"), True)
    if rng.random() < 0.6:
        lines += _section("TECHNIQUE", "Chest PA and lateral" if "LAT" in exam else "Single frontal view of the chest",
                          True)
    lines += _section("COMPARISON", str(rng.choice(_COMPARISONS)), True)
    inline = bool(rng.random() < 0.3)
    if shape in ("both", "findings", "repeat") and findings:
        lines += _section("FINDINGS", findings, inline)
    if shape == "repeat" and impression:
        lines += _section("IMPRESSION", "Preliminary read; see final impression below.  ___ was notified.", True)
        lines += _section("ADDENDUM", "Final read after review with the attending radiologist ___.", True)
    if shape in ("both", "impression", "repeat") and impression:
        lines += _section("IMPRESSION", impression, inline)
    if shape == "neither":
        # free text with no FINDINGS/IMPRESSION header (MGCA falls back to the last paragraph)
        lines += [*_block((findings + " " + impression).strip() or "Study limited by ___."), " "]
    elif rng.random() < 0.15:
        lines += _section("NOTIFICATION", "The findings were discussed with Dr. ___ by ___ on the telephone "
                                          "on ___ at ___, ___ minutes after discovery.", True)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------
def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))


def _unique_ids(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    seen: set[int] = set()
    ids: list[int] = []
    while len(ids) < n:
        v = int(rng.integers(low, high))
        if v not in seen:
            seen.add(v)
            ids.append(v)
    return ids


def _report_shape(rng: np.random.Generator, study_index: int) -> str:
    forced = {0: "neither", 1: "impression", 2: "findings", 3: "repeat"}
    if study_index in forced:
        return forced[study_index]
    u = rng.random()
    return "impression" if u < 0.08 else "findings" if u < 0.12 else "neither" if u < 0.13 else \
        "repeat" if u < 0.15 else "both"


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Write the MIMIC-CXR-JPG root into ``out_dir``; returns the drawn cases keyed by dicom_id."""
    from bench.data.synth.generate import draw_until, lateral_of, sample_case
    from bench.data.synth.profiles import PROFILES

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n_patients, hs, ws = SCALES[scale]
    profile = PROFILES["mimic"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    subjects = sorted(_unique_ids(rng, n_patients, 10_000_000, 20_000_000))
    n_studies = [int(v) for v in rng.integers(1, 4, size=n_patients)]
    study_ids = iter(_unique_ids(rng, sum(n_studies), 50_000_000, 60_000_000))
    # patient-level official split: at least one patient in validate and in test
    split_of = ["train" if u < 0.80 else "validate" if u < 0.86 else "test" for u in rng.random(n_patients)]
    order = rng.permutation(n_patients)
    split_of[int(order[0])], split_of[int(order[1])] = "validate", "test"

    cases: dict[str, DrawnCase] = {}
    meta_rows: list[list[str]] = []
    split_rows: list[list[str]] = []
    chex_rows: list[list[str]] = []
    study_index = 0
    blank_view_written = False
    for p, subject in enumerate(subjects):
        sid = str(subject)
        # MIMIC shifts dates into the 22nd century
        date = datetime.date(2100 + int(rng.integers(0, 100)), 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
        patient_sex: str | None = None
        for _ in range(n_studies[p]):
            study = str(next(study_ids))
            front_view = "PA" if rng.random() < 0.65 else "AP"
            has_lateral = study_index == 0 or (front_view == "PA" and rng.random() < 0.75) or rng.random() < 0.1
            repeat_frontal = (not blank_view_written and study_index == 1) or rng.random() < 0.04
            h, w = size_for(rng, hs, ws)
            front = sample_case(rng, profile, h, w, front_view)
            if patient_sex is None:
                patient_sex = front.sex
            front = dataclasses.replace(front, sex=patient_sex)
            shape = _report_shape(rng, study_index)
            findings, impression = normalize(front.findings_text), normalize(front.impression_text)
            written_f = findings if shape in ("both", "findings", "repeat") else ""
            written_i = impression if shape in ("both", "impression", "repeat") else ""
            exam = "CHEST (PA AND LAT)" if has_lateral and front_view == "PA" else \
                "CHEST (PORTABLE AP)" if front_view == "AP" else "CHEST (PA)"
            report = compose_report(rng, exam=exam, sex=front.sex, findings=findings, impression=impression,
                                    shape=shape)
            study_case = dataclasses.replace(front, findings_text=written_f, impression_text=written_i,
                                             meta={**front.meta, "report_shape": shape, "study_id": study,
                                                   "subject_id": sid})
            images: list[tuple[str, DrawnCase]] = [(front_view, study_case)]
            if has_lateral:
                lh, lw = size_for(rng, hs, ws)
                images.append(("LATERAL", lateral_of(rng, study_case, lh, lw)))
            if repeat_frontal:
                # a repeated frontal exposure whose DICOM lacks ViewPosition (blank in the metadata)
                images.append(("", dataclasses.replace(study_case, view="",
                                                       meta={**study_case.meta, "repeat_of": "frontal"})))
                blank_view_written = True
            folder = out_dir / "files" / f"p{sid[:2]}" / f"p{sid}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"s{study}.txt").write_text(report, encoding="utf-8")
            time_of_day = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
            for view, case in images:
                dicom = _dicom_id(rng)
                while dicom in cases:
                    dicom = _dicom_id(rng)
                save_jpeg(folder / f"s{study}" / f"{dicom}.jpg", case.image)
                cases[dicom] = case
                rows_px, cols_px = case.image.shape
                orientation = "Recumbent" if view == "AP" else "Erect" if view else ""
                meta_rows.append([dicom, sid, study, exam, view, str(rows_px), str(cols_px), date.strftime("%Y%m%d"),
                                  f"{time_of_day}.{int(rng.integers(0, 1000)):03d}", exam, _VIEW_CODE[view],
                                  orientation])
                split_rows.append([dicom, study, sid, split_of[p]])
            chex_rows.append([sid, study, *(label_code(front.chexpert.get(c, math.nan)) for c in CHEXPERT_OBSERVATIONS)])
            study_index += 1
            date += datetime.timedelta(days=int(rng.integers(1, 400)))

    write_csv(out_dir / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta_rows)
    write_csv(out_dir / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, split_rows)
    write_csv(out_dir / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_COLUMNS, chex_rows)
    logger.info("mimic-cxr synthetic: %d images, %d studies, %d patients -> %s",
                len(cases), study_index, n_patients, out_dir)
    return cases
