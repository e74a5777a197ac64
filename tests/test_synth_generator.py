"""Synthetic chest X-ray generator: determinism, exact masks, and report / label consistency."""
from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from bench.data.shapes import mask_bounding_box, rasterize
from bench.data.synth.anatomy import draw_anatomy
from bench.data.synth.case import CHEXPERT_OBSERVATIONS, FINDINGS, NIH_LABELS, ZONES, DrawnCase
from bench.data.synth.findings import DRAW_ORDER, DRAWERS, FOREIGN_OBJECT_KINDS
from bench.data.synth.generate import lateral_of, sample_case
from bench.data.synth.profiles import PROFILES, FindingProfile
from bench.data.synth.reports import (
    LUNG_OPACITY_CHILDREN, chexpert_labels, label_report, nih_labels, terms_from_text,
)

LESION_ZONES = set(ZONES) | {"mediastinum", "bilateral", "chest wall"}
UNCERTAIN_CUES = re.compile(r"\b(possibl[ey]|questionable|may|cannot|concerning|suspicious)\b", re.I)


def _cases(profile: str | FindingProfile, n: int, size=(128, 128), seed: int = 0, view=None) -> list[DrawnCase]:
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    return [sample_case(np.random.default_rng([seed, i]), prof, *size, view=view) for i in range(n)]


@pytest.fixture(scope="module")
def corpus() -> list[DrawnCase]:
    """A mixed corpus: every profile, frontal and lateral, two canvas shapes."""
    out = []
    for k, name in enumerate(PROFILES):
        out += _cases(name, 40, (128, 128), seed=k)
        out += _cases(name, 6, (144, 176), seed=100 + k)
    return out


def _same_labels(a: dict[str, float], b: dict[str, float]) -> bool:
    return all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in CHEXPERT_OBSERVATIONS)


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------

def test_profile_keys():
    assert set(PROFILES) == {"mimic", "chexpert", "rsna", "siim", "covidx", "object_cxr", "nih", "iu_xray"}
    for name, profile in PROFILES.items():
        assert isinstance(profile, FindingProfile) and profile.name == name
        assert set(profile.prevalence) <= set(FINDINGS)
        assert all(0 <= p <= 1 for p in profile.prevalence.values())
        assert abs(sum(profile.views.values()) - 1) < 1e-9


def test_unknown_finding_in_profile_is_an_error():
    with pytest.raises(ValueError):
        FindingProfile(name="bad", prevalence={"pneumonitis": 0.1})


def test_every_finding_has_a_drawer():
    assert set(DRAWERS) == set(FINDINGS) == set(DRAW_ORDER)


# --------------------------------------------------------------------------------------------
# Determinism and image format
# --------------------------------------------------------------------------------------------

def test_same_seed_same_case_bit_for_bit():
    for name in ("mimic", "object_cxr", "covidx"):
        a = sample_case(np.random.default_rng(7), PROFILES[name], 160, 128)
        b = sample_case(np.random.default_rng(7), PROFILES[name], 160, 128)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.findings_text, a.impression_text, a.view, a.sex, a.age) == \
               (b.findings_text, b.impression_text, b.view, b.sex, b.age)
        assert a.mentions == b.mentions and a.nih == b.nih and _same_labels(a.chexpert, b.chexpert)
        assert a.meta == b.meta
        assert len(a.lesions) == len(b.lesions)
        for la, lb in zip(a.lesions, b.lesions):
            assert (la.finding, la.zone, la.box) == (lb.finding, lb.zone, lb.box)
            assert np.array_equal(la.mask, lb.mask)


def test_different_seeds_differ():
    images = {sample_case(np.random.default_rng(s), PROFILES["mimic"], 128, 128, view="PA").image.tobytes()
              for s in range(5)}
    assert len(images) == 5


def test_no_global_random_state_is_used():
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    sample_case(np.random.default_rng(0), PROFILES["mimic"], 128, 128)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state


@pytest.mark.parametrize("height,width,view", [(128, 128, "PA"), (160, 224, "AP"), (256, 192, "LATERAL"),
                                               (300, 300, "PA")])
def test_image_dtype_shape_range(height, width, view):
    case = sample_case(np.random.default_rng(1), PROFILES["chexpert"], height, width, view=view)
    assert case.image.dtype == np.uint8 and case.image.shape == (height, width)
    assert int(case.image.max()) - int(case.image.min()) > 120  # a real dynamic range
    assert case.view == view and case.sex in ("M", "F") and 18 <= case.age <= 95


