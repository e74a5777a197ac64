"""One synthetic case: sample findings from a profile, draw them, write the report, label it.

Everything is driven by the ``rng`` argument (no global random state), in a fixed order, so one
seed gives the same case bit for bit. Typical use::

    rng = np.random.default_rng(seed)
    case = sample_case(rng, PROFILES["mimic"], 256, 256)
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from bench.data.synth.anatomy import Anatomy, draw_anatomy, render, to_uint8
from bench.data.synth.case import DrawnCase, Lesion
from bench.data.synth.findings import SEVERITIES, FindingPlan, draw_findings, plan_finding
from bench.data.synth.profiles import CORRELATIONS, SAMPLING_ORDER, CaseClass, FindingProfile
from bench.data.synth.reports import chexpert_labels, nih_labels, write_report

log = logging.getLogger(__name__)

VIEWS = ("PA", "AP", "LATERAL")
#: Bump whenever the same seed and profile would draw a different case (pixels, text or labels):
#: cached synthetic corpora are keyed by it.
GENERATOR_VERSION = 2


def _choose(rng: np.random.Generator, weights: dict) -> str:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_class(rng: np.random.Generator, profile: FindingProfile) -> CaseClass | None:
    """The case-level class (COVIDx), or None for profiles without classes."""
    if not profile.classes:
        return None
    weights = np.asarray([c.weight for c in profile.classes], dtype=np.float64)
    return profile.classes[int(rng.choice(len(weights), p=weights / weights.sum()))]


def sample_findings(rng: np.random.Generator, profile: FindingProfile, case_class: CaseClass | None = None) -> list[str]:
    """Which findings to draw: independent draws in :data:`SAMPLING_ORDER` with probabilities
    raised by :data:`CORRELATIONS`, required ones always, forbidden ones never, and at most
    ``max_findings`` (dropping random optional ones)."""
    require = set(profile.require) | (set(case_class.require) if case_class else set())
    forbid = (set(profile.forbid) | (set(case_class.forbid) if case_class else set())) - require
    chosen: list[str] = []
    for finding in SAMPLING_ORDER:
        u = rng.random()  # always consumed, so forcing one finding does not reshuffle the others
        if finding in require:
            chosen.append(finding)
            continue
        if finding in forbid:
            continue
        p = profile.prevalence.get(finding, 0.0)
        for earlier in chosen:
            p *= CORRELATIONS.get((earlier, finding), 1.0)
        if u < min(p, 0.95):
            chosen.append(finding)
    optional = [f for f in chosen if f not in require]
    excess = len(chosen) - max(profile.max_findings, len(require))
    if excess > 0:
        drop = set(rng.choice(optional, size=excess, replace=False).tolist())
        chosen = [f for f in chosen if f not in drop]
    return chosen


def plan_findings(rng: np.random.Generator, profile: FindingProfile, findings: list[str]) -> list[FindingPlan]:
    """Severity, zones and lesion counts of the chosen findings."""
    plans = []
    for finding in findings:
        severity = SEVERITIES[int(rng.choice(3, p=np.asarray(profile.severity_weights) / sum(profile.severity_weights)))]
        low, high = profile.lesion_counts.get(finding, (1, 1))
        count = int(rng.integers(low, high + 1))
        plans.append(plan_finding(rng, finding, severity, count))
    return plans


def _as_drawn(plans: list[FindingPlan], lesions: list[Lesion]) -> list[FindingPlan]:
    """Plans restricted to what the drawing actually produced (a lesion can come out empty on a
    tiny canvas and is then skipped): the report must describe the pixels' ground truth."""
    out = []
    for plan in plans:
        zones = tuple(l.zone for l in lesions if l.finding == plan.finding)
        if not zones:
            continue
        if plan.kinds:  # devices / objects: one lesion per kind, in order
            out.append(FindingPlan(plan.finding, plan.severity, zones, plan.kinds[: len(zones)]))
        elif plan.zones == ("bilateral",) or plan.zones == ("mediastinum",):
            out.append(plan)
        else:
            out.append(FindingPlan(plan.finding, plan.severity, tuple(dict.fromkeys(zones))))
    return out


