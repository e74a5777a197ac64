"""Synthetic RSNA Pneumonia (stage 2) in the official Kaggle layout (datasets.md §3, §13).

Writes ``stage_2_train_images/<patientId>.dcm`` (uncompressed 8-bit MONOCHROME2 Secondary
Capture DICOMs, UUID patient ids), ``stage_2_train_labels.csv`` (one row per "Lung Opacity" box,
floats like ``264.0``; a negative patient has one row with blank box fields and Target 0) and
``stage_2_detailed_class_info.csv`` (one row per labels row). Boxes are those of the drawn
consolidation lesions; the fixture always holds a negative (first) and a patient with two or more boxes (last).
"""
from __future__ import annotations

import csv
import logging
import uuid
from pathlib import Path

import numpy as np

from bench.data.dicom import write_dicom
from bench.data.synth.case import DrawnCase

log = logging.getLogger(__name__)

#: scale -> (patients, image side in pixels). The real images are 1024x1024. ``bench`` has the real
#: stage-2 training set's 26,684 patients, so MGCA's 70/15/15 split gives its 4,003 test patients: RSNA
#: scores one binary label (AUROC), whose 95% CI at 1,440 test patients (the earlier 9,600) was
#: +-0.036 around chance, twice CheXpert's five-label macro, and too wide to rank close encoders.
SCALES: dict[str, tuple[int, int]] = {"micro": (24, 96), "tiny": (600, 256), "small": (2400, 256),
                                      "bench": (26684, 176)}
OPACITY = "consolidation"   # the finding whose lesion boxes are RSNA's "Lung Opacity" boxes


def opacity_boxes(case: DrawnCase) -> list[tuple[int, int, int, int]]:
    """The "Lung Opacity" boxes (x1, y1, x2, y2 exclusive) of a drawn case."""
    return [tuple(int(v) for v in lesion.box) for lesion in case.lesions if lesion.finding == OPACITY]


def _draw(rng: np.random.Generator, n: int, size: int) -> list[DrawnCase]:
    from bench.data.synth.generate import draw_until, sample_case
    from bench.data.synth.profiles import PROFILES

    profile = PROFILES["rsna"]
    cases = [sample_case(rng, profile, size, size) for _ in range(n)]
    # Quirks the fixture must hold whatever the prevalence: a negative in the first slot and a
    # patient with two or more boxes in the last, redrawn with the finding forced if need be.
    quirks = ((0, profile.forcing(absent={OPACITY}), lambda c: not opacity_boxes(c)),
              (n - 1, profile.forcing(present={OPACITY}), lambda c: len(opacity_boxes(c)) >= 2))
    for slot, forced, test in quirks:
        cases[slot] = draw_until(lambda forced=forced: sample_case(rng, forced, size, size), test,
                                 tries=101, what=f"rsna slot {slot}", initial=cases[slot])
    return cases


def n_cases(scale: str) -> int:
    """Patients written at ``scale`` (the corpus regenerates this dataset alone when it changes)."""
    return SCALES[scale][0]


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Draw and write the RSNA fixture into ``out_dir``; returns {patientId: case}."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n, size = SCALES[scale]
    return write_cases(out_dir, _draw(rng, n, size), rng)


def write_cases(out_dir: Path, cases: list[DrawnCase], rng: np.random.Generator) -> dict[str, DrawnCase]:
    """Write already drawn cases in the official layout; returns {patientId: case}."""
    out_dir = Path(out_dir)
    images = out_dir / "stage_2_train_images"
    images.mkdir(parents=True, exist_ok=True)
    written: dict[str, DrawnCase] = {}
    label_rows: list[list[str]] = []
    class_rows: list[list[str]] = []
    for case in cases:
        pid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        boxes = opacity_boxes(case)
        height, width = case.image.shape
        spacing = float(rng.choice([0.143, 0.168, 0.139, 0.171])) * 1024 / max(height, width)
        sop = f"1.2.276.0.7230010.3.1.4.8323329.{int(rng.integers(1000, 33000))}.1517874{int(rng.integers(100, 999))}.{int(rng.integers(100000, 999999))}"
        write_dicom(images / f"{pid}.dcm", case.image, transfer="explicit",
                    SOPInstanceUID=sop, StudyInstanceUID=sop.replace(".3.1.4.", ".3.1.2.", 1),
                    SeriesInstanceUID=sop.replace(".3.1.4.", ".3.1.3.", 1),
                    PatientID=pid, PatientName=pid, PatientSex=case.sex, PatientAge=str(int(case.age)),
                    ViewPosition=case.view, SeriesDescription=f"view: {case.view}",
                    PixelSpacing=[round(spacing, 6)] * 2)
        if boxes:
            kind = "Lung Opacity"
            for x1, y1, x2, y2 in boxes:
                label_rows.append([pid, f"{float(x1)!r}", f"{float(y1)!r}", f"{float(x2 - x1)!r}",
                                   f"{float(y2 - y1)!r}", "1"])
                class_rows.append([pid, kind])
        else:
            kind = "Normal" if not case.drawn else "No Lung Opacity / Not Normal"
            label_rows.append([pid, "", "", "", "", "0"])
            class_rows.append([pid, kind])
        written[pid] = case
    for name, header, rows in (("stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], label_rows),
                               ("stage_2_detailed_class_info.csv", ["patientId", "class"], class_rows)):
        with open(out_dir / name, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    log.info("rsna synth: %d patients, %d positive, %d boxes in %s", len(written),
             sum(1 for c in written.values() if opacity_boxes(c)), sum(r[-1] == "1" for r in label_rows), out_dir)
    return written
