"""Radiology reports written from what was drawn, and a CheXpert-like labeler that reads them back.

The writer (:func:`write_report`) turns the finding plans of a case into MIMIC-style FINDINGS and
IMPRESSION sections: varied templates and synonyms, location ("right lower lobe", "at the left
base", "bibasilar"), severity ("small", "moderate", "large"), uncertainty for some drawn findings
("possible", "may represent", "cannot be excluded") and explicit negation of some undrawn ones
("No pneumothorax."). It never looks at pixels, so a text encoder that learns from the reports
learns exactly what was drawn.

Every sentence is built together with the *terms* it asserts and their state
(positive / uncertain / negative). Terms are the FINDINGS names plus ``pneumonia`` (the report
calls a consolidation or ground glass pneumonia), ``enlarged_cardiomediastinum`` and ``fracture``.
Labels are computed from the terms:

* :func:`chexpert_labels`: the 14 CheXpert observations with the labeler's values (1.0 positive,
  -1.0 uncertain, 0.0 negated, nan unmentioned; a positive mention wins over an uncertain one,
  which wins over a negation). Our choices, following the CheXpert label hierarchy:
  Lung Opacity is the strongest positive/uncertain state of the terms the CheXpert labeler's own
  opacity mention list covers (infiltrate, ground glass, reticular/fibrotic opacity; negated ones
  leave it unmentioned). Like the real labeler, consolidation, edema and atelectasis do *not* set
  it: the hierarchy is applied at evaluation time, not in the labels, and the CheXpert 5x200 rule
  (one competition finding positive, Lung Opacity 0) depends on that. Lung Lesion comes from nodule and mass; Pleural Other from pleural
  thickening; Pneumonia only when the text says "pneumonia"; Enlarged Cardiomediastinum only when
  the text describes the cardiomediastinal silhouette (some cardiomegaly reports do, and some
  normal reports negate it); Fracture is only ever negated. No Finding is 1.0 iff no term other
  than support devices and external foreign objects is positive or uncertain (the CheXpert rule
  extended to findings CheXpert does not label, such as emphysema), else nan.
* :func:`nih_labels`: NIH ChestX-ray14 labels for *positive* mentions only (the NIH mining
  discarded uncertain and negated mentions); ``("No Finding",)`` when none.

:func:`terms_from_text` is an independent NegEx-style reader of the report text (keywords,
negation and uncertainty cues with their scope, and whole-phrase normal statements such as "heart
size is normal"). The tests check, on thousands of reports, that it recovers exactly the terms the
writer recorded, so the stored labels are the labels of the text.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from bench.data.synth.case import CHEXPERT_OBSERVATIONS, FINDINGS, NIH_LABELS
from bench.data.synth.findings import FindingPlan

if TYPE_CHECKING:
    from bench.data.synth.profiles import FindingProfile

POSITIVE, UNCERTAIN, NEGATIVE = "positive", "uncertain", "negative"
_RANK = {NEGATIVE: 0, UNCERTAIN: 1, POSITIVE: 2}

#: Every term the reports can assert or deny.
TERMS: tuple[str, ...] = FINDINGS + ("pneumonia", "enlarged_cardiomediastinum", "fracture")

#: Terms that do not count as pathology for "No Finding".
_NOT_PATHOLOGY = frozenset({"support_devices", "foreign_object"})


def merge_state(old: str | None, new: str) -> str:
    """CheXpert aggregation: positive beats uncertain beats negative."""
    return new if old is None or _RANK[new] > _RANK[old] else old


def _record(terms: dict[str, str], updates: Mapping[str, str]) -> None:
    for term, state in updates.items():
        terms[term] = merge_state(terms.get(term), state)


# ---------------------------------------------------------------------------------------------
# Labels from terms
# ---------------------------------------------------------------------------------------------

_CHEXPERT_SOURCES: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("cardiomegaly",),
    "Consolidation": ("consolidation",),
    "Edema": ("edema",),
    "Enlarged Cardiomediastinum": ("enlarged_cardiomediastinum",),
    "Fracture": ("fracture",),
    "Lung Lesion": ("nodule", "mass"),
    "Pleural Effusion": ("effusion",),
    "Pleural Other": ("pleural_thickening",),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",),
    "Support Devices": ("support_devices",),
}
#: Terms whose mentions the CheXpert labeler files under Lung Opacity (its "opacity", "infiltrate",
#: "ground glass" phrases). Consolidation, edema and atelectasis have observations of their own.
LUNG_OPACITY_CHILDREN: tuple[str, ...] = ("covid", "infiltration", "fibrosis")
_STATE_VALUE = {POSITIVE: 1.0, UNCERTAIN: -1.0, NEGATIVE: 0.0}

_NIH_SOURCES: dict[str, str] = {
    "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "effusion",
    "Infiltration": "infiltration", "Mass": "mass", "Nodule": "nodule", "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax", "Consolidation": "consolidation", "Edema": "edema",
    "Emphysema": "emphysema", "Fibrosis": "fibrosis", "Pleural_Thickening": "pleural_thickening",
    "Hernia": "hernia",
}
assert set(_NIH_SOURCES) == set(NIH_LABELS)


def _strongest(terms: Mapping[str, str], sources: Iterable[str], *, affirmed_only: bool = False) -> float:
    best = None
    for term in sources:
        state = terms.get(term)
        if state is None or (affirmed_only and state == NEGATIVE):
            continue
        best = merge_state(best, state)
    return math.nan if best is None else _STATE_VALUE[best]


def chexpert_labels(terms: Mapping[str, str]) -> dict[str, float]:
    """The 14 CheXpert observations (in CHEXPERT_OBSERVATIONS order) from report terms."""
    out = {}
    for obs in CHEXPERT_OBSERVATIONS:
        if obs == "Lung Opacity":
            out[obs] = _strongest(terms, LUNG_OPACITY_CHILDREN, affirmed_only=True)
        elif obs == "No Finding":
            sick = any(s != NEGATIVE for t, s in terms.items() if t not in _NOT_PATHOLOGY)
            out[obs] = math.nan if sick else 1.0
        else:
            out[obs] = _strongest(terms, _CHEXPERT_SOURCES[obs])
    return out


def nih_labels(terms: Mapping[str, str]) -> tuple[str, ...]:
    """NIH ChestX-ray14 labels (NIH_LABELS order) of the positively mentioned terms."""
    labels = tuple(name for name in NIH_LABELS if terms.get(_NIH_SOURCES[name]) == POSITIVE)
    return labels or ("No Finding",)


def mentions_of(terms: Mapping[str, str]) -> dict[str, str]:
    """The FINDINGS part of the terms (DrawnCase.mentions)."""
    return {f: terms[f] for f in FINDINGS if f in terms}


# ---------------------------------------------------------------------------------------------
# Reading a report back (NegEx-style)
# ---------------------------------------------------------------------------------------------

def _rx(*patterns: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


#: Keyword patterns of each term (lower-case text).
KEYWORDS: dict[str, re.Pattern] = {
    "consolidation": _rx(r"\bconsolidat\w*", r"\bair-?space disease"),
    "effusion": _rx(r"\beffusions?\b", r"\bpleural fluid\b", r"\bblunting\b"),
    "pneumothorax": _rx(r"\bpneumothora(?:x|ces)\b"),
    "cardiomegaly": _rx(r"\bcardiomegaly\b",
                        r"\benlarge(?:d|ment of the) (?:heart|cardiac silhouette)\b",
                        r"\b(?:heart|cardiac silhouette)(?: size)? (?:is|appears|may be) (?:\w+ )?enlarged\b"),
    "edema": _rx(r"\bedema\b", r"\bvascular congestion\b"),
    "atelectasis": _rx(r"\batelecta\w*", r"\bcollapse\b"),
    "nodule": _rx(r"\bnodul\w*"),
    "mass": _rx(r"\bmass(?:es|like|-like)?\b"),
    "covid": _rx(r"\bground[- ]glass\b", r"\bcovid\b"),
    "infiltration": _rx(r"\binfiltrat\w*"),
    "emphysema": _rx(r"\bemphysem\w*", r"\bhyperinflat\w*"),
    "fibrosis": _rx(r"\bfibros[ie]s\b", r"\bfibrotic\b", r"\breticular\b"),
    "pleural_thickening": _rx(r"\bpleural thickening\b", r"\bthickened pleura\b"),
    "hernia": _rx(r"\bhernia\b"),
    "support_devices": _rx(r"\btubes?\b", r"\bcatheters?\b", r"\bcentral (?:venous )?lines?\b",
                           r"\bleads\b", r"\bsupport devices\b"),
    "foreign_object": _rx(r"\bforeign (?:bod(?:y|ies)|objects?)\b"),
    "pneumonia": _rx(r"\bpneumoni\w*"),
    "enlarged_cardiomediastinum": _rx(
        r"\bcardiomediastinal silhouette (?:is|appears) (?:\w+ )?(?:enlarged|widened)\b",
        r"\benlarged cardiomediastinal silhouette\b", r"\bwidened mediastinum\b"),
    "fracture": _rx(r"\bfractures?\b"),
}
assert set(KEYWORDS) == set(TERMS)

#: Whole phrases stating normality: they deny the listed terms and are removed before the
#: keyword pass (so "heart size is normal" is not read as a mention of an enlarged heart).
NORMAL_STATEMENTS: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = (
    (_rx(r"\bcardiomediastinal silhouette is (?:normal|within normal limits|unremarkable)\b",
         r"\bnormal cardiomediastinal silhouette\b"), ("cardiomegaly", "enlarged_cardiomediastinum")),
    (_rx(r"\bheart size is normal\b", r"\bnormal heart size\b", r"\bheart is normal in size\b",
         r"\bheart is not enlarged\b", r"\bcardiac silhouette is (?:normal|within normal limits)\b"),
     ("cardiomegaly",)),
    (_rx(r"\bmediastinal (?:and hilar )?contours are (?:normal|unremarkable)\b"), ("enlarged_cardiomediastinum",)),
    (_rx(r"\bcostophrenic angles are sharp\b"), ("effusion",)),
)

_NEGATION_BEFORE = _rx(r"\bno\b", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b")
_NEGATION_AFTER = _rx(r"\bnot (?:seen|identified)\b", r"\bis absent\b")
_UNCERTAIN_BEFORE = _rx(r"\bpossibl[ey]\b", r"\bquestionable\b", r"\bmay (?:represent|reflect|be)\b",
                        r"\bcould represent\b", r"\bconcerning for\b", r"\bsuspicious for\b",
                        r"\bcannot exclude\b", r"\bcannot rule out\b")
_UNCERTAIN_AFTER = _rx(r"\bcannot be excluded\b", r"\bis not excluded\b", r"\b(?:is|are) possible\b")
_SENTENCE_END = re.compile(r"\.(?:\s+|$)|\n+")
_CLAUSE_BREAK = re.compile(r";|\bbut\b")


def _clause_terms(clause: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pattern, denied in NORMAL_STATEMENTS:
        if pattern.search(clause):
            _record(out, {t: NEGATIVE for t in denied})
            clause = pattern.sub(lambda m: " " * len(m.group(0)), clause)
    neg_before = [m.start() for m in _NEGATION_BEFORE.finditer(clause)]
    neg_after = [m.start() for m in _NEGATION_AFTER.finditer(clause)]
    unc_before = [m.start() for m in _UNCERTAIN_BEFORE.finditer(clause)]
    unc_after = [m.start() for m in _UNCERTAIN_AFTER.finditer(clause)]
    for term, pattern in KEYWORDS.items():
        for m in pattern.finditer(clause):
            if any(p < m.start() for p in neg_before) or any(p >= m.end() for p in neg_after):
                state = NEGATIVE
            elif any(p < m.end() for p in unc_before) or any(p >= m.end() for p in unc_after):
                state = UNCERTAIN
            else:
                state = POSITIVE
            _record(out, {term: state})
    return out


def terms_from_text(text: str) -> dict[str, str]:
    """Read the asserted terms back from report text: keyword, negation and uncertainty cues,
    scoped to the clause (a cue before a keyword covers it, a trailing cue covers what precedes)."""
    terms: dict[str, str] = {}
    for sentence in _SENTENCE_END.split(text.lower()):
        for clause in _CLAUSE_BREAK.split(sentence):
            _record(terms, _clause_terms(clause))
    return terms


def label_report(text: str) -> tuple[dict[str, float], tuple[str, ...]]:
    """CheXpert and NIH labels of a report text, via :func:`terms_from_text`."""
    terms = terms_from_text(text)
    return chexpert_labels(terms), nih_labels(terms)


# ---------------------------------------------------------------------------------------------
# Phrase banks
# ---------------------------------------------------------------------------------------------

#: zone -> (adjectival form, prepositional form) synonyms. No keyword of any term may appear here.
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "right upper": (("right upper lobe", "in the right upper lobe"), ("right apical", "at the right apex"),
                    ("right upper zone", "in the right upper zone")),
    "right middle": (("right middle lobe", "in the right middle lobe"), ("right mid lung", "in the right mid lung"),
                     ("right perihilar", "in the right perihilar region")),
    "right lower": (("right lower lobe", "in the right lower lobe"), ("right basilar", "at the right base"),
                    ("right base", "at the right lung base"), ("right infrahilar", "in the right infrahilar region")),
    "left upper": (("left upper lobe", "in the left upper lobe"), ("left apical", "at the left apex"),
                   ("left upper zone", "in the left upper zone")),
    "left middle": (("lingular", "in the lingula"), ("left mid lung", "in the left mid lung"),
                    ("left perihilar", "in the left perihilar region")),
    "left lower": (("left lower lobe", "in the left lower lobe"), ("left basilar", "at the left base"),
                   ("left retrocardiac", "in the left retrocardiac region"), ("left base", "at the left lung base")),
}
_BILATERAL_LEVEL = {
    "upper": ("bilateral upper lobe", "in both upper lobes"),
    "middle": ("bilateral mid lung", "in both mid lungs"),
    "lower": ("bibasilar", "at both lung bases"),
}

#: finding -> severity -> adjectives ("" = no adjective).
SEVERITY_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "consolidation": {"mild": ("small", "subtle", "patchy"), "moderate": ("", "moderate", "confluent"),
                      "severe": ("extensive", "dense", "large")},
    "effusion": {"mild": ("small", "trace", "small"), "moderate": ("moderate", "moderate-sized"),
                 "severe": ("large", "large-sized")},
    "pneumothorax": {"mild": ("small", "tiny"), "moderate": ("moderate", "moderate-sized"),
                     "severe": ("large",)},
    "cardiomegaly": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked")},
    "edema": {"mild": ("mild", "minimal"), "moderate": ("moderate",), "severe": ("severe", "marked")},
    "atelectasis": {"mild": ("minimal", "mild", ""), "moderate": ("", "moderate"), "severe": ("", "complete")},
    "nodule": {"mild": ("small", "6 mm"), "moderate": ("", "9 mm"), "severe": ("12 mm", "large")},
    "mass": {"mild": ("",), "moderate": ("large",), "severe": ("large lobulated", "large")},
    "covid": {"mild": ("mild", "subtle"), "moderate": ("multifocal", "moderate"), "severe": ("extensive", "diffuse")},
    "infiltration": {"mild": ("subtle", "mild"), "moderate": ("", "patchy"), "severe": ("extensive", "diffuse")},
    "emphysema": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "advanced")},
    "fibrosis": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("advanced", "severe")},
    "pleural_thickening": {"mild": ("mild", "minimal"), "moderate": ("moderate",), "severe": ("marked",)},
    "hernia": {"mild": ("small",), "moderate": ("moderate-sized", "moderate"), "severe": ("large",)},
}
_ADVERB = {"mild": ("mildly",), "moderate": ("moderately",), "severe": ("severely", "markedly")}

# Noun-phrase templates per finding: (template, grammatical number): "u" uncountable, "c" countable
# singular (takes "a"), "p" plural. Placeholders: {sev} severity adjective, {loc} adjectival
# location, {at} prepositional location, {side} right / left / bilateral, {s} plural suffix of a
# bilateral pleural finding (whose number then becomes plural), {where} apical / lateral.
NOUN_PHRASES: dict[str, tuple[tuple[str, str], ...]] = {
    "consolidation": (("{sev} {loc} consolidation", "u"), ("{sev} consolidation {at}", "u"),
                      ("{sev} {loc} airspace consolidation", "u"), ("{sev} airspace disease {at}", "u"),
                      ("{sev} focal consolidation {at}", "u")),
    "effusion": (("{sev} {side} pleural effusion{s}", "c"), ("{sev} {side} effusion{s}", "c"),
                 ("{sev} {side}-sided pleural effusion{s}", "c")),
    "pneumothorax": (("{sev} {side} pneumothorax", "c"), ("{sev} {side} apical pneumothorax", "c"),
                     ("{sev} {side}-sided pneumothorax", "c")),
    "cardiomegaly": (("{sev} cardiomegaly", "u"), ("{sev} enlargement of the cardiac silhouette", "u")),
    "edema": (("{sev} pulmonary edema", "u"), ("{sev} interstitial pulmonary edema", "u"),
              ("{sev} interstitial edema", "u"), ("{sev} perihilar edema", "u")),
    # atelectasis: see ATELECTASIS_PHRASES (its wording follows the drawn pattern)
    "nodule": (("{sev} nodule {at}", "c"), ("{sev} {loc} pulmonary nodule", "c"),
               ("{sev} nodular opacity {at}", "c")),
    "mass": (("{sev} {loc} mass", "c"), ("{sev} mass {at}", "c"), ("{sev} masslike opacity {at}", "c")),
    "covid": (("{sev} bilateral peripheral ground-glass opacities", "p"),
              ("{sev} patchy ground glass opacities with peripheral and basilar predominance", "p"),
              ("{sev} peripheral ground-glass opacities in both lower lungs", "p")),
    "infiltration": (("{sev} {loc} infiltrate", "c"), ("{sev} patchy infiltrates {at}", "p"),
                     ("{sev} ill-defined infiltrative opacity {at}", "c")),
    "emphysema": (("{sev} emphysema", "u"), ("{sev} emphysematous changes", "p"), ("{sev} hyperinflation", "u")),
    "fibrosis": (("{sev} bibasilar reticular opacities", "p"), ("{sev} pulmonary fibrosis", "u"),
                 ("{sev} fibrotic changes at both lung bases", "p")),
    "pleural_thickening": (("{sev} {side} {where}pleural thickening", "u"),),
    "hernia": (("{sev} hiatal hernia", "c"), ("{sev} retrocardiac hiatal hernia", "c")),
}

#: Atelectasis is described by its pattern, which the drawing chooses by severity: plate-like
#: bands when mild, segmental or lobar collapse of a lower lobe otherwise (upper zones: bands).
ATELECTASIS_PHRASES: dict[str, tuple[tuple[str, str], ...]] = {
    "plate": (("{sev} linear atelectasis {at}", "u"), ("{sev} plate-like atelectasis {at}", "u"),
              ("{sev} subsegmental atelectasis {at}", "u"), ("{sev} {loc} atelectatic changes", "p")),
    "moderate": (("{sev} segmental atelectasis {at}", "u"), ("{sev} {loc} atelectasis", "u")),
    "severe": (("{sev} {loc} collapse", "u"), ("{sev} lobar atelectasis {at}", "u"),
               ("{sev} collapse of the {lobe}", "u")),
}
_LOBES = {"right lower": "right lower lobe", "right middle": "right middle lobe", "left lower": "left lower lobe",
          "left middle": "lingula"}

_POSITIVE_FRAMES = ("{NP}{tail}.", "There {be} {art}{NP}{tail}.", "{NP} {be} noted{tail}.",
                    "{NP} {be} present{tail}.", "{NP} {be} seen{tail}.")
_UNCERTAIN_FRAMES = ("Possible {NP}{tail}.", "Questionable {NP}{tail}.", "There may be {art}{NP}{tail}.",
                     "Cannot exclude {art}{NP}{tail}.", "{NP} cannot be excluded.", "{NP} {be} possible.")
_IMPRESSION_POSITIVE = ("{NP}{tail}.",)
_IMPRESSION_UNCERTAIN = ("Possible {NP}{tail}.", "{NP} cannot be excluded.")

#: Whole sentences for findings that read better that way; {adv} = severity adverb.
_SPECIAL_POSITIVE: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("The heart is {adv} enlarged.", "The cardiac silhouette is {adv} enlarged."),
    "effusion": ("Blunting of the {side} costophrenic angle{s}, consistent with {art}{sev} pleural effusion{s}.",),
    "hernia": ("Retrocardiac air-fluid level, consistent with {art}{sev} hiatal hernia.",),
    "emphysema": ("The lungs are hyperinflated with flattening of the hemidiaphragms, consistent with emphysema.",),
}
_SPECIAL_UNCERTAIN: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("The heart may be {adv} enlarged.",),
    "hernia": ("Retrocardiac air-fluid level may represent {art}{sev} hiatal hernia.",),
}

#: Tails appended to a positive sentence: (text, terms it adds with their own state).
_TAILS: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    "effusion": ((", with blunting of the costophrenic angle", {}), (", layering dependently", {})),
    "pneumothorax": ((", with a visible visceral pleural line", {}), (" without mediastinal shift", {})),
    "edema": ((" with Kerley B lines", {}), (" and perihilar haziness", {}), (" with vascular indistinctness", {})),
    "nodule": ((", recommend CT for further evaluation", {}),),
    "mass": ((", recommend chest CT for further characterization", {}),),
    "emphysema": ((", with flattening of the hemidiaphragms", {}),),
}
_PNEUMONIA_TAILS = {
    POSITIVE: (", consistent with pneumonia", ", compatible with pneumonia", ", in keeping with pneumonia"),
    UNCERTAIN: (", concerning for pneumonia", ", which may represent pneumonia", ", possibly pneumonia",
                ", suspicious for pneumonia"),
}
#: Ground-glass tails by the pneumonia state the case reports (None: not called pneumonia).
_COVID_TAILS: dict[str | None, tuple[tuple[str, dict[str, str]], ...]] = {
    POSITIVE: ((", typical of COVID-19 pneumonia", {"covid": POSITIVE, "pneumonia": POSITIVE}),),
    UNCERTAIN: ((", which may represent COVID-19 pneumonia", {"covid": UNCERTAIN, "pneumonia": UNCERTAIN}),),
    None: ((", compatible with COVID-19 infection", {"covid": POSITIVE}),
           (", concerning for COVID-19 infection", {"covid": UNCERTAIN}), ("", {})),
}

_DEVICE_SENTENCES: dict[str, tuple[str, ...]] = {
    "ett": ("Endotracheal tube terminates {n} cm above the carina.", "The endotracheal tube is in standard position.",
            "ET tube tip is approximately {n} cm above the carina."),
    "rij_line": ("Right internal jugular central venous catheter terminates in the mid SVC.",
                 "A right IJ central line is in place with the tip in the lower SVC.",
                 "Right internal jugular catheter tip projects over the cavoatrial junction."),
    "lsc_line": ("Left subclavian central venous catheter terminates in the SVC.",
                 "A left subclavian central line ends in the lower SVC."),
    "ng_tube": ("Enteric tube courses below the diaphragm with the tip in the stomach.",
                "A nasogastric tube is seen coursing into the stomach.", "The orogastric tube tip is in the stomach."),
    "ecg_leads": ("Monitoring leads overlie the chest.", "External ECG leads project over the thorax.",
                  "Cardiac monitoring leads are noted."),
}
_DEVICE_IMPRESSIONS = ("Support devices in standard position.", "Lines and tubes in appropriate position.",
                       "Tubes and lines as described above.")
_OBJECT_NAMES = {"button": "button", "coin": "coin", "ring": "ring", "clip": "clip", "snap": "snap fastener",
                 "wire": "wire", "pendant": "pendant"}
_NUMBERS = ("a", "two", "three", "four", "five", "six", "seven", "eight")

#: Negatable terms -> list-item phrasings for "No X, Y, or Z." sentences.
_NEGATION_ITEMS: dict[str, tuple[str, ...]] = {
    "pneumothorax": ("pneumothorax",),
    "effusion": ("pleural effusion", "effusion"),
    "consolidation": ("focal consolidation", "consolidation"),
    "edema": ("pulmonary edema", "edema"),
    "pneumonia": ("pneumonia",),
    "nodule": ("suspicious pulmonary nodules", "pulmonary nodules"),
    "mass": ("mass",),
    "fracture": ("acute fracture", "displaced fracture"),
    "atelectasis": ("atelectasis",),
}
_NEGATION_FRAMES = ("No {list}.", "No evidence of {list}.")
_SINGLE_NEGATION_FRAMES = ("{X} is not seen.", "No {x}.", "There is no {x}.")
_HEART_NORMAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Heart size is normal.", ("cardiomegaly",)),
    ("The heart is normal in size.", ("cardiomegaly",)),
    ("The cardiomediastinal silhouette is normal.", ("cardiomegaly", "enlarged_cardiomediastinum")),
    ("Normal cardiomediastinal silhouette.", ("cardiomegaly", "enlarged_cardiomediastinum")),
    ("The cardiomediastinal silhouette is within normal limits.", ("cardiomegaly", "enlarged_cardiomediastinum")),
)
_MEDIASTINUM_NORMAL = ("Mediastinal and hilar contours are unremarkable.", "Mediastinal contours are normal.")
_LUNGS_CLEAR = ("The lungs are clear.", "Lungs are well expanded and clear.", "The lungs are clear bilaterally.",
                "There is no focal airspace opacity.")
_BONES = ("No acute osseous abnormality.", "Osseous structures are intact.", "The visualized bones are unremarkable.")
_NORMAL_IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                       "No acute intrathoracic process.", "Normal chest radiograph.")
_VIEW_SENTENCES = {
    "PA": ("PA and lateral views of the chest provided.", "Frontal and lateral views of the chest were obtained.", ""),
    "AP": ("Portable AP view of the chest.", "Single portable AP upright radiograph of the chest.", ""),
}

#: Order of the FINDINGS paragraph: devices, lungs, pleura, heart and mediastinum, the rest.
_REPORT_ORDER: tuple[str, ...] = (
    "support_devices", "consolidation", "covid", "infiltration", "edema", "atelectasis", "nodule", "mass",
    "fibrosis", "emphysema", "effusion", "pneumothorax", "pleural_thickening", "cardiomegaly", "hernia",
    "foreign_object",
)
assert set(_REPORT_ORDER) == set(FINDINGS)
#: Findings summarised in the IMPRESSION, most important first.
_IMPRESSION_ORDER: tuple[str, ...] = (
    "pneumothorax", "consolidation", "covid", "edema", "effusion", "mass", "nodule", "cardiomegaly",
    "atelectasis", "infiltration", "emphysema", "fibrosis", "hernia", "pleural_thickening",
)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    """The written sections and the terms (with states) they assert."""

    findings: str
    impression: str
    terms: dict[str, str] = field(default_factory=dict)

    @property
    def mentions(self) -> dict[str, str]:
        return mentions_of(self.terms)

    @property
    def text(self) -> str:
        return f"{self.findings} {self.impression}".strip()


@dataclass
class _Sentences:
    """Accumulates sentences and the terms they assert."""

    items: list[str] = field(default_factory=list)
    terms: dict[str, str] = field(default_factory=dict)

    def add(self, text: str, terms: Mapping[str, str] = ()) -> None:
        if text:
            self.items.append(_capitalise(text))
            _record(self.terms, dict(terms))

    def text(self) -> str:
        return " ".join(self.items)


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:] if text else text


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _tidy(text: str) -> str:
    """Collapse the double spaces an empty placeholder leaves, and space before punctuation."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.;])", r"\1", text)


