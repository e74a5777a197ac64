"""Real data that is not perfect: truncated images, --skip-bad, resumed cache builds, CheXpert root
layouts, `data verify --decode`, the canonical view vocabulary and the per-split summary."""
from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench import cli, runner
from bench.data import cache as cache_mod
from bench.data.cache import ImageCache, UndecodableImagesError
from bench.data.images import letterbox, read_image
from bench.data.prepare import prepare_dataset
from bench.data.spec import DATASETS, DatasetSpec, SplitProtocol, register_dataset
from bench.data.splits import SplitManifest
from bench.data.table import VIEWS, CanonicalTable, canonical_view, make_frame
from bench.errors import DataError
from engine_fakes import FAKE_METHOD, FAKE_TASK, world  # noqa: F401  (fixture)

BAD = "infra-bad-toy"


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a valid file's bytes: its header still parses, its pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- a stand-in dataset of JPEGs with a CSV, whose loader can skip malformed rows ----------------------
def write_bad_toy(root: Path, n_patients: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,patient,label,split"]
    for p in range(n_patients):
        for k in range(2):
            img = rng.integers(0, 255, (48 + 4 * k, 40), dtype=np.uint8)
            name = f"p{p:02d}_{k}.jpg"
            Image.fromarray(img).save(root / "images" / name, quality=90)
            lines.append(f"{name},P{p:02d},{int(rng.random() < 0.4)},{'test' if p % 4 == 0 else 'train'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def load_bad_toy(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    root = Path(root)
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    rows, labels, skipped = [], [], 0
    for line, r in enumerate(df.itertuples(index=False), start=2):
        if r.label not in ("0", "1"):
            if not skip_bad:
                raise DataError(f"label {r.label!r} is not 0 or 1", path=root / "labels.csv", line=line)
            skipped += 1
            continue
        rows.append({"image_id": r.image, "image_path": str(root / "images" / r.image), "patient_id": r.patient,
                     "split": r.split})
        labels.append([float(r.label)])
    return CanonicalTable(BAD, root, make_frame(rows), ("finding",), np.array(labels, np.float32),
                          skipped_rows=skipped, source_files=("labels.csv",))


if BAD not in DATASETS:
    register_dataset(DatasetSpec(BAD, "Stand-in dataset with bad files", "labels.csv + images/", load_bad_toy,
                                 SplitProtocol(official=("train", "test"), val_fraction=0.2), "infra-bad-toy"))


def count_decodes(monkeypatch) -> list[str]:
    decoded: list[str] = []
    real = cache_mod.read_image
    monkeypatch.setattr(cache_mod, "read_image", lambda p: (decoded.append(Path(p).name), real(p))[1])
    return decoded


# -- truncated JPEG: stop with every path, or skip and count ----------------------------------------
def test_truncated_jpeg_stops_the_run_listing_every_path_and_skip_bad_counts_it(tmp_path, monkeypatch, caplog):
    root = write_bad_toy(tmp_path / "toy")
    clean = prepare_dataset(BAD, root, image_size=24, workers=1, progress=False)
    n = len(clean.table)
    bad = [root / "images" / "p01_0.jpg", root / "images" / "p05_1.jpg"]
    for p in bad:
        truncate(p)
        assert Image.open(p).size  # the header still reads: only a full decode fails
    decoded = count_decodes(monkeypatch)
    with pytest.raises(UndecodableImagesError) as err:
        prepare_dataset(BAD, root, image_size=24, workers=1, progress=False)
    assert sorted(Path(p).name for p in err.value.paths) == ["p01_0.jpg", "p05_1.jpg"]
    text = str(err.value)
    assert all(str(p) in text for p in bad) and "--skip-bad" in text and "truncated" in text
    # the two changed files were decoded, the other rows copied from the clean cache (same files)
    assert sorted(decoded) == ["p01_0.jpg", "p05_1.jpg"]

    decoded.clear()
    with caplog.at_level("WARNING"):
        skipped = prepare_dataset(BAD, root, image_size=24, workers=1, progress=False, skip_bad=True)
    # only the two failures are tried again (to learn which rows to drop); the good rows are copied
    assert sorted(decoded) == ["p01_0.jpg", "p05_1.jpg"]
    assert all(str(p) in caplog.text for p in bad)  # named in the log
    assert len(skipped.table) == n - 2 and not set(skipped.table.frame["image_id"]) & {p.name for p in bad}
    assert skipped.source["skipped_rows"] == 2 and skipped.source["skip_bad"] is True
    assert skipped.source["skipped"] == {"malformed_row": 0, "missing_image": 0, "undecodable_image": 2}
    assert skipped.manifest.skipped_rows == 2 and len(skipped.manifest) == n - 2
    assert skipped.manifest.sha256 != clean.manifest.sha256
    recorded = SplitManifest.read(skipped.source["manifest_path"])
    assert recorded.sha256 == skipped.manifest.sha256 and recorded.skipped_rows == 2
    assert len(skipped.images) == n - 2
    for i, p in enumerate(skipped.table.frame["image_path"]):
        np.testing.assert_array_equal(skipped.images.array[i], letterbox(read_image(p), 24)[0])


def test_skipped_rows_are_split_by_reason(tmp_path):
    root = write_bad_toy(tmp_path / "toy")
    df = pd.read_csv(root / "labels.csv", dtype=str)
    df.loc[3, "label"] = "maybe"                                 # malformed row
    df.to_csv(root / "labels.csv", index=False)
    (root / "images" / df["image"].iat[6]).unlink()              # missing image
    truncate(root / "images" / df["image"].iat[9])               # undecodable image
    with pytest.raises(DataError, match="line 5"):
        prepare_dataset(BAD, root, image_size=16, workers=1, progress=False)
    prep = prepare_dataset(BAD, root, image_size=16, workers=1, progress=False, skip_bad=True)
    assert prep.source["skipped"] == {"malformed_row": 1, "missing_image": 1, "undecodable_image": 1}
    assert prep.source["skipped_rows"] == prep.manifest.skipped_rows == 3 and prep.source["rows"] == len(df) - 3


# -- resumable cache builds ----------------------------------------------------------------------------
def test_crashed_cache_build_resumes_decoding_only_the_rest(tmp_path, monkeypatch):
    root = write_bad_toy(tmp_path / "toy", n_patients=10)
    table = load_bad_toy(root)
    real = cache_mod.read_image
    calls = {"n": 0}

    def crash_at_9(p):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("simulated crash")  # not a DataError: the build itself dies
        return real(p)

    monkeypatch.setattr(cache_mod, "read_image", crash_at_9)
    with pytest.raises(RuntimeError):
        ImageCache.open_or_build(table, 20, workers=1, chunk_size=4, progress=False)
    final = ImageCache.location(table, 20)
    assert not final.exists() and (ImageCache.partial_location(final) / "done.npy").is_file()
    decoded: list[str] = []
    monkeypatch.setattr(cache_mod, "read_image", lambda p: (decoded.append(Path(p).name), real(p))[1])
    cache = ImageCache.open_or_build(table, 20, workers=1, chunk_size=4, progress=False)
    assert decoded == list(table.frame["image_id"].iloc[8:])  # two chunks of 4 were done before the crash
    assert cache.meta["resumed_rows"] == 8 and cache.meta["decoded_rows"] == len(table) - 8
    assert not ImageCache.partial_location(final).exists()
    for i, p in enumerate(table.frame["image_path"]):
        np.testing.assert_array_equal(cache.array[i], letterbox(real(p), 20)[0])


def test_failed_build_keeps_decoded_rows_and_retries_only_the_failures(tmp_path, monkeypatch):
    root = write_bad_toy(tmp_path / "toy", n_patients=6)
    table = load_bad_toy(root)
    truncate(Path(table.frame["image_path"].iat[4]))
    with pytest.raises(UndecodableImagesError) as err:
        ImageCache.open_or_build(table, 16, workers=1, chunk_size=3, progress=False)
    assert err.value.rows.tolist() == [4]
    decoded = count_decodes(monkeypatch)
    with pytest.raises(UndecodableImagesError):
        ImageCache.open_or_build(table, 16, workers=1, chunk_size=3, progress=False)
    assert decoded == [table.frame["image_id"].iat[4]]  # only the failed row is tried again
    # the file is replaced: its key changes, so a new cache, filled from the partial one but that file
    Image.fromarray(np.full((30, 30), 77, np.uint8)).save(table.frame["image_path"].iat[4], quality=90)
    decoded.clear()
    cache = ImageCache.open_or_build(load_bad_toy(root), 16, workers=1, chunk_size=3, progress=False)
    assert decoded == [table.frame["image_id"].iat[4]] and cache.meta["copied_rows"] == len(table) - 1


def test_rows_with_extra_views_are_copied_whole(tmp_path, monkeypatch):
    """IU X-ray style rows (a lateral beside the frontal): a cache filled by copying equals decoding."""
    rng = np.random.default_rng(1)
    (tmp_path / "iu").mkdir()
    rows = []
    for i in range(6):
        paths = []
        for v in range(1 + i % 3):  # 0, 1 or 2 extra views
            p = tmp_path / "iu" / f"s{i}_{v}.png"
            Image.fromarray(rng.integers(0, 255, (30 + v, 26), dtype=np.uint8)).save(p)
            paths.append(str(p))
        rows.append({"image_id": f"s{i}", "image_path": paths[0], "extra_image_paths": tuple(paths[1:]),
                     "patient_id": f"s{i}"})
    table = CanonicalTable("iu-like", tmp_path, make_frame(rows), (), np.zeros((6, 0), np.float32))
    truncate(Path(rows[1]["extra_image_paths"][0]))  # a bad lateral fails its whole row
    with pytest.raises(UndecodableImagesError) as err:
        ImageCache.open_or_build(table, 16, workers=1, chunk_size=2, progress=False)
    assert err.value.paths == [rows[1]["extra_image_paths"][0]]
    decoded = count_decodes(monkeypatch)
    sub = table.without_rows([1], "undecodable_image")
    cache = ImageCache.open_or_build(sub, 16, workers=1, chunk_size=2, progress=False)
    assert decoded == [] and cache.meta["copied_rows"] == 5
    for i, row in sub.frame.iterrows():
        np.testing.assert_array_equal(cache.array[i], letterbox(read_image(row["image_path"]), 16)[0])
        assert cache.extra_count[i] == len(row["extra_image_paths"])
        for v, p in enumerate(row["extra_image_paths"]):
            np.testing.assert_array_equal(cache.extra[i, v], letterbox(read_image(p), 16)[0])
            np.testing.assert_allclose(cache.extra_geometry[i, v], letterbox(read_image(p), 16)[1].to_array())


# -- CheXpert root layouts --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chexpert_outer(tmp_path_factory):
    from bench.data.synth import write_chexpert

    outer = tmp_path_factory.mktemp("chexpert-outer")
    write_chexpert.write(outer / "CheXpert-v1.0-small", np.random.default_rng(5), "micro")
    return outer


def test_chexpert_root_holding_the_release_folder_works_like_the_folder(chexpert_outer):
    from bench.data.loaders import chexpert as loader
    from bench.data.splits import build_splits

    inner = chexpert_outer / "CheXpert-v1.0-small"
    assert pd.read_csv(inner / "train.csv")["Path"].str.startswith("CheXpert-v1.0-small/train/").all()
    a, b = loader.load(inner), loader.load(chexpert_outer)
    assert a.root == b.root == inner
    pd.testing.assert_frame_equal(a.frame, b.frame)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert all(Path(p).is_file() for p in b.frame["image_path"])
    spec = DATASETS.get("chexpert")
    assert build_splits(a, spec.split, seed=0).sha256 == build_splits(b, spec.split, seed=0).sha256
    # through --data: the same root is recorded, so results, manifests and caches are shared
    pa = prepare_dataset("chexpert", str(inner), image_size=16, workers=1, progress=False)
    pb = prepare_dataset("chexpert", str(chexpert_outer), image_size=16, workers=1, progress=False)
    assert pa.source["root"] == pb.source["root"] == str(inner)
    assert pa.manifest.sha256 == pb.manifest.sha256 and pa.images.path == pb.images.path


def test_chexpert_root_without_the_csvs_names_what_it_expected(tmp_path):
    from bench.data.loaders import chexpert as loader

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train.csv"):
        loader.load(tmp_path / "empty")


# -- data verify --decode ------------------------------------------------------------------------------
def run_data(*argv: str) -> int:
    from bench.data.cli import add_data_commands

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def test_verify_decode_catches_a_truncated_jpeg_the_header_check_misses(tmp_path, capsys):
    root = write_bad_toy(tmp_path / "toy")
    victim = root / "images" / "p03_1.jpg"
    truncate(victim, 0.6)
    assert run_data("verify", "--dataset", BAD, "--root", str(root)) == 0  # headers are fine
    assert "--decode" in capsys.readouterr().out
    assert run_data("verify", "--dataset", BAD, "--root", str(root), "--decode") == 1
    out = capsys.readouterr().out
    assert "undecodable" in out and str(victim) in out and "1 problem(s)" in out
    victim.write_bytes(b"")  # an emptied file is caught by the header check too, and by --decode
    assert run_data("verify", "--dataset", BAD, "--root", str(root), "--decode") == 1
    assert str(victim) in capsys.readouterr().out


def test_verify_decode_passes_on_clean_files(tmp_path, capsys):
    root = write_bad_toy(tmp_path / "toy", n_patients=4)
    assert run_data("verify", "--dataset", BAD, "--root", str(root), "--decode") == 0
    assert "decoded fully" in capsys.readouterr().out


# -- the view vocabulary ------------------------------------------------------------------------------------
def test_canonical_view_mapping():
    assert [canonical_view(v) for v in ("PA", " ap ", "LATERAL", "LL", "rl", "XTABLE LATERAL", "AP LLD", "LAO",
                                        "SWIMMERS", "", None)] == \
        ["PA", "AP", "LATERAL", "LATERAL", "LATERAL", "LATERAL", "OTHER", "OTHER", "OTHER", "", ""]
    assert set(VIEWS) == {"PA", "AP", "LATERAL", "OTHER", ""}
    with pytest.raises(ValueError, match="'LL'"):  # a loader that forgets to map is refused
        CanonicalTable("x", Path("."), make_frame([{"image_id": "a", "image_path": "a", "patient_id": "p",
                                                    "view": "LL"}]), (), np.zeros((1, 0), np.float32))


def test_chexpert_frontal_ll_stays_frontal_and_mimic_ll_is_lateral(chexpert_outer, tmp_path):
    from bench.data.labels import frontal_mask
    from bench.data.loaders import chexpert as chexpert_loader
    from bench.data.loaders import mimic_cxr as mimic_loader
    from bench.data.synth import write_mimic_cxr

    root = tmp_path / "cx"
    shutil.copytree(chexpert_outer / "CheXpert-v1.0-small", root)
    df = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    frontal = np.flatnonzero(df["Frontal/Lateral"] == "Frontal")
    df.loc[frontal[0], "AP/PA"] = "LL"
    df.loc[frontal[1], "AP/PA"] = ""
    df.to_csv(root / "train.csv", index=False)
    t = chexpert_loader.load(root)
    row = t.frame.set_index("image_id")
    ll, blank = (df["Path"].iat[i].split("/", 1)[1] for i in frontal[:2])
    assert (row.at[ll, "view"], row.at[ll, "view_raw"]) == ("OTHER", "Frontal LL")
    assert (row.at[blank, "view"], row.at[blank, "view_raw"]) == ("", "Frontal")
    keep = pd.Series(frontal_mask(t), index=t.frame["image_id"])
    assert keep[ll] and keep[blank]
    lateral = t.frame["view_raw"] == "Lateral"
    assert lateral.any() and (t.frame.loc[lateral, "view"] == "LATERAL").all() and not keep[lateral.to_numpy()].any()
    assert set(t.frame["view"]) <= set(VIEWS)

    mroot = tmp_path / "mimic"
    write_mimic_cxr.write(mroot, np.random.default_rng(3), "micro")
    meta_file = mroot / "mimic-cxr-2.0.0-metadata.csv.gz"
    meta = pd.read_csv(meta_file, dtype=str, keep_default_na=False)
    meta.loc[0, "ViewPosition"], meta.loc[1, "ViewPosition"] = "LL", "AP LLD"
    buf = io.StringIO()
    meta.to_csv(buf, index=False)
    with gzip.open(meta_file, "wt", newline="") as fh:
        fh.write(buf.getvalue())
    m = mimic_loader.load(mroot).frame.set_index("image_id")
    assert (m.at[meta["dicom_id"].iat[0], "view"], m.at[meta["dicom_id"].iat[0], "view_raw"]) == ("LATERAL", "LL")
    assert m.at[meta["dicom_id"].iat[1], "view"] == "OTHER"
    assert set(m["view"]) <= set(VIEWS)


# -- data summary per split and fraction ----------------------------------------------------------------------
def test_summary_counts_images_patients_and_positive_patients_per_split(chexpert_outer, capsys):
    from bench.data.cli import split_label_counts
    from bench.data.labels import chexpert_labels
    from bench.data.loaders import chexpert as loader
    from bench.data.splits import build_splits

    table = loader.load(chexpert_outer)
    manifest = build_splits(table, DATASETS.get("chexpert").split, seed=0)
    got = split_label_counts(table, manifest)
    space = chexpert_labels(table)
    assert got["classes"] == list(space.classes) and list(got["splits"]) == list(manifest.sizes())
    pat = table.frame["patient_id"].to_numpy()
    for key, c in got["splits"].items():
        split, _, frac = key.partition("@")
        rows = manifest.rows(split, float(frac or 1.0))
        used = rows[space.keep[rows]]
        assert c["rows"] == len(rows) and c["images"] == len(used)
        assert c["patients"] == len(set(pat[used]))
        for j, name in enumerate(space.classes):
            assert c["positive_patients"][name] == len(set(pat[used[space.targets[used, j] == 1]]))
    assert got["splits"]["train@1.0"]["images"] < got["splits"]["train@1.0"]["rows"]  # laterals filtered out
    assert run_data("summary", "--dataset", "chexpert", "--root", str(chexpert_outer)) == 0
    out = capsys.readouterr().out
    assert "Edema: positive patients" in out and "train@0.01" in out and "frontal only" in out
    assert run_data("summary", "--dataset", "chexpert", "--root", str(chexpert_outer), "--json") == 0
    assert json.loads(capsys.readouterr().out)["split_labels"] == got


# -- bench run --skip-bad -------------------------------------------------------------------------------------
def test_run_skip_bad_reaches_the_data_layer_and_the_result(world, monkeypatch, capsys, tmp_path):
    calls = []

    def prepare(dataset, data, *, image_size, split_seed, skip_bad=False):
        calls.append(skip_bad)
        n = 2 if skip_bad else 0
        source = {"kind": "real", "root": "/fake", "dataset": dataset, "manifest_sha256": f"m-skip{n}",
                  "rows": 10 - n, "skipped_rows": n,
                  "skipped": {"malformed_row": 0, "missing_image": 0, "undecodable_image": n}}
        return type("Prepared", (), {"source": source})()

    monkeypatch.setattr(runner, "prepare_data", prepare)
    run = ["run", "--method", FAKE_METHOD, "--task", FAKE_TASK, "--fraction", "0.1", "--device", "cpu",
           "--data", str(tmp_path / "real-root")]
    assert cli.main(run) == 0 and calls == [False]
    assert "skipped" not in capsys.readouterr().out
    assert cli.main(run + ["--skip-bad"]) == 0 and calls == [False, True]
    out = capsys.readouterr().out
    assert "2 rows skipped" in out and "ran in" in out  # another manifest: the old result is stale
    path = next((tmp_path / "results").rglob("frac0.1-seed0*.json"))
    source = json.loads(path.read_text())["data_source"]
    assert source["skipped_rows"] == 2 and source["skipped"]["undecodable_image"] == 2
    assert cli.main(run + ["--skip-bad"]) == 0 and "cached" in capsys.readouterr().out
