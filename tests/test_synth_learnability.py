"""The synthetic findings must be learnable, but not trivially.

A logistic regression on 32x32 pixels (a deliberately weak learner) is fitted on balanced sets of
128x128 cases for each main finding; its held-out AUROC must beat chance clearly (> 0.6) and stay
clear of perfect separation (< 0.99). ``python -m bench.data.synth.learnability`` prints the same
table with more cases.
"""
from __future__ import annotations

import pytest

from bench.data.synth.learnability import TARGETS, balanced_set, probe_auroc

#: Cases per finding (half positive); generation dominates the run time (~2 s per finding).
N_CASES = 400


@pytest.mark.parametrize("target", list(TARGETS))
def test_finding_is_learnable_but_not_trivial(target):
    features, labels = balanced_set(target, N_CASES, size=128, pixels=32, seed=0)
    assert labels.sum() == N_CASES // 2
    auroc = probe_auroc(features, labels)
    assert 0.6 < auroc < 0.99, f"{target}: pixel-probe AUROC {auroc:.3f}"
