"""Growing one dataset of the synthetic corpus regenerates that dataset alone (SIIM and Object-CXR were
grown for the dense tasks; the other datasets' files and split manifests must not move)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data.synth import corpus as corpus_mod
from bench.data.synth import write_object_cxr, write_rsna, write_siim
from test_cache_and_corpus import tree_digest


@pytest.fixture
def sized_writers(monkeypatch):
    """Stand-in writers ``fa`` and ``fb`` that draw ``sizes[key]`` images and say so through ``n_cases``."""
    calls: list = []
    sizes = {"fa": 3, "fb": 3}
    for key in sizes:
        mod = types.ModuleType(f"bench.data.synth.write_{key}")

        def write(out_dir: Path, rng: np.random.Generator, scale: str, key=key) -> dict:
            calls.append(key)
            (Path(out_dir) / "imgs").mkdir(parents=True, exist_ok=True)
            for i in range(sizes[key]):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(Path(out_dir) / "imgs" / f"{i}.png")
            return {str(i): None for i in range(sizes[key])}

        mod.write = write
        mod.n_cases = lambda scale, key=key: sizes[key]
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(corpus_mod, "WRITERS", {"fa": "fa-root", "fb": "fb-root"})
    return calls, sizes


def _fb_is_regenerated_alone(root: Path, calls: list, before: dict) -> dict:
    """``fb`` is outdated: ``ensure_corpus`` redraws it alone (``fa`` keeps its bytes), then nothing more
    on the next call; returns the corpus manifest."""
    assert corpus_mod.outdated_datasets(corpus_mod.read_corpus_manifest(root), "micro") == ["fb"]
    corpus_mod.ensure_corpus(root, "micro", 3, workers=1)
    assert calls == ["fb"]
    after = tree_digest(root)
    assert {k: v for k, v in after.items() if k.startswith("fa-root")} == \
        {k: v for k, v in before.items() if k.startswith("fa-root")}
    calls.clear()
    corpus_mod.ensure_corpus(root, "micro", 3)
    assert calls == []
    return corpus_mod.read_corpus_manifest(root)


def test_a_grown_dataset_is_regenerated_alone(tmp_path, sized_writers):
    calls, sizes = sized_writers
    root = tmp_path / "corpus"
    corpus_mod.generate_corpus(root, "micro", 3, workers=1)
    before = tree_digest(root)
    calls.clear()
    assert corpus_mod.ensure_corpus(root, "micro", 3) == root.resolve() and calls == []   # nothing changed
    sizes["fb"] = 5                                                                     # fb grows
    meta = _fb_is_regenerated_alone(root, calls, before)
    assert len(list((root / "fb-root" / "imgs").iterdir())) == 5
    assert meta["datasets"]["fb"]["cases"] == 5 and meta["datasets"]["fa"]["cases"] == 3


def test_a_dataset_whose_version_is_bumped_is_regenerated_alone(tmp_path, sized_writers):
    calls, _ = sized_writers
    root = tmp_path / "corpus"
    corpus_mod.generate_corpus(root, "micro", 3, workers=1)
    meta = corpus_mod.read_corpus_manifest(root)
    assert meta["datasets"]["fa"]["version"] == 1 == meta["datasets"]["fb"]["version"]   # no VERSION: 1
    before = tree_digest(root)
    # a corpus written before per-dataset versions records none: read as version 1, nothing redrawn
    for entry in meta["datasets"].values():
        del entry["version"]
    (root / corpus_mod.MANIFEST_NAME).write_text(json.dumps(meta))
    calls.clear()
    corpus_mod.ensure_corpus(root, "micro", 3, workers=1)
    assert calls == []
    sys.modules["bench.data.synth.write_fb"].VERSION = 2                  # fb's drawing changed
    meta = _fb_is_regenerated_alone(root, calls, before)
    assert meta["datasets"]["fb"]["version"] == 2 and meta["datasets"]["fa"].get("version", 1) == 1
    assert meta["version"] == corpus_mod.generator_version()      # the corpus-wide version is unchanged


def test_the_grown_datasets_declare_their_sizes():
    # a dataset grown after corpora were cached must say so, or the cached, smaller copy is read on
    assert write_siim.n_cases("bench") == 12047 and write_object_cxr.n_cases("bench") == 3000   # SIIM: real size
    assert write_rsna.n_cases("bench") == 26684     # the real stage-2 training set: MGCA's 4,003 test patients
    for scale in corpus_mod.SCALES:
        assert write_siim.n_cases(scale) == write_siim.SCALES[scale][0]
        assert write_object_cxr.n_cases(scale) == sum(write_object_cxr.SCALES[scale][:2])
        assert write_rsna.n_cases(scale) == write_rsna.SCALES[scale][0]


def test_object_cxr_annotates_only_objects_within_the_lung_field():
    # the challenge annotated foreign objects "presented within the lung field" and excluded support
    # devices: both are drawn, so an unannotated image can still hold a button over the mediastinum
    assert write_object_cxr.VERSION >= 2
    cases = write_object_cxr._draw(np.random.default_rng(3), 60, (192, 288))
    annotated = [o for c in cases for o in write_object_cxr.objects(c)]
    outside = [o for c in cases for o in write_object_cxr.drawn_objects(c) if o not in write_object_cxr.objects(c)]
    assert annotated and all(o.lung_fraction >= write_object_cxr.IN_LUNG_FIELD for o in annotated)
    assert len(outside) >= 10 and all(o.lung_fraction < write_object_cxr.IN_LUNG_FIELD for o in outside)
    negatives = [c for c in cases[1:] if not write_object_cxr.objects(c)]
    assert len(negatives) == 30
    assert any(write_object_cxr.drawn_objects(c) for c in negatives)            # unannotated objects
    assert all(write_object_cxr.annotation(c) == "" for c in negatives)
    with_devices = [c for c in cases if any(l.finding == "support_devices" for l in c.lesions)]
    assert with_devices                                                           # drawn, never annotated
    for c in cases:
        assert write_object_cxr.annotation(c).count(";") == len(write_object_cxr.objects(c)) - 1 \
            if write_object_cxr.objects(c) else write_object_cxr.annotation(c) == ""
