"""bench.data.splits: patient-level, seeded, nested splits and their manifest."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.data.spec import SplitProtocol
from bench.data.splits import FRACTIONS, SplitManifest, build_splits, check_manifest
from bench.data.table import CanonicalTable, make_frame
from bench.errors import DataError

PREVALENCE = np.array([0.3, 0.1, 0.04, 0.025, 0.02])  # the rarest: ~20 patients of 1000


def toy_table(n_patients: int = 1000, seed: int = 0, official=None, name: str = "toy") -> CanonicalTable:
    """Patients with 1-4 images each; labels drawn per patient (all images of a patient agree)."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for p in range(n_patients):
        lab = (rng.random(len(PREVALENCE)) < PREVALENCE).astype(np.float32)
        split = official(p) if official else ""
        for k in range(int(rng.integers(1, 5))):
            rows.append({"image_id": f"p{p:05d}_{k}", "image_path": f"/data/p{p:05d}_{k}.png",
                         "patient_id": f"P{p:05d}", "split": split})
            labels.append(lab)
    return CanonicalTable(name, Path("/data"), make_frame(rows), tuple("abcde"), np.array(labels))


def patients_of(table, manifest, split, fraction=1.0) -> set:
    return set(table.frame["patient_id"].to_numpy()[manifest.rows(split, fraction)])


def test_fractions_match_the_api():
    from bench.api import FRACTIONS as API_FRACTIONS

    assert FRACTIONS == API_FRACTIONS


def test_patient_level_and_covering():
    t = toy_table()
    m = build_splits(t, SplitProtocol(), seed=0)
    tr, va, te = (patients_of(t, m, s) for s in ("train", "val", "test"))
    assert tr and va and te
    assert not (tr & va) and not (tr & te) and not (va & te)
    rows = np.concatenate([m.rows(s) for s in ("train", "val", "test")])
    assert sorted(rows) == list(range(len(t)))  # every row in exactly one split
    assert check_manifest(t, m) == []
    # 15% / 15% of patients
    n_pat = t.frame["patient_id"].nunique()
    assert len(te) == round(0.15 * n_pat) and len(va) == round(0.15 * n_pat)
    for s in ("train", "val", "test"):
        r = m.rows(s)
        assert r.dtype == np.int64 and np.all(np.diff(r) > 0)


def test_deterministic_per_seed_and_row_order_free():
    t = toy_table()
    a, b = build_splits(t, SplitProtocol(), seed=0), build_splits(t, SplitProtocol(), seed=0)
    assert a.sha256 == b.sha256
    pd.testing.assert_frame_equal(a.frame, b.frame)
    c = build_splits(t, SplitProtocol(), seed=1)
    assert c.sha256 != a.sha256
    assert patients_of(t, c, "test") != patients_of(t, a, "test")
    # Shuffling the table's rows does not change who goes where.
    perm = np.random.default_rng(5).permutation(len(t))
    shuffled = t.subset(perm)
    d = build_splits(shuffled, SplitProtocol(), seed=0)
    for s in ("train", "val", "test"):
        assert patients_of(shuffled, d, s) == patients_of(t, a, s)
        for f in FRACTIONS:
            assert patients_of(shuffled, d, "train", f) == patients_of(t, a, "train", f)


def test_nested_fractions_and_sizes():
    t = toy_table()
    m = build_splits(t, SplitProtocol(), seed=3)
    per_patient = t.frame.groupby("patient_id").size()
    subsets = [set(m.rows("train", f)) for f in FRACTIONS]
    assert subsets[0] < subsets[1] < subsets[2]  # strictly nested
    n_train = len(subsets[2])
    for f, rows in zip(FRACTIONS, subsets):
        target = max(1, math.ceil(f * n_train))
        assert target <= len(rows) < target + per_patient.max()
        # patient-level: a subset takes all of a patient's training images or none
        pats = set(t.frame["patient_id"].to_numpy()[list(rows)])
        assert len(rows) == per_patient.loc[list(pats)].sum()
    sizes = m.sizes()
    assert sizes["train@1.0"] == n_train and sizes["train@0.01"] == len(subsets[0])
    assert sizes["val"] + sizes["test"] + n_train == len(t)
    # val and test ignore the fraction
    np.testing.assert_array_equal(m.rows("val", 0.01), m.rows("val"))
    with pytest.raises(ValueError):
        m.rows("train", 0.5)
    with pytest.raises(ValueError):
        m.rows("validate")


def test_stratification_keeps_every_class_in_the_10pct_subset():
    t = toy_table()
    for seed in range(8):
        m = build_splits(t, SplitProtocol(), seed=seed)
        train_pos = (t.labels[m.rows("train")] == 1).sum(axis=0)
        assert np.all(train_pos >= 10)  # the rarest class: >= 10 training patients
        sub = (t.labels[m.rows("train", 0.1)] == 1).sum(axis=0)
        assert np.all(sub > 0), (seed, sub, train_pos)
        # patient-level prevalence of the commonest class in the 10% subset stays close to the pool's
        def prevalence(rows):
            return pd.Series(t.labels[rows, 0], index=t.frame["patient_id"].to_numpy()[rows]).groupby(level=0).max().mean()

        assert abs(prevalence(m.rows("train", 0.1)) - prevalence(m.rows("train"))) < 0.03
        # carved test split holds every class too
        assert np.all((t.labels[m.rows("test")] == 1).sum(axis=0) > 0)