def cardiothoracic_ratio(anatomy: Anatomy) -> float:
    """Widest heart span over widest lung span (pixels), as a radiologist would measure it."""
    heart_cols = np.flatnonzero(anatomy.heart.any(axis=0))
    lung_cols = np.flatnonzero(anatomy.lung.any(axis=0))
    if len(heart_cols) == 0 or len(lung_cols) == 0:
        return float("nan")
    return float((heart_cols[-1] - heart_cols[0] + 1) / (lung_cols[-1] - lung_cols[0] + 1))


def sample_case(rng: np.random.Generator, profile: FindingProfile, height: int, width: int,
                view: str | None = None) -> DrawnCase:
    """Draw one case of ``profile`` on an ``height`` x ``width`` canvas.

    ``view`` ("PA", "AP", "LATERAL") overrides the profile's view mix. A lateral gets its findings
    and report sampled like a frontal film (the study's report) but no lesions drawn.
    """
    view = view or _choose(rng, dict(profile.views))
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    sex = "F" if rng.random() < profile.female_rate else "M"
    age = int(np.clip(round(rng.normal(61, 17)), 18, 95))
    case_class = sample_class(rng, profile)
    plans = plan_findings(rng, profile, sample_findings(rng, profile, case_class))

    density, anatomy = draw_anatomy(rng, height, width, view, sex)
    lesions = [] if view == "LATERAL" else draw_findings(rng, density, anatomy, plans)
    image = to_uint8(render(density, anatomy, rng))
    if view != "LATERAL":
        plans = _as_drawn(plans, lesions)

    report = write_report(rng, plans, profile, view)
    meta = {
        "profile": profile.name,
        "plans": [{"finding": p.finding, "severity": p.severity, "zones": list(p.zones), "kinds": list(p.kinds)}
                  for p in plans],
    }
    if view != "LATERAL":
        meta["cardiothoracic_ratio"] = round(cardiothoracic_ratio(anatomy), 4)
    if case_class is not None:
        meta[profile.class_key] = case_class.name
    return DrawnCase(
        image=image, lesions=lesions, mentions=report.mentions,
        severity={p.finding: p.severity for p in plans},
        findings_text=report.findings, impression_text=report.impression,
        chexpert=chexpert_labels(report.terms), nih=nih_labels(report.terms),
        view=view, sex=sex, age=age, meta=meta,
    )


def lateral_of(rng: np.random.Generator, case: DrawnCase, height: int | None = None,
               width: int | None = None) -> DrawnCase:
    """The lateral film of the same study as frontal ``case``: same patient, report and labels,
    a lateral image and no lesions (IU X-ray pairs, MIMIC studies with two views)."""
    h, w = height or case.image.shape[0], width or case.image.shape[1]
    density, anatomy = draw_anatomy(rng, h, w, "LATERAL", case.sex)
    image = to_uint8(render(density, anatomy, rng))
    meta = {k: v for k, v in case.meta.items() if k != "cardiothoracic_ratio"}
    return DrawnCase(
        image=image, lesions=[], mentions=dict(case.mentions), severity=dict(case.severity),
        findings_text=case.findings_text, impression_text=case.impression_text,
        chexpert=dict(case.chexpert), nih=tuple(case.nih), view="LATERAL", sex=case.sex, age=case.age, meta=meta,
    )


def draw_until(draw: Callable[[], DrawnCase], test: Callable[[DrawnCase], bool] | None,
               tries: int = 200, what: str = "", initial: DrawnCase | None = None) -> DrawnCase:
    """``draw()`` until ``test`` holds: at most ``tries`` cases are examined, ``initial`` (when
    given) being the first, and the last one is kept if none passes.

    The writers use it for the fixture's quirk slots (a CheXpert row with a -1.0 label, an RSNA
    patient with two boxes...), so that each format quirk is in the files whatever the
    prevalences. ``test=None`` draws once.
    """
    case = draw() if initial is None else initial
    for _ in range(tries - 1):
        if test is None or test(case):
            return case
        case = draw()
    if test is not None and not test(case):
        log.warning("synthetic writer: could not draw the quirk case %s in %d tries", what, tries)
    return case
