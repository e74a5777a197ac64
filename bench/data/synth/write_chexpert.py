"""Write a synthetic CheXpert v1.0-small root in the official layout (datasets.md §2, §13).

``out_dir`` is the ``CheXpert-v1.0-small`` folder: ``train.csv``, ``valid.csv``,
``train/patientNNNNN/studyN/viewN_frontal.jpg|viewN_lateral.jpg`` and ``valid/...``. ``Path``
values start with ``CheXpert-v1.0-small/``. Train labels are the labeler codes of the drawn study
(1.0 / 0.0 / -1.0 / blank); valid labels are radiologist-style 0.0 / 1.0 (a drawn finding, even one
the report hedges, is 1.0). Train and valid patients are disjoint (valid ids start at 64541, as in
the real release). Laterals carry their study's labels and a blank ``AP/PA``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from bench.data.synth.case import CHEXPERT_OBSERVATIONS, DrawnCase
from bench.data.synth.write_mimic_cxr import label_code, save_jpeg, size_for, write_csv

logger = logging.getLogger(__name__)

PREFIX = "CheXpert-v1.0-small"
COMPETITION_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
#: The official train.csv / valid.csv header (written independently of the loader on purpose).
CSV_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
VALID_FIRST_PATIENT = 64541
#: scale -> (train patients, valid patients, (min h, max h), (min w, max w))
SCALES = {
    "micro": (8, 4, (88, 104), (80, 80)),
    "tiny": (260, 50, (256, 304), (256, 256)),
    "small": (1040, 200, (256, 304), (256, 256)),
    "bench": (6000, 1000, (160, 192), (160, 160)),
}
_SEX = {"M": "Male", "F": "Female"}


def _has_uncertain(case: DrawnCase) -> bool:
    return any(v == -1.0 for v in case.chexpert.values())


def five_by_200_task(chexpert: dict[str, float]) -> str | None:
    """The CheXpert 5x200 task a frontal train row qualifies for (datasets.md §2), or None."""
    lab = {c: (0.0 if math.isnan(chexpert.get(c, math.nan)) else chexpert[c]) for c in CHEXPERT_OBSERVATIONS}
    positive = [t for t in COMPETITION_TASKS if lab[t] == 1.0]
    others = [c for c in CHEXPERT_OBSERVATIONS if c not in ("No Finding", *positive)]
    return positive[0] if len(positive) == 1 and all(lab[c] == 0.0 for c in others) else None


#: (split, patient index, study) -> test of the quirk that slot must hold (§13 checklist)
_QUIRKS = {
    ("train", 0, 1): _has_uncertain,                                                 # -1.0 codes
    ("train", 1, 1): lambda c: five_by_200_task(c.chexpert) is not None,             # 5x200-eligible
    ("train", 2, 1): lambda c: any(t == 1.0 for t in (c.chexpert.get(k) for k in COMPETITION_TASKS))
    and five_by_200_task(c.chexpert) is None,                                        # positive, not eligible
}


def valid_labels(chexpert: dict[str, float]) -> dict[str, float]:
    """Radiologist-style 0/1 labels: drawn (1 or -1) -> 1.0, negative or not mentioned -> 0.0."""
    out = {}
    for c in CHEXPERT_OBSERVATIONS:
        v = chexpert.get(c, math.nan)
        out[c] = 1.0 if (not math.isnan(v) and v in (1.0, -1.0)) else 0.0
    return out


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Write the CheXpert root into ``out_dir``; returns the drawn cases keyed by image_id
    (``train/patient00001/study1/view1_frontal.jpg``: ``Path`` without its first component)."""
    from bench.data.synth.generate import draw_until, lateral_of, sample_case
    from bench.data.synth.profiles import PROFILES

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n_train, n_valid, hs, ws = SCALES[scale]
    profile = PROFILES["chexpert"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases: dict[str, DrawnCase] = {}

    for split, n_patients, first in (("train", n_train, 1), ("valid", n_valid, VALID_FIRST_PATIENT)):
        rows: list[list[str]] = []
        for p in range(n_patients):
            patient = f"patient{first + p:05d}"
            n_studies = 1 if split == "valid" else int(rng.integers(1, 4))
            unknown_sex = (split == "train" and p == 1) or rng.random() < 0.01
            for s in range(1, n_studies + 1):
                front_view = "AP" if rng.random() < 0.8 else "PA"
                lateral = (p == 0 and s == 1) or rng.random() < (0.3 if front_view == "PA" else 0.12)
                h, w = size_for(rng, hs, ws)
                quirk = _QUIRKS.get((split, p, s))
                front = draw_until(lambda: sample_case(rng, profile, h, w, front_view), quirk,
                                   what=f"{split} patient {p} study {s}")
                if s == 1:
                    patient_sex, first_age = front.sex, int(front.age)
                front = dataclasses.replace(front, sex=patient_sex, age=first_age + (s - 1) // 2)
                if split == "valid":
                    front = dataclasses.replace(front, chexpert=valid_labels(front.chexpert))
                sex = "Unknown" if unknown_sex else _SEX.get(patient_sex, "Unknown")
                views = [(front_view, front)]
                if lateral:
                    lh, lw = size_for(rng, hs, ws)
                    views.append(("LATERAL", lateral_of(rng, front, lh, lw)))
                for k, (view, case) in enumerate(views, start=1):
                    kind = "lateral" if view == "LATERAL" else "frontal"
                    rel = f"{split}/{patient}/study{s}/view{k}_{kind}.jpg"
                    save_jpeg(out_dir / rel, case.image)
                    cases[rel] = case
                    labels = {c: label_code(case.chexpert.get(c, math.nan)) for c in CHEXPERT_OBSERVATIONS}
                    rows.append([f"{PREFIX}/{rel}", sex, str(int(case.age)),
                                 "Lateral" if view == "LATERAL" else "Frontal",
                                 "" if view == "LATERAL" else view,
                                 *(labels[c] for c in CSV_COLUMNS[5:])])
        write_csv(out_dir / f"{split}.csv", CSV_COLUMNS, rows)
    logger.info("chexpert synthetic: %d images -> %s", len(cases), out_dir)
    return cases
