"""Label spaces: what a task predicts from a dataset's canonical table.

A canonical table keeps each dataset's raw label codes (1 / 0 / -1 uncertain / NaN blank). A
:class:`LabelSpace` is one reading of them for evaluation: the output classes, the targets and
the rows a task may use. They live in the data layer, beside the loaders whose columns they read,
so every task family (linear probe, fine-tuning, zero-shot CheXpert 5x200, ...) applies the same
5-label map and the same frontal filter. Look one up by dataset name with :func:`label_space`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from bench.data.label_lists import CHEXPERT_COMPETITION_TASKS, COVIDX_CLASSES, NIH_LABELS
from bench.data.loaders.chexpert import MGCA_UNCERTAIN_POLICY
from bench.data.table import apply_uncertainty_policy
from bench.errors import DataError

LABEL_KINDS = ("multilabel", "binary", "multiclass")


@dataclass(frozen=True)
class LabelSpace:
    """What a classification task predicts from a canonical table."""

    kind: str                                   # "multilabel" | "binary" | "multiclass"
    classes: tuple[str, ...]                    # output names (columns of the targets)
    targets: np.ndarray                         # multilabel/binary: float [N, C] 1/0/NaN; multiclass: int [N] (-1 none)
    keep: np.ndarray                            # bool [N]: rows the task uses (view filter, labelled)
    policy: str                                 # how labels were derived, recorded in details


def class_columns(table: Any, names: tuple[str, ...]) -> list[int]:
    """Column indices of ``names`` in ``table.labels``; a missing one names the dataset and the columns it has."""
    missing = [c for c in names if c not in table.classes]
    if missing:
        raise DataError(f"{table.dataset}: label columns {missing} not in table classes {list(table.classes)}")
    return [list(table.classes).index(c) for c in names]


def frontal_mask(table: Any) -> np.ndarray:
    """MGCA's ``Frontal/Lateral == "Frontal"``: the CheXpert loader writes laterals as view LATERAL
    (frontal rows keep AP/PA/LL, or "" when the AP/PA column is blank)."""
    return table.frame["view"].to_numpy(dtype=object) != "LATERAL"


def chexpert_labels(table: Any) -> LabelSpace:
    """The 5 competition labels of frontal images, MGCA's U-ones/U-zeros map, blanks -> 0."""
    tasks = CHEXPERT_COMPETITION_TASKS
    cols = class_columns(table, tasks)
    y = apply_uncertainty_policy(table.labels[:, cols], tasks, MGCA_UNCERTAIN_POLICY, blank=0.0)
    policy = ("frontal only; 5 competition labels; blank -> 0 (fillna(0)); -1 -> "
              + ", ".join(f"{c}: {int(v)}" for c, v in MGCA_UNCERTAIN_POLICY.items()) + " (MGCA U-ones/U-zeros)")
    return LabelSpace("multilabel", tuple(tasks), y.astype(np.float32), frontal_mask(table), policy)


def rsna_labels(table: Any) -> LabelSpace:
    """Binary pneumonia (the loader's ``Target``: any Lung Opacity box); unlabelled rows are dropped."""
    name = "Pneumonia" if "Pneumonia" in table.classes else (table.classes[0] if len(table.classes) == 1 else None)
    if name is None:
        raise DataError(f"rsna: expected a single 'Pneumonia' label column, got {list(table.classes)}")
    (col,) = class_columns(table, (name,))
    y = table.labels[:, [col]].astype(np.float32)
    keep = np.isin(y[:, 0], (0.0, 1.0))
    return LabelSpace("binary", (name,), y, keep, f"binary {name!r} (Target: any Lung Opacity box)")


def covidx_labels(table: Any) -> LabelSpace:
    """3-class single label; rows without exactly one class are dropped."""
    names = COVIDX_CLASSES
    cols = class_columns(table, names)
    onehot = np.nan_to_num(table.labels[:, cols], nan=0.0) == 1
    single = onehot.sum(axis=1) == 1
    y = np.where(single, onehot.argmax(axis=1), -1).astype(np.int64)
    return LabelSpace("multiclass", names, y, single,
                      "3-class single label: normal 0, pneumonia 1, COVID-19 2 (MGCA label map)")


def nih_labels(table: Any) -> LabelSpace:
    """The 14 ChestX-ray14 labels, blanks -> 0, every row kept."""
    classes = tuple(table.classes)
    if len(classes) != len(NIH_LABELS):
        raise DataError(f"nih: expected the 14 ChestX-ray14 labels, got {len(classes)}: {list(classes)}")
    y = apply_uncertainty_policy(table.labels, classes, None, blank=0.0)
    return LabelSpace("multilabel", classes, y.astype(np.float32), np.ones(len(table), dtype=bool),
                      "14 labels from Finding Labels; blank -> 0")


#: dataset name -> its label space for classification-style tasks.
LABEL_SPACES: dict[str, Callable[[Any], LabelSpace]] = {
    "chexpert": chexpert_labels,
    "rsna": rsna_labels,
    "covidx": covidx_labels,
    "nih": nih_labels,
}


def label_space(dataset: str) -> Callable[[Any], LabelSpace]:
    """The label-space function of ``dataset``; an unknown name lists the ones that have one."""
    try:
        return LABEL_SPACES[dataset]
    except KeyError:
        raise DataError(f"dataset {dataset!r} has no classification label space "
                        f"(datasets with one: {', '.join(sorted(LABEL_SPACES))})") from None