def _article(text: str, number: str) -> str:
    """Indefinite article for a noun phrase of grammatical ``number`` ("u", "c" or "p")."""
    if number != "c":
        return ""
    return "an " if text[:1] in "aeiou" else "a "


def _location(rng, zones: Sequence[str]) -> tuple[str, str]:
    """Adjectival and prepositional location of one or more zones."""
    zones = [z for z in zones if z in LOCATIONS]
    if not zones:
        return "", ""
    if len(zones) == 1:
        return _pick(rng, LOCATIONS[zones[0]])
    levels = {z.split()[1] for z in zones}
    sides = {z.split()[0] for z in zones}
    if len(levels) == 1 and sides == {"right", "left"}:
        return _BILATERAL_LEVEL[levels.pop()]
    adjectives = [LOCATIONS[z][0][0] for z in zones]
    preps = [LOCATIONS[z][0][1] for z in zones]
    return " and ".join(adjectives), " and ".join(preps)


def _side_word(plan: FindingPlan) -> tuple[str, bool]:
    """right / left / bilateral, and whether that makes a pleural finding plural."""
    sides = plan.sides
    if len(sides) == 2:
        return "bilateral", True
    return (sides[0] if sides else "right"), False


def _phrases(plan: FindingPlan) -> tuple[tuple[str, str], ...]:
    if plan.finding != "atelectasis":
        return NOUN_PHRASES[plan.finding]
    if plan.severity == "mild" or any(z.endswith("upper") for z in plan.zones):
        return ATELECTASIS_PHRASES["plate"]
    if plan.severity == "severe" and len(plan.zones) == 1:
        return ATELECTASIS_PHRASES["severe"]
    return ATELECTASIS_PHRASES["moderate"]


