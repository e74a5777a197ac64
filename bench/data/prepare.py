"""From a dataset name and a data source to what a task consumes: table, splits and cached images.

``prepare_dataset("rsna", "synth", image_size=128)`` generates the synthetic corpus on first use,
loads the dataset's official files into a :class:`CanonicalTable` (memoised per process), opens or
builds the :class:`ImageCache` of letterboxed images, then builds the seeded patient-level
:class:`SplitManifest` (recorded under ``cache_dir()/splits/``).

The cache comes before the splits so that, with ``skip_bad``, rows whose image is missing or does
not decode are dropped from the table first: the manifest then covers exactly the rows a task can
read, and its ``skipped_rows`` (part of its sha256) counts them, so results on a partial dataset
are never mistaken for results on the whole one. Without ``skip_bad`` an undecodable image stops
the run with the list of every such path (:class:`UndecodableImagesError`), the images decoded so
far kept for the rerun.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data.cache import ImageCache, UndecodableImagesError, root_fingerprint
from bench.data.spec import DATASETS, DatasetSpec, resolve_root
from bench.data.splits import SplitManifest, build_splits
from bench.data.table import CanonicalTable
from bench.errors import DataError, MissingDataError
from bench.paths import cache_dir, synth_root

log = logging.getLogger(__name__)

#: Per-process memo of loaded tables: key -> (stamp of the files read, table).
_TABLES: dict[tuple, tuple[tuple, CanonicalTable]] = {}


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Everything a task needs about one dataset."""

    spec: DatasetSpec
    table: CanonicalTable
    manifest: SplitManifest
    images: ImageCache
    #: kind ("synthetic" | "real"), root, dataset, manifest_sha256, manifest_path, rows,
    #: skipped_rows, skipped (by reason: malformed_row, missing_image, undecodable_image),
    #: skip_bad, split_seed, image_cache; scale and seed for synthetic data.
    source: dict


