"""Image cache, synthetic corpus generation, prepare_dataset and the `data` commands."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.data import cache as cache_mod
from bench.data.cache import ImageCache, image_fingerprint
from bench.data.images import letterbox, read_image
from bench.data.spec import DATASETS, DatasetSpec, SplitProtocol, register_dataset
from bench.data.splits import SplitManifest, build_splits
from bench.data.synth import corpus as corpus_mod
from bench.data.table import CanonicalTable, encode_mask, make_frame

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))


# -- a hand-made dataset ---------------------------------------------------------------------------
def write_images(folder: Path, n: int, seed: int = 0, dicom_every: int = 0) -> list[Path]:
    """PNG / JPEG / RGB / DICOM images of varying sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        if dicom_every and i % dicom_every == dicom_every - 1:
            from bench.data.dicom import write_dicom

            p = write_dicom(folder / f"im{i:03d}.dcm", img)
        elif i % 3 == 0:
            p = folder / f"im{i:03d}.png"
            Image.fromarray(img).save(p)
        elif i % 3 == 1:
            p = folder / f"im{i:03d}.jpg"
            Image.fromarray(img).save(p, quality=90)
        else:
            p = folder / f"im{i:03d}.rgb.png"
            Image.fromarray(np.stack([img, img // 2, img], -1)).save(p)
        out.append(p)
    return out


def hand_table(root: Path, n: int = 18, extras: bool = False, name: str = "hand") -> CanonicalTable:
    paths = write_images(root / "images", n + (2 * n if extras else 0), dicom_every=5)
    rows = []
    for i in range(n):
        extra = ()
        if extras and i % 3:  # rows with 0, 1 or 2 extra views
            extra = tuple(str(p) for p in paths[n + 2 * i: n + 2 * i + (1 if i % 3 == 1 else 2)])
        rows.append({"image_id": f"img{i}", "image_path": str(paths[i]), "patient_id": f"P{i // 2}",
                     "extra_image_paths": extra})
    return CanonicalTable(name, root, make_frame(rows), ("x",), np.zeros((n, 1), dtype=np.float32))


def test_cache_equals_direct_decoding(tmp_path):
    table = hand_table(tmp_path / "ds", n=18, extras=True)
    cache = ImageCache.open_or_build(table, 32, workers=2, chunk_size=4, progress=False, min_parallel_rows=0)
    assert cache.meta["workers"] == 2
    assert cache.array.shape == (18, 32, 32) and cache.array.dtype == np.uint8
    assert isinstance(cache.array, np.memmap) and not cache.array.flags.writeable
    assert cache.geometry.shape == (18, 3) and cache.geometry.dtype == np.float32
    assert cache.path.parent == tmp_path / "cache" / "images"
    assert cache.path.name == f"hand-{image_fingerprint(table)}-32"
    ks = [len(e) for e in table.frame["extra_image_paths"]]
    assert cache.extra.shape == (18, max(ks), 32, 32)
    np.testing.assert_array_equal(cache.extra_count, ks)
    for i, row in table.frame.iterrows():
        img, g = letterbox(read_image(row["image_path"]), 32)
        np.testing.assert_array_equal(cache.array[i], img)
        np.testing.assert_allclose(cache.geometry[i], g.to_array())
        for v, p in enumerate(row["extra_image_paths"]):
            np.testing.assert_array_equal(cache.extra[i, v], letterbox(read_image(p), 32)[0])
        assert not cache.extra[i, ks[i]:].any()  # zero-filled where a row has fewer views
    assert cache.batch([3, 5]).shape == (2, 1, 32, 32)
    import pickle

    blob = pickle.dumps(cache)
    assert len(blob) < 2000  # pickled by path, not by pixels
    back = pickle.loads(blob)
    assert isinstance(back.array, np.memmap) and np.array_equal(back.array, cache.array)


def test_unreadable_image_fails_the_build_naming_the_file(tmp_path):
    from bench.errors import DataError

    table = hand_table(tmp_path / "ds", n=8)
    bad = Path(table.frame["image_path"].iat[6])
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=bad.name):  # found in a worker process, reported here
        ImageCache.open_or_build(table, 16, workers=2, chunk_size=2, progress=False, min_parallel_rows=0)
    # no finished cache; the partial build keeps the 7 decoded rows for a rerun
    final = ImageCache.location(table, 16)
    assert not final.exists()
    done = np.load(ImageCache.partial_location(final) / "done.npy")
    assert done.tolist() == [1, 1, 1, 1, 1, 1, 2, 1]
    bad.unlink()
    with pytest.raises(DataError, match=bad.name):
        ImageCache.open_or_build(table, 16, workers=1, progress=False)


def test_build_without_worker_processes_gives_the_same_cache(tmp_path, monkeypatch):
    from bench.data import parallel

    table = hand_table(tmp_path / "ds", n=12)
    monkeypatch.setattr(parallel, "can_spawn", lambda: False)  # as under `python - < script`
    here = ImageCache.open_or_build(table, 20, workers=2, chunk_size=3, progress=False, min_parallel_rows=0)
    for i, p in enumerate(table.frame["image_path"]):
        np.testing.assert_array_equal(here.array[i], letterbox(read_image(p), 20)[0])


def test_cache_reused_then_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    table = hand_table(tmp_path / "ds", n=8)
    first = ImageCache.open_or_build(table, 24, workers=1, progress=False)

    def no_build(*a, **k):
        raise AssertionError("cache rebuilt although nothing changed")

    monkeypatch.setattr(ImageCache, "_build", staticmethod(no_build))
    again = ImageCache.open_or_build(table, 24, workers=1, progress=False)
    assert again.path == first.path
    monkeypatch.undo()
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))

    changed = Path(table.frame["image_path"].iat[3])
    img = np.full((50, 70), 200, dtype=np.uint8)
    if changed.suffix == ".dcm":
        from bench.data.dicom import write_dicom

        write_dicom(changed, img)
    else:
        Image.fromarray(img).save(changed, **({"quality": 95} if changed.suffix == ".jpg" else {}))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    rebuilt = ImageCache.open_or_build(table, 24, workers=1, progress=False)
    assert rebuilt.path != first.path
    np.testing.assert_array_equal(rebuilt.array[3], letterbox(read_image(changed), 24)[0])
    assert not np.array_equal(rebuilt.array[3], first.array[3])
    # another size is another cache
    assert ImageCache.open_or_build(table, 16, workers=1, progress=False).array.shape == (8, 16, 16)


