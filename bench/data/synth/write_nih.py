"""Write a synthetic NIH ChestX-ray14 root in the official layout (datasets.md §7, §13).

Files: ``images/<patient:08d>_<follow-up:03d>.png`` (8-bit gray PNG; a few RGBA, as in the real
release), ``Data_Entry_2017.csv`` (the original header whose bracketed names hold commas, and the
trailing comma on every line; ages like ``058Y``), ``BBox_List_2017.csv`` (header
``Image Index,Finding Label,Bbox [x,y,w,h],,,``, infiltration spelt ``Infiltrate``),
``train_val_list.txt`` and ``test_list.txt`` (patient-disjoint).

Boxes are those of drawn lesions whose NIH label the image carries, for the 8 box labels
(consolidation lesions give "Pneumonia" boxes when the image is labelled Pneumonia).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from bench.data.synth.case import NIH_LABELS, DrawnCase
from bench.data.synth.write_mimic_cxr import save_png, write_csv

logger = logging.getLogger(__name__)

ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
#: drawn finding -> box label as spelt in BBox_List_2017.csv, and the entry-file label it requires
BOX_LABELS: dict[str, tuple[str, str]] = {
    "atelectasis": ("Atelectasis", "Atelectasis"), "cardiomegaly": ("Cardiomegaly", "Cardiomegaly"),
    "effusion": ("Effusion", "Effusion"), "infiltration": ("Infiltrate", "Infiltration"),
    "mass": ("Mass", "Mass"), "nodule": ("Nodule", "Nodule"), "consolidation": ("Pneumonia", "Pneumonia"),
    "pneumothorax": ("Pneumothorax", "Pneumothorax"),
}
#: box-file label -> entry-file label ("Infiltrate" -> "Infiltration")
BOX_LABELS_BY_FILE: dict[str, str] = {file_label: entry_label for file_label, entry_label in BOX_LABELS.values()}
#: scale -> (patients, image side). The real PNGs are 1024x1024.
SCALES = {"micro": (10, 96), "tiny": (300, 256), "small": (1200, 256), "bench": (2000, 176)}


def box_rows(case: DrawnCase) -> list[tuple[str, int, int, int, int]]:
    """(box-file label, x, y, w, h) of the boxes written for a case."""
    out = []
    for lesion in case.lesions:
        spec = BOX_LABELS.get(lesion.finding)
        if spec is None or spec[1] not in case.nih:
            continue
        x1, y1, x2, y2 = (int(v) for v in lesion.box)
        if x2 > x1 and y2 > y1:
            out.append((spec[0], x1, y1, x2 - x1, y2 - y1))
    return out


def entry_labels(case: DrawnCase) -> str:
    labels = [lab for lab in case.nih if lab in NIH_LABELS]
    return "|".join(labels) if labels else "No Finding"


#: image number -> test of the quirk that image must hold (§13 checklist)
_QUIRKS = {
    0: lambda c: len([x for x in c.nih if x != "No Finding"]) >= 2,      # "A|B" labels
    1: lambda c: any(label == "Infiltrate" for label, *_ in box_rows(c)),  # the Infiltrate spelling
    2: lambda c: tuple(c.nih) in ((), ("No Finding",)),                  # "No Finding"
}


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Write the NIH root into ``out_dir``; returns the drawn cases keyed by Image Index."""
    from bench.data.synth.generate import draw_until, sample_case
    from bench.data.synth.profiles import PROFILES

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n_patients, side = SCALES[scale]
    profile = PROFILES["nih"]
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    test_patient = rng.random(n_patients) < 0.25
    order = rng.permutation(n_patients)
    test_patient[int(order[0])], test_patient[int(order[1])] = True, False

    cases: dict[str, DrawnCase] = {}
    entry_rows: list[list[str]] = []
    bbox_rows: list[list[str]] = []
    lists: dict[bool, list[str]] = {True: [], False: []}
    n_images = 0
    for p in range(n_patients):
        pid = p + 1
        for fu in range(int(rng.integers(1, 5))):
            name = f"{pid:08d}_{fu:03d}.png"
            view = "PA" if rng.random() < 0.6 else "AP"
            quirk = _QUIRKS.get(n_images)
            case = draw_until(lambda: sample_case(rng, profile, side, side, view), quirk, what=f"image {n_images}")
            if fu == 0:
                sex, base_age = case.sex, int(case.age)
            case = dataclasses.replace(case, sex=sex, age=min(base_age + fu, 999))
            rgba = n_images in (1, 4) or rng.random() < 0.005
            save_png(out_dir / "images" / name, case.image, rgba=rgba)
            if rgba:
                case.meta["rgba"] = True
            cases[name] = case
            n_images += 1
            spacing = str(rng.choice(["0.143", "0.139", "0.168"]))
            scale_up = float(rng.uniform(2.4, 2.9))
            h, w = case.image.shape
            entry_rows.append([name, entry_labels(case), str(fu), str(pid), f"{case.age:03d}Y",
                               "M" if case.sex == "M" else "F", view, str(int(w * scale_up)), str(int(h * scale_up)),
                               spacing, spacing])
            for label, x, y, bw, bh in box_rows(case):
                bbox_rows.append([name, label, f"{float(x)!r}", f"{float(y)!r}", f"{float(bw)!r}", f"{float(bh)!r}"])
            lists[bool(test_patient[p])].append(name)

    write_csv(out_dir / "Data_Entry_2017.csv", ENTRY_HEADER, entry_rows, trailing=",")
    write_csv(out_dir / "BBox_List_2017.csv", BBOX_HEADER, bbox_rows, trailing=",,,")
    (out_dir / "train_val_list.txt").write_text("".join(n + "\n" for n in sorted(lists[False])), encoding="utf-8")
    (out_dir / "test_list.txt").write_text("".join(n + "\n" for n in sorted(lists[True])), encoding="utf-8")
    logger.info("nih synthetic: %d images (%d boxes) -> %s", len(cases), len(bbox_rows), out_dir)
    return cases
