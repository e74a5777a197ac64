"""Classification metrics, thresholds chosen on validation, and patient-level bootstrap CIs.

Conventions
-----------
* Point estimates use scikit-learn (``roc_auc_score``, ``f1_score``, ``accuracy_score``).
* A metric that is undefined on a sample (AUROC without both classes, F1 with neither a
  positive nor a predicted positive) is ``nan``, never a made-up 0.5 or 0.
* Macro AUROC averages the classes that have both a positive and a negative; the others are
  reported as ``nan`` per class and counted in ``classes_used``.
* Thresholds for F1 and accuracy are chosen on the validation set (:func:`choose_threshold`) and
  then applied, fixed, to the test set; never chosen on the set being scored (``protocols.md``
  §8.15; BenchX's ``multilabel_accuracy`` leaks here).
* :func:`bootstrap_ci` resamples **patients** with replacement: all images of a drawn patient
  enter the resample together, as many times as the patient was drawn. A resample is written as
  a weight (multiplicity) per row, so metrics with a batched weighted form (:class:`Metric`)
  evaluate a thousand resamples as a few array operations.

Metric keys in results are plain names (``auroc_macro``, ``f1``, ``accuracy``); per-class values
are ``<metric>/<class name>`` (``auroc/Atelectasis``). :func:`metric_spec` resolves either.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from bench.registry import Registry

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Registry of metric names
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricSpec:
    name: str
    higher_is_better: bool
    description: str = ""


METRICS: Registry[MetricSpec] = Registry("metric")

for _name, _hib, _desc in (
    ("auroc", True, "area under the ROC curve (binary, or per class)"),
    ("auroc_macro", True, "mean AUROC over classes with both a positive and a negative (multi-label, "
                          "or one-vs-rest for multi-class)"),
    ("accuracy", True, "fraction correct (multi-class argmax, or binary at the validation-chosen threshold)"),
    ("f1", True, "F1 of the positive class at the validation-chosen threshold"),
    ("f1_macro", True, "mean F1 over classes (thresholds chosen on validation per class; argmax for multi-class)"),
    ("loss", False, "training objective on a split"),
):
    METRICS.add(_name, MetricSpec(_name, _hib, _desc))


def metric_spec(key: str) -> MetricSpec:
    """Spec of a metric key, per-class keys included (``"auroc/Edema"`` -> ``auroc``)."""
    return METRICS.get(key.split("/", 1)[0])


def higher_is_better(key: str) -> bool:
    return metric_spec(key).higher_is_better


# ---------------------------------------------------------------------------------------------
# Point estimates
# ---------------------------------------------------------------------------------------------

def _both_classes(y: np.ndarray) -> bool:
    return bool(np.any(y == 1) and np.any(y == 0))


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Binary AUROC; rows with a NaN label are ignored; nan without both classes."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    keep = np.isfinite(y)
    y, s = y[keep], s[keep]
    if not _both_classes(y):
        return math.nan
    return float(roc_auc_score(y, s))


def auroc_per_class(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """AUROC per column of ``[N, C]`` labels (1/0/NaN) and scores; nan where undefined."""
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    return np.array([auroc(y[:, j], s[:, j]) for j in range(y.shape[1])], dtype=np.float64)


def auroc_macro(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean AUROC over the classes with both a positive and a negative (nan if there are none)."""
    per = auroc_per_class(y_true, y_score)
    return float(np.mean(per[np.isfinite(per)])) if np.isfinite(per).any() else math.nan


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64)
    out = np.zeros((len(y), n_classes), dtype=np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true).ravel()
    return math.nan if len(y_true) == 0 else float(accuracy_score(y_true, np.asarray(y_pred).ravel()))


