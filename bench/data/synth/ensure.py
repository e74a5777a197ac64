"""Generate the synthetic datasets a set of tasks reads, all at once and in parallel.

A single ``bench run`` generates only its own dataset on first use; commands that run many tasks
(``bench check``, ``bench demo``) call this first, so their datasets are written side by side over
the corpus workers instead of one after the other, and the datasets they never read are not
written at all.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

log = logging.getLogger(__name__)

#: The corpus the pretraining methods (``supervised`` and the vision-language ones) train on.
PRETRAINING_DATASET = "mimic-cxr"


def ensure_synthetic_datasets(task_names: Iterable[str], *, pretraining: bool = True) -> list[str]:
    """Generate the datasets of ``task_names`` (and, with ``pretraining``, the pretraining corpus) in
    the default synthetic corpus; returns their names."""
    from bench.api import TASKS
    from bench.data.synth.corpus import DATASET_KEYS, default_scale, ensure_corpus
    from bench.paths import synth_root
    from bench.runner import load_registries

    load_registries()
    # a dataset without a synthetic writer (a test's stand-in) is left to its own loader
    needed = {TASKS.get(t).dataset for t in task_names} & set(DATASET_KEYS)
    if not needed:
        return []
    needed |= {PRETRAINING_DATASET} if pretraining else set()
    names = sorted(needed)
    t0 = time.perf_counter()
    scale = default_scale()
    ensure_corpus(synth_root(scale, 0), scale, 0, datasets=names)
    log.info("synthetic datasets %s ready in %.1f s", ", ".join(names), time.perf_counter() - t0)
    return names
