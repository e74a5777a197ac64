"""Write a synthetic IU X-ray root in the R2Gen release layout (datasets.md §8, §13).

``annotation.json`` is ``{"train": [...], "val": [...], "test": [...]}`` with entries
``{"id": "CXR2384_IM-0942", "report": <findings>, "image_path": ["CXR2384_IM-0942/0.png",
"CXR2384_IM-0942/1.png"], "split": "train"}``; images are ``images/<id>/0.png`` (frontal) and
``1.png`` (lateral), 8-bit grayscale PNG. The returned case of a study is its frontal drawing;
the lateral image is in ``case.meta["lateral_image"]``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from bench.data.synth.case import DrawnCase
from bench.data.synth.write_mimic_cxr import normalize, save_png, size_for

logger = logging.getLogger(__name__)

#: scale -> (studies, (min h, max h), (min w, max w))
SCALES = {"micro": (10, (96, 112), (88, 96)), "tiny": (150, (256, 288), (224, 256)),
          "small": (600, (256, 288), (224, 256)), "bench": (150, (256, 288), (224, 256))}
SPLIT_FRACTIONS = (0.70, 0.10, 0.20)   # R2Gen: 2,069 / 296 / 590 studies


def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict[str, DrawnCase]:
    """Write the iu_xray root into ``out_dir``; returns the frontal cases keyed by study id."""
    from bench.data.synth.generate import lateral_of, sample_case
    from bench.data.synth.profiles import PROFILES

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    n, hs, ws = SCALES[scale]
    profile = PROFILES["iu_xray"]
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    numbers = rng.choice(np.arange(1, 3956), size=n, replace=False)
    n_val = max(1, int(round(n * SPLIT_FRACTIONS[1])))
    n_test = max(1, int(round(n * SPLIT_FRACTIONS[2])))
    splits = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    splits = [splits[i] for i in rng.permutation(n)]
    data: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    cases: dict[str, DrawnCase] = {}
    for number, split in zip(numbers, splits):
        ident = f"CXR{int(number)}_IM-{int(rng.integers(1, 3000)):04d}"
        h, w = size_for(rng, hs, ws)
        front = sample_case(rng, profile, h, w, "PA" if rng.random() < 0.9 else "AP")
        lh, lw = size_for(rng, hs, ws)
        lateral = lateral_of(rng, front, lh, lw)
        report = normalize(front.findings_text) or normalize(front.impression_text) or \
            "The heart and lungs are within normal limits."
        case = dataclasses.replace(front, findings_text=report, impression_text="",
                                   meta={**front.meta, "lateral_image": lateral.image})
        save_png(out_dir / "images" / ident / "0.png", case.image)
        save_png(out_dir / "images" / ident / "1.png", lateral.image)
        data[split].append({"id": ident, "report": report,
                            "image_path": [f"{ident}/0.png", f"{ident}/1.png"], "split": split})
        cases[ident] = case
    (out_dir / "annotation.json").write_text(json.dumps(data), encoding="utf-8")
    logger.info("iu-xray synthetic: %d studies -> %s", len(cases), out_dir)
    return cases
