"""Round trips and parsing quirks of the MIMIC-CXR-JPG, CheXpert, NIH ChestX-ray14 and IU X-ray loaders.

Each dataset is written at scale "micro" by its synthetic writer (official files), read back by
its loader and compared with the drawn ground truth; then the raw files are mutated to exercise
the format variants (csv vs csv.gz, 2017 vs v2020 NIH entry file) and malformed input.
"""
from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.data.loaders import chexpert as chexpert_loader
from bench.data.loaders import iu_xray as iu_loader
from bench.data.loaders import mimic_cxr as mimic_loader
from bench.data.loaders import nih as nih_loader
from bench.data.spec import DATASETS
from bench.data.synth import write_chexpert, write_iu_xray, write_mimic_cxr, write_nih
from bench.data.synth.case import CHEXPERT_OBSERVATIONS, NIH_LABELS
from bench.data.table import CanonicalTable, make_frame
from bench.errors import DataError, MissingDataError

JPEG_MAE = 2.5   # mean absolute error allowed for quality-95 JPEG round trips


def norm(text: str) -> str:
    return " ".join(text.split())


def decode(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr[..., 0] if arr.ndim == 3 else arr


def same_codes(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def expected_chexpert(case) -> np.ndarray:
    return np.array([case.chexpert.get(c, math.nan) for c in CHEXPERT_OBSERVATIONS], dtype=np.float32)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{key: (root, cases)} for the four datasets written once at scale micro."""
    base = tmp_path_factory.mktemp("synth")
    out = {}
    for seed, (key, mod) in enumerate((("mimic", write_mimic_cxr), ("chexpert", write_chexpert),
                                       ("nih", write_nih), ("iu", write_iu_xray))):
        root = base / key
        out[key] = (root, mod.write(root, np.random.default_rng(100 + seed), "micro"))
    return out


def copy_of(written, key: str, tmp_path: Path) -> Path:
    dst = tmp_path / key
    shutil.copytree(written[key][0], dst)
    return dst


def line_of(lines: list[str], predicate) -> int:
    """1-based number of the first line matching ``predicate``."""
    return next(k for k, line in enumerate(lines, start=1) if predicate(line))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def test_specs_registered():
    expected = {"mimic-cxr": "mimic-cxr-jpg/2.0.0", "chexpert": "CheXpert-v1.0-small",
                "nih": "nih-chestxray14", "iu-xray": "iu_xray"}
    for name, subdir in expected.items():
        spec = DATASETS.get(name)
        assert spec.name == name and spec.synth_subdir == subdir and spec.title and spec.official_layout
    assert DATASETS.get("mimic-cxr").load is mimic_loader.load
    assert DATASETS.get("chexpert").split.official == ("train", "test")
    assert DATASETS.get("nih").split.official == ("train", "test")
    assert DATASETS.get("iu-xray").split.official == ("train", "val", "test")


# ------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# ------------------------------------------------------------------------------------------------
def test_mimic_roundtrip(written):
    root, cases = written["mimic"]
    table = mimic_loader.load(root)
    assert table.dataset == "mimic-cxr" and table.classes == CHEXPERT_OBSERVATIONS
    assert set(table.frame["image_id"]) == set(cases) and len(table) == len(cases)
    assert table.skipped_rows == 0
    for i, row in table.frame.iterrows():
        case = cases[row["image_id"]]
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", row["image_id"]) and len(row["image_id"]) == 44
        assert re.fullmatch(r"1\d{7}", row["patient_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert (row["patient_id"], row["study_id"]) == (case.meta["subject_id"], case.meta["study_id"])
        expected_path = (root / "files" / f"p{row['patient_id'][:2]}" / f"p{row['patient_id']}"
                         / f"s{row['study_id']}" / f"{row['image_id']}.jpg")
        assert Path(row["image_path"]) == expected_path
        assert same_codes(table.labels[i], expected_chexpert(case)), row["image_id"]
        assert row["findings"] == norm(case.findings_text)
        assert row["impression"] == norm(case.impression_text)
        assert row["view"] == case.view
        img = decode(row["image_path"])
        assert img.dtype == np.uint8 and img.shape == case.image.shape == (row["height"], row["width"])
        assert np.abs(img.astype(np.int16) - case.image.astype(np.int16)).mean() < JPEG_MAE
    views = set(table.frame["view"])
    assert {"LATERAL", ""} <= views and views & {"PA", "AP"}
    # reports in the official format: centred header, every line starts with one space
    some_report = next((root / "files").rglob("s*.txt")).read_text()
    first, *rest = some_report.splitlines()
    assert first.strip() == "FINAL REPORT" and first.startswith("   ")
    assert all(line.startswith(" ") for line in rest) and "___" in some_report
    # the quirky studies: impression only, findings only, neither
    f, imp = table.frame["findings"] != "", table.frame["impression"] != ""
    assert (f & ~imp).any() and (~f & imp).any() and (~f & ~imp).any() and (f & imp).any()
    assert any(c.meta["report_shape"] == "repeat" and c.impression_text for c in cases.values())


def test_mimic_splits_follow_split_csv(written):
    root, _ = written["mimic"]
    table = mimic_loader.load(root)
    raw = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
    assert list(raw.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    expected = dict(zip(raw["dicom_id"], raw["split"].map({"train": "train", "validate": "val", "test": "test"})))
    assert dict(zip(table.frame["image_id"], table.frame["split"])) == expected
    assert set(table.frame["split"]) == {"train", "val", "test"}
    assert table.frame.groupby("patient_id")["split"].nunique().max() == 1
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    assert list(meta.columns)[:7] == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                      "ViewPosition", "Rows", "Columns"]
    chex = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    assert list(chex.columns) == ["subject_id", "study_id", *sorted(CHEXPERT_OBSERVATIONS)]
    assert chex["study_id"].is_unique and chex["study_id"].nunique() == table.frame["study_id"].nunique()
    assert table.frame.groupby("patient_id")["study_id"].nunique().max() > 1


def test_mimic_frontal_with_text(written):
    root, _ = written["mimic"]
    table = mimic_loader.load(root)
    rows = mimic_loader.frontal_with_text(table)
    picked = table.frame.iloc[rows]
    assert len(rows) and set(picked["view"]) <= {"PA", "AP"}
    assert ((picked["findings"] != "") | (picked["impression"] != "")).all()
    frame = table.frame
    expected = frame.index[frame["view"].isin(["PA", "AP"]) & ((frame["findings"] != "") | (frame["impression"] != ""))]
    assert list(rows) == list(expected)
    assert len(rows) < len(frame)


def test_mimic_reads_plain_csv_too(written, tmp_path):
    root = copy_of(written, "mimic", tmp_path)
    reference = mimic_loader.load(written["mimic"][0])
    for stem in ("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-chexpert"):
        gz = root / f"{stem}.csv.gz"
        (root / f"{stem}.csv").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    table = mimic_loader.load(root)
    assert "mimic-cxr-2.0.0-metadata.csv" in table.source_files
    assert "mimic-cxr-2.0.0-split.csv.gz" in table.source_files
    cols = ["image_id", "patient_id", "study_id", "view", "split", "findings", "impression", "height", "width"]
    pd.testing.assert_frame_equal(table.frame[cols], reference.frame[cols])
    assert same_codes(table.labels, reference.labels)


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""


def test_section_parser_official_format():
    findings, impression = mimic_loader.findings_impression(REPORT)
    assert findings == ("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular "
                        "opacities that most likely represent nipple shadows.")
    assert impression == "No acute cardiopulmonary process."
    names = [n for n, _ in mimic_loader.split_sections(REPORT)]
    assert names == ["preamble", "examination", "indication", "comparison", "findings", "impression"]


def test_section_parser_quirks():
    # missing impression
    only_findings = REPORT.split(" IMPRESSION:")[0]
    assert mimic_loader.findings_impression(only_findings) == (
        mimic_loader.findings_impression(REPORT)[0], "")
    # repeated sections: the last non-empty one wins; an aliased header (CONCLUSION) counts as impression
    repeated = REPORT + " \n IMPRESSION:  Second impression.\n \n NOTIFICATION:  Called ___.\n"
    assert mimic_loader.findings_impression(repeated)[1] == "Second impression."
    aliased = REPORT + " CONCLUSION:  Final conclusion.\n"
    assert mimic_loader.findings_impression(aliased)[1] == "Final conclusion."
    empty_last = REPORT + " IMPRESSION: \n \n"
    assert mimic_loader.findings_impression(empty_last)[1] == "No acute cardiopulmonary process."
    # an empty section directly followed by the next header
    tight = " FINAL REPORT\n FINDINGS:\n IMPRESSION:  Clear lungs.\n"
    assert mimic_loader.findings_impression(tight) == ("", "Clear lungs.")
    # one space is required: no leading space (or two) is not a header; no header at all -> nothing
    assert mimic_loader.findings_impression(REPORT.replace("\n IMPRESSION:", "\nIMPRESSION:"))[1] == ""
    assert mimic_loader.findings_impression(REPORT.replace("\n FINDINGS:", "\n  FINDINGS:"))[0] == ""
    assert mimic_loader.findings_impression("Free text with no sections.\n") == ("", "")
    assert mimic_loader.split_sections("no header")[0][0] == "full report"
    # a lower-case word ends a header run: "Findings:" is not a section header
    assert mimic_loader.findings_impression(" FINAL REPORT\n Findings: clear.\n")[0] == ""


def _mutate_gz_csv(path: Path, edit) -> list[str]:
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines = edit(lines)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return lines


def test_mimic_bad_input(written, tmp_path):
    with pytest.raises(MissingDataError, match="nowhere"):
        mimic_loader.load(tmp_path / "nowhere")
    root = copy_of(written, "mimic", tmp_path)
    n = len(mimic_loader.load(root))
    # duplicate dicom_id in the metadata
    meta = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    lines = _mutate_gz_csv(meta, lambda ls: ls + [ls[1]])
    with pytest.raises(DataError, match=rf"metadata\.csv\.gz, line {len(lines)}: duplicate dicom_id"):
        mimic_loader.load(root)
    table = mimic_loader.load(root, skip_bad=True)
    assert table.skipped_rows == 1 and len(table) == n
    # an unknown label value in chexpert.csv
    chex = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    _mutate_gz_csv(chex, lambda ls: [ls[0], ls[1].rsplit(",", 1)[0] + ",2.0", *ls[2:]])
    with pytest.raises(DataError, match=r"chexpert\.csv\.gz, line 2: column 'Support Devices': label value '2.0'"):
        mimic_loader.load(root)
    study = gzip.decompress(chex.read_bytes()).decode().splitlines()[1].split(",")[1]
    table = mimic_loader.load(root, skip_bad=True)
    assert table.skipped_rows == 2
    assert np.isnan(table.labels[(table.frame["study_id"] == study).to_numpy()]).all()
    # an unknown split value: the row is skipped once, and its image with it
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    lines = _mutate_gz_csv(split, lambda ls: [*ls[:-1], ls[-1].rsplit(",", 1)[0] + ",valid"])
    with pytest.raises(DataError, match=rf"split\.csv\.gz, line {len(lines)}: split 'valid' is not one of "
                                        r"train/validate/test"):
        mimic_loader.load(root)
    table = mimic_loader.load(root, skip_bad=True)
    assert table.skipped_rows == 3 and len(table) == n - 1
    assert lines[-1].split(",")[0] not in set(table.frame["image_id"])
    # a missing official file names the expected path
    split.unlink()
    with pytest.raises(MissingDataError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz"):
        mimic_loader.load(root)


# ------------------------------------------------------------------------------------------------
# CheXpert
# ------------------------------------------------------------------------------------------------
def test_chexpert_roundtrip(written):
    root, cases = written["chexpert"]
    table = chexpert_loader.load(root)
    assert set(table.frame["image_id"]) == set(cases) and table.classes == CHEXPERT_OBSERVATIONS
    for i, row in table.frame.iterrows():
        case = cases[row["image_id"]]
        patient, study = row["image_id"].split("/")[1:3]
        assert row["patient_id"] == patient and row["study_id"] == f"{patient}/{study}"
        assert row["split"] == ("train" if row["image_id"].startswith("train/") else "test")
        assert Path(row["image_path"]) == root / row["image_id"]
        assert same_codes(table.labels[i], expected_chexpert(case)), row["image_id"]
        assert row["view"] == case.view
        assert (row["view"] == "LATERAL") == row["image_id"].endswith("_lateral.jpg")
        img = decode(row["image_path"])
        assert img.shape == case.image.shape
        assert np.abs(img.astype(np.int16) - case.image.astype(np.int16)).mean() < JPEG_MAE
    test = table.frame["split"].to_numpy() == "test"
    assert test.any() and (~test).any()
    assert set(np.unique(table.labels[test])) <= {0.0, 1.0}
    train_labels = table.labels[~test]
    assert np.isnan(train_labels).any() and (train_labels == -1).any()
    assert not set(table.frame.loc[test, "patient_id"]) & set(table.frame.loc[~test, "patient_id"])


def test_chexpert_raw_csv_format(written):
    root, _ = written["chexpert"]
    for name in ("train.csv", "valid.csv"):
        df = pd.read_csv(root / name)
        assert tuple(df.columns) == chexpert_loader.CSV_COLUMNS
        assert df["Path"].str.startswith(f"CheXpert-v1.0-small/{name[:-4]}/patient").all()
        assert set(df["Sex"]) <= {"Male", "Female", "Unknown"}
        assert set(df["Frontal/Lateral"]) <= {"Frontal", "Lateral"}
        lateral = df["Frontal/Lateral"] == "Lateral"
        assert df.loc[lateral, "AP/PA"].isna().all() and df.loc[~lateral, "AP/PA"].isin(["AP", "PA"]).all()
    train = pd.read_csv(root / "train.csv")
    assert (train["Frontal/Lateral"] == "Lateral").any() and (train["Sex"] == "Unknown").any()
    assert (train[list(CHEXPERT_OBSERVATIONS)] == -1).any().any() and train[list(CHEXPERT_OBSERVATIONS)].isna().any().any()


def test_chexpert_fixture_has_5x200_eligible_and_ineligible_rows(written):
    table = chexpert_loader.load(written["chexpert"][0])
    eligible = set(np.concatenate(list(chexpert_loader.five_by_200_candidates(table).values())))
    assert eligible
    tasks = [CHEXPERT_OBSERVATIONS.index(t) for t in chexpert_loader.COMPETITION_TASKS]
    frontal_train = (table.frame["split"] == "train").to_numpy() & table.frame["view"].isin(["AP", "PA"]).to_numpy()
    positive = np.flatnonzero(frontal_train & (table.labels[:, tasks] == 1).any(axis=1))
    assert set(positive) - eligible


def _chexpert_table(rows: list[tuple[str, str, dict]]) -> CanonicalTable:
    frame = make_frame([{"image_id": f"train/patient{k:05d}/study1/view1.jpg", "image_path": "x", "patient_id": f"p{k}",
                         "view": view, "split": split} for k, (view, split, _) in enumerate(rows)])
    labels = np.array([[lab.get(c, np.nan) for c in CHEXPERT_OBSERVATIONS] for _, _, lab in rows], np.float32)
    return CanonicalTable("chexpert", Path("."), frame, CHEXPERT_OBSERVATIONS, labels)


def test_build_5x200_rule():
    tasks = chexpert_loader.COMPETITION_TASKS
    rows = []
    for t in tasks:
        for _ in range(3):
            rows.append(("AP", "train", {t: 1.0, "No Finding": 0.0}))   # eligible (blanks fill to 0)
    eligible = len(rows)
    rows += [
        ("LATERAL", "train", {"Edema": 1.0}),                           # lateral
        ("PA", "test", {"Edema": 1.0}),                                 # not train.csv
        ("PA", "train", {"Edema": 1.0, "Atelectasis": 1.0}),            # two tasks positive
        ("PA", "train", {"Edema": 1.0, "Atelectasis": -1.0}),           # uncertain other task
        ("PA", "train", {"Edema": 1.0, "Support Devices": 1.0}),        # other listed observation
        ("PA", "train", {"Edema": 1.0, "Lung Opacity": -1.0}),          # uncertain listed observation
        ("PA", "train", {"Edema": -1.0}),                               # uncertain target
    ]
    table = _chexpert_table(rows)
    cand = chexpert_loader.five_by_200_candidates(table)
    assert {t: list(v) for t, v in cand.items()} == {t: [3 * k, 3 * k + 1, 3 * k + 2] for k, t in enumerate(tasks)}
    sel = chexpert_loader.build_5x200(table, per_class=200, seed=0)
    assert sel.per_class == 3 and len(sel.rows) == 15 and set(sel.rows) == set(range(eligible))
    assert all(table.labels[r, CHEXPERT_OBSERVATIONS.index(tasks[t])] == 1 for r, t in zip(sel.rows, sel.targets))
    two = chexpert_loader.build_5x200(table, per_class=2, seed=1)
    assert two.per_class == 2 and len(two.rows) == 10 and len(set(two.rows)) == 10
    assert list(chexpert_loader.build_5x200(table, per_class=2, seed=1).rows) == list(two.rows)
    with pytest.raises(DataError, match="Edema"):
        chexpert_loader.build_5x200(table.subset([r for r in range(len(rows)) if r not in (9, 10, 11)]))


def test_chexpert_policy_constants():
    assert chexpert_loader.COMPETITION_TASKS == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                                 "Pleural Effusion")
    assert chexpert_loader.MGCA_UNCERTAIN_POLICY == {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0,
                                                     "Edema": 1, "Pleural Effusion": 1}


def test_chexpert_bad_input(written, tmp_path):
    root = copy_of(written, "chexpert", tmp_path)
    n = len(chexpert_loader.load(root))
    train = root / "train.csv"
    lines = train.read_text().splitlines()
    parts = lines[2].split(",")
    parts[7] = "2.0"   # Cardiomegaly
    lines[2] = ",".join(parts)
    lines.append(lines[1])   # duplicate image
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.csv, line 3: column 'Cardiomegaly': label value '2.0'"):
        chexpert_loader.load(root)
    table = chexpert_loader.load(root, skip_bad=True)
    assert table.skipped_rows == 2 and len(table) == n - 1
    bad_id = lines[2].split(",")[0].split("/", 1)[1]
    assert bad_id not in set(table.frame["image_id"])
    lines[2] = lines[3]
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.csv, line 4: duplicate image"):
        chexpert_loader.load(root)
    # valid.csv allows only 0.0/1.0
    valid = root / "valid.csv"
    vlines = valid.read_text().splitlines()
    vlines[1] = vlines[1].rsplit(",", 1)[0] + ",-1.0"
    valid.write_text("\n".join(vlines) + "\n")
    train.write_text("\n".join(lines[:3] + lines[4:-1]) + "\n")
    with pytest.raises(DataError, match=r"valid\.csv, line 2: column 'Support Devices'"):
        chexpert_loader.load(root)
    valid.unlink()
    with pytest.raises(MissingDataError, match=r"valid\.csv"):
        chexpert_loader.load(root)
    with pytest.raises(MissingDataError, match="nope"):
        chexpert_loader.load(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# ------------------------------------------------------------------------------------------------
def test_nih_roundtrip(written):
    root, cases = written["nih"]
    table = nih_loader.load(root)
    assert set(table.frame["image_id"]) == set(cases) and table.classes == NIH_LABELS
    assert table.box_classes == nih_loader.BOX_CLASSES
    n_boxes = 0
    for i, row in table.frame.iterrows():
        case = cases[row["image_id"]]
        expected = np.array([1.0 if c in case.nih else 0.0 for c in NIH_LABELS], np.float32)
        assert same_codes(table.labels[i], expected)
        assert row["patient_id"] == str(int(row["image_id"][:8])) and row["view"] == case.view
        img = decode(row["image_path"])
        assert np.array_equal(img, case.image)   # lossless PNG (RGBA files: gray in every channel)
        want = write_nih.box_rows(case)
        labels = [write_nih.BOX_LABELS_BY_FILE[w[0]] for w in want]
        boxes = np.array([[x, y, x + w, y + h] for _, x, y, w, h in want], np.float32).reshape(-1, 4)
        assert np.array_equal(table.boxes[i], boxes)
        assert [table.box_classes[k] for k in table.box_labels[i]] == labels
        n_boxes += len(want)
        if len(want):
            assert (row["height"], row["width"]) == case.image.shape
    assert n_boxes > 0
    assert any(c.meta.get("rgba") for c in cases.values())
    assert Image.open(next(root / "images" / k for k, c in cases.items() if c.meta.get("rgba"))).mode == "RGBA"
    splits = table.frame.groupby("patient_id")["split"].agg(set)
    assert all(len(s) == 1 for s in splits) and set(table.frame["split"]) == {"train", "test"}
    listed = (root / "test_list.txt").read_text().split()
    assert set(table.frame.loc[table.frame["split"] == "test", "image_id"]) == set(listed)


def test_nih_raw_format(written):
    root, _ = written["nih"]
    df = pd.read_csv(root / "Data_Entry_2017.csv")
    assert list(df.columns) == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                                "OriginalImagePixelSpacing[x", "y]", "Unnamed: 11"]
    assert df["Patient Age"].str.fullmatch(r"\d{3}Y").all()
    box = pd.read_csv(root / "BBox_List_2017.csv")
    assert list(box.columns)[:6] == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
    assert (root / "BBox_List_2017.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    assert "Infiltrate" in set(box["Finding Label"]) and "Infiltration" not in set(box["Finding Label"])
    assert (df["Finding Labels"] == "No Finding").any() and df["Finding Labels"].str.contains("|", regex=False).any()


def test_nih_v2020_entry_file(written, tmp_path):
    root = copy_of(written, "nih", tmp_path)
    reference = nih_loader.load(written["nih"][0])
    old = root / "Data_Entry_2017.csv"
    lines = old.read_text().splitlines()
    out = [lines[0].rstrip(",")]
    for line in lines[1:]:
        f = line.rstrip(",").split(",")
        f[4] = str(int(f[4].rstrip("Y")))
        out.append(",".join(f))
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(out) + "\n")
    old.unlink()
    table = nih_loader.load(root)
    assert "Data_Entry_2017_v2020.csv" in table.source_files
    cols = [c for c in table.frame.columns if c != "image_path"]
    pd.testing.assert_frame_equal(table.frame[cols], reference.frame[cols])
    assert same_codes(table.labels, reference.labels)
    entries = nih_loader.read_entry(root / "Data_Entry_2017_v2020.csv")
    ref_entries = nih_loader.read_entry(written["nih"][0] / "Data_Entry_2017.csv")
    assert [e["age"] for e in entries] == [e["age"] for e in ref_entries]
    assert all(isinstance(e["age"], float) and 0 < e["age"] < 130 for e in entries)


def test_nih_age_and_box_label_quirks(tmp_path):
    assert nih_loader.parse_age("058Y") == 58 and nih_loader.parse_age("58") == 58
    assert nih_loader.parse_age("006M") == 0.5
    with pytest.raises(ValueError):
        nih_loader.parse_age("abc")
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(root / "images" / "00000001_000.png")
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "00000001_000.png,Infiltration|Effusion,0,1,058Y,M,PA,2682,2749,0.143,0.143,\n"
        "00000002_000.png,No Finding,0,2,041Y,F,AP,2500,2048,0.168,0.168,\n")
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                             "00000001_000.png,Infiltrate,10.5,5.25,20.0,30.0,,,\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n")
    (root / "test_list.txt").write_text("00000002_000.png\n")
    table = nih_loader.load(root)
    assert table.labels[0, NIH_LABELS.index("Infiltration")] == 1 and table.labels[0, NIH_LABELS.index("Effusion")] == 1
    assert table.labels[0].sum() == 2 and table.labels[1].sum() == 0
    assert np.allclose(table.boxes[0], [[10.5, 5.25, 30.5, 35.25]]) and table.boxes[1].shape == (0, 4)
    assert table.box_classes[table.box_labels[0][0]] == "Infiltration"
    assert (table.frame.loc[0, "height"], table.frame.loc[0, "width"]) == (40, 50)
    assert list(table.frame["split"]) == ["train", "test"]


def test_nih_bad_input(written, tmp_path):
    root = copy_of(written, "nih", tmp_path)
    n = len(nih_loader.load(root))
    entry = root / "Data_Entry_2017.csv"
    lines = entry.read_text().splitlines()
    f = lines[3].split(",")
    f[1] = "Cardiomegaly|Pneumonitis"
    lines[3] = ",".join(f)
    entry.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv, line 4: Finding Labels .*'Pneumonitis'"):
        nih_loader.load(root)
    table = nih_loader.load(root, skip_bad=True)
    assert table.skipped_rows == 1 and len(table) == n - 1 and f[0] not in set(table.frame["image_id"])
    entry.write_text("\n".join(lines[:3] + [lines[2]] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv, line 4: duplicate Image Index"):
        nih_loader.load(root)
    entry.write_text("\n".join(written_lines(written)) + "\n")
    # a box that leaves the image
    bbox = root / "BBox_List_2017.csv"
    blines = bbox.read_text().splitlines()
    image = blines[1].split(",")[0]
    side = decode(root / "images" / image).shape[1]
    blines.append(f"{image},Mass,{side - 5}.0,1.0,10.0,10.0,,,")
    blines.append(f"{image},Fibrosis,1.0,1.0,10.0,10.0,,,")
    bbox.write_text("\n".join(blines) + "\n")
    with pytest.raises(DataError, match=rf"BBox_List_2017\.csv, line {len(blines) - 1}: box .* leaves"):
        nih_loader.load(root)
    table = nih_loader.load(root, skip_bad=True)
    assert table.skipped_rows == 2
    assert sum(len(b) for b in table.boxes) == len(blines) - 3
    (root / "test_list.txt").unlink()
    with pytest.raises(MissingDataError, match=r"test_list\.txt"):
        nih_loader.load(root)
    (root / "Data_Entry_2017.csv").unlink()
    with pytest.raises(MissingDataError, match=r"Data_Entry_2017\.csv"):
        nih_loader.load(root)


def written_lines(written) -> list[str]:
    return (written["nih"][0] / "Data_Entry_2017.csv").read_text().splitlines()


# ------------------------------------------------------------------------------------------------
# IU X-ray
# ------------------------------------------------------------------------------------------------
def test_iu_roundtrip(written):
    root, cases = written["iu"]
    table = iu_loader.load(root)
    assert set(table.frame["image_id"]) == set(cases)
    assert table.classes == () and table.labels.shape == (len(cases), 0)
    data = json.loads((root / "annotation.json").read_text())
    split_of = {e["id"]: s for s in ("train", "val", "test") for e in data[s]}
    assert all(e["split"] == s for s in data for e in data[s])
    for _, row in table.frame.iterrows():
        case = cases[row["image_id"]]
        assert row["split"] == split_of[row["image_id"]]
        assert row["findings"] == norm(case.findings_text) != "" and row["impression"] == ""
        assert Path(row["image_path"]) == root / "images" / row["image_id"] / "0.png"
        assert row["extra_image_paths"] == (str(root / "images" / row["image_id"] / "1.png"),)
        assert np.array_equal(decode(row["image_path"]), case.image)
        assert np.array_equal(decode(row["extra_image_paths"][0]), case.meta["lateral_image"])
        assert re.fullmatch(r"CXR\d+_IM-\d{4}", row["image_id"])
    assert set(table.frame["split"]) == {"train", "val", "test"}


def test_iu_bad_input(written, tmp_path):
    root = copy_of(written, "iu", tmp_path)
    path = root / "annotation.json"
    data = json.loads(path.read_text())
    dup = dict(data["train"][0], split="test")
    data["test"].append(dup)
    path.write_text(json.dumps(data, indent=2))
    line = line_of(path.read_text().splitlines(), lambda s: f'"id": "{dup["id"]}"' in s)
    line2 = [k for k, s in enumerate(path.read_text().splitlines(), 1) if f'"id": "{dup["id"]}"' in s][1]
    with pytest.raises(DataError, match=rf"annotation\.json, line {line2}: duplicate id"):
        iu_loader.load(root)
    assert line < line2
    table = iu_loader.load(root, skip_bad=True)
    assert table.skipped_rows == 1 and len(table) == len(written["iu"][1])
    path.write_text("{\"train\": [}")
    with pytest.raises(DataError, match=r"annotation\.json, line 1: invalid JSON"):
        iu_loader.load(root)
    path.unlink()
    with pytest.raises(MissingDataError, match=r"annotation\.json"):
        iu_loader.load(root)


# ------------------------------------------------------------------------------------------------
# the real label files shipped in the torchxrayvision 1.5.7 wheel (datasets.md §12), installed by make test
# ------------------------------------------------------------------------------------------------
def _xrv_data() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data if data.is_dir() else None


def test_real_label_files_smoke(tmp_path):
    data = _xrv_data()
    if data is None:
        pytest.fail("torchxrayvision 1.5.7 (real label files) is not installed: run `make test`, whose "
                    "set-up installs it with --no-deps")
    chex = tmp_path / "chexpert"
    chex.mkdir()
    text = gzip.decompress((data / "chexpert_train.csv.gz").read_bytes()).decode()
    (chex / "train.csv").write_text(text)
    (chex / "valid.csv").write_text(text.split("\n", 1)[0] + "\n")
    table = chexpert_loader.load(chex)
    views = table.frame["view"].value_counts()
    assert len(table) == 223_414 and views["AP"] == 161_590 and views["PA"] == 29_420
    assert len(chexpert_loader.build_5x200(table).rows) == 1000
    nih = tmp_path / "nih"
    nih.mkdir()
    for name in ("Data_Entry_2017_v2020.csv.gz", "BBox_List_2017.csv.gz"):
        shutil.copy(data / name, nih / name)
    images = [line.split(",", 1)[0] for line in
              gzip.decompress((data / "Data_Entry_2017_v2020.csv.gz").read_bytes()).decode().splitlines()[1:]]
    (nih / "train_val_list.txt").write_text("\n".join(images[:-1000]) + "\n")
    (nih / "test_list.txt").write_text("\n".join(images[-1000:]) + "\n")
    table = nih_loader.load(nih)
    assert len(table) == 112_120 and table.positives()["Infiltration"] == 19_894
    assert sum(len(b) for b in table.boxes) == 984 and sum(1 for b in table.boxes if len(b)) == 880