def f1_binary(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 of the positive class; nan when there is neither a positive nor a predicted positive."""
    y = np.asarray(y_true).ravel().astype(int)
    p = np.asarray(y_pred).ravel().astype(int)
    if not (y.any() or p.any()):
        return math.nan
    return float(f1_score(y, p, zero_division=0.0))


def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, criterion: str = "f1") -> float:
    """Threshold (predict positive when ``score >= t``) maximising ``criterion`` on this sample.

    Call it on **validation** predictions. Candidates are midpoints between consecutive distinct
    scores plus both ends; ties go to the lowest threshold reaching the maximum. Returns 0.5 when
    the sample has no positive (or no row) and the criterion cannot inform the choice.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    keep = np.isfinite(y)
    y, s = y[keep], s[keep]
    if len(y) == 0 or (criterion == "f1" and not np.any(y == 1)):
        return 0.5
    u = np.unique(s)                                     # ascending distinct scores
    cuts = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]]) if len(u) > 1 else \
        np.array([u[0] - 1.0, u[0] + 1.0])
    # positives / negatives at or above each cut: count rows with score >= cut
    order = np.sort(s)
    pos_sorted = np.sort(s[y == 1])
    n_pos, n = len(pos_sorted), len(order)
    above = n - np.searchsorted(order, cuts, side="left")
    tp = n_pos - np.searchsorted(pos_sorted, cuts, side="left")
    fp = above - tp
    fn = n_pos - tp
    tn = (n - n_pos) - fp
    if criterion == "f1":
        denom = 2 * tp + fp + fn
        score = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    elif criterion == "accuracy":
        score = (tp + tn) / n
    else:
        raise ValueError(f"unknown threshold criterion {criterion!r} (f1 | accuracy)")
    return float(cuts[int(np.argmax(score))])


# ---------------------------------------------------------------------------------------------
# Batched, weighted forms (one row of weights per bootstrap resample)
# ---------------------------------------------------------------------------------------------

