"""Frozen-encoder features of plain images, extracted once and cached on disk.

One file per cache key (method card, weights fingerprint, preset, dataset, split manifest, image
cache, array size, input size, precision) holds the rows extracted so far, so the 1% run's
features serve the 10% and 100% runs, and any change to what the features depend on misses.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from bench.api import Encoder
from bench.paths import cache_dir
from bench.progress import progress
from tasks.common.inputs import images_of, to_input
from tasks.common.precision import autocast, precision_label

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1


@torch.no_grad()
def extract_features(encoder: Encoder, data: Any, rows: np.ndarray, device: torch.device,
                     batch_size: int, *, image_size: int) -> np.ndarray:
    """Pooled features (float32 [len(rows), D]) of plain (un-augmented) images at ``image_size``,
    encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = np.empty((len(rows), encoder.card.embed_dim), dtype=np.float32)
    try:
        for start in progress(range(0, len(rows), batch_size), f"extracting {encoder.card.name} features",
                              unit="batch"):
            sl = slice(start, start + batch_size)
            with autocast(device):
                pooled = encoder.image_features(to_input(encoder, images_of(data, rows[sl]), device, image_size)).pooled
            out[sl] = pooled.float().cpu().numpy()
    finally:
        encoder.train(was_training)
    return out


def feature_cache_key(encoder: Encoder, data: Any, preset: str, device: torch.device, *,
                      image_size: int) -> dict[str, Any]:
    """Everything the cached features depend on (``image_size`` is the protocol's input size)."""
    from methods.backbones import state_fingerprint

    source = dict(getattr(data, "source", None) or {})
    return {
        "version": FEATURE_CACHE_VERSION,
        "card": encoder.card.to_dict(),
        "weights_fingerprint": state_fingerprint(encoder),
        "preset": preset,
        "dataset": data.table.dataset,
        "manifest_sha256": source.get("manifest_sha256") or getattr(data.manifest, "sha256", None),
        "image_cache": getattr(data.images, "fingerprint", None) or None,
        "array_size": int(data.images.array.shape[-1]),
        "image_size": int(image_size),
        "precision": precision_label(device),
        "feature": "pooled",
    }


def feature_cache_path(key: Mapping[str, Any], root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    card = key["card"]
    return (root or cache_dir()) / "features" / str(key["dataset"]) / str(card["name"]) / f"{digest[:32]}.npz"


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    # write beside the target and rename: a crash never leaves a truncated cache file behind
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class CachedFeatures:
    features: np.ndarray          # float32 [len(rows), D] in the order asked
    path: Path
    hit_rows: int                 # rows read from the cache
    extracted_rows: int           # rows computed now


def cached_features(encoder: Encoder, data: Any, rows: np.ndarray, *, preset: str, device: torch.device,
                    batch_size: int, image_size: int, root: Path | None = None) -> CachedFeatures:
    """Pooled features of ``rows``, read from the feature cache where present.

    One file per cache key holds ``rows`` (sorted table indices) and ``features``; rows not yet in
    it are extracted and merged in (atomic rewrite), so the 1% run's features serve the 100% run.
    """
    key = feature_cache_key(encoder, data, preset, device, image_size=image_size)
    path = feature_cache_path(key, root)
    want = np.unique(np.asarray(rows, dtype=np.int64))
    have_rows = np.zeros(0, dtype=np.int64)
    have = np.zeros((0, encoder.card.embed_dim), dtype=np.float32)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["key"])) == json.loads(json.dumps(key, default=str)):
                    have_rows, have = z["rows"].astype(np.int64), z["features"].astype(np.float32)
                else:
                    log.warning("feature cache %s: key mismatch (hash collision?); rebuilding", path)
        except Exception as e:  # truncated or foreign file: rebuild, never trust it
            log.warning("feature cache %s unreadable (%s); rebuilding", path, e)
    missing = np.setdiff1d(want, have_rows, assume_unique=True)
    if len(missing):
        log.info("extracting %d feature rows (%d cached) -> %s", len(missing), len(have_rows), path)
        new = extract_features(encoder, data, missing, device, batch_size, image_size=image_size)
        all_rows = np.concatenate([have_rows, missing])
        order = np.argsort(all_rows, kind="stable")
        have_rows, have = all_rows[order], np.concatenate([have, new])[order]
        _atomic_save_npz(path, rows=have_rows, features=have, key=np.array(json.dumps(key, sort_keys=True, default=str)))
    else:
        log.info("feature cache hit: %d rows from %s", len(want), path)
    idx = np.searchsorted(have_rows, np.asarray(rows, dtype=np.int64))
    return CachedFeatures(have[idx], path, int(len(want) - len(missing)), int(len(missing)))
