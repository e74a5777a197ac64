"""Per-image records from mmengine's val/test loops, and the final metrics with patient-level CIs.

mmengine's evaluator hands each prediction (with its ground truth) to a :class:`BaseMetric`; the
metrics here keep one record per image (segmentation: pixel counts over the image's content;
detection: the predicted boxes and scores) and answer the loop with the model-selection value.
The task reads the records of the test loop afterwards (:attr:`records`) and computes every
labelled metric with its bootstrap CI (:func:`segmentation_metrics`, :func:`detection_metrics`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric

from bench import metrics_dense as D

#: Model-selection keys reported to mmengine's loops (CheckpointHook save_best / early stopping).
SEG_SELECT = "dice_dataset"
DET_SELECT = "map_40_75"


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class SegmentationRecords(BaseMetric):
    """Counts (intersection, predicted, truth, pixels) per image inside its content box."""

    default_prefix = "seg"

    def __init__(self) -> None:
        super().__init__(collect_device="cpu")
        self.records: list[tuple[int, np.ndarray]] = []

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            pred = _np(s["pred_sem_seg"]["data"])[0].astype(bool)
            truth = _np(s["gt_sem_seg"]["data"])[0]
            x1, y1, x2, y2 = s["content_box"]
            valid = np.zeros_like(pred)
            valid[y1:y2, x1:x2] = True
            counts = D.seg_counts(pred[None], (truth == 1)[None], valid[None])[0]
            self.results.append((int(s["img_id"]), counts))

    def compute_metrics(self, results: list) -> dict[str, float]:
        self.records = sorted(results, key=lambda r: r[0])
        counts = np.stack([c for _, c in self.records]) if self.records else np.zeros((0, 4))
        return {SEG_SELECT: D.seg_metric(SEG_SELECT, counts)}


class DetectionRecords(BaseMetric):
    """Predicted boxes and scores per image (input frame), with the image's truth boxes."""

    default_prefix = "det"

    def __init__(self) -> None:
        super().__init__(collect_device="cpu")
        self.records: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            pred = s["pred_instances"]
            self.results.append((int(s["img_id"]), _np(pred["bboxes"]).astype(np.float64).reshape(-1, 4),
                                 _np(pred["scores"]).astype(np.float64).ravel(),
                                 _np(s["gt_instances"]["bboxes"]).astype(np.float64).reshape(-1, 4)))

    def compute_metrics(self, results: list) -> dict[str, float]:
        self.records = sorted(results, key=lambda r: r[0])
        value = D.average_precision([r[1] for r in self.records], [r[2] for r in self.records],
                                    [r[3] for r in self.records], D.IOU_40_75)
        return {DET_SELECT: 0.0 if math.isnan(value) else value}


# ---------------------------------------------------------------------------------------------
# Final metrics with CIs
# ---------------------------------------------------------------------------------------------

def _ci_into(values: dict, cis: dict, skipped: dict, name: str, ci: Any, n_boot: int) -> None:
    values[name] = ci.point
    if n_boot > 0:
        cis[name] = ci.as_tuple()
        if ci.n_skipped:
            skipped[name] = ci.n_skipped


def segmentation_metrics(counts: np.ndarray, groups: np.ndarray, *, n_boot: int, seed: int
                         ) -> tuple[dict[str, float], dict[str, tuple[float, float]], dict[str, int]]:
    """Every labelled segmentation metric of a count table with its patient-bootstrap CI."""
    counts = np.asarray(counts, dtype=np.float64)
    values: dict[str, float] = {}
    cis: dict[str, tuple[float, float]] = {}
    skipped: dict[str, int] = {}
    for name, batched in D.SEG_METRICS.items():
        ci = D.bootstrap(D.seg_metric(name, counts), lambda w, f=batched: f(counts, w), groups,
                         n_boot=n_boot, seed=seed)
        _ci_into(values, cis, skipped, name, ci, n_boot)
    return values, cis, skipped


def detection_metrics(det_boxes: list[np.ndarray], det_scores: list[np.ndarray], truth: list[np.ndarray],
                      groups: np.ndarray, *, n_boot: int, seed: int, mgca_conf: float = 0.5,
                      froc_inside: Callable[[int, np.ndarray], np.ndarray] | None = None
                      ) -> tuple[dict[str, float], dict[str, tuple[float, float]], dict[str, Any]]:
    """mAP@[.40:.75] (all images), MGCA's variant, COCO mAP, (FROC) with patient-bootstrap CIs.

    Boxes are in one frame per image (native pixels). ``froc_inside(i, points)`` enables FROC.
    """
    groups = np.asarray(groups)
    n = len(truth)
    values: dict[str, float] = {}
    cis: dict[str, tuple[float, float]] = {}
    skipped: dict[str, int] = {}
    chunk = D.DET_CHUNK
    for name, thrs in (("map_40_75", D.IOU_40_75), ("coco_map", D.IOU_COCO)):
        m = D.match_detections(det_boxes, det_scores, truth, thrs)
        ci = D.bootstrap(float(D.ap_batched(m, np.ones((1, n)))[0]), lambda w, m=m: D.ap_batched(m, w), groups,
                         n_boot=n_boot, seed=seed, chunk=chunk)
        _ci_into(values, cis, skipped, name, ci, n_boot)
    scored, keep = D.mgca_selection(det_scores, truth, mgca_conf)
    idx = np.flatnonzero(scored)
    sub = D.match_detections([np.asarray(det_boxes[i]).reshape(-1, 4)[keep[i]] for i in idx],
                             [np.asarray(det_scores[i]).ravel()[keep[i]] for i in idx], [truth[i] for i in idx],
                             D.IOU_40_75)
    point = float(D.ap_batched(sub, np.ones((1, len(idx))))[0]) if len(idx) else math.nan
    ci = D.bootstrap(point, lambda w: D.ap_batched(sub, w[:, idx]), groups, n_boot=n_boot, seed=seed, chunk=chunk) \
        if len(idx) else D.bootstrap(point, lambda w: np.full(len(w), math.nan), groups, n_boot=n_boot, seed=seed)
    _ci_into(values, cis, skipped, "map_40_75_mgca", ci, n_boot)
    extra: dict[str, Any] = {"mgca_scored_images": int(len(idx)), "mgca_conf_threshold": mgca_conf}
    if froc_inside is not None:
        centres = [(np.asarray(b).reshape(-1, 4)[:, :2] + np.asarray(b).reshape(-1, 4)[:, 2:]) / 2 for b in det_boxes]
        rec = D.froc_records(centres, det_scores, froc_inside, [len(np.asarray(t).reshape(-1, 4)) for t in truth])
        ci = D.bootstrap(D.froc(rec), lambda w: D.froc_batched(rec, w), groups, n_boot=n_boot, seed=seed, chunk=chunk)
        _ci_into(values, cis, skipped, "froc", ci, n_boot)
    extra["truth_boxes"] = int(sum(len(np.asarray(t).reshape(-1, 4)) for t in truth))
    extra["images_with_boxes"] = int(sum(len(np.asarray(t).reshape(-1, 4)) > 0 for t in truth))
    extra["bootstrap_skipped"] = skipped
    return values, cis, extra
