"""The synthetic corpus: all eight datasets' official files under one root.

``root/<subdir>/`` holds one dataset each (subdirs below, the ``synth_subdir`` of each registered
dataset) and ``root/corpus.json`` records scale, seed, generator version, per-dataset image counts
and seconds. ``corpus.json`` is written last, so a root without it is partial.

Determinism: dataset number ``i`` (its position in :data:`WRITERS`) draws from
``np.random.default_rng([seed, i])`` only, so every dataset's files are the same whichever worker
writes it, in whatever order, and whichever other datasets are generated alongside.
Atomicity: each dataset is written into a hidden temporary directory under the root and renamed to
its subdir when its writer returns.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from bench.data.parallel import run_jobs
from bench.data.synth.generate import GENERATOR_VERSION
from bench.errors import DataError

log = logging.getLogger(__name__)

#: Writer module key (``bench.data.synth.write_<key>``) -> dataset subdir in the corpus root.
#: The order fixes each dataset's random stream; append new datasets at the end.
WRITERS: dict[str, str] = {
    "mimic_cxr": "mimic-cxr-jpg/2.0.0",
    "chexpert": "CheXpert-v1.0-small",
    "rsna": "rsna-pneumonia",
    "siim": "siim-acr-pneumothorax",
    "covidx": "covidx",
    "object_cxr": "object-cxr",
    "nih": "nih-chestxray14",
    "iu_xray": "iu_xray",
}
#: Dataset registry key -> writer module key.
DATASET_KEYS: dict[str, str] = {
    "mimic-cxr": "mimic_cxr", "chexpert": "chexpert", "rsna": "rsna", "siim": "siim", "covidx": "covidx",
    "object-cxr": "object_cxr", "nih": "nih", "iu-xray": "iu_xray",
}
SCALES = ("micro", "tiny", "small", "bench")
#: The corpus every run uses without ``--data``. ``bench`` is sized so the tiny preset ranks
#: encoders: test sets of ~1,000 images (95% CI half-widths <= 0.035) and >= 10 positive patients per
#: main label in the 1% training subsets; ``micro``/``tiny``/``small`` are for tests and CI speed.
DEFAULT_SCALE = "bench"
#: Scales set by :func:`using_scale`, innermost last (the drift check's smaller corpus).
_SCALE_STACK: list[str] = []
CORPUS_FORMAT = 1
MANIFEST_NAME = "corpus.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm"}
_TMP_MARK = ".tmp-"
_LOCK_NAME = ".corpus.lock"


def default_scale() -> str:
    """The scale ``--data synth`` reads: :data:`DEFAULT_SCALE`, or the one :func:`using_scale` set."""
    return _SCALE_STACK[-1] if _SCALE_STACK else DEFAULT_SCALE


@contextlib.contextmanager
def using_scale(scale: str):
    """Within the block, ``--data synth`` reads the corpus of ``scale`` (every result records its
    scale in ``data_source``). For the drift check, whose golden cells need a deterministic corpus,
    not a large one: generating the benchmark corpus would take most of the CI budget."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    _SCALE_STACK.append(scale)
    try:
        yield scale
    finally:
        _SCALE_STACK.pop()


def generator_version() -> str:
    """``<corpus format>.<GENERATOR_VERSION of bench.data.synth.generate>``."""
    return f"{CORPUS_FORMAT}.{GENERATOR_VERSION}"


def dataset_version(key: str) -> int:
    """Writer ``key``'s own version (its module's ``VERSION``, 1 when it declares none): bumped when
    that dataset alone would draw different files for the same seed and scale (a finding drawn only
    in its profile, a quirk of its format), so a cached corpus regenerates that dataset alone and
    every other keeps its bytes (and the pretrainings and results that read them stay valid). A
    change to the drawing code every dataset shares bumps :data:`GENERATOR_VERSION` instead."""
    module = importlib.import_module(f"bench.data.synth.write_{key}")
    return int(getattr(module, "VERSION", 1))


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _write_one(root: str, key: str, index: int, scale: str, seed: int) -> dict:
    """Run writer ``key`` into a temp dir under ``root`` and rename it to its subdir."""
    module = importlib.import_module(f"bench.data.synth.write_{key}")
    root_p = Path(root)
    tmp = root_p / f".{key}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        cases = module.write(tmp, np.random.default_rng([seed, index]), scale)
        seconds = time.perf_counter() - t0
        images = _count_images(tmp)
        final = root_p / WRITERS[key]
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"subdir": WRITERS[key], "images": images, "cases": len(cases), "seconds": round(seconds, 3),
            "version": dataset_version(key)}