def get_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``, importing the loaders first when needed."""
    if name not in DATASETS:
        import bench.data.loaders  # noqa: F401  (registers the datasets)
    return DATASETS.get(name)


def _stamp(table: CanonicalTable) -> tuple:
    out = []
    for rel in table.source_files:
        try:
            st = (Path(table.root) / rel).stat()
            out.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((rel, -1, -1))
    return tuple(out)


def load_table(spec: DatasetSpec, root: Path, *, skip_bad: bool = False) -> CanonicalTable:
    """``spec.load(root)``, memoised per process while the official files read stay unchanged."""
    root = Path(root)
    if not root.exists():
        raise MissingDataError(root, f"the {spec.title} root ({spec.official_layout})")
    key = (spec.name, str(root), bool(skip_bad))
    hit = _TABLES.get(key)
    if hit is not None and hit[1].source_files and _stamp(hit[1]) == hit[0]:
        return hit[1]
    t0 = time.perf_counter()
    table = spec.load(root, skip_bad=skip_bad)
    log.debug("%s: loaded %d rows from %s in %.2fs", spec.name, len(table), root, time.perf_counter() - t0)
    _TABLES[key] = (_stamp(table), table)
    return table


#: How many skipped paths the log names one by one (all are counted; the rest are summarised).
LOG_SKIPPED_PATHS = 50


def _log_skipped(dataset: str, what: str, items: list[str]) -> None:
    log.warning("%s: --skip-bad: %d row(s) skipped because %s:%s%s", dataset, len(items), what,
                "".join(f"\n  {x}" for x in items[:LOG_SKIPPED_PATHS]),
                f"\n  ... and {len(items) - LOG_SKIPPED_PATHS} more" if len(items) > LOG_SKIPPED_PATHS else "")


def drop_missing_images(table: CanonicalTable) -> CanonicalTable:
    """Rows whose image files all exist; the others are counted in ``skipped_rows`` (skip_bad)."""
    frame = table.frame
    ok = np.array([os.path.isfile(p) and all(os.path.isfile(e) for e in (extra or ()))
                   for p, extra in zip(frame["image_path"], frame["extra_image_paths"])], dtype=bool)
    if ok.all():
        return table
    _log_skipped(table.dataset, "an image file is missing", [str(p) for p in frame["image_path"].to_numpy()[~ok]])
    return table.without_rows(np.flatnonzero(~ok), "missing_image")


def open_images(table: CanonicalTable, image_size: int, *, skip_bad: bool = False, workers: int = 2,
                progress: bool = True) -> tuple[CanonicalTable, ImageCache]:
    """(table, its image cache). With ``skip_bad``, rows whose images do not decode are dropped
    (counted as ``undecodable_image``) and the cache of the remaining rows is returned; it is
    filled from the rows already decoded, not decoded again."""
    try:
        return table, ImageCache.open_or_build(table, int(image_size), workers=workers, progress=progress)
    except UndecodableImagesError as exc:
        if not skip_bad:
            raise
        _log_skipped(table.dataset, "an image does not decode", [reason for _, _, reason in exc.failures])
        table = table.without_rows(exc.rows, "undecodable_image")
        if len(table) == 0:
            raise DataError(f"dataset {table.dataset!r}: no row has a decodable image", path=table.root) from exc
        return table, ImageCache.open_or_build(table, int(image_size), workers=workers, progress=progress)


def resolve_dataset(name: str, data: str | Path = "synth", *, scale: str | None = None,
                    synth_seed: int = 0, generate: bool = True) -> tuple[DatasetSpec, Path, str]:
    """(spec, dataset root, kind) for ``--data`` (``"synth"`` or a dataset root directory).

    With ``"synth"`` the corpus ``synth_root(scale, synth_seed)`` is generated on first use.
    """
    spec = get_spec(name)
    if scale is None:
        from bench.data.synth.corpus import default_scale

        scale = default_scale()
    sroot = synth_root(scale, synth_seed)
    if str(data) == "synth" and generate:
        from bench.data.synth.corpus import DATASET_KEYS, ensure_corpus

        # only the dataset this run reads (a dataset without a writer of its own: the whole corpus)
        ensure_corpus(sroot, scale, synth_seed, datasets=[name] if name in DATASET_KEYS else None)
    root, kind = resolve_root(spec, data, sroot)
    if kind == "real":
        from bench.data.synth.corpus import corpus_of

        if corpus_of(root) is not None:  # a dataset folder of a synthetic corpus, given by path
            kind = "synthetic"
    return spec, root, kind


def manifest_path(table: CanonicalTable, split_seed: int) -> Path:
    return cache_dir() / "splits" / f"{table.dataset}-{root_fingerprint(table)}-seed{int(split_seed)}.csv"


def record_manifest(table: CanonicalTable, manifest: SplitManifest, split_seed: int) -> Path:
    """Write the manifest to its place under ``cache_dir()/splits`` unless an identical one is there."""
    path = manifest_path(table, split_seed)
    if path.is_file():
        try:
            if SplitManifest.read(path).sha256 == manifest.sha256:
                return path
            log.info("%s: split manifest changed; rewriting %s", table.dataset, path)
        except DataError as exc:
            log.warning("%s: replacing unreadable split manifest: %s", table.dataset, exc)
    return manifest.write(path)


def prepare_dataset(name: str, data: str | Path = "synth", *, image_size: int, split_seed: int = 0,
                    skip_bad: bool = False, scale: str | None = None, synth_seed: int = 0,
                    workers: int = 2, progress: bool = True) -> PreparedData:
    """Load, split and cache dataset ``name`` from ``data`` ("synth" or a root directory)."""
    spec, root, kind = resolve_dataset(name, data, scale=scale, synth_seed=synth_seed)
    table = load_table(spec, root, skip_bad=skip_bad)
    if skip_bad:
        table = drop_missing_images(table)
    if len(table) == 0:
        raise DataError(f"dataset {name!r} has no rows", path=root)
    table, images = open_images(table, image_size, skip_bad=skip_bad, workers=workers, progress=progress)
    manifest = build_splits(table, spec.split, seed=split_seed, skip_bad=skip_bad)
    mpath = record_manifest(table, manifest, split_seed)
    source = {"kind": kind, "root": str(root), "dataset": name, "manifest_sha256": manifest.sha256,
              "manifest_path": str(mpath), "rows": len(table), "skipped_rows": int(table.skipped_rows),
              "skipped": table.skipped_by_reason(), "skip_bad": bool(skip_bad),
              "split_seed": int(split_seed), "image_size": int(image_size), "image_cache": str(images.path)}
    if kind == "synthetic":
        from bench.data.synth.corpus import DATASET_KEYS, corpus_of

        found = corpus_of(root)
        meta = found[1] if found else {"scale": scale, "seed": synth_seed}
        scale, synth_seed = meta.get("scale", scale), int(meta.get("seed", synth_seed))
        entry = (meta.get("datasets") or {}).get(DATASET_KEYS.get(name, name)) or {}
        source.update(scale=scale, seed=synth_seed, generator_version=meta.get("version"),
                      dataset_version=int(entry.get("version", 1)))
    sizes = manifest.sizes()
    what = f"SYNTHETIC data (corpus {scale}, seed {synth_seed})" if kind == "synthetic" else "REAL data"
    skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in table.skipped_by_reason().items() if n)
    log.info("%s: %s from %s: %d rows (%d skipped%s), train %d / val %d / test %d, manifest %s", name, what, root,
             len(table), table.skipped_rows, f": {skipped}" if skipped else "", sizes["train@1.0"], sizes["val"],
             sizes["test"], manifest.sha256[:12])
    return PreparedData(spec, table, manifest, images, source)
