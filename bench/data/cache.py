"""Decoded, letterboxed images of a table, memory-mapped from disk.

Each image is decoded once per (dataset, root, image size) and stored under
``cache_dir()/images/<dataset>-<fingerprint>-<size>/``:

* ``images.npy``    uint8 [N_rows, size, size]    the first image of each row, as models see it
* ``geometry.npy``  float32 [N_rows, 3]          (scale, pad_x, pad_y), see :class:`Geometry`
* ``extra.npy``     uint8 [N_rows, k, size, size] further views (IU X-ray), k = max per row,
                    zero-filled where a row has fewer; only when some row has extra views
* ``extra_geometry.npy`` float32 [N_rows, k, 3], ``extra_count.npy`` int16 [N_rows]
* ``keys.npy``      S16 [N_rows]                  per row, a digest of its image files (paths,
                    sizes, mtimes): what lets another build reuse the row without decoding it
* ``meta.json``     what was built, from what, in how long

The fingerprint hashes the image pipeline version, dataset name, root and, per row, the image id
and every image path with its file size and mtime, so any changed, added, removed or reordered
file gives a new cache.

Building, resuming, bad files
-----------------------------
A build writes into ``.<name>.partial/`` beside the target, holding the same arrays plus a
``done.npy`` mask (0 to do, 1 decoded, 2 failed) that is set only after a chunk's pixels are
flushed, and renames it into place when every row is decoded. Nothing deletes a partial build on
failure: an interrupted or crashed build (Ctrl-C, SIGKILL, a power cut of the process) resumes
from its mask, decoding only the rows not done. Before decoding, rows whose key matches a row
already decoded by another cache of the same dataset and size (finished, or partial) are copied
instead: after ``--skip-bad`` drops undecodable rows, the smaller table's cache is filled from the
partial build of the full one, and a dataset with a few replaced files re-decodes only those.

An image that fails to decode does not stop the others: every failing path is collected and the
build ends with :class:`UndecodableImagesError` (a DataError listing them), its partial kept. Rows
to decode run before rows to copy, so the error comes before any bulk copying. A per-cache lock
file (``.locks/<name>.lock``, flock) serialises builds of one cache across processes; it is
released by the kernel when its process dies, so a crash never leaves a stale lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
#: Rows copied from another cache per step (bounded memory: 1024 x 224^2 bytes is ~50 MB).
COPY_CHUNK = 1024
#: Undecodable paths quoted in the error message; all of them are in the partial's failures.json.
MAX_LISTED_FAILURES = 1000
_TMP_MARK = ".tmp-"        # temporary dirs of the previous cache format (removed when stale)
_PARTIAL = ".partial"
_LOCKS = ".locks"
KEY_DTYPE = np.dtype("S16")
PENDING, DONE, FAILED = 0, 1, 2


class UndecodableImagesError(DataError):
    """Images of a table that could not be decoded; ``failures`` is [(row, path, reason)]."""

    def __init__(self, dataset: str, failures: list[tuple[int, str, str]], partial: Path) -> None:
        self.failures = sorted(failures)
        self.rows = np.array([r for r, _, _ in self.failures], dtype=np.int64)
        self.paths = [p for _, p, _ in self.failures]
        listed = "\n".join(f"  {reason}" for _, _, reason in self.failures[:MAX_LISTED_FAILURES])
        more = len(self.failures) - MAX_LISTED_FAILURES
        tail = f"\n  ... and {more} more, all in {partial / 'failures.json'}" if more > 0 else ""
        super().__init__(
            f"{dataset}: {len(self.failures)} image file(s) could not be decoded:\n{listed}{tail}\n"
            f"The images decoded so far are kept in {partial}; a rerun decodes only the rest",
            hint="replace or remove these files, or pass --skip-bad to leave their rows out (counted in "
                 "the split manifest)")


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError("image file not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot stat image file: {exc}", path=path) from exc
    return st.st_size, st.st_mtime_ns


def _file_records(table: CanonicalTable) -> list[str]:
    """Per row, ``"path|size|mtime"`` of its first image and its extra views, tab-joined."""
    frame = table.frame
    out = []
    for path, extras in zip(frame["image_path"], frame["extra_image_paths"]):
        parts = []
        for p in (path, *tuple(extras or ())):
            size, mtime = _stat(str(p))
            parts.append(f"{p}|{size}|{mtime}")
        out.append("\t".join(parts))
    return out


def _fingerprint_of(table: CanonicalTable, records: list[str]) -> str:
    h = hashlib.sha256()
    h.update(f"images v{CACHE_FORMAT_VERSION}.{IMAGE_PIPELINE_VERSION}\n{table.dataset}\n{table.root}\n".encode())
    for image_id, rec in zip(table.frame["image_id"], records):
        h.update(f"{image_id}\t{rec}\n".encode())
    return h.hexdigest()[:16]


def _keys_of(records: list[str]) -> np.ndarray:
    """S16 digest per row of its files only (not the image id, dataset or root: the pixels depend
    on the files alone, so a row is reusable wherever the same files appear)."""
    return np.array([hashlib.blake2b(r.encode(), digest_size=16).digest() for r in records], dtype=KEY_DTYPE)


def image_fingerprint(table: CanonicalTable) -> str:
    """16 hex digits over the table's image files (paths, sizes, mtimes) and row order."""
    return _fingerprint_of(table, _file_records(table))


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
    """Remove temporary build dirs of ``name`` (previous format) left by processes that are gone."""
    for tmp in parent.glob(f".{name}{_TMP_MARK}*"):
        try:
            pid = int(tmp.name.split(_TMP_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            pid = -1
        if pid != os.getpid() and not _is_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _locked(parent: Path, name: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold the build lock of cache ``name``; yields False (without waiting) when ``wait`` is off
    and another process holds it. flock is dropped by the kernel when the holder dies."""
    locks = parent / _LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    """Atomic: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


# -- workers ---------------------------------------------------------------------------------------
def _decode_rows(part: str, size: int, rows: list[int], paths: list[str], extras: list[tuple[str, ...]],
                 k_extra: int) -> tuple[list[int], list[tuple[int, str, str]]]:
    """Decode ``rows`` into the memmaps of the partial build ``part``; return (decoded rows,
    [(row, path, reason)] of the rows whose first image or an extra view failed to decode)."""
    images = np.load(os.path.join(part, "images.npy"), mmap_mode="r+")
    geom = np.load(os.path.join(part, "geometry.npy"), mmap_mode="r+")
    extra = egeom = ecount = None
    if k_extra:
        extra = np.load(os.path.join(part, "extra.npy"), mmap_mode="r+")
        egeom = np.load(os.path.join(part, "extra_geometry.npy"), mmap_mode="r+")
        ecount = np.load(os.path.join(part, "extra_count.npy"), mmap_mode="r+")
    ok: list[int] = []
    failed: list[tuple[int, str, str]] = []
    for row, path, more in zip(rows, paths, extras):
        current = path
        try:
            img, g = letterbox(read_image(path), size)
            views = []
            for p in more:
                current = p
                views.append(letterbox(read_image(p), size))
        except DataError as exc:  # one bad file must not hide the others: collect, go on
            failed.append((int(row), str(current), str(exc)))
            continue
        images[row] = img
        geom[row] = g.to_array()
        if k_extra:
            for v, (eimg, eg) in enumerate(views):
                extra[row, v] = eimg
                egeom[row, v] = eg.to_array()
            ecount[row] = len(views)
        ok.append(int(row))
    for arr in (images, geom, extra, egeom, ecount):  # pixels reach the file before done.npy says so
        if arr is not None:
            arr.flush()
    del images, geom, extra, egeom, ecount
    return ok, failed


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

    @staticmethod
    def partial_location(final: Path) -> Path:
        """Where the build of the cache ``final`` lives until it is complete."""
        return final.parent / f".{final.name}{_PARTIAL}"

    @classmethod
    def open_or_build(cls, table: CanonicalTable, size: int, *, workers: int = DEFAULT_WORKERS,
                      chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
                      min_parallel_rows: int = MIN_PARALLEL_ROWS) -> "ImageCache":
        """Open the cache of ``table`` at ``size``, building (or resuming) it first when absent.

        The build decodes chunks of ``chunk_size`` rows over ``workers`` processes (one process
        when fewer than ``min_parallel_rows`` rows need decoding). Raises
        :class:`UndecodableImagesError` listing every image that failed to decode.
        """
        records = _file_records(table)
        fp = _fingerprint_of(table, records)
        final = cls.location(table, size, fp)
        cache = cls._open_finished(final, len(table))
        if cache is not None:
            return cache
        with _locked(final.parent, final.name):
            cache = cls._open_finished(final, len(table))  # another process may have finished it meanwhile
            if cache is not None:
                return cache
            _remove_stale_tmp(final.parent, final.name)
            cls._build(table, int(size), fp, _keys_of(records), final, workers=workers, chunk_size=chunk_size,
                       progress=progress, min_parallel_rows=min_parallel_rows)
        return cls.open(final)

    @classmethod
    def _open_finished(cls, final: Path, rows: int) -> "ImageCache | None":
        if (final / "meta.json").is_file():
            cache = cls.open(final)
            if cache.meta.get("rows") == rows:
                return cache
            log.warning("image cache %s does not match its table; rebuilding", final)
            shutil.rmtree(final, ignore_errors=True)
        elif final.exists():  # not produced by a build (builds rename complete dirs into place)
            shutil.rmtree(final, ignore_errors=True)
        return None

    # -- the build -------------------------------------------------------------------------------
    @staticmethod
    def _partial_state(table: CanonicalTable, size: int, fp: str, n: int, k_extra: int) -> dict:
        return {"format": CACHE_FORMAT_VERSION, "pipeline": IMAGE_PIPELINE_VERSION, "dataset": table.dataset,
                "root": str(table.root), "size": size, "rows": n, "k_extra": k_extra, "fingerprint": fp}

    @classmethod
    def _open_partial(cls, part: Path, state: dict, keys: np.ndarray) -> bool:
        """True when ``part`` is a partial build of exactly this cache (else it is removed)."""
        if not part.exists():
            return False
        try:
            ok = (json.loads((part / "state.json").read_text()) == state
                  and np.array_equal(np.load(part / "keys.npy"), keys)
                  and np.load(part / "done.npy", mmap_mode="r").shape == (state["rows"],))
        except (OSError, ValueError, EOFError) as exc:  # state.json is written last: its absence = never set up
            log.debug("partial image cache %s unusable (%s); starting over", part, exc)
            ok = False
        if not ok:
            shutil.rmtree(part, ignore_errors=True)
        return ok

    @staticmethod
    def _new_partial(part: Path, state: dict, keys: np.ndarray) -> None:
        n, size, k = state["rows"], state["size"], state["k_extra"]
        part.mkdir(parents=True)
        arrays = {"images.npy": (np.uint8, (n, size, size)), "geometry.npy": (np.float32, (n, 3)),
                  "done.npy": (np.uint8, (n,))}
        if k:
            arrays.update({"extra.npy": (np.uint8, (n, k, size, size)),
                           "extra_geometry.npy": (np.float32, (n, k, 3)), "extra_count.npy": (np.int16, (n,))})
        for name, (dtype, shape) in arrays.items():  # zero-filled (sparse) files
            np.lib.format.open_memmap(part / name, mode="w+", dtype=dtype, shape=shape).flush()
        np.save(part / "keys.npy", keys)
        _write_json(part / "state.json", state)

    @staticmethod
    def _sources(parent: Path, dataset: str, size: int, exclude: set[str]) -> Iterator[tuple[Path, np.ndarray]]:
        """(dir, usable rows' keys masked: key or b"" where not decoded) of other caches of
        ``dataset`` at ``size`` built by this pipeline: finished ones, then partial builds."""
        pattern = re.compile(rf"^\.?{re.escape(dataset)}-[0-9a-f]{{16}}-{int(size)}({re.escape(_PARTIAL)})?$")
        found = sorted((d for d in parent.iterdir() if d.name not in exclude and pattern.match(d.name)),
                       key=lambda d: (d.name.startswith("."), d.name))
        for d in found:
            try:
                meta = json.loads((d / ("state.json" if d.name.startswith(".") else "meta.json")).read_text())
                if (meta.get("format"), meta.get("pipeline"), meta.get("size")) != (
                        CACHE_FORMAT_VERSION, IMAGE_PIPELINE_VERSION, int(size)):
                    continue
                keys = np.load(d / "keys.npy")
                if d.name.startswith("."):
                    done = np.load(d / "done.npy", mmap_mode="r")
                    keys = np.where(np.asarray(done) == DONE, keys, b"")
            except (OSError, ValueError, EOFError):
                continue  # an older cache without keys.npy, or one being removed: not a source
            yield d, keys

    @classmethod
    def _build(cls, table: CanonicalTable, size: int, fp: str, keys: np.ndarray, final: Path, *, workers: int,
               chunk_size: int, progress: bool, min_parallel_rows: int) -> None:
        from tqdm.auto import tqdm

        frame = table.frame
        n = len(frame)
        paths = [str(p) for p in frame["image_path"]]
        extras = [tuple(str(x) for x in (e or ())) for e in frame["extra_image_paths"]]
        k_extra = max((len(e) for e in extras), default=0)
        state = cls._partial_state(table, size, fp, n, k_extra)
        part = cls.partial_location(final)
        if not cls._open_partial(part, state, keys):
            cls._new_partial(part, state, keys)
        t0 = time.perf_counter()
        done = np.load(part / "done.npy", mmap_mode="r+")
        todo = np.flatnonzero(np.asarray(done) != DONE)
        resumed = n - len(todo)
        if resumed:
            log.info("%s: resuming the image cache build at %dpx: %d of %d rows already decoded (%s)",
                     table.dataset, size, resumed, n, part)

        # Rows another cache decoded from the same files are copied, not decoded.
        copy_from: list[tuple[Path, np.ndarray, np.ndarray]] = []   # (source, our rows, its rows)
        left = todo
        for src, src_keys in cls._sources(final.parent, table.dataset, size, {final.name, part.name}):
            if not len(left):
                break
            index = {k: i for i, k in enumerate(src_keys.tolist()) if k}
            hit = np.array([index.get(k, -1) for k in keys[left].tolist()], dtype=np.int64)
            if (hit >= 0).any():
                copy_from.append((src, left[hit >= 0], hit[hit >= 0]))
                left = left[hit < 0]
        to_decode = left
        workers = 1 if len(to_decode) < min_parallel_rows else max(1, int(workers))
        bar = tqdm(total=len(todo), desc=f"caching {table.dataset} images at {size}px", unit="img",
                   disable=None if progress else True, leave=False)
        try:
            failures = cls._decode_into(part, done, to_decode, paths, extras, size, k_extra, chunk_size, workers,
                                        bar)
            if failures:
                _write_json(part / "failures.json", {str(r): reason for r, _, reason in failures})
                raise UndecodableImagesError(table.dataset, failures, part)
            copied = cls._copy_into(part, done, copy_from, k_extra, bar)
        finally:
            bar.close()
            done.flush()
            del done
        seconds = time.perf_counter() - t0
        meta = {**state, "build_seconds": round(seconds, 3), "workers": workers, "decoded_rows": len(to_decode),
                "copied_rows": copied, "resumed_rows": resumed}
        for name in ("done.npy", "state.json", "failures.json"):
            (part / name).unlink(missing_ok=True)
        _write_json(part / "meta.json", meta)
        os.rename(part, final)  # the lock guarantees no other process is finishing this cache
        log.info("cached %d %s images at %dpx in %.1fs (decoded %d, copied %d from other caches, %d resumed) -> %s",
                 n, table.dataset, size, seconds, len(to_decode), copied, resumed, final)
        cls._drop_covered_partials(final, keys, [src for src, _, _ in copy_from])

    @staticmethod
    def _decode_into(part: Path, done: np.ndarray, rows: np.ndarray, paths: list[str],
                     extras: list[tuple[str, ...]], size: int, k_extra: int, chunk_size: int, workers: int,
                     bar) -> list[tuple[int, str, str]]:
        chunk_size = max(1, int(chunk_size))
        jobs = []
        for s in range(0, len(rows), chunk_size):
            r = [int(x) for x in rows[s:s + chunk_size]]
            jobs.append((str(part), size, r, [paths[i] for i in r], [extras[i] for i in r], k_extra))
        failures: list[tuple[int, str, str]] = []
        for _, (ok, failed) in run_jobs(_decode_rows, jobs, workers):
            done[ok] = DONE
            done[[r for r, _, _ in failed]] = FAILED
            done.flush()
            failures += failed
            bar.update(len(ok) + len(failed))
        return failures

    @staticmethod
    def _copy_into(part: Path, done: np.ndarray, copy_from, k_extra: int, bar) -> int:
        if not copy_from:
            return 0
        dst = {"images": np.load(part / "images.npy", mmap_mode="r+"),
               "geometry": np.load(part / "geometry.npy", mmap_mode="r+")}
        if k_extra:
            for name in ("extra", "extra_geometry", "extra_count"):
                dst[name] = np.load(part / f"{name}.npy", mmap_mode="r+")
        copied = 0
        for src, ours, theirs in copy_from:
            arrays = {name: np.load(src / f"{name}.npy", mmap_mode="r") for name in dst
                      if name in ("images", "geometry") or (src / f"{name}.npy").is_file()}
            for s in range(0, len(ours), COPY_CHUNK):
                o, t = ours[s:s + COPY_CHUNK], theirs[s:s + COPY_CHUNK]
                dst["images"][o] = arrays["images"][t]
                dst["geometry"][o] = arrays["geometry"][t]
                if k_extra and "extra_count" in arrays:  # same files, so the same number of views
                    k = min(k_extra, arrays["extra"].shape[1])
                    dst["extra"][o, :k] = arrays["extra"][t, :k]
                    dst["extra_geometry"][o, :k] = arrays["extra_geometry"][t, :k]
                    dst["extra_count"][o] = arrays["extra_count"][t]
                for arr in dst.values():
                    arr.flush()
                done[o] = DONE
                done.flush()
                bar.update(len(o))
            log.info("image cache: reused %d decoded rows of %s", len(ours), src)
            copied += len(ours)
        return copied

    @staticmethod
    def _drop_covered_partials(final: Path, keys: np.ndarray, sources: list[Path]) -> None:
        """Remove partial builds whose decoded rows all live in the finished ``final`` now (disk:
        a partial MIMIC build is as large as the cache), unless another process is building one."""
        have = set(keys.tolist())
        for src in sources:
            if not src.name.startswith("."):
                continue
            with _locked(final.parent, src.name[1:-len(_PARTIAL)], wait=False) as mine:
                if not mine:
                    continue
                try:
                    done = np.load(src / "done.npy")
                    theirs = np.load(src / "keys.npy")[done == DONE]
                except (OSError, ValueError, EOFError):
                    continue
                if set(theirs.tolist()) <= have:
                    shutil.rmtree(src, ignore_errors=True)
                    log.info("removed partial image cache %s: its decoded rows are in %s", src, final)