def weighted_auroc_batched(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one binary column under ``B`` weightings of its rows at once.

    ``weights`` is ``[B, N]`` (row multiplicities of each resample). Mann-Whitney form with ties
    counted one half, equal to ``roc_auc_score`` on the rows repeated by their weights. Rows with
    a NaN label are ignored. Returns ``[B]``, nan where a weighting lacks a class.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64)
    keep = np.isfinite(y)
    y, s, w = y[keep], s[keep], w[:, keep]
    if len(y) == 0:
        return np.full(w.shape[0], math.nan)
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])           # first row of each distinct score
    pos = np.add.reduceat(w * (y == 1), starts, axis=1)             # [B, U] positive weight per score
    neg = np.add.reduceat(w * (y == 0), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    p_tot, n_tot = pos.sum(axis=1), neg.sum(axis=1)
    num = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / (p_tot * n_tot)
    out[(p_tot == 0) | (n_tot == 0)] = math.nan
    return out


class Metric:
    """A metric ``fn(y_true, y_score) -> float`` with an optional batched weighted form
    ``batched(y_true, y_score, weights[B, N]) -> [B]`` used by :func:`bootstrap_ci`."""

    def __init__(self, name: str, fn: Callable[[np.ndarray, np.ndarray], float],
                 batched: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None) -> None:
        self.name, self.fn, self.batched = name, fn, batched

    def __call__(self, y_true: np.ndarray, y_score: np.ndarray) -> float:
        return self.fn(y_true, y_score)

    def __repr__(self) -> str:
        return f"Metric({self.name!r})"


def _macro_batched(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    defined = [j for j in range(y.shape[1]) if _both_classes(y[np.isfinite(y[:, j]), j])]
    if not defined:
        return np.full(w.shape[0], math.nan)
    per = np.stack([weighted_auroc_batched(y[:, j], s[:, j], w) for j in defined], axis=1)
    # A resample that loses a class defined on the full sample estimates a different average:
    # it is undefined (nan -> skipped and counted), not averaged over fewer classes.
    return per.mean(axis=1)


def _macro_point(y: np.ndarray, s: np.ndarray) -> float:
    return auroc_macro(y, s)


def auroc_metric() -> Metric:
    return Metric("auroc", auroc, weighted_auroc_batched)


def auroc_macro_metric() -> Metric:
    """Macro AUROC over ``[N, C]`` labels (1/0/NaN) and scores."""
    return Metric("auroc_macro", _macro_point, _macro_batched)


def auroc_class_metric(j: int) -> Metric:
    return Metric(f"auroc[{j}]", lambda y, s: auroc(np.asarray(y)[:, j], np.asarray(s)[:, j]),
                  lambda y, s, w: weighted_auroc_batched(np.asarray(y)[:, j], np.asarray(s)[:, j], w))


def ovr_auroc_macro_metric(n_classes: int) -> Metric:
    """One-vs-rest macro AUROC of integer labels ``[N]`` against class probabilities ``[N, K]``."""
    return Metric("auroc_macro",
                  lambda y, p: auroc_macro(one_hot(y, n_classes), p),
                  lambda y, p, w: _macro_batched(one_hot(y, n_classes), p, w))


def _weighted_mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    tot = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (w @ values.astype(np.float64)) / tot
    out[tot == 0] = math.nan
    return out


def argmax_accuracy_metric() -> Metric:
    """Accuracy of integer labels ``[N]`` against class scores ``[N, K]`` (argmax)."""
    return Metric("accuracy",
                  lambda y, p: accuracy(y, np.argmax(p, axis=1)),
                  lambda y, p, w: _weighted_mean(np.argmax(p, axis=1) == np.asarray(y), w))


def accuracy_at_metric(threshold: float) -> Metric:
    """Binary accuracy with a fixed (validation-chosen) threshold on the positive score."""
    def pred(s: np.ndarray) -> np.ndarray:
        return np.asarray(s, dtype=np.float64).ravel() >= threshold

    return Metric("accuracy",
                  lambda y, s: accuracy(np.asarray(y).ravel().astype(int), pred(s).astype(int)),
                  lambda y, s, w: _weighted_mean(pred(s) == (np.asarray(y).ravel() == 1), w))


def _f1_counts_batched(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    y = np.asarray(y).ravel() == 1
    tp = w @ (y & pred).astype(np.float64)
    fp = w @ (~y & pred).astype(np.float64)
    fn = w @ (y & ~pred).astype(np.float64)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 2 * tp / denom
    out[denom == 0] = math.nan
    return out


def f1_at_metric(threshold: float) -> Metric:
    """Positive-class F1 with a fixed (validation-chosen) threshold."""
    def pred(s: np.ndarray) -> np.ndarray:
        return np.asarray(s, dtype=np.float64).ravel() >= threshold

    return Metric("f1", lambda y, s: f1_binary(np.asarray(y).ravel(), pred(s)),
                  lambda y, s, w: _f1_counts_batched(y, pred(s), w))


def f1_macro_at_metric(thresholds: Sequence[float]) -> Metric:
    """Mean per-class F1 of ``[N, C]`` labels at per-class fixed thresholds; classes whose F1 is
    undefined on the full sample are left out, as for macro AUROC."""
    thr = np.asarray(thresholds, dtype=np.float64)

    def per_class(y: np.ndarray, s: np.ndarray) -> np.ndarray:
        y, s = np.asarray(y, dtype=np.float64), np.asarray(s, dtype=np.float64)
        out = []
        for j in range(y.shape[1]):
            keep = np.isfinite(y[:, j])
            out.append(f1_binary(y[keep, j], s[keep, j] >= thr[j]))
        return np.array(out)

    def point(y: np.ndarray, s: np.ndarray) -> float:
        per = per_class(y, s)
        return float(np.mean(per[np.isfinite(per)])) if np.isfinite(per).any() else math.nan

    def batched(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
        y, s = np.asarray(y, dtype=np.float64), np.asarray(s, dtype=np.float64)
        defined = np.flatnonzero(np.isfinite(per_class(y, s)))
        if not len(defined):
            return np.full(w.shape[0], math.nan)
        cols = []
        for j in defined:
            keep = np.isfinite(y[:, j])
            cols.append(_f1_counts_batched(y[keep, j], s[keep, j] >= thr[j], w[:, keep]))
        return np.stack(cols, axis=1).mean(axis=1)

    return Metric("f1_macro", point, batched)


def argmax_f1_macro_metric(n_classes: int) -> Metric:
    """Macro F1 of a multi-class argmax prediction (one-vs-rest per class)."""
    def point(y: np.ndarray, p: np.ndarray) -> float:
        pred = np.argmax(p, axis=1)
        per = [f1_binary(np.asarray(y) == k, pred == k) for k in range(n_classes)]
        per = np.array(per)
        return float(np.mean(per[np.isfinite(per)])) if np.isfinite(per).any() else math.nan

    def batched(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        pred = np.argmax(p, axis=1)
        defined = [k for k in range(n_classes) if np.any(y == k) or np.any(pred == k)]
        if not defined:
            return np.full(w.shape[0], math.nan)
        return np.stack([_f1_counts_batched((y == k).astype(int), pred == k, w) for k in defined],
                        axis=1).mean(axis=1)

    return Metric("f1_macro", point, batched)


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BootstrapCI:
    point: float
    low: float
    high: float
    n_boot: int
    n_skipped: int            # resamples where the metric was undefined
    alpha: float
    unit: str = "patient"     # what was resampled

    def as_tuple(self) -> tuple[float, float]:
        return (self.low, self.high)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"point": self.point, "low": self.low, "high": self.high, "n_boot": self.n_boot,
                "n_skipped": self.n_skipped, "alpha": self.alpha, "unit": self.unit}


_CHUNK = 128  # resamples evaluated together (bounds memory to CHUNK x N weights)


def resample_weights(groups: Sequence | np.ndarray, n_boot: int, seed: int = 0,
                     chunk: int = _CHUNK):
    """Yield ``[b, N]`` row multiplicities of ``n_boot`` patient-level resamples, in chunks.

    Each resample draws as many patients as there are, with replacement; a row's weight is the
    number of times its patient was drawn. Deterministic in ``seed``.
    """
    _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    inv = inv.ravel()
    n_groups = int(inv.max()) + 1 if len(inv) else 0
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        counts = np.bincount((draws + (np.arange(b) * n_groups)[:, None]).ravel(),
                             minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, inv]
        done += b


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float] | Metric, y_true: np.ndarray,
                 y_score: np.ndarray, groups: Sequence | np.ndarray | None = None, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> BootstrapCI:
    """Percentile bootstrap CI of ``metric_fn`` resampling **groups** (patients) with replacement.

    ``groups`` gives each row's patient; ``None`` resamples rows (each row its own group).
    A resample on which the metric is undefined (nan, or a ``ValueError`` from a plain function)
    is skipped; ``n_skipped`` says how many. A :class:`Metric` with a batched form is evaluated
    on all resamples at once; any other callable is called once per resample on the repeated rows.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    n = len(y_true)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups) != n or len(y_score) != n:
        raise ValueError(f"bootstrap_ci: y_true ({n}), y_score ({len(y_score)}) and groups ({len(groups)}) "
                         "must have the same length")
    point = float(metric_fn(y_true, y_score))
    if n == 0 or n_boot <= 0:
        return BootstrapCI(point, math.nan, math.nan, n_boot, n_boot, alpha)
    batched = getattr(metric_fn, "batched", None)
    values: list[np.ndarray] = []
    for w in resample_weights(groups, n_boot, seed):
        if batched is not None:
            values.append(np.asarray(batched(y_true, y_score, w), dtype=np.float64))
            continue
        chunk = np.empty(len(w))
        for b, row in enumerate(w):
            idx = np.repeat(np.arange(n), row)
            try:
                chunk[b] = float(metric_fn(y_true[idx], y_score[idx]))
            except ValueError:
                chunk[b] = math.nan
        values.append(chunk)
    vals = np.concatenate(values)
    ok = vals[np.isfinite(vals)]
    skipped = int(n_boot - len(ok))
    if skipped:
        log.debug("bootstrap: %d of %d resamples undefined for %r", skipped, n_boot, metric_fn)
    if len(ok) == 0:
        return BootstrapCI(point, math.nan, math.nan, n_boot, skipped, alpha)
    low, high = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(point, float(low), float(high), n_boot, skipped, alpha)