def test_interrupted_build_leaves_no_finished_cache_and_resumes(tmp_path, monkeypatch):
    table = hand_table(tmp_path / "ds", n=10)
    images_dir = tmp_path / "cache" / "images"
    calls = {"n": 0}
    real = cache_mod.read_image

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(cache_mod, "read_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        ImageCache.open_or_build(table, 24, workers=1, chunk_size=2, progress=False)
    final = ImageCache.location(table, 24)
    assert not final.exists()  # never a finished cache from an interrupted build
    assert sorted(p.name for p in images_dir.iterdir() if p.name != ".locks") == [f".{final.name}.partial"]
    # the resumed build decodes only the rows the two finished chunks did not hold
    decoded: list[str] = []
    monkeypatch.setattr(cache_mod, "read_image", lambda p: (decoded.append(str(p)), real(p))[1])
    resumed = ImageCache.open_or_build(table, 24, workers=1, chunk_size=2, progress=False)
    assert decoded == [str(p) for p in table.frame["image_path"].iloc[4:]]
    assert resumed.meta["resumed_rows"] == 4 and resumed.meta["decoded_rows"] == 6
    for i, p in enumerate(table.frame["image_path"]):
        np.testing.assert_array_equal(resumed.array[i], letterbox(real(p), 24)[0])
        np.testing.assert_allclose(resumed.geometry[i], letterbox(real(p), 24)[1].to_array())
    monkeypatch.setattr(cache_mod, "read_image", real)
    shutil.rmtree(final)

    # A process of the previous format killed mid-build left a hidden temp dir: never opened, removed.
    final = ImageCache.location(table, 24)
    stale = final.parent / f".{final.name}.tmp-999999999-dead"
    stale.mkdir(parents=True)
    (stale / "images.npy").write_bytes(b"partial")
    cache = ImageCache.open_or_build(table, 24, workers=1, progress=False)
    assert cache.path == final and not stale.exists()
    np.testing.assert_array_equal(cache.array[0], letterbox(read_image(table.frame["image_path"].iat[0]), 24)[0])


def test_killed_build_process_leaves_no_finished_cache(tmp_path):
    table = hand_table(tmp_path / "ds", n=40)
    table.frame.to_pickle(tmp_path / "frame.pkl")
    script = textwrap.dedent(f"""
        import time, numpy as np, pandas as pd
        from pathlib import Path
        from bench.data import cache as c
        from bench.data.table import CanonicalTable
        real = c.read_image
        def slow(p):
            time.sleep(0.05)
            return real(p)
        c.read_image = slow
        frame = pd.read_pickle({str(tmp_path / 'frame.pkl')!r})
        t = CanonicalTable("hand", Path({str(tmp_path / 'ds')!r}), frame, ("x",), np.zeros((len(frame), 1), np.float32))
        c.ImageCache.open_or_build(t, 24, workers=1, chunk_size=4, progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path)
    images_dir = tmp_path / "cache" / "images"
    done_file = ImageCache.partial_location(ImageCache.location(table, 24)) / "done.npy"

    def n_done() -> int:
        try:
            return int((np.load(done_file, mmap_mode="r") == 1).sum())
        except (OSError, ValueError, EOFError):  # not created yet
            return 0

    deadline = time.time() + 60
    while time.time() < deadline and n_done() < 8:  # killed after two chunks at least, mid-build
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in images_dir.iterdir())
    final = ImageCache.location(table, 24)
    assert left == [f".{final.name}.partial", ".locks"], left  # only hidden entries
    assert not final.exists()
    done_before = int((np.load(ImageCache.partial_location(final) / "done.npy") == 1).sum())
    assert done_before < 40
    cache = ImageCache.open_or_build(table, 24, workers=2, chunk_size=8, progress=False, min_parallel_rows=0)
    assert len(cache) == 40 and [p.name for p in images_dir.iterdir() if p.name != ".locks"] == [cache.path.name]
    assert cache.meta["resumed_rows"] == done_before and cache.meta["decoded_rows"] == 40 - done_before
    for i, p in enumerate(table.frame["image_path"]):
        np.testing.assert_array_equal(cache.array[i], letterbox(read_image(p), 24)[0])


# -- corpus machinery with stand-in writers ----------------------------------------------------------
def _fake_writer(tag: str, calls: list):
    def write(out_dir: Path, rng: np.random.Generator, scale: str) -> dict:
        calls.append(tag)
        out_dir = Path(out_dir)
        (out_dir / "imgs").mkdir(parents=True, exist_ok=True)
        n = {"micro": 3, "tiny": 5}[scale]
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(out_dir / "imgs" / f"{i}.png")
        (out_dir / "labels.csv").write_text("".join(f"{i},{rng.integers(0, 2)}\n" for i in range(n)))
        if tag == "broken":
            raise RuntimeError("writer failed")
        return {str(i): None for i in range(n)}

    return write


@pytest.fixture
def fake_writers(monkeypatch):
    calls: list = []
    for key in ("fa", "fb", "broken"):
        mod = types.ModuleType(f"bench.data.synth.write_{key}")
        mod.write = _fake_writer(key, calls)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(corpus_mod, "WRITERS", {"fa": "fa-root", "fb": "nested/fb-root"})
    return calls


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("corpus.json", ".corpus.lock")}


def test_corpus_machinery_deterministic_reused_and_atomic(tmp_path, fake_writers, monkeypatch):
    meta = corpus_mod.generate_corpus(tmp_path / "a", "micro", 7, workers=1)
    assert set(meta["datasets"]) == {"fa", "fb"} and meta["images"] == 6 and meta["scale"] == "micro"
    assert (tmp_path / "a" / "nested" / "fb-root" / "labels.csv").is_file()
    assert json.loads((tmp_path / "a" / "corpus.json").read_text())["seed"] == 7
    # deterministic; each dataset's stream does not depend on which others are generated
    corpus_mod.generate_corpus(tmp_path / "b", "micro", 7, workers=1)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    corpus_mod.generate_corpus(tmp_path / "c", "micro", 7, datasets=["fb"], workers=1)
    assert tree_digest(tmp_path / "c") == {k: v for k, v in tree_digest(tmp_path / "a").items() if "fb" in k}
    corpus_mod.generate_corpus(tmp_path / "d", "micro", 8, workers=1)
    assert tree_digest(tmp_path / "d") != tree_digest(tmp_path / "a")

    # reuse: a complete corpus of the same scale/seed is not regenerated
    fake_writers.clear()
    assert corpus_mod.ensure_corpus(tmp_path / "a", "micro", 7) == (tmp_path / "a").resolve()
    assert fake_writers == []
    # partial (no corpus.json) -> removed and regenerated; another scale -> regenerated
    (tmp_path / "a" / "corpus.json").unlink()
    (tmp_path / "a" / ".fa.tmp-1-x").mkdir()
    corpus_mod.ensure_corpus(tmp_path / "a", "micro", 7, workers=1)
    assert sorted(fake_writers) == ["fa", "fb"] and not (tmp_path / "a" / ".fa.tmp-1-x").exists()
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    corpus_mod.ensure_corpus(tmp_path / "a", "tiny", 7, workers=1)
    assert json.loads((tmp_path / "a" / "corpus.json").read_text())["scale"] == "tiny"
    assert len(list((tmp_path / "a" / "fa-root" / "imgs").iterdir())) == 5

    # a failing writer leaves neither its dataset nor a corpus.json
    monkeypatch.setattr(corpus_mod, "WRITERS", {"fa": "fa-root", "broken": "broken-root"})
    with pytest.raises(RuntimeError):
        corpus_mod.generate_corpus(tmp_path / "e", "micro", 0, workers=1)
    assert not (tmp_path / "e" / "corpus.json").exists() and not (tmp_path / "e" / "broken-root").exists()
    assert not list((tmp_path / "e").glob(".*.tmp-*"))
    # a directory with foreign files is not taken over
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "thesis.tex").write_text("x")
    from bench.errors import DataError

    with pytest.raises(DataError, match="thesis.tex"):
        corpus_mod.ensure_corpus(tmp_path / "f", "micro", 0)


def test_a_run_generates_only_the_datasets_it_reads(tmp_path, fake_writers):
    full = tmp_path / "full"
    corpus_mod.generate_corpus(full, "micro", 7, workers=1)
    root = tmp_path / "lazy"
    fake_writers.clear()
    corpus_mod.ensure_corpus(root, "micro", 7, workers=1, datasets=["fb"])
    assert fake_writers == ["fb"] and not (root / "fa-root").exists()
    assert set(corpus_mod.read_corpus_manifest(root)["datasets"]) == {"fb"}
    assert not corpus_mod._is_complete(root, "micro", 7)
    before_fb = {k: v for k, v in tree_digest(root).items() if "fb" in k}
    corpus_mod.ensure_corpus(root, "micro", 7, workers=1, datasets=["fb"])   # already there: nothing written
    assert fake_writers == ["fb"]
    corpus_mod.ensure_corpus(root, "micro", 7, workers=1)                      # the rest, fb kept as it was
    assert fake_writers == ["fb", "fa"]
    assert {k: v for k, v in tree_digest(root).items() if "fb" in k} == before_fb
    assert tree_digest(root) == tree_digest(full) and corpus_mod._is_complete(root, "micro", 7)
    # another scale: every dataset of the old corpus goes, only the one asked for is written
    fake_writers.clear()
    corpus_mod.ensure_corpus(root, "tiny", 7, workers=1, datasets=["fa"])
    assert fake_writers == ["fa"] and not (root / "nested" / "fb-root").exists()
    assert set(corpus_mod.read_corpus_manifest(root)["datasets"]) == {"fa"}
    with pytest.raises(ValueError, match="nope"):
        corpus_mod.ensure_corpus(root, "tiny", 7, datasets=["nope"])


# -- a registered stand-in dataset for prepare and the CLI -------------------------------------------
TOY = "infra-toy"


def write_toy_root(root: Path, n_patients: int = 24, seed: int = 0) -> Path:
    """Official files of the stand-in dataset: images/*.png and labels.csv."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        for k in range(int(rng.integers(1, 4))):
            h, w = int(rng.integers(60, 100)), int(rng.integers(60, 100))
            img = rng.integers(0, 120, (h, w), dtype=np.uint8)
            pos = rng.random() < 0.4
            box = ""
            if pos:
                x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
                x2, y2 = x1 + int(rng.integers(5, w // 2)), y1 + int(rng.integers(5, h // 2))
                img[y1:y2, x1:x2] = 230
                box = f"{x1} {y1} {x2} {y2}"
            name = f"p{p:03d}_{k}.png"
            Image.fromarray(img).save(root / "images" / name)
            rows.append({"image": name, "patient": f"P{p:03d}", "label": int(pos), "box": box, "h": h, "w": w,
                         "split": "test" if p % 6 == 0 else "train"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def load_toy(root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    root = Path(root)
    df = pd.read_csv(root / "labels.csv", dtype={"box": str}, keep_default_na=False)
    boxes, masks = [], []
    for b, h, w in zip(df["box"], df["h"], df["w"]):
        arr = np.array([[float(v) for v in b.split()]], dtype=np.float32) if b else np.zeros((0, 4), np.float32)
        boxes.append(arr)
        if len(arr):
            m = np.zeros((h, w), dtype=np.uint8)
            x1, y1, x2, y2 = arr[0].astype(int)
            m[y1:y2, x1:x2] = 1
            masks.append(encode_mask(m))
        else:
            masks.append(None)
    frame = make_frame([{"image_id": i, "image_path": str(root / "images" / i), "patient_id": p, "split": s,
                         "height": h, "width": w}
                        for i, p, s, h, w in zip(df["image"], df["patient"], df["split"], df["h"], df["w"])])
    return CanonicalTable(TOY, root, frame, ("finding",), df[["label"]].to_numpy(np.float32),
                          boxes=tuple(boxes), box_labels=tuple(np.zeros(len(b), np.int64) for b in boxes),
                          box_classes=("finding",), masks=tuple(masks), source_files=("labels.csv",))


if TOY not in DATASETS:
    register_dataset(DatasetSpec(TOY, "Stand-in dataset for data-layer tests", "labels.csv + images/",
                                 load_toy, SplitProtocol(official=("train", "test"), val_fraction=0.2),
                                 "infra-toy"))


def run_data(*argv: str) -> int:
    from bench.data.cli import add_data_commands

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def test_prepare_dataset_real_root(tmp_path, caplog):
    from bench.data.prepare import prepare_dataset

    root = write_toy_root(tmp_path / "toy")
    with caplog.at_level("INFO"):
        prep = prepare_dataset(TOY, root, image_size=32, workers=1, progress=False)
    assert "REAL data" in caplog.text
    assert prep.source["kind"] == "real" and prep.source["rows"] == len(prep.table)
    assert prep.source["manifest_sha256"] == prep.manifest.sha256
    assert prep.images.array.shape == (len(prep.table), 32, 32)
    recorded = Path(prep.source["manifest_path"])
    assert recorded.parent == tmp_path / "cache" / "splits" and recorded.name.endswith("-seed0.csv")
    assert SplitManifest.read(recorded).sha256 == prep.manifest.sha256
    test_rows = set(np.flatnonzero(prep.table.frame["split"].to_numpy() == "test"))
    assert set(prep.manifest.rows("test")) == test_rows and len(prep.manifest.rows("val")) > 0
    again = prepare_dataset(TOY, root, image_size=32, workers=1, progress=False, split_seed=0)
    assert again.table is prep.table and again.images.path == prep.images.path  # memoised, reused
    other = prepare_dataset(TOY, root, image_size=32, workers=1, progress=False, split_seed=1)
    assert other.manifest.sha256 != prep.manifest.sha256
    # skip_bad drops rows whose image file is missing, counting them
    Path(prep.table.frame["image_path"].iat[0]).unlink()
    with pytest.raises(Exception, match=prep.table.frame["image_id"].iat[0]):
        prepare_dataset(TOY, root, image_size=32, workers=1, progress=False)
    skipped = prepare_dataset(TOY, root, image_size=32, workers=1, progress=False, skip_bad=True)
    assert len(skipped.table) == len(prep.table) - 1 and skipped.source["skipped_rows"] == 1


def test_data_commands_on_a_stand_in_dataset(tmp_path, capsys):
    root = write_toy_root(tmp_path / "toy")
    table = load_toy(root)
    assert run_data("summary", "--dataset", TOY, "--root", str(root), "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"] == len(table) and s["patients"] == 24 and s["source"] == "real"
    assert s["positives"]["finding"] == int((table.labels == 1).sum()) == s["boxes"]
    assert s["mask_pixels"] == sum(int(np.prod(b[0, 2:] - b[0, :2])) for b in table.boxes if len(b))
    m = build_splits(table, DATASETS.get(TOY).split, seed=0)
    assert s["manifest_sha256"] == m.sha256 and s["splits"] == m.sizes()
    assert run_data("summary", "--dataset", TOY, "--root", str(root)) == 0
    assert "manifest sha256 " + m.sha256 in capsys.readouterr().out

    assert run_data("verify", "--dataset", TOY, "--root", str(root)) == 0
    assert "OK" in capsys.readouterr().out

    pos = int(np.flatnonzero(table.labels[:, 0] == 1)[0])
    out = tmp_path / "show.png"
    assert run_data("show", "--dataset", TOY, "--root", str(root), "--index", str(pos), "--out", str(out),
                    "--size", "128") == 0
    shown = np.asarray(Image.open(out).convert("RGB"))
    assert shown.shape[0] > 100 and (shown[..., 0].astype(int) - shown[..., 2]).max() > 100  # red mask overlay

    # a planted leak in a manifest file
    f = m.frame
    pat = table.frame["patient_id"].to_numpy()
    multi = [r for r in m.rows("train") if (pat == pat[r]).sum() > 1][0]
    f.loc[multi, ["split", "min_fraction"]] = ["test", np.nan]
    leaky = SplitManifest(TOY, 0, m.protocol, f).write(tmp_path / "leaky.csv")
    assert run_data("verify", "--dataset", TOY, "--root", str(root), "--manifest", str(leaky)) == 1
    assert "leak" in capsys.readouterr().out
    # a leak in the official split file
    df = pd.read_csv(root / "labels.csv", keep_default_na=False)
    j = int(np.flatnonzero((df["split"] == "train") & df["patient"].duplicated(keep=False))[0])
    df.loc[j, "split"] = "test"
    df.to_csv(root / "labels.csv", index=False)
    assert run_data("verify", "--dataset", TOY, "--root", str(root)) == 1
    assert df["patient"].iat[j] in capsys.readouterr().out
    # a deleted and a corrupted image
    write_toy_root(root)
    Path(table.frame["image_path"].iat[2]).unlink()
    Path(table.frame["image_path"].iat[4]).write_bytes(b"garbage")
    assert run_data("verify", "--dataset", TOY, "--root", str(root)) == 1
    text = capsys.readouterr().out
    assert "missing" in text and "unreadable" in text and table.frame["image_id"].iat[4] in text


def test_perf_data_reports_a_speedup(tmp_path):
    from bench.data.perf import perf_data

    root = write_toy_root(tmp_path / "toy", n_patients=40)
    r = perf_data(TOY, str(root), image_size=64, limit=60, repeats=2, workers=1)
    assert r["images"] == 60 and r["raw_images_per_s"] > 0 and r["cache_images_per_s"] > r["raw_images_per_s"]


# -- the real synthetic corpus (micro) -------------------------------------------------------------------
ALL_DATASETS = ("mimic-cxr", "chexpert", "rsna", "siim", "covidx", "object-cxr", "nih", "iu-xray")


@pytest.fixture(scope="module")
def micro_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "micro"
    t0 = time.perf_counter()
    meta = corpus_mod.generate_corpus(root, "micro", 0, workers=2)
    meta["wall"] = time.perf_counter() - t0
    return root, meta


def test_micro_corpus_is_deterministic_and_reused(micro_corpus, tmp_path):
    root, meta = micro_corpus
    assert set(meta["datasets"]) == set(corpus_mod.WRITERS) and meta["images"] > 0
    for key, sub in corpus_mod.WRITERS.items():
        assert (root / sub).is_dir() and meta["datasets"][key]["images"] > 0, key
    other = tmp_path / "again"
    corpus_mod.generate_corpus(other, "micro", 0, workers=2)
    assert tree_digest(other) == tree_digest(root)
    before = (root / "corpus.json").stat().st_mtime_ns
    corpus_mod.ensure_corpus(root, "micro", 0)
    assert (root / "corpus.json").stat().st_mtime_ns == before


def test_synthetic_data_records_its_generator_and_dataset_versions(micro_corpus):
    """What the leaderboard reads to refuse pooling results of two versions of one dataset."""
    from bench.data.prepare import prepare_dataset

    root, meta = micro_corpus
    prep = prepare_dataset("rsna", str(root / corpus_mod.WRITERS["rsna"]), image_size=16, workers=1, progress=False)
    assert prep.source["kind"] == "synthetic" and prep.source["generator_version"] == corpus_mod.generator_version()
    assert prep.source["dataset_version"] == meta["datasets"]["rsna"]["version"] == corpus_mod.dataset_version("rsna")


@pytest.mark.parametrize("name", ALL_DATASETS)
def test_data_commands_on_the_micro_corpus(micro_corpus, name, tmp_path, capsys):
    root, _ = micro_corpus
    spec = DATASETS.get(name) if name in DATASETS else (__import__("bench.data.loaders"), DATASETS.get(name))[1]
    droot = root / spec.synth_subdir
    assert run_data("summary", "--dataset", name, "--root", str(droot), "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"] > 0 and s["splits"]["train@1.0"] > 0 and s["splits"]["train@0.01"] >= 1
    assert run_data("verify", "--dataset", name, "--root", str(droot)) == 0, capsys.readouterr().out
    capsys.readouterr()
    out = tmp_path / f"{name}.png"
    assert run_data("show", "--dataset", name, "--root", str(droot), "--index", "0", "--out", str(out)) == 0
    assert out.stat().st_size > 1000


@pytest.mark.parametrize("name", ["rsna", "nih"])  # rsna's loader checks files itself, nih's does not
def test_verify_fails_on_a_deleted_image_in_a_copy_of_the_corpus(micro_corpus, tmp_path, capsys, name):
    import shutil

    from bench.data.prepare import get_spec, load_table

    root, _ = micro_corpus
    spec = get_spec(name)
    copy = tmp_path / name
    shutil.copytree(root / spec.synth_subdir, copy)
    table = load_table(spec, copy)
    victim = Path(table.frame["image_path"].iat[1])
    victim.unlink()
    assert run_data("verify", "--dataset", name, "--root", str(copy)) == 1
    assert victim.name in capsys.readouterr().out


def test_verify_fails_on_a_planted_official_split_leak(micro_corpus, tmp_path, capsys):
    """MIMIC-CXR's split.csv is patient-level; move one image of a training patient to test."""
    import gzip
    import shutil

    root, _ = micro_corpus
    copy = tmp_path / "mimic"
    shutil.copytree(root / corpus_mod.WRITERS["mimic_cxr"], copy)
    split_file = copy / "mimic-cxr-2.0.0-split.csv.gz"
    df = pd.read_csv(split_file, dtype=str)
    train = df[df["split"] == "train"]
    multi = train[train["subject_id"].duplicated(keep=False)]
    j = multi.index[0]
    df.loc[j, "split"] = "test"
    with gzip.open(split_file, "wt", newline="") as fh:
        df.to_csv(fh, index=False)
    assert run_data("verify", "--dataset", "mimic-cxr", "--root", str(copy)) == 1
    out = capsys.readouterr().out
    assert "leak" in out and df.loc[j, "subject_id"] in out


def test_check_and_demo_generate_only_their_tasks_datasets(monkeypatch):
    from bench.data.synth import ensure

    asked = []
    monkeypatch.setattr(corpus_mod, "ensure_corpus", lambda root, scale, seed, datasets=None: asked.append(datasets))
    assert ensure.ensure_synthetic_datasets(["rsna-cls", "chexpert-ft", "rsna-ft"]) == ["chexpert", "mimic-cxr", "rsna"]
    assert asked == [["chexpert", "mimic-cxr", "rsna"]]
    assert ensure.ensure_synthetic_datasets(["siim-seg"], pretraining=False) == ["siim"]
    assert ensure.ensure_synthetic_datasets([]) == [] and len(asked) == 2


def test_prepared_data_is_kept_per_dataset_and_cache_folder(monkeypatch, tmp_path):
    from bench import runner
    from bench.data import prepare

    calls = []
    monkeypatch.setattr(prepare, "prepare_dataset", lambda *a, **k: calls.append((a, k)) or object())
    runner._prepare_data_memo.cache_clear()
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "one"))
    first = runner.prepare_data("rsna", "synth", image_size=64, split_seed=0)
    assert runner.prepare_data("rsna", "synth", image_size=64, split_seed=0) is first and len(calls) == 1
    runner.prepare_data("rsna", "synth", image_size=96, split_seed=0)          # another size: prepared again
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "two"))           # another cache (the drift check's)
    assert runner.prepare_data("rsna", "synth", image_size=64, split_seed=0) is not first and len(calls) == 3
    runner._prepare_data_memo.cache_clear()