def _noun_phrase(rng, plan: FindingPlan) -> tuple[str, str, bool]:
    """(noun phrase, article, plural) describing one drawn finding."""
    loc, at = _location(rng, plan.zones)
    if plan.finding == "nodule" and len(plan.zones) > 1:
        count = _NUMBERS[min(len(plan.zones), len(_NUMBERS)) - 1]
        text = _pick(rng, (f"{count} pulmonary nodules {at}", f"{count} {loc} nodules", f"multiple small nodules {at}"))
        return _tidy(text), "", True
    template, number = _pick(rng, _phrases(plan))
    side, bilateral = _side_word(plan)
    if bilateral and "{s}" in template:
        number = "p"
    where = ""
    if plan.finding == "pleural_thickening":
        where = "apical " if all(z.endswith("upper") for z in plan.zones) else _pick(rng, ("lateral ", ""))
    sev = _pick(rng, SEVERITY_WORDS[plan.finding][plan.severity])
    lobe = _LOBES.get(plan.zones[0], "lower lobe") if plan.zones else "lower lobe"
    text = _tidy(template.format(sev=sev, loc=loc, at=at, side=side, s="s" if number == "p" else "", where=where,
                                 lobe=lobe))
    return text, _article(text, number), number == "p"


def _finding_sentence(rng, plan: FindingPlan, state: str, pneumonia: str | None, *, impression: bool) -> tuple[str, dict[str, str]]:
    """One sentence asserting ``plan`` with ``state``, plus the terms it asserts."""
    finding = plan.finding
    terms = {finding: state}
    side, plural = _side_word(plan)
    specials = (_SPECIAL_POSITIVE if state == POSITIVE else _SPECIAL_UNCERTAIN).get(finding, ())
    if specials and not impression and rng.random() < 0.35:
        sev = _pick(rng, SEVERITY_WORDS[finding][plan.severity])
        art = "" if plural else ("an " if sev[:1] in "aeiou" else "a ")
        text = _pick(rng, specials).format(adv=_pick(rng, _ADVERB[plan.severity]), side=side,
                                           s="s" if plural else "", sev=sev, art=art)
        return _tidy(text), terms
    np_text, art, plural = _noun_phrase(rng, plan)
    tail, tail_terms = _tail(rng, finding, state, pneumonia)
    if state == POSITIVE:
        frame = _pick(rng, _IMPRESSION_POSITIVE if impression else _POSITIVE_FRAMES)
    else:
        frame = _pick(rng, _IMPRESSION_UNCERTAIN if impression else _UNCERTAIN_FRAMES)
        if "{tail}" not in frame:
            tail, tail_terms = "", {}
        tail_terms = {t: UNCERTAIN for t in tail_terms}  # a leading cue covers the whole sentence
    text = frame.format(NP=np_text, tail=tail, art=art, be="are" if plural else "is")
    terms.update({t: merge_state(terms.get(t), s) for t, s in tail_terms.items()})
    return _tidy(text), terms


