"""Image classification tasks: each dataset bound to the linear probe and to fine-tuning.

``<dataset>-cls`` runs :mod:`tasks.linear_probe` (MGCA §5.1; protocols ``cached`` and
``augmented``), ``<dataset>-ft`` runs :mod:`tasks.fine_tune` (BenchX-style). The label space of
each dataset lives in the data layer (:mod:`bench.data.labels`):

* ``chexpert``: frontal images only, the 5 competition labels with MGCA's U-ones/U-zeros map and
  ``fillna(0)``; macro AUROC.
* ``rsna``: binary (class "Pneumonia" = Target); AUROC, plus F1 and accuracy at thresholds
  chosen on validation.
* ``covidx``: 3-class softmax; accuracy (main, MGCA) and one-vs-rest macro AUROC.
* ``nih``: 14 labels; macro AUROC.

Every test metric carries a 95% bootstrap CI resampling patients (``n_boot`` settings).
Determinism: everything random (head init, shuffling, augmentation, bootstrap) draws from
generators derived from ``spec.seed``; on CPU the same spec gives the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from bench import metrics as M
from bench.api import TASKS, Capability, TaskEntry
from bench.data.labels import LabelSpace, label_space
from tasks.fine_tune import FINE_TUNE_ANCHOR_DIFFERENCES, FINE_TUNE_PROTOCOLS, FINE_TUNE_SETTINGS, run_fine_tune
from tasks.linear_probe import (
    LINEAR_PROBE_ANCHOR_DIFFERENCES, LINEAR_PROBE_PROTOCOLS, LINEAR_PROBE_VERSION, LINEAR_PROBE_SETTINGS, run_linear_probe,
)
from tasks.linear_probe import perf_probe  # noqa: F401  (`bench perf probe` imports it from here)

#: Binary metrics differ from BenchX in both families.
_BINARY_THRESHOLD = ("BenchX: binary F1 and accuracy use thresholds chosen on validation, where BenchX takes the "
                     "argmax of a 2-class softmax.")
_MULTILABEL_THRESHOLD = ("BenchX: multi-label F1 uses per-class thresholds chosen on validation, where BenchX's "
                         "multilabel_accuracy picks its threshold on the set it scores.")


@dataclass(frozen=True)
class DatasetTask:
    """One dataset as a classification task: its label space, main metric and anchor differences."""

    dataset: str
    title: str
    labels: Callable[[Any], LabelSpace]
    main_metric: str
    probe_differences: tuple[str, ...] = ()      # added to the linear probe's (MGCA-anchored) list
    fine_tune_differences: tuple[str, ...] = ()  # added to fine-tuning's (BenchX-anchored) list


DATASET_TASKS: dict[str, DatasetTask] = {
    "chexpert": DatasetTask(
        "chexpert", "CheXpert 5 competition labels (frontal)", label_space("chexpert"), "auroc_macro",
        probe_differences=(
            "MGCA: validation is carved from train.csv by patient, where MGCA draws 5,000 random training "
            "images.",
            _MULTILABEL_THRESHOLD,
        ),
        fine_tune_differences=(
            "BenchX: BenchX has no CheXpert classification task; chexpert-ft applies its fine-tuning protocol "
            "to MGCA's CheXpert-5 labels, frontal filter and split.",
            _MULTILABEL_THRESHOLD,
        )),
    "rsna": DatasetTask(
        "rsna", "RSNA pneumonia (binary)", label_space("rsna"), "auroc",
        probe_differences=(
            "MGCA: the 70/15/15 split is ours (patient-level, stratified, from --split-seed), not MGCA's "
            "generated 18,678 / 4,003 / 4,003 split.",
            _BINARY_THRESHOLD,
        ),
        fine_tune_differences=(
            "BenchX: the 70/15/15 split is ours (patient-level, stratified, from --split-seed), not BenchX's "
            "shipped 18,678 / 4,003 / 4,003 lists.",
            _BINARY_THRESHOLD,
            "BenchX: binary tasks train one sigmoid output with BCE, where BenchX trains a 2-class softmax "
            "with cross-entropy.",
            "BenchX: the main and early-stopping metric is AUROC, where BenchX headlines and early-stops on "
            "positive-class F1.",
        )),
    "covidx": DatasetTask(
        "covidx", "COVIDx 3-class", label_space("covidx"), "accuracy",
        probe_differences=(
            "MGCA: validation is 20% of the training patients, where MGCA splits train 80/20 by image.",
        ),
        fine_tune_differences=(
            "BenchX: COVIDx is MGCA's 3-class task (normal / pneumonia / COVID-19, accuracy) on COVIDx 9A, "
            "where BenchX fine-tunes a binary COVID-19 task on COVIDx CXR-4 and headlines F1.",
        )),
    "nih": DatasetTask(
        "nih", "NIH ChestX-ray14 14 labels", label_space("nih"), "auroc_macro",
        probe_differences=(
            "MGCA: MGCA has no NIH ChestX-ray14 task; nih-cls applies MGCA's linear-probe protocol to BenchX's "
            "14-label task.",
            "BenchX: the split is the official test_list.txt with validation = 12.5% of train_val_list.txt "
            "patients, where BenchX uses MRM's 78,468 / 11,219 / 22,433 lists.",
            _MULTILABEL_THRESHOLD,
        ),
        fine_tune_differences=(
            "BenchX: the split is the official test_list.txt with validation = 12.5% of train_val_list.txt "
            "patients, where BenchX uses MRM's 78,468 / 11,219 / 22,433 lists.",
            _MULTILABEL_THRESHOLD,
        )),
}


def _register() -> None:
    lp_req = frozenset({Capability.IMAGE_GLOBAL})
    ft_req = frozenset({Capability.IMAGE_GLOBAL, Capability.TRAINABLE})
    for ds, t in DATASET_TASKS.items():
        bound = {"labels": t.labels, "main_metric": t.main_metric}
        TASKS.add(f"{ds}-cls", TaskEntry(
            name=f"{ds}-cls", family="linear-probe", dataset=ds, version=LINEAR_PROBE_VERSION, requires=lp_req,
            main_metric=t.main_metric, higher_is_better=M.higher_is_better(t.main_metric),
            protocols=LINEAR_PROBE_PROTOCOLS, run=partial(run_linear_probe, **bound),
            description=f"{t.title}: frozen linear probe (MGCA), {t.main_metric}",
            settings={k: dict(v) for k, v in LINEAR_PROBE_SETTINGS.items()},
            anchor_differences=LINEAR_PROBE_ANCHOR_DIFFERENCES + t.probe_differences))
        TASKS.add(f"{ds}-ft", TaskEntry(
            name=f"{ds}-ft", family="fine-tune", dataset=ds, version=1, requires=ft_req,
            main_metric=t.main_metric, higher_is_better=M.higher_is_better(t.main_metric),
            protocols=FINE_TUNE_PROTOCOLS, run=partial(run_fine_tune, **bound),
            description=f"{t.title}: full fine-tuning (BenchX-style, clamped warmup-cosine), {t.main_metric}",
            settings={k: dict(v) for k, v in FINE_TUNE_SETTINGS.items()},
            anchor_differences=FINE_TUNE_ANCHOR_DIFFERENCES + t.fine_tune_differences))


_register()
