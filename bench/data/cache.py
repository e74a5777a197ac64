"""Decoded, letterboxed images of a table, memory-mapped from disk.

Each image is decoded once per (dataset, root, image size) and stored under
``cache_dir()/images/<dataset>-<fingerprint>-<size>/``:

* ``images.npy``    uint8 [N_rows, size, size]    the first image of each row, as models see it
* ``geometry.npy``  float32 [N_rows, 3]          (scale, pad_x, pad_y), see :class:`Geometry`
* ``extra.npy``     uint8 [N_rows, k, size, size] further views (IU X-ray), k = max per row,
                    zero-filled where a row has fewer; only when some row has extra views
* ``extra_geometry.npy`` float32 [N_rows, k, 3], ``extra_count.npy`` int16 [N_rows]
* ``meta.json``     what was built, from what, in how long

The fingerprint hashes the image pipeline version, dataset name, root and, per row, the image id
and every image path with its file size and mtime, so any changed, added, removed or reordered
file gives a new cache. A build writes into a hidden temporary directory beside the target and
renames it into place when complete; an interrupted build leaves only the hidden directory, which
is never opened and is removed by a later build once its process is gone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data.images import IMAGE_PIPELINE_VERSION, letterbox, read_image
from bench.data.parallel import run_jobs
from bench.data.table import CanonicalTable
from bench.errors import DataError
from bench.paths import cache_dir

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
DEFAULT_WORKERS = 2
DEFAULT_CHUNK = 64
#: Below this many rows a build runs in this process: starting spawned workers (~1 s each, mostly
#: imports) costs more than it saves (measured: 600-1000 rows decode at 500-800 img/s in one process).
MIN_PARALLEL_ROWS = 2000
_TMP_MARK = ".tmp-"


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError("image file not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot stat image file: {exc}", path=path) from exc
    return st.st_size, st.st_mtime_ns


def image_fingerprint(table: CanonicalTable) -> str:
    """16 hex digits over the table's image files (paths, sizes, mtimes) and row order."""
    h = hashlib.sha256()
    h.update(f"images v{CACHE_FORMAT_VERSION}.{IMAGE_PIPELINE_VERSION}\n{table.dataset}\n{table.root}\n".encode())
    frame = table.frame
    for image_id, path, extras in zip(frame["image_id"], frame["image_path"], frame["extra_image_paths"]):
        parts = [str(image_id)]
        for p in (path, *tuple(extras or ())):
            size, mtime = _stat(str(p))
            parts.append(f"{p}|{size}|{mtime}")
        h.update(("\t".join(parts) + "\n").encode())
    return h.hexdigest()[:16]


