"""Synthetic SIIM-ACR Pneumothorax (stage 1) in the official Kaggle layout (datasets.md §4, §13).

Writes ``dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
(JPEG Baseline Secondary Capture DICOMs, UIDs in the ``1.2.276.0.7230010.3.1.{2,3,4}.8323329...``
style) and ``train-rle.csv`` with the header ``ImageId, EncodedPixels`` (leading space in the
second name). Each separate component of the pneumothorax mask is one RLE row (leading space);
negatives are `` -1`` and, for some images, ``-1`` (the torchxrayvision copy's spelling). The
fixture always holds a negative of each spelling and a positive image with two rows.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
from scipy import ndimage

from bench.data.dicom import write_dicom
from bench.data.rle import encode_siim_rle
from bench.data.synth.case import DrawnCase

log = logging.getLogger(__name__)

#: scale -> (images, image side in pixels). The real images are 1024x1024. ``bench`` holds the real
#: stage-1 training set's 12,047 images: MGCA's 70/15/15 split then tests on about 1,800 images, 450 with a
#: pneumothorax. At 4,000 images (594 test images, 141 positive) siim-seg's CIs were too wide to tell
#: ``supervised`` from ``random`` at 100% labels (issue 9).
SCALES: dict[str, tuple[int, int]] = {"micro": (24, 96), "tiny": (500, 256), "small": (2000, 256),
                                      "bench": (12047, 256)}
FINDING = "pneumothorax"
UID_ROOT = "1.2.276.0.7230010.3.1"
JPEG_QUALITY = 95


def instances(case: DrawnCase) -> list[np.ndarray]:
    """The mask instances of a case, one RLE row each: the separate (8-connected) components of the
    pneumothorax mask, largest first. Fragments (under 3% of the mask or 16 pixels) are folded into
    the largest row, so the union of the rows is always exactly the mask."""
    labelled, n = ndimage.label(case.mask_of(FINDING), structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(labelled.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    big = [k for k in order if sizes[k] >= max(0.03 * sizes.sum(), 16) or k == order[0]]
    rows = [labelled == k + 1 for k in big]
    for k in order:
        if k not in big:
            rows[0] |= labelled == k + 1
    return rows


def _draw(rng: np.random.Generator, n: int, size: int) -> list[DrawnCase]:
    from bench.data.synth.generate import draw_until, sample_case
    from bench.data.synth.profiles import PROFILES

    profile = PROFILES["siim"]
    cases = [sample_case(rng, profile, size, size) for _ in range(n)]
    # Quirks: negatives in the first two slots (" -1" and "-1"), a two-row positive in the last.
    negative = profile.forcing(absent={FINDING})
    positive = profile.forcing(present={FINDING})
    quirks = ((0, negative, lambda c: not instances(c)), (1, negative, lambda c: not instances(c)),
              (n - 1, positive, lambda c: len(instances(c)) >= 2))
    for slot, forced, test in quirks:
        cases[slot] = draw_until(lambda forced=forced: sample_case(rng, forced, size, size), test,
                                 tries=101, what=f"siim slot {slot}", initial=cases[slot])
    return cases


def n_cases(scale: str) -> int:
    """Images written at ``scale`` (the corpus regenerates this dataset alone when it changes)."""
    return SCALES[scale][0]


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Draw and write the SIIM fixture into ``out_dir``; returns {ImageId: case}."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n, size = SCALES[scale]
    return write_cases(out_dir, _draw(rng, n, size), rng)


def _uids(rng: np.random.Generator, used: set[str]) -> tuple[str, str, str]:
    """(study, series, instance) UIDs like 1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819."""
    while True:
        tail = int(rng.integers(100003, 999999))
        middle = f"8323329.{int(rng.integers(1000, 33000))}.{1517875000 + int(rng.integers(0, 999))}"
        sop = f"{UID_ROOT}.4.{middle}.{tail}"
        if sop not in used:
            used.add(sop)
            return f"{UID_ROOT}.2.{middle}.{tail - 1}", f"{UID_ROOT}.3.{middle}.{tail - 2}", sop


def write_cases(out_dir: Path, cases: list[DrawnCase], rng: np.random.Generator) -> dict[str, DrawnCase]:
    """Write already drawn cases in the official layout; returns {ImageId: case}.

    The second negative is spelled ``-1`` (no space), and so is every seventh one after it.
    """
    out_dir = Path(out_dir)
    root = out_dir / "dicom-images-train"
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, DrawnCase] = {}
    lines = ["ImageId, EncodedPixels"]
    used: set[str] = set()
    patient = ""
    negatives = 0
    for case in cases:
        study, series, sop = _uids(rng, used)
        if not patient or rng.random() >= 0.1:      # about 10% are a further image of the last patient
            patient = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        height, width = case.image.shape
        write_dicom(root / study / series / f"{sop}.dcm", case.image, transfer="jpeg",
                    jpeg_quality=JPEG_QUALITY, SOPInstanceUID=sop, StudyInstanceUID=study,
                    SeriesInstanceUID=series, PatientID=patient, PatientName=patient,
                    PatientSex=case.sex, PatientAge=str(int(case.age)), ViewPosition=case.view,
                    SeriesDescription=f"view: {case.view}",
                    PixelSpacing=[round(0.168 * 1024 / max(height, width), 6)] * 2)
        parts = instances(case)
        if parts:
            lines.extend(f"{sop}, {encode_siim_rle(part)}" for part in parts)
        else:
            lines.append(f"{sop},{'-1' if negatives % 7 == 1 else ' -1'}")
            negatives += 1
        written[sop] = case
    (out_dir / "train-rle.csv").write_text("\n".join(lines) + "\n")
    log.info("siim synth: %d images, %d positive, %d RLE rows in %s", len(written),
             len(written) - negatives, len(lines) - 1, out_dir)
    return written
