"""Smoke tests on the REAL label files that the torchxrayvision 1.5.7 wheel ships (datasets.md §12).

The wheel carries no images, only the publishers' label files, so these tests check our parsers
against the real RSNA labels CSV and SIIM RLE file (the CheXpert and NIH files are covered in
test_loaders_text_datasets.py). `make test` installs the wheel with --no-deps; the files are read
in place from site-packages and never copied into the repository.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench.data.loaders import rsna as rsna_loader
from bench.data.loaders import siim as siim_loader
from bench.data.rle import decode_siim_rle, encode_siim_rle


@pytest.fixture(scope="module")
def xrv_data() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("torchxrayvision 1.5.7 is not installed: run `make test` (scripts/setup_env.sh "
                    "installs it with --no-deps for its real label files)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def test_real_rsna_labels_parse_to_the_published_counts(xrv_data, tmp_path):
    with zipfile.ZipFile(xrv_data / "kaggle_stage_2_train_labels.csv.zip") as z:
        name = next(n for n in z.namelist() if n.endswith(".csv"))
        (tmp_path / "stage_2_train_labels.csv").write_bytes(z.read(name))
    patients, errors = rsna_loader._read_labels(tmp_path / "stage_2_train_labels.csv")
    assert errors == [] and not any(p.error for p in patients.values())
    assert len(patients) == 26_684
    assert sum(p.target == 1 for p in patients.values()) == 6_012
    assert sum(len(p.boxes) for p in patients.values()) == 9_555
    boxes = np.array([b for p in patients.values() for _, b in p.boxes])
    assert (boxes[:, 0] + boxes[:, 2] <= 1024).all() and (boxes[:, 1] + boxes[:, 3] <= 1024).all()


def test_real_siim_rles_round_trip(xrv_data, tmp_path):
    path = tmp_path / "train-rle.csv"
    path.write_bytes(gzip.decompress((xrv_data / "siim-pneumothorax-train-rle.csv.gz").read_bytes()))
    images, errors = siim_loader._read_rle(path)
    assert errors == []
    rows = [(image_id, line, rle) for image_id, entries in images.items() for line, rle in entries]
    assert len(rows) == 12_954 and len(images) == 12_047
    positive = {image_id for image_id, _, rle in rows if rle != "-1"}
    assert len(positive) == 2_669
    # every 10th positive RLE decodes inside the 1024x1024 image and re-encodes to the same string
    for image_id, line, rle in [r for r in rows if r[2] != "-1"][::10]:
        mask = decode_siim_rle(rle, 1024, 1024)
        assert mask.any(), f"line {line}: empty mask"
        assert encode_siim_rle(mask) == " ".join(rle.split()), f"line {line} of the real train-rle.csv"
