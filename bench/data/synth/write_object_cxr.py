"""Synthetic Object-CXR in the official JF Healthcare layout (datasets.md §6, §13).

Writes ``train/00001.jpg ...`` and ``dev/08001.jpg ...`` (grey JPEGs of varied non-square
sizes; counts scaled down, dev numbering kept from 08001), ``train.csv`` with the header
``image_name,annotation`` and ``dev.csv`` with the ``image_path`` variant of the first column
name. Annotations: ``0 x1 y1 x2 y2`` rectangle, ``1 x1 y1 x2 y2`` ellipse, ``2 x1 y1 ... xn yn``
polygon, objects joined by ``;``, empty for an image without foreign objects. Half the images of
each split have objects, and the first train image holds all three shape types.

As in the challenge's annotation rules, only foreign objects "presented within the lung field" are
annotated (at least half of the object's pixels on the lung fields) and support devices are drawn but
never annotated: an image "without foreign objects" can still show a button over the mediastinum, a
pendant at the neck or an ECG lead, so a detector has to know where the lungs are and what a device
looks like, not only find bright metal.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.synth.case import DrawnCase, Lesion

log = logging.getLogger(__name__)

#: 2: only objects within the lung field are annotated; objects outside it and support devices are
#: drawn unannotated, in positive and negative images (was: every object annotated, no devices).
VERSION = 2

FINDING = "foreign_object"
#: An object is "within the lung field" when at least this share of its pixels lies on the lungs.
IN_LUNG_FIELD = 0.5
#: Share of the negative images' draws that may carry (unannotated) objects outside the lung field.
NEGATIVE_OBJECT_RATE = 0.6
TYPE_CODES = {"rectangle": "0", "ellipse": "1", "polygon": "2"}
#: scale -> (train images, dev images, (min side, max side)). Real images are ~2000-3000 px. ``bench``
#: has a dev (test) set of 1,000 images as the real one, so object-cxr-det's CIs separate encoders.
SCALES: dict[str, tuple[int, int, tuple[int, int]]] = {
    "micro": (16, 8, (80, 128)),
    "tiny": (400, 100, (192, 288)),
    "small": (1600, 400, (192, 288)),
    "bench": (2000, 1000, (192, 288)),
}
DEV_FIRST = 8001
JPEG_QUALITY = 95


def drawn_objects(case: DrawnCase) -> list[Lesion]:
    """Every foreign object drawn on a case, annotated or not (lesions with a shape)."""
    return [lesion for lesion in case.lesions if lesion.finding == FINDING and lesion.shape is not None]


def objects(case: DrawnCase) -> list[Lesion]:
    """The annotated foreign objects of a case: those presented within the lung field."""
    return [lesion for lesion in drawn_objects(case)
            if lesion.lung_fraction is not None and lesion.lung_fraction >= IN_LUNG_FIELD]


def annotation(case: DrawnCase) -> str:
    """The official annotation cell of a case ("" when it has no foreign object)."""
    parts = []
    for lesion in objects(case):
        pts = np.asarray(lesion.shape.points, dtype=np.int64).reshape(-1, 2)
        parts.append(" ".join([TYPE_CODES[lesion.shape.kind]] + [str(int(v)) for v in pts.ravel()]))
    return ";".join(parts)


def _draw(rng: np.random.Generator, n: int, sides: tuple[int, int]) -> list[DrawnCase]:
    """n cases, alternately with and without annotated foreign objects (first: all three shape kinds).
    Negative images are drawn from a profile that may place objects, and kept only when none of
    them lies within the lung field."""
    from dataclasses import replace

    from bench.data.synth.generate import draw_until, sample_case
    from bench.data.synth.profiles import PROFILES

    base = PROFILES["object_cxr"]
    negative = replace(base, prevalence={**base.prevalence, FINDING: NEGATIVE_OBJECT_RATE})
    profiles = {True: base.forcing(present={FINDING}), False: negative}
    all_kinds = set(TYPE_CODES)
    cases = []
    for i in range(n):
        positive = i % 2 == 0
        h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
        kinds_of = lambda c: {o.shape.kind for o in objects(c)}  # noqa: E731
        wanted = (lambda c: kinds_of(c) >= all_kinds) if i == 0 else (lambda c, p=positive: bool(kinds_of(c)) == p)
        cases.append(draw_until(lambda p=profiles[positive], h=h, w=w: sample_case(rng, p, h, w), wanted,
                                tries=300 if i == 0 else 20, what=f"object-cxr slot {i}"))
    order = rng.permutation(n - 1) + 1        # keep the all-kinds case first, shuffle the rest
    return [cases[0]] + [cases[i] for i in order]


def n_cases(scale: str) -> int:
    """Images written at ``scale`` (the corpus regenerates this dataset alone when it changes)."""
    return SCALES[scale][0] + SCALES[scale][1]


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Draw and write the Object-CXR fixture into ``out_dir``; returns {image name: case}."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n_train, n_dev, sides = SCALES[scale]
    train = _draw(rng, n_train, sides)
    dev = _draw(rng, n_dev, sides)
    return write_cases(out_dir, train, dev)


def write_cases(out_dir: Path, train: list[DrawnCase], dev: list[DrawnCase]) -> dict[str, DrawnCase]:
    """Write already drawn cases in the official layout; returns {image name: case}."""
    out_dir = Path(out_dir)
    written: dict[str, DrawnCase] = {}
    for csv_name, folder, first, name_col, cases in (("train.csv", "train", 1, "image_name", train),
                                                    ("dev.csv", "dev", DEV_FIRST, "image_path", dev)):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        with open(out_dir / csv_name, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([name_col, "annotation"])
            for k, case in enumerate(cases):
                name = f"{first + k:05d}.jpg"
                Image.fromarray(case.image, mode="L").save(out_dir / folder / name, format="JPEG",
                                                           quality=JPEG_QUALITY)
                writer.writerow([name, annotation(case)])
                written[name] = case
    log.info("object-cxr synth: %d train + %d dev images in %s", len(train), len(dev), out_dir)
    return written
