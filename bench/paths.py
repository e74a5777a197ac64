"""Where the harness keeps caches, the synthetic corpus and results."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of derived, re-creatable files (image caches, feature caches, synthetic corpus)."""
    return Path(os.environ.get("MEDVLP_BENCH_CACHE", Path.home() / ".cache" / "medvlp-bench"))


def synth_root(scale: str = "tiny", seed: int = 0) -> Path:
    """Default location of the synthetic corpus of a given scale and seed."""
    return cache_dir() / "synth" / f"{scale}-seed{seed}"


def results_dir() -> Path:
    return Path(os.environ.get("MEDVLP_BENCH_RESULTS", REPO_ROOT / "results"))
