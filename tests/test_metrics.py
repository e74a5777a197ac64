"""bench.metrics: hand-computed AUROC, macro rules, validation thresholds, patient-level bootstrap."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench import metrics as M


# -- point estimates ------------------------------------------------------------------------------

def test_auroc_hand_computed():
    # pairs (pos, neg): (0.35 > 0.1) (0.35 < 0.4) (0.8 > 0.1) (0.8 > 0.4) -> 3/4
    assert M.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: pairs 1, 0.5, 1, 1 -> 3.5/4
    assert M.auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    # perfectly inverted ranking
    assert M.auroc([1, 1, 0], [0.1, 0.2, 0.3]) == pytest.approx(0.0)
    # NaN labels are ignored, not counted as negatives
    assert M.auroc([0, np.nan, 1], [0.2, 0.9, 0.5]) == pytest.approx(1.0)


def test_auroc_undefined_without_both_classes():
    assert math.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(M.auroc([], []))


def test_macro_auroc_skips_classes_without_positives():
    y = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=float)
    s = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.7, 0.5, 0.1], [0.1, 0.2, 0.4]])
    per = M.auroc_per_class(y, s)
    assert per[0] == pytest.approx(1.0)
    assert math.isnan(per[1])                       # no positive in class 1
    assert per[2] == pytest.approx(0.5)             # 0.8 beats both negatives, 0.1 beats none -> 2/4
    assert M.auroc_macro(y, s) == pytest.approx(0.75)   # mean of classes 0 and 2 only, not (1+0.5+?)/3


def test_multiclass_ovr_auroc_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet(np.ones(3), 200) + np.eye(3)[y] * 0.3
    p /= p.sum(1, keepdims=True)
    m = M.ovr_auroc_macro_metric(3)
    assert m(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_accuracy_and_f1():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(0.75)
    # tp=1 fp=1 fn=1 -> 2/(2+1+1)
    assert M.f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert math.isnan(M.f1_binary([0, 0], [0, 0]))


def test_threshold_is_chosen_on_the_given_validation_sample():
    y_val = np.array([0, 0, 0, 1, 1, 1])
    s_val = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = M.choose_threshold(y_val, s_val, "f1")
    assert 0.3 < t < 0.6                             # any cut in the gap separates perfectly
    # applied, fixed, to a test set whose own best cut differs: F1 is what that threshold gives
    y_test = np.array([0, 1, 1, 0])
    s_test = np.array([0.2, 0.35, 0.5, 0.55])
    f1 = M.f1_at_metric(t)(y_test, s_test)
    assert f1 == pytest.approx(M.f1_binary(y_test, s_test >= t))
    assert M.choose_threshold(y_test, s_test, "f1") != pytest.approx(t)
    # the criteria differ: F1 takes the positive at the price of two false positives, accuracy
    # prefers predicting no positive at all (4/5 correct)
    y, s = [0, 0, 0, 0, 1], [0.1, 0.2, 0.6, 0.7, 0.5]
    assert M.choose_threshold(y, s, "f1") == pytest.approx(0.35)   # midpoint of 0.2 and 0.5
    assert M.choose_threshold(y, s, "accuracy") > 0.7


def test_metric_registry_directions():
    assert M.higher_is_better("auroc_macro") and M.higher_is_better("auroc/Edema")
    assert not M.higher_is_better("loss")
    assert M.METRICS.get("f1").higher_is_better


# -- batched weighted AUROC equals sklearn on repeated rows -----------------------------------

def test_weighted_auroc_equals_sklearn_on_repeated_rows():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    s = np.round(y * 0.4 + rng.random(300), 1)      # rounding makes many ties
    w = rng.integers(0, 3, size=(5, 300))
    got = M.weighted_auroc_batched(y, s, w)
    for b in range(5):
        idx = np.repeat(np.arange(300), w[b])
        assert got[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


# -- bootstrap -------------------------------------------------------------------------------------

def _toy_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 5)) < 0.3).astype(float)
    s = y * 0.8 + rng.normal(0, 0.6, (n, 5))
    return y, s


def test_bootstrap_ci_contains_point_and_shrinks_with_more_samples():
    y, s = _toy_scores(2000, 1)
    groups = np.arange(2000) // 2
    small = M.bootstrap_ci(M.auroc_macro_metric(), y[:200], s[:200], groups[:200], n_boot=500, seed=0)
    large = M.bootstrap_ci(M.auroc_macro_metric(), y, s, groups, n_boot=500, seed=0)
    for ci in (small, large):
        assert ci.low <= ci.point <= ci.high
        assert ci.n_skipped == 0
    assert (large.high - large.low) < 0.6 * (small.high - small.low)


def test_bootstrap_is_deterministic_in_seed():
    y, s = _toy_scores(300, 2)
    g = np.arange(300) // 3
    a = M.bootstrap_ci(M.auroc_macro_metric(), y, s, g, n_boot=200, seed=7)
    b = M.bootstrap_ci(M.auroc_macro_metric(), y, s, g, n_boot=200, seed=7)
    c = M.bootstrap_ci(M.auroc_macro_metric(), y, s, g, n_boot=200, seed=8)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)


def test_batched_and_plain_function_paths_agree():
    y, s = _toy_scores(150, 4)
    g = np.arange(150) // 2
    fast = M.bootstrap_ci(M.auroc_macro_metric(), y, s, g, n_boot=60, seed=3)
    slow = M.bootstrap_ci(lambda yy, ss: M.auroc_macro(yy, ss), y, s, g, n_boot=60, seed=3)
    assert fast.point == pytest.approx(slow.point)
    assert fast.low == pytest.approx(slow.low, abs=1e-12) and fast.high == pytest.approx(slow.high, abs=1e-12)


def test_resampling_keeps_a_patients_rows_together():
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    for w in M.resample_weights(groups, 300, seed=0):
        assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 1] == w[:, 2])
        assert np.all(w[:, 4] == w[:, 5])
        # each resample draws 3 patients: total weight = 3 x rows of drawn patients
        per_patient = w[:, [0, 3, 4]]
        assert np.all(per_patient.sum(axis=1) == 3)


def test_patient_level_spread_differs_from_row_level():
    # 40 patients x 10 images; all images of a patient share one label and one score, so the
    # sample really holds 40 independent units. Resampling rows pretends it holds 400 and gives
    # a CI about sqrt(10) times too narrow.
    rng = np.random.default_rng(5)
    pat_y = np.r_[np.zeros(20), np.ones(20)]
    pat_s = pat_y * 0.7 + rng.normal(0, 0.6, 40)
    y = np.repeat(pat_y, 10)
    s = np.repeat(pat_s, 10)
    groups = np.repeat(np.arange(40), 10)
    by_patient = M.bootstrap_ci(M.auroc_metric(), y, s, groups, n_boot=1000, seed=0)
    by_row = M.bootstrap_ci(M.auroc_metric(), y, s, None, n_boot=1000, seed=0)
    assert by_patient.point == pytest.approx(by_row.point)
    width_p, width_r = by_patient.high - by_patient.low, by_row.high - by_row.low
    assert width_p > 2.0 * width_r


def test_undefined_resamples_are_skipped_and_counted():
    # one positive patient among 8: many resamples miss it and AUROC is undefined there
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    s = np.linspace(0.9, 0.1, 8)
    ci = M.bootstrap_ci(M.auroc_metric(), y, s, np.arange(8), n_boot=400, seed=0)
    expected_missing = (7 / 8) ** 8 * 400           # P(positive never drawn) x n_boot ~ 137
    assert 0.6 * expected_missing < ci.n_skipped < 1.4 * expected_missing
    assert ci.low == ci.high == 1.0                 # every defined resample ranks it first


def test_macro_resample_losing_a_class_is_skipped():
    y = np.zeros((10, 2))
    y[0, 0] = 1                                      # class 0 has a single positive row
    y[:5, 1] = 1
    s = np.random.default_rng(0).random((10, 2))
    ci = M.bootstrap_ci(M.auroc_macro_metric(), y, s, np.arange(10), n_boot=300, seed=1)
    assert ci.n_skipped > 0                          # resamples without row 0 are not averaged over class 1 only


def test_vectorised_bootstrap_is_fast():
    y, s = _toy_scores(1000, 0)
    groups = np.arange(1000) // 2
    t = time.perf_counter()
    ci = M.bootstrap_ci(M.auroc_macro_metric(), y, s, groups, n_boot=1000, seed=0)
    elapsed = time.perf_counter() - t
    assert ci.low < ci.point < ci.high
    assert elapsed < 3.0, f"1000 resamples of 5-class macro AUROC on 1000 rows took {elapsed:.2f}s"