def test_official_splits_kept_and_missing_ones_carved_from_train():
    t = toy_table(official=lambda p: "test" if p % 10 == 0 else "train")
    proto = SplitProtocol(official=("train", "test"), val_fraction=0.1)
    m = build_splits(t, proto, seed=0)
    official_test = set(np.flatnonzero(t.frame["split"].to_numpy() == "test"))
    assert set(m.rows("test")) == official_test
    assert not set(m.rows("val")) & official_test and len(m.rows("val")) > 0
    assert check_manifest(t, m) == []
    # val_size in images, capped at 10% of the pool
    m2 = build_splits(t, replace(proto, val_size=10_000), seed=0)
    pool = len(t) - len(official_test)
    assert 0 < len(m2.rows("val")) <= math.floor(0.1 * pool) + 3
    assert len(m2.rows("val")) >= math.floor(0.1 * pool)
    m3 = build_splits(t, replace(proto, val_size=20), seed=0)
    assert 20 <= len(m3.rows("val")) < 24
    # merge: official val rows become test
    t4 = toy_table(200, official=lambda p: "val" if p % 5 == 0 else "train")
    m4 = build_splits(t4, SplitProtocol(official=("train", "test"), merge_official_val_into="test"), seed=0)
    assert set(m4.rows("test")) == set(np.flatnonzero(t4.frame["split"].to_numpy() == "val"))


def test_official_split_leak_names_the_patient():
    t = toy_table(50, official=lambda p: "test" if p % 10 == 0 else "train")
    frame = t.frame.copy()
    i = int(np.flatnonzero(frame["patient_id"].to_numpy() == "P00003")[0])
    frame.loc[i, "split"] = "test"  # patient P00003 now in train and test
    leaky = replace(t, frame=frame)
    with pytest.raises(DataError, match="P00003"):
        build_splits(leaky, SplitProtocol(official=("train", "test")), seed=0)
    m = build_splits(leaky, SplitProtocol(official=("train", "test")), seed=0, skip_bad=True)
    assert check_manifest(leaky, m) == []
    p3 = np.flatnonzero(frame["patient_id"].to_numpy() == "P00003")
    assert set(m.frame["split"].to_numpy()[p3]) <= {"test", "excluded"} and i in set(m.rows("test"))
    assert m.sizes().get("excluded", 0) == len(p3) - 1


def test_check_manifest_finds_planted_problems():
    t = toy_table(300)
    m = build_splits(t, SplitProtocol(), seed=0)
    f = m.frame
    # a leak: one image of a multi-image training patient moved to test
    counts = t.frame["patient_id"].value_counts()
    train_rows = m.rows("train")
    multi = [r for r in train_rows if counts[t.frame["patient_id"].iat[r]] > 1]
    f.loc[multi[0], "split"] = "test"
    f.loc[multi[0], "min_fraction"] = np.nan
    problems = check_manifest(t, SplitManifest("toy", 0, SplitProtocol(), f))
    assert any(p.startswith("leak:") and t.frame["patient_id"].iat[multi[0]] in p for p in problems)
    # non-nesting / bad fractions, uncovered rows
    g = m.frame
    g.loc[m.rows("train")[0], "min_fraction"] = 0.5
    g.loc[m.rows("test")[0], "min_fraction"] = 0.1
    problems = check_manifest(t, SplitManifest("toy", 0, SplitProtocol(), g.iloc[:-1]))
    kinds = {p.split(":")[0] for p in problems}
    assert {"fraction", "coverage"} <= kinds
    assert any("not in the manifest" in p for p in problems)


def test_sha_changes_with_content_and_round_trip(tmp_path):
    t = toy_table(200)
    m = build_splits(t, SplitProtocol(), seed=0)
    f = t.frame.copy()
    f.loc[7, "image_id"] = "renamed"
    assert build_splits(replace(t, frame=f), SplitProtocol(), seed=0).sha256 != m.sha256
    assert build_splits(t, replace(SplitProtocol(), test_fraction=0.2), seed=0).sha256 != m.sha256
    assert build_splits(replace(t, dataset="other"), SplitProtocol(), seed=0).sha256 != m.sha256

    path = m.write(tmp_path / "sub" / "toy-seed0.csv")
    back = SplitManifest.read(path)
    assert back.sha256 == m.sha256 and back.dataset == "toy" and back.seed == 0
    pd.testing.assert_frame_equal(back.frame, m.frame)
    for s in ("train", "val", "test"):
        for fr in FRACTIONS:
            np.testing.assert_array_equal(back.rows(s, fr), m.rows(s, fr))
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind
    # an edited manifest is refused
    lines = path.read_text().splitlines(keepends=True)
    lines[5] = lines[5].replace(",train,", ",test,") if ",train," in lines[5] else lines[5].replace(",", ",x", 1)
    path.write_text("".join(lines))
    with pytest.raises(DataError, match="sha256"):
        SplitManifest.read(path)


def test_small_pools_keep_training_data():
    t = toy_table(3)
    m = build_splits(t, SplitProtocol(), seed=0)
    assert len(m.rows("train")) > 0 and len(m.rows("train", 0.01)) >= 1
    assert check_manifest(t, m) == []
    one = toy_table(1)
    m1 = build_splits(one, SplitProtocol(), seed=0)
    assert len(m1.rows("train")) == len(one) and len(m1.rows("test")) == 0


def test_skipped_rows_are_recorded_in_the_manifest(tmp_path):
    t = toy_table(100)
    clean = build_splits(t, SplitProtocol(), seed=0)
    skipped = build_splits(replace(t, skipped_rows=3), SplitProtocol(), seed=0)
    assert clean.skipped_rows == 0 and skipped.skipped_rows == 3
    assert skipped.sha256 != clean.sha256          # a partial dataset never passes for the full one
    path = skipped.write(tmp_path / "m.csv")
    assert '"skipped_rows": 3' in path.read_text().splitlines()[0]
    back = SplitManifest.read(path)
    assert back.skipped_rows == 3 and back.sha256 == skipped.sha256
