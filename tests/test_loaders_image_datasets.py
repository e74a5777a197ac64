"""Round trips and bad input for the RSNA, SIIM-ACR, COVIDx and Object-CXR writers and loaders.

Each synthetic writer produces the publisher's official files at scale "micro"; the loader must
read back, for every image, exactly the labels, boxes and masks that were drawn.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from bench.data.dicom import write_dicom
from bench.data.loaders import covidx, object_cxr, rsna, siim
from bench.data.rle import decode_siim_rle, encode_siim_rle
from bench.data.shapes import bounding_box, rasterize
from bench.data.spec import DATASETS
from bench.data.synth import write_covidx, write_object_cxr, write_rsna, write_siim
from bench.data.table import boxes_to_mask
from bench.errors import DataError, MissingDataError

WRITERS = {"rsna": write_rsna, "siim": write_siim, "covidx": write_covidx, "object-cxr": write_object_cxr}
LOADERS = {"rsna": rsna, "siim": siim, "covidx": covidx, "object-cxr": object_cxr}
SEEDS = {"rsna": 11, "siim": 12, "covidx": 13, "object-cxr": 14}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> (root, drawn cases), written once at scale micro."""
    out = {}
    for name, writer in WRITERS.items():
        root = tmp_path_factory.mktemp(name.replace("-", "_"))
        out[name] = (root, writer.write(root, np.random.default_rng(SEEDS[name]), "micro"))
    return out


def _copy(corpus, name, tmp_path) -> Path:
    root = tmp_path / name
    shutil.copytree(corpus[name][0], root)
    return root


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


# -- SIIM RLE --------------------------------------------------------------------------------------
def test_rle_decodes_hand_computed_example_column_major():
    mask = decode_siim_rle(" 1 2 5 1", 4, 4)
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[1, 0] = expected[2, 0] = 1          # flat positions 1, 2: down the first column
    expected[0, 2] = 1                            # position 8 = column 2, row 0
    np.testing.assert_array_equal(mask, expected)
    assert encode_siim_rle(expected) == "1 2 5 1"
    # non-square: positions run down the H rows of each column
    np.testing.assert_array_equal(np.argwhere(decode_siim_rle("3 1", 2, 3)), [[1, 1]])


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 7), (32, 32), (17, 40)])
def test_rle_encode_decode_are_inverse(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for density in (0.0, 0.05, 0.5, 0.95, 1.0):
        mask = (rng.random(shape) < density).astype(np.uint8)
        text = encode_siim_rle(mask)
        np.testing.assert_array_equal(decode_siim_rle(text, *shape), mask)
        assert decode_siim_rle(" " + text + " ", *shape).sum() == mask.sum()
        assert (text == "-1") == (not mask.any())


@pytest.mark.parametrize("text, message", [
    ("1 2 3", "odd number"), ("1 x", "not an integer"), ("1 2.5", "not an integer"),
    ("1 -2", "negative"), ("10 7", "past the end"), ("3 2 1 20", "past the end"),
])
def test_rle_rejects_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        decode_siim_rle(text, 4, 4)


# -- DICOM writer ----------------------------------------------------------------------------------
def test_write_dicom_variants(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(30, 41), dtype=np.uint8)
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", img, PatientID="p1", ViewPosition="AP",
                                     PatientAge="62", PixelSpacing=[0.168, 0.168]))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (ds.Modality, ds.ConversionType, ds.BodyPartExamined, ds.PhotometricInterpretation) == \
        ("CR", "WSD", "CHEST", "MONOCHROME2")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PatientAge == "62"
    np.testing.assert_array_equal(ds.pixel_array, img)

    smooth = np.add.outer(np.arange(40), np.arange(50)).astype(np.uint8) * 2
    ds = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", smooth, transfer="jpeg"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert np.abs(ds.pixel_array.astype(int) - smooth).mean() < 2.0

    img12 = rng.integers(0, 4096, size=(20, 24)).astype(np.uint16)
    ds = pydicom.dcmread(write_dicom(tmp_path / "c.dcm", img12, photometric="MONOCHROME1",
                                     bits_stored=12, window=(1800, 2400)))
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == ("MONOCHROME1", 16, 12, 11)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (1800.0, 2400.0)
    np.testing.assert_array_equal(ds.pixel_array, img12)

    with pytest.raises(ValueError, match="below 2"):
        write_dicom(tmp_path / "d.dcm", img12 | 4096, bits_stored=12)
    with pytest.raises(ValueError, match="JPEG"):
        write_dicom(tmp_path / "e.dcm", img12, bits_stored=12, transfer="jpeg")
    with pytest.raises(ValueError, match="keyword"):
        write_dicom(tmp_path / "f.dcm", img, NotAKeyword=1)


