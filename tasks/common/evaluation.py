"""Test metrics with patient-level bootstrap CIs, validation-chosen thresholds, and per-sample predictions."""
from __future__ import annotations

from typing import Any

import numpy as np

from bench import metrics as M
from bench.data.labels import LabelSpace
from tasks.common.seeding import derived_seed


def main_value(space: LabelSpace, main_metric: str, y: np.ndarray, p: np.ndarray) -> float:
    """Threshold-free main metric (for early stopping on validation)."""
    if space.kind == "multiclass":
        if main_metric == "accuracy":
            return M.accuracy(y, np.argmax(p, axis=1))
        return M.auroc_macro(M.one_hot(y, len(space.classes)), p)
    if space.kind == "binary" and main_metric == "auroc":
        return M.auroc(y[:, 0], p[:, 0])
    return M.auroc_macro(y, p)


def evaluate(space: LabelSpace, y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray,
             groups: np.ndarray, *, n_boot: int, seed: int
             ) -> tuple[dict[str, float], dict[str, tuple[float, float]], dict[str, Any]]:
    """Test metrics, their patient-level bootstrap CIs, and the validation-chosen thresholds.

    Thresholds come from validation, never from the set being scored (BenchX's multi-label F1
    picks its threshold on the evaluated set).
    """
    metrics: dict[str, M.Metric] = {}
    extra: dict[str, Any] = {}
    if space.kind == "binary":
        thr_f1 = M.choose_threshold(y_val[:, 0], p_val[:, 0], "f1")
        thr_acc = M.choose_threshold(y_val[:, 0], p_val[:, 0], "accuracy")
        yt, pt = y_test[:, 0], p_test[:, 0]
        metrics = {"auroc": M.auroc_metric(), "f1": M.f1_at_metric(thr_f1), "accuracy": M.accuracy_at_metric(thr_acc)}
        extra["thresholds"] = {"f1": thr_f1, "accuracy": thr_acc}
        extra["threshold_source"] = "validation"
    elif space.kind == "multilabel":
        thrs = [M.choose_threshold(y_val[:, j], p_val[:, j], "f1") for j in range(len(space.classes))]
        yt, pt = y_test, p_test
        metrics = {"auroc_macro": M.auroc_macro_metric(), "f1_macro": M.f1_macro_at_metric(thrs)}
        for j, c in enumerate(space.classes):
            metrics[f"auroc/{c}"] = M.auroc_class_metric(j)
        extra["thresholds"] = dict(zip(space.classes, thrs))
        extra["threshold_source"] = "validation (F1-optimal per class)"
    else:
        k = len(space.classes)
        yt, pt = y_test, p_test
        metrics = {"accuracy": M.argmax_accuracy_metric(), "auroc_macro": M.ovr_auroc_macro_metric(k),
                   "f1_macro": M.argmax_f1_macro_metric(k)}
        for j, c in enumerate(space.classes):
            metrics[f"auroc/{c}"] = M.Metric(f"auroc/{c}", lambda y, p, j=j: M.auroc(M.one_hot(y, k)[:, j], p[:, j]),
                                              lambda y, p, w, j=j: M.weighted_auroc_batched(M.one_hot(y, k)[:, j], p[:, j], w))
        extra["thresholds"] = None
        extra["threshold_source"] = "argmax (no threshold)"
    values: dict[str, float] = {}
    cis: dict[str, tuple[float, float]] = {}
    skipped: dict[str, int] = {}
    bseed = derived_seed(seed, "bootstrap")
    for name, metric in metrics.items():
        ci = M.bootstrap_ci(metric, yt, pt, groups, n_boot=n_boot, seed=bseed)
        values[name] = ci.point
        if n_boot > 0:
            cis[name] = ci.as_tuple()
            if ci.n_skipped:
                skipped[name] = ci.n_skipped
    extra["bootstrap"] = {"n_boot": n_boot, "unit": "patient", "alpha": 0.05, "method": "percentile",
                          "n_patients": int(len(np.unique(groups))), "skipped": skipped}
    return values, cis, extra


def predictions(data: Any, space: LabelSpace, rows: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
    """Per-sample test predictions (ids, labels with None for unlabelled, scores rounded to 1e-6)."""
    frame = data.table.frame
    ids = frame["image_id"].to_numpy(dtype=object)[rows]
    pats = frame["patient_id"].to_numpy(dtype=object)[rows]
    if space.kind == "multiclass":
        labels = M.one_hot(space.targets[rows], len(space.classes))
    else:
        labels = space.targets[rows].astype(np.float64)
    out = []
    for i in range(len(rows)):
        out.append({"image_id": str(ids[i]), "patient_id": str(pats[i]),
                    "labels": [None if not np.isfinite(v) else float(v) for v in labels[i]],
                    "scores": [round(float(v), 6) for v in p[i]]})
    return out