def _tail(rng, finding: str, state: str, pneumonia: str | None) -> tuple[str, dict[str, str]]:
    """Optional clause appended to a finding sentence, with the terms it asserts.

    Consolidation and ground glass carry the case's pneumonia statement; other findings get a
    descriptive tail without terms now and then.
    """
    if finding == "consolidation" and pneumonia:
        return _pick(rng, _PNEUMONIA_TAILS[pneumonia]), {"pneumonia": pneumonia}
    if finding == "covid" and (pneumonia or rng.random() < 0.6):
        text, terms = _pick(rng, _COVID_TAILS[pneumonia])
        return text, dict(terms)
    if finding in _TAILS and state == POSITIVE and rng.random() < 0.3:
        text, terms = _pick(rng, _TAILS[finding])
        return text, dict(terms)
    return "", {}


#: Drawn findings the writer never hedges: devices and external objects are seen or not.
_ALWAYS_POSITIVE = frozenset({"support_devices", "foreign_object"})
#: Findings whose presence means the lungs are not "clear".
_PARENCHYMAL = frozenset({"consolidation", "covid", "infiltration", "edema", "atelectasis", "nodule", "mass",
                          "fibrosis", "emphysema", "pneumothorax", "effusion"})


def _pneumonia_state(rng, states: Mapping[str, str], rate: float) -> str | None:
    """Whether (and how surely) the report calls the airspace disease pneumonia."""
    host = next((f for f in ("consolidation", "covid") if f in states), None)
    if host is None or rng.random() >= rate:
        return None
    if states[host] == UNCERTAIN or rng.random() < 0.3:
        return UNCERTAIN
    return POSITIVE