# -- registration ----------------------------------------------------------------------------------
def test_specs_registered():
    subdirs = {"rsna": "rsna-pneumonia", "siim": "siim-acr-pneumothorax", "covidx": "covidx",
               "object-cxr": "object-cxr"}
    for name, subdir in subdirs.items():
        spec = DATASETS.get(name)
        assert spec.synth_subdir == subdir and spec.load is LOADERS[name].load
    assert DATASETS.get("covidx").split.official == ("train", "test")
    assert DATASETS.get("rsna").split.official == ()


# -- RSNA ------------------------------------------------------------------------------------------
def test_rsna_round_trip(corpus):
    root, drawn = corpus["rsna"]
    table = rsna.load(root)
    assert sorted(table.frame["image_id"]) == sorted(drawn) and table.skipped_rows == 0
    assert table.classes == ("Pneumonia",) and table.box_classes == ("Lung Opacity",)
    n_boxes = []
    for i, row in table.frame.iterrows():
        case = drawn[row["image_id"]]
        boxes = np.array(write_rsna.opacity_boxes(case), dtype=np.float32).reshape(-1, 4)
        n_boxes.append(len(boxes))
        assert row["patient_id"] == row["image_id"]
        assert (row["height"], row["width"]) == case.image.shape and row["view"] == case.view
        assert table.labels[i, 0] == float(len(boxes) > 0)
        np.testing.assert_array_equal(table.boxes[i], boxes)
        np.testing.assert_array_equal(table.mask(i), boxes_to_mask(boxes, *case.image.shape))
        assert (table.masks[i] is None) == (len(boxes) == 0)
        ds = pydicom.dcmread(row["image_path"])
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and ds.PatientID == row["image_id"]
        np.testing.assert_array_equal(ds.pixel_array, case.image)
    assert 0 in n_boxes and max(n_boxes) >= 2
    lines = (root / "stage_2_train_labels.csv").read_text().splitlines()
    assert lines[0] == "patientId,x,y,width,height,Target"
    assert any(l.endswith(",,,,,0") for l in lines)
    assert all(re.fullmatch(r"[0-9a-f-]{36}(,\d+\.0){4},1", l) for l in lines[1:] if l.endswith(",1"))
    assert len(lines) - 1 == sum(max(n, 1) for n in n_boxes)
    assert len((root / "stage_2_detailed_class_info.csv").read_text().splitlines()) == len(lines)


def test_rsna_bad_rows(corpus, tmp_path):
    root = _copy(corpus, "rsna", tmp_path)
    labels = root / "stage_2_train_labels.csv"
    lines = labels.read_text().splitlines()
    lineno = next(i for i, l in enumerate(lines, 1) if l.endswith(",1"))
    pid, x, y, w, h, _ = lines[lineno - 1].split(",")
    n_rows = sum(l.startswith(pid + ",") for l in lines)
    _replace_line(labels, lineno, f"{pid},{x},{y},{w},5000.0,1")
    with pytest.raises(DataError, match=rf"stage_2_train_labels\.csv, line {lineno}: .*outside") as err:
        rsna.load(root)
    assert err.value.line == lineno
    table = rsna.load(root, skip_bad=True)
    assert table.skipped_rows == n_rows and pid not in set(table.frame["image_id"])
    assert len(table) == len(corpus["rsna"][1]) - 1

    root = _copy(corpus, "rsna", tmp_path / "dup")
    labels = root / "stage_2_train_labels.csv"
    negative = next(l for l in lines if l.endswith(",,,,,0"))
    labels.write_text(labels.read_text() + negative + "\n")
    with pytest.raises(DataError, match=rf"line {len(lines) + 1}: .*listed again"):
        rsna.load(root)
    assert rsna.load(root, skip_bad=True).skipped_rows == 2