def test_lungs_dark_mediastinum_and_abdomen_bright():
    for seed in range(5):
        density, anatomy = draw_anatomy(np.random.default_rng(seed), 192, 160, "PA")
        lung = density[anatomy.lung].mean()
        assert lung < density[anatomy.heart].mean() - 0.15
        assert lung < density[anatomy.mediastinum].mean() - 0.15
        below = anatomy.body & (anatomy.Y > anatomy.diaphragm_level() + 0.1)
        assert lung < density[below].mean() - 0.2


def test_zones_partition_the_lungs():
    _, anatomy = draw_anatomy(np.random.default_rng(3), 200, 180, "AP")
    total = np.zeros(anatomy.shape, dtype=int)
    for zone in ZONES:
        assert anatomy.zones[zone].any()
        total += anatomy.zones[zone]
    assert np.array_equal(total > 0, anatomy.lung) and total.max() == 1


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------

def test_lesion_masks_exact_nonempty_and_boxed(corpus):
    n = 0
    for case in corpus:
        for lesion in case.lesions:
            n += 1
            assert lesion.finding in FINDINGS and lesion.zone in LESION_ZONES
            assert lesion.mask.dtype == bool and lesion.mask.shape == case.image.shape
            assert lesion.mask.any()
            assert lesion.box == mask_bounding_box(lesion.mask)
            x1, y1, x2, y2 = lesion.box
            assert 0 <= x1 < x2 <= case.image.shape[1] and 0 <= y1 < y2 <= case.image.shape[0]
    assert n > 100


def test_drawn_findings_match_lesions_and_severity(corpus):
    for case in corpus:
        if case.view == "LATERAL":
            assert case.lesions == []
            continue
        assert {l.finding for l in case.lesions} == case.drawn
        assert set(case.severity) == case.drawn
        assert set(case.severity.values()) <= {"mild", "moderate", "severe"}


def test_every_finding_can_be_drawn_in_every_canvas_shape():
    for k, finding in enumerate(FINDINGS):
        profile = PROFILES["mimic"].forcing(present=[finding]).frontal()
        for size in ((128, 128), (150, 260), (240, 140)):
            case = sample_case(np.random.default_rng([k, *size]), profile, *size)
            assert finding in case.drawn
            assert any(l.finding == finding for l in case.lesions)


def test_lesion_changes_exactly_its_mask():
    """Drawing a finding changes the density on its mask and nowhere else (before noise)."""
    from bench.data.synth.findings import draw_findings, plan_finding

    for k, finding in enumerate(FINDINGS):
        rng = np.random.default_rng(k)
        density, anatomy = draw_anatomy(rng, 160, 160, "PA")
        before = density.copy()
        plan = plan_finding(rng, finding, ("mild", "moderate", "severe")[k % 3], 2)
        lesions = draw_findings(rng, density, anatomy, [plan])
        union = np.zeros(density.shape, dtype=bool)
        for lesion in lesions:
            union |= lesion.mask
            assert np.all(density[lesion.mask] != before[lesion.mask]) or len(lesions) > 1
        assert np.array_equal(density != before, union), finding


def test_foreign_object_masks_are_rasterized_shapes():
    profile = PROFILES["object_cxr"].forcing(present=["foreign_object"])
    kinds = set()
    for case in _cases(profile, 40, (160, 144)):
        objects = [l for l in case.lesions if l.finding == "foreign_object"]
        assert 1 <= len(objects) <= 4
        for lesion in objects:
            shape = lesion.shape
            assert shape is not None and shape.kind in ("rectangle", "ellipse", "polygon")
            assert shape.points.dtype.kind == "i" and shape.points.shape[1] == 2
            if shape.kind in ("rectangle", "ellipse"):
                assert shape.points.shape == (2, 2)
            expected = rasterize(shape.kind, shape.points, *case.image.shape)
            assert np.array_equal(lesion.mask, expected)
            ys, xs = np.nonzero(expected)
            assert lesion.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            kinds.add(shape.kind)
    assert kinds == {"rectangle", "ellipse", "polygon"}
    assert set(FOREIGN_OBJECT_KINDS.values()) == kinds


