"""Synthetic COVIDx 9A in the layout MGCA reads (datasets.md §5, §13).

Writes ``train_COVIDx9A.txt`` / ``test_COVIDx9A.txt`` (space-separated, NO header,
``patient_id filename class source``) and the images in ``train/`` and ``test/``: a mix of PNG and
JPEG, some RGB, varied non-square sizes, file names in the styles of the aggregated sources (several
dots, e.g. ``SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg``). The first two lines of the
train list (and the first of the test list) are ``DX.1.2.840....png`` names whose stems before
the first dot collide (BenchX turns them all into ``DX.png``).
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.synth.case import DrawnCase

log = logging.getLogger(__name__)

CLASSES = ("normal", "pneumonia", "COVID-19")
#: scale -> (train images, test images, (min side, max side)).
SCALES: dict[str, tuple[int, int, tuple[int, int]]] = {
    "micro": (24, 12, (64, 112)),
    "tiny": (500, 90, (192, 288)),
    "small": (2000, 360, (192, 288)),
    "bench": (7600, 1000, (160, 192)),
}
#: Plausible sources per class (COVIDx aggregates them; the loader ignores the source).
SOURCES = {"normal": ("rsna",), "pneumonia": ("rsna", "cohen"),
           "COVID-19": ("ricord", "bimcv", "cohen", "stonybrook")}


def covidx_class(case: DrawnCase) -> str:
    label = case.meta.get("covidx_class")
    if label not in CLASSES:
        raise ValueError(f"case.meta['covidx_class'] is {label!r}; expected one of {CLASSES}")
    return label


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, size=n))


def _dx_name(rng: np.random.Generator) -> str:
    return f"DX.1.2.840.113619.2.55.3.{_digits(rng, 9)}.{_digits(rng, 3)}.{_digits(rng, 10)}.{_digits(rng, 3)}.1.png"


def _name(rng: np.random.Generator, source: str) -> tuple[str, str]:
    """(patient_id, filename) in the style of a COVIDx source."""
    if source == "rsna":
        pid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        return pid, f"{pid}.png"
    if source == "ricord":
        pid = f"{_digits(rng, 6)}-{_digits(rng, 6)}"
        return pid, f"MIDRC-RICORD-1C-{pid}-{_digits(rng, 5)}-0.png"
    if source == "bimcv":
        pid = f"sub-S{_digits(rng, 5)}"
        return pid, f"{pid}_ses-E{_digits(rng, 5)}_run-1_bp-chest_vp-ap_cr.png"
    if source == "stonybrook":
        return f"A{_digits(rng, 6)}", _dx_name(rng)
    pid = str(int(rng.integers(1, 500)))     # cohen: small integers, names with several dots
    style = int(rng.integers(0, 3))
    if style == 0:
        return pid, f"SARS-10.1148rg.{_digits(rng, 9)}-g04mr{_digits(rng, 2)}g0-Fig{int(rng.integers(1, 9))}a-day0.jpeg"
    if style == 1:
        return pid, f"covid-19-pneumonia-{_digits(rng, 2)}-day{int(rng.integers(0, 9))}.jpg"
    return pid, f"1.{_digits(rng, 4)}-{_digits(rng, 3)}.fig{int(rng.integers(1, 5))}.CXR.jpg"


def _draw(rng: np.random.Generator, n: int, sides: tuple[int, int]) -> list[DrawnCase]:
    from bench.data.synth.generate import sample_case
    from bench.data.synth.profiles import PROFILES

    profile = PROFILES["covidx"]
    shapes = rng.integers(sides[0], sides[1] + 1, size=(n, 2))
    return [sample_case(rng, profile, int(h), int(w)) for h, w in shapes]


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Draw and write the COVIDx fixture into ``out_dir``; returns {file name: case}."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n_train, n_test, sides = SCALES[scale]
    cases = _draw(rng, n_train + n_test, sides)
    return write_cases(out_dir, cases[:n_train], cases[n_train:], rng)


def _save(path: Path, image: np.ndarray, rgb: bool) -> None:
    pil = Image.fromarray(image, mode="L")
    if rgb:
        pil = pil.convert("RGB")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        pil.save(path, format="JPEG", quality=95)
    else:
        pil.save(path, format="PNG", compress_level=1)


def write_cases(out_dir: Path, train: list[DrawnCase], test: list[DrawnCase],
                rng: np.random.Generator) -> dict[str, DrawnCase]:
    """Write already drawn cases in the 9A layout; returns {file name: case}."""
    out_dir = Path(out_dir)
    written: dict[str, DrawnCase] = {}
    patients_of_split: dict[str, set[tuple[str, str]]] = {"train": set(), "test": set()}
    for split, cases, n_dx in (("train", train, 2), ("test", test, 1)):
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, case in enumerate(cases):
            label = covidx_class(case)
            while True:
                source = "stonybrook" if i < n_dx else str(rng.choice(SOURCES[label]))
                patient, filename = _name(rng, source)
                # The official lists keep a patient in one split; small "cohen" ids must not repeat
                # across train and test.
                other = patients_of_split["test" if split == "train" else "train"]
                if filename not in written and (source, patient) not in other:
                    break
            patients_of_split[split].add((source, patient))
            _save(folder / filename, case.image, rgb=bool(rng.random() < 0.25))
            lines.append(f"{patient} {filename} {label} {source}\n")
            written[filename] = case
        (out_dir / f"{split}_COVIDx9A.txt").write_text("".join(lines))
    log.info("covidx synth: %d train + %d test images in %s", len(train), len(test), out_dir)
    return written
