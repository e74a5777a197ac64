"""Data model of one synthetic radiograph: what was drawn, and what the report says about it.

Writers of the official formats (``bench.data.synth.write_*``) consume :class:`DrawnCase` only, so
the drawing code and the format code never depend on each other's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The official label lists have one home in the data layer; re-exported here for the generator's modules.
from bench.data.label_lists import CHEXPERT_OBSERVATIONS, NIH_LABELS  # noqa: F401

#: Every finding the generator can draw. Names are ours; each dataset maps them to its own labels.
FINDINGS: tuple[str, ...] = (
    "consolidation",      # lobar / patchy airspace opacity; "pneumonia" when the report says so
    "effusion",           # pleural effusion: meniscus at a costophrenic angle
    "pneumothorax",       # lucent rim without lung markings, visible pleural line
    "cardiomegaly",       # enlarged cardiac silhouette
    "edema",              # bilateral perihilar haze, Kerley-like lines
    "atelectasis",        # band-like linear opacity, volume loss
    "nodule",             # small round opacity (< 3 cm equivalent)
    "mass",               # large round opacity
    "covid",              # peripheral, bilateral ground glass (COVID-like)
    "infiltration",       # ill-defined patchy opacity
    "emphysema",          # hyperlucent, hyperinflated lungs, flat diaphragm
    "fibrosis",           # reticular pattern, lower-zone predominant
    "pleural_thickening", # thickened pleural rim
    "hernia",             # retrocardiac gas-containing mass (hiatal hernia)
    "support_devices",    # lines and tubes
    "foreign_object",     # rings, wires, buttons (Object-CXR)
)

#: Lung zones in which localised findings are placed ("right lower" etc.).
ZONES: tuple[str, ...] = tuple(
    f"{side} {level}" for side in ("right", "left") for level in ("upper", "middle", "lower")
)


@dataclass(frozen=True)
class Shape:
    """Geometry of an annotated object in image pixel coordinates (x to the right, y down).

    ``kind`` is ``rectangle`` or ``ellipse`` (``points`` = [[x1, y1], [x2, y2]], the bounding box
    corners, integers) or ``polygon`` (``points`` = the vertices, integers). Rasterise only with
    :func:`bench.data.shapes.rasterize`, which the loaders use too, so drawn and loaded masks agree.
    """

    kind: str
    points: np.ndarray  # int64 [n, 2] (x, y)


@dataclass
class Lesion:
    """One drawn, localisable abnormality."""

    finding: str                   # a name from FINDINGS
    zone: str                      # a name from ZONES, or "mediastinum"/"bilateral"/"chest wall"
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (x2, y2 exclusive), integer pixels, inside image
    mask: np.ndarray               # bool [H, W], the exact pixels the lesion occupies
    shape: Shape | None = None     # annotation geometry where the official format stores shapes
    #: share of the lesion's pixels inside the lung fields (set for foreign objects: Object-CXR
    #: annotates only objects presented within the lung field)
    lung_fraction: float | None = None


@dataclass
class DrawnCase:
    """One synthetic radiograph with its ground truth and its report."""

    image: np.ndarray              # uint8 [H, W], MONOCHROME2 convention (bone bright, lung dark)
    lesions: list[Lesion]
    #: finding -> "positive" | "uncertain" | "negative"; a finding absent from the dict is not
    #: mentioned in the report. Drawn findings are "positive" or "uncertain"; "negative" means the
    #: report explicitly denies it ("no pneumothorax").
    mentions: dict[str, str]
    severity: dict[str, str]       # finding -> "mild" | "moderate" | "severe" (drawn findings only)
    findings_text: str             # FINDINGS section, no header
    impression_text: str           # IMPRESSION section, no header
    chexpert: dict[str, float]     # CHEXPERT_OBSERVATIONS -> 1.0 / 0.0 / -1.0 / nan (labeler rules)
    nih: tuple[str, ...]           # NIH_LABELS present ("No Finding" when empty)
    view: str                      # "PA" | "AP" | "LATERAL" (laterals are not drawn as lesions)
    sex: str                       # "M" | "F"
    age: int
    meta: dict = field(default_factory=dict)  # extra per-case facts (e.g. covid class)

    @property
    def drawn(self) -> set[str]:
        """Findings actually drawn in the pixels."""
        return {f for f, m in self.mentions.items() if m in ("positive", "uncertain")}

    def mask_of(self, *findings: str) -> np.ndarray:
        """Union of the masks of the lesions of the given findings (all lesions if none given)."""
        out = np.zeros(self.image.shape, dtype=bool)
        for lesion in self.lesions:
            if not findings or lesion.finding in findings:
                out |= lesion.mask
        return out