def test_object_cxr_is_half_positive():
    cases = _cases("object_cxr", 200, (128, 128), seed=5)
    share = np.mean(["foreign_object" in c.drawn for c in cases])
    assert 0.4 < share < 0.6


# --------------------------------------------------------------------------------------------
# Reports and labels
# --------------------------------------------------------------------------------------------

def test_labels_are_the_labels_of_the_text(corpus):
    for case in corpus:
        text = f"{case.findings_text} {case.impression_text}"
        terms = terms_from_text(text)
        assert {f: s for f, s in terms.items() if f in FINDINGS} == case.mentions, text
        chexpert, nih = label_report(text)
        assert _same_labels(chexpert, case.chexpert), text
        assert nih == case.nih, text


def test_mentions_agree_with_what_was_drawn(corpus):
    for case in corpus:
        drawn_plans = {p["finding"] for p in case.meta["plans"]}
        assert case.drawn == drawn_plans
        for finding, state in case.mentions.items():
            assert state in ("positive", "uncertain", "negative")
            if state == "negative":
                assert finding not in drawn_plans  # a denied finding is never drawn


_SUPPORT = {  # CheXpert observation -> findings that can make it positive or uncertain
    "Atelectasis": {"atelectasis"}, "Cardiomegaly": {"cardiomegaly"}, "Consolidation": {"consolidation"},
    "Edema": {"edema"}, "Enlarged Cardiomediastinum": {"cardiomegaly"}, "Fracture": set(),
    "Lung Lesion": {"nodule", "mass"}, "Lung Opacity": set(LUNG_OPACITY_CHILDREN) - {"pneumonia"},
    "Pleural Effusion": {"effusion"}, "Pleural Other": {"pleural_thickening"},
    "Pneumonia": {"consolidation", "covid"}, "Pneumothorax": {"pneumothorax"},
    "Support Devices": {"support_devices"},
}


def test_chexpert_values_follow_the_mentions(corpus):
    for case in corpus:
        for obs, value in case.chexpert.items():
            if obs == "No Finding":
                continue
            if value == 1.0:
                assert any(case.mentions.get(f) == "positive" for f in _SUPPORT[obs]), (obs, case.findings_text)
            if value == -1.0:
                assert any(f in case.drawn for f in _SUPPORT[obs]), (obs, case.findings_text)
            if value in (1.0, -1.0) and len(_SUPPORT[obs]) == 1 and obs not in ("Enlarged Cardiomediastinum",):
                (finding,) = _SUPPORT[obs]
                assert case.mentions[finding] == ("positive" if value == 1.0 else "uncertain")
        if -1.0 in case.chexpert.values():
            assert UNCERTAIN_CUES.search(f"{case.findings_text} {case.impression_text}")
        sick = any(s != "negative" for f, s in case.mentions.items() if f not in ("support_devices", "foreign_object"))
        assert (case.chexpert["No Finding"] == 1.0) == (not sick)
        assert math.isnan(case.chexpert["No Finding"]) == sick


def test_uncertain_mentions_are_hedged_in_the_text():
    profile = PROFILES["chexpert"].frontal()
    seen = 0
    for case in _cases(profile, 150, (128, 128), seed=9):
        uncertain = [f for f, s in case.mentions.items() if s == "uncertain"]
        if uncertain:
            seen += 1
            assert UNCERTAIN_CUES.search(case.findings_text)
            obs = {"atelectasis": "Atelectasis", "consolidation": "Consolidation", "edema": "Edema",
                   "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax", "cardiomegaly": "Cardiomegaly"}
            for f in uncertain:
                if f in obs:
                    assert case.chexpert[obs[f]] == -1.0
    assert seen >= 10


def test_normal_cases_read_normal():
    profile = PROFILES["iu_xray"].forcing(absent=FINDINGS)
    for case in _cases(profile, 20, (128, 128)):
        assert case.drawn == set() and case.lesions == []
        assert case.chexpert["No Finding"] == 1.0 and case.nih == ("No Finding",)
        assert re.search(r"no acute|normal chest", case.impression_text, re.I)


def test_report_sentences_survive_mgca_tokenisation(corpus):
    """MGCA drops sentences of <= 1 token and splits on '.'; every sentence must keep >= 2 tokens."""
    for case in corpus:
        assert case.findings_text and case.impression_text
        for section in (case.findings_text, case.impression_text):
            for sentence in re.split(r"[0-9]+\.|\.", section):
                tokens = re.findall(r"\w+", sentence.lower())
                assert len(tokens) == 0 or len(tokens) >= 2, sentence