@contextlib.contextmanager
def _locked(root: Path):
    """Exclusive lock on the corpus root, so concurrent processes do not generate it twice."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK_NAME, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean(root: Path, keys) -> None:
    """Remove leftovers of an earlier generation: the marker, temp dirs, the given datasets."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for tmp in root.glob(f".*{_TMP_MARK}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for key in keys:
        target = root / WRITERS[key]
        if target.exists():
            shutil.rmtree(target)
        parent = target.parent
        if parent != root and parent.exists() and not any(parent.iterdir()):
            parent.rmdir()


def read_corpus_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def corpus_of(dataset_root: str | Path) -> tuple[Path, dict] | None:
    """(corpus root, corpus.json) when ``dataset_root`` is a dataset folder of a synthetic corpus,
    so data given as ``--data DIR`` inside a synthetic corpus is still labelled synthetic."""
    path = Path(dataset_root).expanduser().resolve()
    for parent in list(path.parents)[:3]:
        meta = read_corpus_manifest(parent)
        if meta and path.relative_to(parent).as_posix() in WRITERS.values():
            return parent, meta
    return None


def expected_cases(key: str, scale: str) -> int | None:
    """Cases writer ``key`` draws at ``scale``, when the writer says (its ``n_cases``), else None."""
    module = importlib.import_module(f"bench.data.synth.write_{key}")
    n_cases = getattr(module, "n_cases", None)
    return None if n_cases is None else int(n_cases(scale))


def outdated_datasets(meta: dict, scale: str) -> list[str]:
    """Writer keys whose recorded case count differs from what the writer now draws at ``scale``, or
    whose recorded version (1 when the corpus predates per-dataset versions) differs from the
    writer's :func:`dataset_version`: a dataset grown, shrunk or redrawn since the corpus was written.
    Each dataset has its own random stream, so these are regenerated alone and every other dataset
    stays byte for byte the same."""
    out = []
    for key, entry in (meta.get("datasets") or {}).items():
        if key not in WRITERS:
            continue
        entry = entry or {}
        want = expected_cases(key, scale)
        resized = want is not None and int(entry.get("cases", -1)) != want
        if resized or int(entry.get("version", 1)) != dataset_version(key):
            out.append(key)
    return out


def _is_complete(root: Path, scale: str, seed: int) -> bool:
    """Every dataset of this scale, seed and generator version is there at its current size."""
    return not _to_generate(root, read_corpus_manifest(root), scale, seed, list(WRITERS))


