"""Finding profiles: how often each finding is drawn for each synthetic dataset.

Prevalences loosely follow the real datasets (see ``/work/shared/reference/datasets.md``):
MIMIC-CXR and CheXpert are inpatient-heavy (many AP films, support devices, the five competition
findings at 15-30%); RSNA has ~30% "Lung Opacity" (pneumonia) cases, often with two boxes; SIIM
~25% pneumothorax; Object-CXR half the images with 1-4 foreign objects (and, as the challenge
annotated only objects within the lung field and no support devices, objects elsewhere and devices
drawn unannotated: see ``write_object_cxr``); COVIDx three classes;
NIH every one of its 14 labels at >= ~5% so that small splits still have positives; IU X-ray is
mostly normal outpatient PA films. Drawn findings are correlated a little (see
:data:`CORRELATIONS`), as in real populations.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from bench.data.synth.case import FINDINGS


@dataclass(frozen=True)
class CaseClass:
    """A case-level class drawn before the findings (COVIDx: normal / pneumonia / COVID-19)."""

    name: str
    weight: float
    require: frozenset[str] = frozenset()  # findings always drawn in this class
    forbid: frozenset[str] = frozenset()   # findings never drawn in this class


@dataclass(frozen=True)
class FindingProfile:
    """Sampling parameters of one synthetic dataset. Treat the mappings as read-only."""

    name: str
    prevalence: Mapping[str, float]        # finding -> probability of being drawn (before correlations)
    max_findings: int = 4                  # at most this many findings per case (required ones kept)
    uncertain_rate: float = 0.12           # share of drawn findings the report hedges ("possible ...")
    negation_rate: float = 0.5             # how readily the report denies undrawn findings
    views: Mapping[str, float] = field(default_factory=lambda: {"PA": 0.6, "AP": 0.4})
    severity_weights: tuple[float, float, float] = (0.4, 0.37, 0.23)  # mild, moderate, severe
    #: finding -> (min, max) number of lesions (nodules, RSNA's two pneumonia boxes, objects)
    lesion_counts: Mapping[str, tuple[int, int]] = field(default_factory=lambda: {"nodule": (1, 3)})
    pneumonia_rate: float = 0.35           # share of consolidations the report calls pneumonia
    cardiomediastinum_rate: float = 0.3    # share of cardiomegaly reports that also call the
    #                                        cardiomediastinal silhouette enlarged
    female_rate: float = 0.47
    classes: tuple[CaseClass, ...] = ()    # optional case-level classes
    class_key: str = ""                    # DrawnCase.meta key that stores the class name
    require: frozenset[str] = frozenset()  # findings every case draws (see :meth:`forcing`)
    forbid: frozenset[str] = frozenset()   # findings no case draws

    def __post_init__(self) -> None:
        unknown = (set(self.prevalence) | set(self.lesion_counts) | self.require | self.forbid) - set(FINDINGS)
        for c in self.classes:
            unknown |= (c.require | c.forbid) - set(FINDINGS)
        if unknown:
            raise ValueError(f"profile {self.name!r}: unknown findings {sorted(unknown)}")
        if self.require & self.forbid:
            raise ValueError(f"profile {self.name!r}: findings both required and forbidden")
        if self.classes and not self.class_key:
            raise ValueError(f"profile {self.name!r}: classes need a class_key")
        if not all(v in ("PA", "AP", "LATERAL") for v in self.views):
            raise ValueError(f"profile {self.name!r}: unknown view in {dict(self.views)}")

    def forcing(self, present: Iterable[str] = (), absent: Iterable[str] = ()) -> FindingProfile:
        """This profile with some findings always drawn and others never (e.g. balanced sets for a
        learnability check, or single-finding cases for CheXpert 5x200)."""
        present, absent = frozenset(present), frozenset(absent)
        return replace(self, require=(self.require - absent) | present, forbid=(self.forbid - present) | absent)

    def frontal(self) -> FindingProfile:
        """This profile without lateral views."""
        views = {v: p for v, p in self.views.items() if v != "LATERAL"}
        return replace(self, views=views)


#: (earlier finding, later finding) -> multiplier of the later finding's probability when the
#: earlier one was drawn. Heart failure links cardiomegaly, edema and effusions; effusions cause
#: compressive atelectasis; sick (edematous) patients have more lines and tubes.
CORRELATIONS: Mapping[tuple[str, str], float] = {
    ("cardiomegaly", "edema"): 2.2,
    ("cardiomegaly", "effusion"): 1.5,
    ("edema", "effusion"): 1.8,
    ("effusion", "atelectasis"): 1.6,
    ("consolidation", "effusion"): 1.3,
    ("edema", "support_devices"): 1.5,
}
#: Order in which findings are sampled, so that correlations flow from cause to consequence.
SAMPLING_ORDER: tuple[str, ...] = (
    "cardiomegaly", "consolidation", "edema", "effusion", "atelectasis", "support_devices",
) + tuple(f for f in FINDINGS if f not in
          ("cardiomegaly", "consolidation", "edema", "effusion", "atelectasis", "support_devices"))

_LUNG_OPACITIES = frozenset({"consolidation", "covid", "edema", "atelectasis", "infiltration", "nodule", "mass",
                             "fibrosis"})

PROFILES: dict[str, FindingProfile] = {
    "mimic": FindingProfile(
        name="mimic",
        prevalence={"consolidation": 0.15, "effusion": 0.19, "pneumothorax": 0.05, "cardiomegaly": 0.2,
                    "edema": 0.15, "atelectasis": 0.2, "nodule": 0.05, "mass": 0.02, "infiltration": 0.04,
                    "emphysema": 0.03, "fibrosis": 0.02, "pleural_thickening": 0.03, "hernia": 0.015,
                    "support_devices": 0.3, "foreign_object": 0.02},
        max_findings=5, uncertain_rate=0.12, negation_rate=0.55,
        views={"AP": 0.52, "PA": 0.33, "LATERAL": 0.15},
    ),
    "chexpert": FindingProfile(
        name="chexpert",
        prevalence={"consolidation": 0.15, "effusion": 0.19, "pneumothorax": 0.07, "cardiomegaly": 0.18,
                    "edema": 0.18, "atelectasis": 0.2, "nodule": 0.04, "mass": 0.02, "infiltration": 0.03,
                    "emphysema": 0.02, "fibrosis": 0.02, "pleural_thickening": 0.03, "hernia": 0.01,
                    "support_devices": 0.45, "foreign_object": 0.02},
        max_findings=5, uncertain_rate=0.18, negation_rate=0.5,
        views={"AP": 0.62, "PA": 0.22, "LATERAL": 0.16},
    ),
    "rsna": FindingProfile(
        name="rsna",
        prevalence={"consolidation": 0.30, "effusion": 0.07, "atelectasis": 0.07, "cardiomegaly": 0.07,
                    "edema": 0.03, "nodule": 0.03, "mass": 0.01, "infiltration": 0.02, "emphysema": 0.02,
                    "pleural_thickening": 0.02, "support_devices": 0.1, "pneumothorax": 0.01},
        max_findings=3, uncertain_rate=0.08, negation_rate=0.5, pneumonia_rate=0.7,
        views={"PA": 0.55, "AP": 0.45},
        lesion_counts={"consolidation": (1, 2), "nodule": (1, 2)},
    ),
    "siim": FindingProfile(
        name="siim",
        prevalence={"pneumothorax": 0.25, "support_devices": 0.15, "effusion": 0.06, "atelectasis": 0.06,
                    "cardiomegaly": 0.05, "consolidation": 0.04, "emphysema": 0.04, "nodule": 0.02,
                    "pleural_thickening": 0.02},
        max_findings=3, uncertain_rate=0.06, negation_rate=0.5,
        views={"PA": 0.6, "AP": 0.4},
    ),
    "covidx": FindingProfile(
        name="covidx",
        prevalence={"cardiomegaly": 0.05, "support_devices": 0.08, "effusion": 0.04, "atelectasis": 0.03},
        max_findings=3, uncertain_rate=0.05, negation_rate=0.5, pneumonia_rate=0.5,
        views={"AP": 0.5, "PA": 0.5},
        classes=(
            CaseClass("normal", 0.35, forbid=_LUNG_OPACITIES | {"effusion", "cardiomegaly", "pneumothorax"}),
            CaseClass("pneumonia", 0.25, require=frozenset({"consolidation"}), forbid=frozenset({"covid"})),
            CaseClass("COVID-19", 0.40, require=frozenset({"covid"}), forbid=frozenset({"consolidation"})),
        ),
        class_key="covidx_class",
    ),
    "object_cxr": FindingProfile(
        name="object_cxr",
        prevalence={"foreign_object": 0.5, "support_devices": 0.12, "cardiomegaly": 0.06, "effusion": 0.05,
                    "atelectasis": 0.04, "consolidation": 0.04, "nodule": 0.03, "pleural_thickening": 0.02},
        max_findings=3, uncertain_rate=0.08, negation_rate=0.5,
        views={"PA": 1.0}, lesion_counts={"foreign_object": (1, 4), "nodule": (1, 2)},
    ),
    "nih": FindingProfile(
        name="nih",
        prevalence={"atelectasis": 0.10, "cardiomegaly": 0.07, "effusion": 0.11, "infiltration": 0.12,
                    "mass": 0.07, "nodule": 0.08, "consolidation": 0.13, "pneumothorax": 0.07, "edema": 0.06,
                    "emphysema": 0.07, "fibrosis": 0.07, "pleural_thickening": 0.07, "hernia": 0.06,
                    "support_devices": 0.05},
        max_findings=4, uncertain_rate=0.05, negation_rate=0.45, pneumonia_rate=0.75,
        views={"PA": 0.6, "AP": 0.4},
    ),
    "iu_xray": FindingProfile(
        name="iu_xray",
        prevalence={"cardiomegaly": 0.1, "atelectasis": 0.08, "effusion": 0.05, "consolidation": 0.04,
                    "nodule": 0.04, "emphysema": 0.04, "fibrosis": 0.03, "pleural_thickening": 0.03,
                    "edema": 0.03, "hernia": 0.02, "infiltration": 0.02, "pneumothorax": 0.01, "mass": 0.01,
                    "support_devices": 0.02, "foreign_object": 0.01},
        max_findings=3, uncertain_rate=0.08, negation_rate=0.7,
        views={"PA": 1.0},
    ),
}