# -- SIIM ------------------------------------------------------------------------------------------
def test_siim_round_trip(corpus):
    root, drawn = corpus["siim"]
    table = siim.load(root)
    assert sorted(table.frame["image_id"]) == sorted(drawn) and table.skipped_rows == 0
    maes = []
    for i, row in table.frame.iterrows():
        case = drawn[row["image_id"]]
        expected = case.mask_of("pneumothorax")
        assert table.labels[i, 0] == float(expected.any())
        np.testing.assert_array_equal(table.mask(i), expected.astype(np.uint8))
        path = Path(row["image_path"])
        rel = path.relative_to(root).parts
        assert len(rel) == 4 and rel[0] == "dicom-images-train" and path.stem == row["image_id"]
        assert ".3.1.2." in rel[1] and ".3.1.3." in rel[2] and ".3.1.4." in rel[3]
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert ds.PatientID == row["patient_id"] != row["image_id"] and row["view"] == case.view
        maes.append(np.abs(ds.pixel_array.astype(int) - case.image.astype(int)).mean())
    assert max(maes) < 3.0
    lines = (root / "train-rle.csv").read_text().splitlines()
    assert lines[0] == "ImageId, EncodedPixels"
    values = [l.split(",", 1)[1] for l in lines[1:]]
    assert " -1" in values and "-1" in values
    assert all(v.startswith(" ") and v[1].isdigit() for v in values if v.strip() != "-1")
    ids = [l.split(",", 1)[0] for l in lines[1:]]
    multi = [i for i in set(ids) if ids.count(i) >= 2]
    assert multi and len(ids) > len(set(ids)) == len(table)
    # the union of the rows of a two-row image is its mask, and each row is a separate component
    row = int(np.flatnonzero(table.frame["image_id"] == multi[0])[0])
    parts = [decode_siim_rle(v, *drawn[multi[0]].image.shape) for i, v in zip(ids, values) if i == multi[0]]
    np.testing.assert_array_equal(np.bitwise_or.reduce(parts), table.mask(row))
    assert sum(p.sum() for p in parts) == table.mask(row).sum()


def test_siim_bad_rows(corpus, tmp_path):
    root = _copy(corpus, "siim", tmp_path)
    rle = root / "train-rle.csv"
    lines = rle.read_text().splitlines()
    lineno = next(i for i, l in enumerate(lines, 1) if i > 1 and l.split(",")[1].strip() != "-1")
    image_id = lines[lineno - 1].split(",")[0]
    n_rows = sum(l.startswith(image_id + ",") for l in lines)
    _replace_line(rle, lineno, f"{image_id}, 5 3 7")
    with pytest.raises(DataError, match=rf"train-rle\.csv, line {lineno}: .*odd number"):
        siim.load(root)
    table = siim.load(root, skip_bad=True)
    assert table.skipped_rows == n_rows and image_id not in set(table.frame["image_id"])

    root = _copy(corpus, "siim", tmp_path / "orphan")
    rle = root / "train-rle.csv"
    rle.write_text(rle.read_text() + "1.2.276.0.7230010.3.1.4.8323329.1.1517875000.1, -1\n")
    with pytest.raises(DataError, match=r"line \d+: 1 ImageId\(s\) have no DICOM .*8323329\.1\.1517875000\.1"):
        siim.load(root)
    assert siim.load(root, skip_bad=True).skipped_rows == 1

    root = _copy(corpus, "siim", tmp_path / "dup")
    rle = root / "train-rle.csv"
    negative = next(l for l in lines[1:] if l.split(",")[1].strip() == "-1")
    rle.write_text(rle.read_text() + negative + "\n")
    with pytest.raises(DataError, match=rf"line {len(lines) + 1}: .*listed twice as negative"):
        siim.load(root)