def root_fingerprint(table: CanonicalTable) -> str:
    """16 hex digits over the official files read (``table.source_files``) and the image files."""
    h = hashlib.sha256(image_fingerprint(table).encode())
    for rel in table.source_files:
        p = Path(table.root) / rel
        try:
            st = p.stat()
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}|missing\n".encode())
    return h.hexdigest()[:16]


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(parent: Path, name: str) -> None:
    """Remove temporary build dirs of ``name`` left by processes that no longer exist."""
    for tmp in parent.glob(f".{name}{_TMP_MARK}*"):
        try:
            pid = int(tmp.name.split(_TMP_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            pid = -1
        if pid != os.getpid() and not _is_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


# -- workers ---------------------------------------------------------------------------------------
def _decode_chunk(tmp_dir: str, size: int, start: int, paths: list[str],
                  extras: list[tuple[str, ...]], k_extra: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Decode rows ``start..start+len(paths)`` into the memmaps in ``tmp_dir``; return geometries."""
    images = np.load(os.path.join(tmp_dir, "images.npy"), mmap_mode="r+")
    geom = np.zeros((len(paths), 3), dtype=np.float32)
    egeom = np.zeros((len(paths), max(k_extra, 0), 3), dtype=np.float32)
    ecount = np.zeros(len(paths), dtype=np.int16)
    extra = np.load(os.path.join(tmp_dir, "extra.npy"), mmap_mode="r+") if k_extra else None
    for j, (path, more) in enumerate(zip(paths, extras)):
        img, g = letterbox(read_image(path), size)
        images[start + j] = img
        geom[j] = g.to_array()
        for v, p in enumerate(more):
            eimg, eg = letterbox(read_image(p), size)
            extra[start + j, v] = eimg
            egeom[j, v] = eg.to_array()
        ecount[j] = len(more)
    images.flush()
    if extra is not None:
        extra.flush()
    del images, extra
    return start, geom, egeom, ecount


# -- the cache -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ImageCache:
    """Read-only view of a built cache (use :meth:`open_or_build`)."""

    path: Path
    size: int
    array: np.ndarray                 # uint8 [N, size, size], memory-mapped read-only
    geometry: np.ndarray              # float32 [N, 3]
    extra: np.ndarray | None = None   # uint8 [N, k, size, size] or None
    extra_geometry: np.ndarray | None = None
    extra_count: np.ndarray | None = None
    meta: dict | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __reduce__(self):
        # Pickle by path (DataLoader workers, process pools): re-open the memmaps, never copy pixels.
        return (ImageCache.open, (str(self.path),))

    @property
    def fingerprint(self) -> str:
        return (self.meta or {}).get("fingerprint", "")

    def batch(self, rows) -> np.ndarray:
        """uint8 [B, 1, size, size] copy of the given rows (sorted reads are fastest)."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.asarray(self.array[rows])[:, None]

    @classmethod
    def open(cls, path: str | Path) -> "ImageCache":
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise DataError("not a finished image cache (no meta.json)", path=path)
        meta = json.loads(meta_file.read_text())
        array = np.load(path / "images.npy", mmap_mode="r")
        geometry = np.load(path / "geometry.npy")
        extra = egeom = ecount = None
        if meta.get("k_extra", 0):
            extra = np.load(path / "extra.npy", mmap_mode="r")
            egeom = np.load(path / "extra_geometry.npy")
            ecount = np.load(path / "extra_count.npy")
        if array.shape != (meta["rows"], meta["size"], meta["size"]) or geometry.shape != (meta["rows"], 3):
            raise DataError(f"image cache arrays {array.shape} / {geometry.shape} do not match meta.json", path=path)
        return cls(path, int(meta["size"]), array, geometry, extra, egeom, ecount, meta)

    @classmethod
    def location(cls, table: CanonicalTable, size: int, fingerprint: str | None = None) -> Path:
        fp = fingerprint or image_fingerprint(table)
        return cache_dir() / "images" / f"{table.dataset}-{fp}-{int(size)}"

    @classmethod
    def open_or_build(cls, table: CanonicalTable, size: int, *, workers: int = DEFAULT_WORKERS,
                      chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
                      min_parallel_rows: int = MIN_PARALLEL_ROWS) -> "ImageCache":
        """Open the cache of ``table`` at ``size``, building it first when absent or stale.

        The build decodes chunks of ``chunk_size`` rows over ``workers`` processes (one process
        when the table has fewer than ``min_parallel_rows`` rows).
        """
        fp = image_fingerprint(table)
        final = cls.location(table, size, fp)
        if (final / "meta.json").is_file():
            cache = cls.open(final)
            if cache.meta.get("rows") == len(table):
                return cache
            log.warning("image cache %s does not match its table; rebuilding", final)
            shutil.rmtree(final, ignore_errors=True)
        elif final.exists():  # not produced by a build (builds rename complete dirs into place)
            shutil.rmtree(final, ignore_errors=True)
        if len(table) < min_parallel_rows:
            workers = 1
        cls._build(table, int(size), fp, final, workers=workers, chunk_size=chunk_size, progress=progress)
        return cls.open(final)

    @staticmethod
    def _build(table: CanonicalTable, size: int, fp: str, final: Path, *, workers: int, chunk_size: int,
               progress: bool) -> None:
        from tqdm.auto import tqdm

        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(final.parent, final.name)
        tmp = final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        frame = table.frame
        n = len(frame)
        paths = [str(p) for p in frame["image_path"]]
        extras = [tuple(str(x) for x in (e or ())) for e in frame["extra_image_paths"]]
        k_extra = max((len(e) for e in extras), default=0)
        t0 = time.perf_counter()
        try:
            np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)).flush()
            if k_extra:
                np.lib.format.open_memmap(tmp / "extra.npy", mode="w+", dtype=np.uint8,
                                          shape=(n, k_extra, size, size)).flush()
            geometry = np.zeros((n, 3), dtype=np.float32)
            egeom = np.zeros((n, k_extra, 3), dtype=np.float32)
            ecount = np.zeros(n, dtype=np.int16)
            chunk_size = max(1, int(chunk_size))
            starts = list(range(0, n, chunk_size))
            jobs = [(str(tmp), size, s, paths[s:s + chunk_size], extras[s:s + chunk_size], k_extra) for s in starts]
            bar = tqdm(total=n, desc=f"caching {table.dataset} images at {size}px", unit="img",
                       disable=None if progress else True, leave=False)

            def collect(result) -> None:
                s, g, eg, ec = result
                geometry[s:s + len(g)] = g
                egeom[s:s + len(g)] = eg
                ecount[s:s + len(g)] = ec
                bar.update(len(g))

            workers = max(1, int(workers))
            for _, result in run_jobs(_decode_chunk, jobs, workers):
                collect(result)
            bar.close()
            np.save(tmp / "geometry.npy", geometry)
            if k_extra:
                np.save(tmp / "extra_geometry.npy", egeom)
                np.save(tmp / "extra_count.npy", ecount)
            seconds = time.perf_counter() - t0
            meta = {"format": CACHE_FORMAT_VERSION, "pipeline": IMAGE_PIPELINE_VERSION, "dataset": table.dataset,
                    "root": str(table.root), "size": size, "rows": n, "k_extra": k_extra, "fingerprint": fp,
                    "build_seconds": round(seconds, 3), "workers": workers}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            try:
                os.rename(tmp, final)
            except OSError:
                if (final / "meta.json").is_file():  # another process finished the same cache first
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
            log.info("cached %d %s images at %dpx in %.1fs (%.0f img/s) -> %s", n, table.dataset, size,
                     seconds, n / max(seconds, 1e-9), final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