def generate_corpus(root: str | Path, scale: str = "tiny", seed: int = 0, datasets=None,
                    workers: int = 2) -> dict:
    """Write the synthetic corpus (all datasets, or the writer keys in ``datasets``) into ``root``.

    Datasets are written in parallel over ``workers`` processes; ``corpus.json`` is written last
    and returned: {format, version, scale, seed, datasets: {key: {subdir, images, cases, seconds}},
    images, seconds, workers}.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    root = Path(root).expanduser().resolve()
    keys = list(WRITERS) if datasets is None else [DATASET_KEYS.get(k, k) for k in datasets]
    unknown = [k for k in keys if k not in WRITERS]
    if unknown:
        raise ValueError(f"unknown synthetic dataset(s) {unknown}; expected keys of {sorted(WRITERS)}")
    with _locked(root):
        meta = _generate_locked(root, scale, seed, keys, workers)
    log.info("synthetic corpus (%s, seed %d): %d images in %.1fs -> %s", scale, seed, meta["images"],
             meta["seconds"], root)
    return meta


def _generate_locked(root: Path, scale: str, seed: int, keys: list[str], workers: int) -> dict:
    index = {k: i for i, k in enumerate(WRITERS)}
    t0 = time.perf_counter()
    prev = read_corpus_manifest(root) or {}
    kept: dict[str, dict] = {}
    if (prev.get("scale"), prev.get("seed"), prev.get("version")) == (scale, seed, generator_version()):
        # datasets of the same corpus that are not regenerated now stay listed
        kept = {k: v for k, v in prev.get("datasets", {}).items()
                if k in WRITERS and k not in keys and (root / WRITERS[k]).is_dir()}
    _clean(root, keys)
    results: dict[str, dict] = {}
    workers = max(1, int(workers))
    jobs = [(str(root), k, index[k], scale, seed) for k in keys]
    for i, result in run_jobs(_write_one, jobs, workers):
        results[keys[i]] = result
        log.info("synth %s: %d images in %.1fs", keys[i], result["images"], result["seconds"])
    for tmp in root.glob(f".*{_TMP_MARK}*"):  # left by a worker that died (its job was rerun here)
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    meta = {"format": CORPUS_FORMAT, "version": generator_version(), "scale": scale, "seed": int(seed),
            "datasets": {k: results.get(k, kept.get(k)) for k in WRITERS if k in results or k in kept},
            "images": int(sum(r["images"] for r in results.values()) + sum(r["images"] for r in kept.values())),
            "seconds": round(seconds, 3),
            "workers": workers}
    tmp = root / f".{MANIFEST_NAME}{_TMP_MARK}{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST_NAME)
    return meta


def _same_corpus(meta: dict | None, scale: str, seed: int) -> bool:
    return bool(meta) and (meta.get("scale"), meta.get("seed"), meta.get("version")) == (scale, seed, generator_version())


def _to_generate(root: Path, meta: dict | None, scale: str, seed: int, keys: list[str]) -> list[str]:
    """Which of ``keys`` a corpus of this scale, seed and version lacks or holds outdated (another
    size or dataset version, :func:`outdated_datasets`)."""
    if not _same_corpus(meta, scale, seed):
        return list(keys)
    listed = meta.get("datasets", {}) if meta else {}
    outdated = set(outdated_datasets({"datasets": {k: v for k, v in listed.items() if k in keys}}, scale))
    return [k for k in keys if k not in listed or not (root / WRITERS[k]).is_dir() or k in outdated]


def ensure_corpus(root: str | Path, scale: str = "tiny", seed: int = 0, workers: int = 2,
                  datasets=None) -> Path:
    """Return ``root`` holding the datasets ``datasets`` (registry or writer keys; ``None``: all) of a
    corpus of this scale, seed and generator version, generating first what is absent, partial,
    resized, of another dataset version or of another corpus. Each dataset draws from its own random stream, so the datasets
    generated now are byte for byte those a full generation writes; a run generates only what it
    reads (``bench run --task rsna-cls`` on a fresh machine writes RSNA, not the other seven)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    root = Path(root).expanduser().resolve()
    keys = list(WRITERS) if datasets is None else [DATASET_KEYS.get(k, k) for k in datasets]
    unknown = [k for k in keys if k not in WRITERS]
    if unknown:
        raise ValueError(f"unknown synthetic dataset(s) {unknown}; expected keys of {sorted(WRITERS)}")
    keys = [k for k in WRITERS if k in keys]   # the writers' order
    if not _to_generate(root, read_corpus_manifest(root), scale, seed, keys):
        return root
    with _locked(root):
        meta = read_corpus_manifest(root)
        todo = _to_generate(root, meta, scale, seed, keys)
        if not todo:                                # another process finished it while we waited
            return root
        if _same_corpus(meta, scale, seed):
            log.info("synthetic corpus at %s: generating %s (the other datasets are kept)", root, ", ".join(todo))
        elif meta:
            log.warning("synthetic corpus at %s is %s/seed %s/version %s; regenerating as %s/seed %d/version %s",
                        root, meta.get("scale"), meta.get("seed"), meta.get("version"), scale, seed,
                        generator_version())
            _clean(root, list(WRITERS))             # no dataset of the old corpus may stay behind
        elif any(p.name != _LOCK_NAME for p in root.iterdir()):  # our own lock file is not content
            foreign = [p.name for p in root.iterdir() if p.name != _LOCK_NAME and not p.name.startswith(".")
                       and p.name not in {s.split("/")[0] for s in WRITERS.values()}]
            if foreign:
                raise DataError(f"directory holds files that are not part of a synthetic corpus ({foreign[:5]}); "
                                "refusing to generate into it", path=root)
            log.warning("synthetic corpus at %s is partial (no %s); regenerating", root, MANIFEST_NAME)
            _clean(root, list(WRITERS))
        meta = _generate_locked(root, scale, seed, todo, workers)
    log.info("synthetic corpus (%s, seed %d): %d images in %.1fs -> %s", scale, seed, meta["images"],
             meta["seconds"], root)
    return root