# -- COVIDx ----------------------------------------------------------------------------------------
def test_covidx_round_trip(corpus):
    root, drawn = corpus["covidx"]
    table = covidx.load(root)
    assert sorted(table.frame["image_id"]) == sorted(drawn) and table.skipped_rows == 0
    assert table.classes == ("normal", "pneumonia", "COVID-19")
    for i, row in table.frame.iterrows():
        case = drawn[row["image_id"]]
        k = table.classes.index(case.meta["covidx_class"])
        np.testing.assert_array_equal(table.labels[i], np.eye(3, dtype=np.float32)[k])
        assert row["class_index"] == k and Path(row["image_path"]).name == row["image_id"]
        assert Path(row["image_path"]).parent.name == row["split"]
        assert (row["height"], row["width"]) == case.image.shape
        if row["image_id"].endswith(".png"):      # lossless: the drawn pixels exactly
            arr = np.asarray(Image.open(row["image_path"]))
            np.testing.assert_array_equal(arr if arr.ndim == 2 else arr[..., 0], case.image)
    for split in ("train", "test"):
        first = (root / f"{split}_COVIDx9A.txt").read_text().splitlines()[0].split()
        assert len(first) == 4 and first[1] in set(table.frame["image_id"])   # no header line
        assert set(table.frame.loc[table.frame["split"] == split, "class_index"]) <= {0, 1, 2}
    stems = table.frame["image_id"].str.split(".").str[0]
    assert (stems == "DX").sum() >= 2 and table.frame.loc[stems == "DX", "image_id"].is_unique
    suffixes = {Path(p).suffix for p in table.frame["image_path"]}
    assert ".png" in suffixes and suffixes & {".jpg", ".jpeg"}
    assert any(Image.open(p).mode == "RGB" for p in table.frame["image_path"])
    assert (table.frame["height"] != table.frame["width"]).any()
    assert set(table.frame["split"]) == {"train", "test"}


def test_covidx_bad_rows(corpus, tmp_path):
    root = _copy(corpus, "covidx", tmp_path)
    listing = root / "train_COVIDx9A.txt"
    lines = listing.read_text().splitlines()
    patient, filename, _, source = lines[2].split()
    _replace_line(listing, 3, f"{patient} {filename} tuberculosis {source}")
    with pytest.raises(DataError, match=r"train_COVIDx9A\.txt, line 3: unknown class 'tuberculosis'"):
        covidx.load(root)
    table = covidx.load(root, skip_bad=True)
    assert table.skipped_rows == 1 and filename not in set(table.frame["image_id"])

    root = _copy(corpus, "covidx", tmp_path / "dup")
    test_list = root / "test_COVIDx9A.txt"
    n_test = len(test_list.read_text().splitlines())
    test_list.write_text(test_list.read_text() + lines[0] + "\n")
    with pytest.raises(DataError, match=rf"test_COVIDx9A\.txt, line {n_test + 1}: .*listed again"):
        covidx.load(root)

    root = _copy(corpus, "covidx", tmp_path / "missing")
    (root / "train" / lines[1].split()[1]).unlink()
    with pytest.raises(DataError, match=r"line 2: image train/DX\..* not found"):
        covidx.load(root)
    assert covidx.load(root, skip_bad=True).skipped_rows == 1