def _device_sentence(rng, kind: str) -> str:
    return _pick(rng, _DEVICE_SENTENCES[kind]).format(n=int(rng.integers(3, 7)))


def _object_sentence(rng, plan: FindingPlan) -> str:
    names = [_OBJECT_NAMES[k] for k in plan.kinds]
    n = len(names)
    if n == 1:
        art = "an" if names[0][0] in "aeiou" else "a"
        return _pick(rng, (f"A radiopaque foreign body, likely {art} {names[0]}, projects over the chest.",
                           f"There is a metallic foreign object overlying the chest, probably {art} {names[0]}.",
                           "A radiopaque foreign object projects over the thorax."))
    listed = ", ".join(f"a {x}" for x in names[:-1]) + f" and a {names[-1]}"
    count = _NUMBERS[min(n, len(_NUMBERS)) - 1]
    return _pick(rng, (f"{count} radiopaque foreign objects ({listed}) project over the chest.",
                       f"Multiple external foreign bodies overlie the chest, including {listed}.",
                       f"{count} metallic foreign objects project over the thorax, likely external."))


def _negation_sentences(rng, negated: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Group denied terms into "No X, Y, or Z." sentences: (sentence, the terms it denies)."""
    out = []
    items = list(negated)
    rng.shuffle(items)
    while items:
        take = int(rng.integers(1, min(3, len(items)) + 1))
        group, items = items[:take], items[take:]
        phrases = [_pick(rng, _NEGATION_ITEMS[t]) for t in group]
        if len(phrases) == 1:
            frame = _pick(rng, _SINGLE_NEGATION_FRAMES)
            out.append((frame.format(X=_capitalise(phrases[0]), x=phrases[0]), group))
            continue
        listed = " or ".join(phrases) if len(phrases) == 2 else ", ".join(phrases[:-1]) + ", or " + phrases[-1]
        out.append((_pick(rng, _NEGATION_FRAMES).format(list=listed), group))
    return out


def write_report(rng: np.random.Generator, plans: Sequence[FindingPlan], profile: FindingProfile,
                 view: str) -> Report:
    """FINDINGS and IMPRESSION for the drawn ``plans`` (one per finding), with the terms asserted.

    ``profile`` supplies ``uncertain_rate``, ``negation_rate``, ``pneumonia_rate`` and
    ``cardiomediastinum_rate``. Drawn findings are always mentioned (positive or, at the
    uncertain rate, hedged); only undrawn findings are ever denied.
    """
    drawn = {p.finding: p for p in plans}
    states = {f: UNCERTAIN if f not in _ALWAYS_POSITIVE and rng.random() < profile.uncertain_rate else POSITIVE
              for f in drawn}
    pneumonia = _pneumonia_state(rng, states, profile.pneumonia_rate)

    body = _Sentences()
    body.add(_pick(rng, _VIEW_SENTENCES["AP" if view == "AP" else "PA"]))
    said_cardiomediastinum = False
    for finding in _REPORT_ORDER:
        plan = drawn.get(finding)
        if plan is None:
            continue
        if finding == "support_devices":
            for kind in plan.kinds:
                body.add(_device_sentence(rng, kind), {finding: POSITIVE})
        elif finding == "foreign_object":
            body.add(_object_sentence(rng, plan), {finding: POSITIVE})
        else:
            body.add(*_finding_sentence(rng, plan, states[finding], pneumonia, impression=False))
        if finding == "cardiomegaly" and states[finding] == POSITIVE and rng.random() < profile.cardiomediastinum_rate:
            body.add(_pick(rng, ("The cardiomediastinal silhouette is enlarged.", "Enlarged cardiomediastinal silhouette.")),
                     {"enlarged_cardiomediastinum": POSITIVE})
            said_cardiomediastinum = True

    if not _PARENCHYMAL & set(drawn):
        body.add(_pick(rng, _LUNGS_CLEAR))
    candidates = [t for t in _NEGATION_ITEMS if t not in drawn]
    if pneumonia or "consolidation" in drawn or "covid" in drawn:
        candidates.remove("pneumonia")
    weights = {"pneumothorax": 1.0, "effusion": 1.0, "consolidation": 0.9, "edema": 0.6, "pneumonia": 0.3,
               "nodule": 0.15, "mass": 0.1, "fracture": 0.1, "atelectasis": 0.1}
    negated = [t for t in candidates if rng.random() < profile.negation_rate * weights[t]]
    for sentence, denied in _negation_sentences(rng, negated):
        body.add(sentence, {t: NEGATIVE for t in denied})
    if "cardiomegaly" not in drawn and rng.random() < profile.negation_rate:
        text, denied = _pick(rng, _HEART_NORMAL)
        body.add(text, {t: NEGATIVE for t in denied})
        said_cardiomediastinum |= "enlarged_cardiomediastinum" in denied
    if not said_cardiomediastinum and rng.random() < 0.25:
        body.add(_pick(rng, _MEDIASTINUM_NORMAL), {"enlarged_cardiomediastinum": NEGATIVE})
    if rng.random() < 0.3:
        body.add(_pick(rng, _BONES))

    impression = _Sentences()
    main = [f for f in _IMPRESSION_ORDER if f in drawn][: int(rng.integers(1, 4))]
    if not main:
        impression.add(_pick(rng, _NORMAL_IMPRESSIONS))
    for finding in main:
        impression.add(*_finding_sentence(rng, drawn[finding], states[finding], pneumonia, impression=True))
    if "support_devices" in drawn and rng.random() < 0.4:
        impression.add(_pick(rng, _DEVICE_IMPRESSIONS), {"support_devices": POSITIVE})
    if main and negated and rng.random() < 0.4:
        term = negated[int(rng.integers(len(negated)))]
        impression.add(f"No {_pick(rng, _NEGATION_ITEMS[term])}.", {term: NEGATIVE})

    terms: dict[str, str] = {}
    _record(terms, body.terms)
    _record(terms, impression.terms)
    return Report(findings=body.text(), impression=impression.text(), terms=terms)
