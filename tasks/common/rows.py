"""Which table rows a task trains, validates and tests on, and who the patients are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.data.labels import LabelSpace
from bench.errors import DataError


@dataclass
class SplitRows:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_rows(data: Any, space: LabelSpace, fraction: float) -> SplitRows:
    """Sorted rows of each split (train at ``fraction``; val and test whole) that the label space keeps."""
    rows = {}
    for split, frac in (("train", fraction), ("val", 1.0), ("test", 1.0)):
        r = np.asarray(data.manifest.rows(split, frac), dtype=np.int64)
        r = r[space.keep[r]]
        if len(r) == 0:
            raise DataError(f"{data.table.dataset}: no usable {split} rows (fraction {frac}) after the task's "
                            f"filter ({space.policy})")
        rows[split] = np.sort(r)
    return SplitRows(**rows)


def patients_of(data: Any, rows: np.ndarray) -> np.ndarray:
    """Patient ids (str) of table rows: the bootstrap's resampling unit."""
    return data.table.frame["patient_id"].to_numpy(dtype=object)[rows].astype(str)


def split_sizes(data: Any, rows: SplitRows) -> dict[str, Any]:
    """Images and patients per split, as recorded in result details."""
    return {s: {"images": int(len(r)), "patients": int(len(np.unique(patients_of(data, r))))}
            for s, r in (("train", rows.train), ("val", rows.val), ("test", rows.test))}