# -- Object-CXR ------------------------------------------------------------------------------------
def test_object_cxr_round_trip(corpus):
    root, drawn = corpus["object-cxr"]
    table = object_cxr.load(root)
    assert sorted(table.frame["image_id"]) == sorted(drawn) and table.skipped_rows == 0
    for i, row in table.frame.iterrows():
        case = drawn[row["image_id"]]
        objs = write_object_cxr.objects(case)
        h, w = case.image.shape
        assert (row["height"], row["width"]) == (h, w)
        assert table.labels[i, 0] == float(bool(objs))
        expected_boxes = np.array([bounding_box(o.shape.points) for o in objs], dtype=np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(table.boxes[i], expected_boxes)
        expected = np.zeros((h, w), dtype=bool)
        for o in objs:
            expected |= rasterize(o.shape.kind, o.shape.points, h, w)
        np.testing.assert_array_equal(table.mask(i), expected.astype(np.uint8))
        unannotated = case.mask_of("foreign_object") & ~expected      # objects outside the lung field
        assert not (table.mask(i).astype(bool) & unannotated).any()
        folder = "train" if row["split"] == "train" else "dev"
        assert Path(row["image_path"]).parent.name == folder
    assert (root / "train.csv").read_text().startswith("image_name,annotation\n")
    assert (root / "dev.csv").read_text().startswith("image_path,annotation\n")
    assert sorted(table.frame.loc[table.frame["split"] == "test", "image_id"])[0] == "08001.jpg"
    assert "00001.jpg" in set(table.frame["image_id"])
    for split in ("train", "test"):
        pos = table.labels[(table.frame["split"] == split).to_numpy(), 0]
        assert abs(pos.mean() - 0.5) <= 0.1
    first = (root / "train.csv").read_text().splitlines()[1].split(",")[1]
    assert {part.split()[0] for part in first.split(";")} == {"0", "1", "2"}
    assert any(a == "" for a in (l.split(",")[1] for l in (root / "dev.csv").read_text().splitlines()[1:]))
    assert (table.frame["height"] != table.frame["width"]).all() or table.frame["height"].nunique() > 1


def test_object_cxr_bad_rows(corpus, tmp_path):
    root = _copy(corpus, "object-cxr", tmp_path)
    train = root / "train.csv"
    lines = train.read_text().splitlines()
    name = lines[3].split(",")[0]
    _replace_line(train, 4, f"{name},3 1 2 3 4")
    with pytest.raises(DataError, match=r"train\.csv, line 4: unknown shape type '3'"):
        object_cxr.load(root)
    table = object_cxr.load(root, skip_bad=True)
    assert table.skipped_rows == 1 and name not in set(table.frame["image_id"])

    root = _copy(corpus, "object-cxr", tmp_path / "outside")
    _replace_line(root / "train.csv", 2, f"{lines[1].split(',')[0]},0 1 1 5000 3")
    with pytest.raises(DataError, match=r"train\.csv, line 2: rectangle .* outside"):
        object_cxr.load(root)

    root = _copy(corpus, "object-cxr", tmp_path / "dup")
    dev = root / "dev.csv"
    n_dev = len(dev.read_text().splitlines())
    dev.write_text(dev.read_text() + lines[1] + "\n")
    with pytest.raises(DataError, match=rf"dev\.csv, line {n_dev + 1}: image 00001\.jpg is listed again"):
        object_cxr.load(root)
    assert object_cxr.load(root, skip_bad=True).skipped_rows == 1


# -- missing data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, official_file", [
    ("rsna", "stage_2_train_labels.csv"), ("rsna", "stage_2_train_images"),
    ("siim", "train-rle.csv"), ("siim", "dicom-images-train"),
    ("covidx", "test_COVIDx9A.txt"), ("covidx", "train"),
    ("object-cxr", "dev.csv"), ("object-cxr", "train"),
])
def test_missing_root_and_files(corpus, tmp_path, name, official_file):
    with pytest.raises(MissingDataError, match=re.escape(str(tmp_path / "nowhere"))):
        LOADERS[name].load(tmp_path / "nowhere")
    root = _copy(corpus, name, tmp_path)
    target = root / official_file
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MissingDataError, match=re.escape(str(target)) + ": not found; expected"):
        LOADERS[name].load(root)