def test_label_functions_on_handwritten_text():
    chex, nih = label_report("Possible right lower lobe consolidation, which may represent pneumonia. "
                             "No pleural effusion or pneumothorax. Heart size is normal.")
    assert chex["Consolidation"] == -1.0 and chex["Pneumonia"] == -1.0
    # Like the CheXpert labeler, consolidation does not set Lung Opacity (5x200 relies on it) ...
    assert math.isnan(chex["Lung Opacity"])
    assert chex["Pleural Effusion"] == 0.0 and chex["Pneumothorax"] == 0.0 and chex["Cardiomegaly"] == 0.0
    assert math.isnan(chex["No Finding"]) and math.isnan(chex["Atelectasis"])
    assert nih == ("No Finding",)  # NIH keeps positive mentions only
    chex, nih = label_report("Moderate cardiomegaly. Small left pleural effusion. Right upper lobe mass.")
    assert chex["Cardiomegaly"] == 1.0 and chex["Pleural Effusion"] == 1.0 and chex["Lung Lesion"] == 1.0
    assert nih == ("Cardiomegaly", "Effusion", "Mass")
    assert chexpert_labels({})["No Finding"] == 1.0 and nih_labels({}) == ("No Finding",)
    # ... while its own opacity phrases (infiltrate, ground glass) do.
    chex, _ = label_report("Patchy infiltrate in the left lower lobe.")
    assert chex["Lung Opacity"] == 1.0
    chex, _ = label_report("Possible bilateral peripheral ground-glass opacities.")
    assert chex["Lung Opacity"] == -1.0


# --------------------------------------------------------------------------------------------
# Dataset-specific behaviour
# --------------------------------------------------------------------------------------------

def test_covidx_classes_match_drawn_findings():
    classes = {}
    for case in _cases("covidx", 90, (128, 128), seed=2):
        klass = case.meta["covidx_class"]
        classes[klass] = classes.get(klass, 0) + 1
        if klass == "normal":
            assert not case.drawn & {"consolidation", "covid", "edema", "atelectasis", "infiltration", "nodule",
                                     "mass", "effusion", "cardiomegaly", "pneumothorax"}
        elif klass == "pneumonia":
            assert "consolidation" in case.drawn and "covid" not in case.drawn
        else:
            assert klass == "COVID-19"
            assert "covid" in case.drawn and "consolidation" not in case.drawn
    assert set(classes) == {"normal", "pneumonia", "COVID-19"}


def test_forcing_present_and_absent():
    present = PROFILES["siim"].forcing(present=["pneumothorax"]).frontal()
    absent = PROFILES["siim"].forcing(absent=["pneumothorax"]).frontal()
    assert all("pneumothorax" in c.drawn for c in _cases(present, 15))
    assert all("pneumothorax" not in c.drawn and not c.mask_of("pneumothorax").any() for c in _cases(absent, 15))


def test_rsna_prevalence_and_nih_label_coverage():
    rsna = _cases("rsna", 200, (128, 128), seed=3)
    share = np.mean(["consolidation" in c.drawn for c in rsna])
    assert 0.2 < share < 0.4
    nih = _cases(PROFILES["nih"].frontal(), 300, (128, 128), seed=4)
    counts = {label: sum(label in c.nih for c in nih) for label in NIH_LABELS}
    assert all(count >= 0.03 * len(nih) for count in counts.values()), counts


def test_lateral_has_no_lesions_but_a_report():
    case = sample_case(np.random.default_rng(4), PROFILES["mimic"].forcing(present=["effusion"]), 128, 128,
                       view="LATERAL")
    assert case.view == "LATERAL" and case.lesions == [] and "effusion" in case.drawn
    assert "effusion" in case.findings_text.lower() or "blunting" in case.findings_text.lower()
    frontal = sample_case(np.random.default_rng(5), PROFILES["iu_xray"], 128, 128)
    lateral = lateral_of(np.random.default_rng(6), frontal)
    assert lateral.view == "LATERAL" and lateral.lesions == []
    assert (lateral.findings_text, lateral.impression_text, lateral.nih) == \
           (frontal.findings_text, frontal.impression_text, frontal.nih)
    assert lateral.image.shape == frontal.image.shape and not np.array_equal(lateral.image, frontal.image)
