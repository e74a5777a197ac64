"""``python -m bench perf data``: decoding on the fly against reading the image cache.

Raw: ``read_image`` + ``letterbox`` for each of the first ``limit`` rows, in one process (what a
data loader worker does per sample without a cache). Cache: random-access batches of
``batch_size`` rows (sorted within a batch) copied out of the memory-mapped cache of the same
rows, ``repeats`` passes. The cache is built first if needed (its build time is reported but not
counted); reads therefore hit the page cache, which is the steady state of a training run.
"""
from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)


def perf_data(dataset: str = "rsna", data: str = "synth", size: int = 128, limit: int = 256, *,
              image_size: int | None = None, batch_size: int = 64, repeats: int = 3, workers: int = 2,
              scale: str | None = None, seed: int = 0, skip_bad: bool = False) -> dict:
    """Images/s of raw decoding vs the built cache for ``dataset`` (``image_size`` aliases ``size``).

    ``skip_bad``: malformed rows and missing or undecodable images are left out (as ``bench run
    --skip-bad``) instead of stopping the measurement."""
    from bench.data.cache import ImageCache
    from bench.data.images import letterbox, read_image
    from bench.data.prepare import drop_missing_images, load_table, open_images, resolve_dataset

    size = int(image_size or size)
    spec, root, kind = resolve_dataset(dataset, data, scale=scale, synth_seed=seed)
    table = load_table(spec, root, skip_bad=skip_bad)
    if skip_bad:
        table = drop_missing_images(table)
    n = min(int(limit), len(table)) if limit else len(table)
    sub = table.subset(np.arange(n))
    pre_build_s = 0.0
    if skip_bad:  # build the cache first, dropping undecodable rows, so the raw pass decodes clean rows
        t0 = time.perf_counter()
        sub, _ = open_images(sub, size, skip_bad=True, workers=workers, progress=False)
        pre_build_s, n = time.perf_counter() - t0, len(sub)
    paths = list(sub.frame["image_path"])

    t0 = time.perf_counter()
    checksum = 0
    for p in paths:
        img, _ = letterbox(read_image(p), size)
        checksum += int(img[size // 2, size // 2])
    raw_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache = ImageCache.open_or_build(sub, size, workers=workers, progress=False)
    build_s = time.perf_counter() - t0 + pre_build_s

    rng = np.random.default_rng(seed)
    read = 0
    t0 = time.perf_counter()
    for _ in range(max(1, int(repeats))):
        order = rng.permutation(n)
        for s in range(0, n, batch_size):
            batch = cache.batch(np.sort(order[s:s + batch_size]))
            read += len(batch)
    cache_s = time.perf_counter() - t0
    raw_ips = n / max(raw_s, 1e-9)
    cache_ips = read / max(cache_s, 1e-9)
    return {"dataset": dataset, "source": kind, "images": n, "image_size": size,
            "raw_images_per_s": round(raw_ips, 1), "cache_images_per_s": round(cache_ips, 1),
            "speedup": round(cache_ips / max(raw_ips, 1e-9), 1), "cache_build_s": round(build_s, 2),
            "cache_build_images_per_s": round(n / max(build_s, 1e-9), 1), "batch_size": batch_size,
            "repeats": int(repeats), "workers": workers, "cache": str(cache.path),
            "skipped_rows": int(sub.skipped_rows)}
