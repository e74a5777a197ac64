"""Segmentation and detection metrics, each with a batched weighted form for patient bootstraps.

Every metric here is a function of per-image records that do not change under resampling (pixel
counts of one image, or one image's detections already matched to its boxes), so a bootstrap
resample is a weight per image (:func:`bench.metrics.resample_weights`) and a thousand resamples
cost a few array operations. :func:`bootstrap` turns such a (point, batched) pair into a
:class:`bench.metrics.BootstrapCI`.

Segmentation (binary masks; counts per image over the image's content, letterbox padding excluded)
-------------------------------------------------------------------------------------------------
* ``dice_positive``: mean per-image foreground Dice over the images whose ground truth is not
  empty (the images with something to find).
* ``dice_dataset``: foreground Dice of the whole test set as one volume, ``2 sum I / (sum P + sum G)``.
* ``dice_mgca``: MGCA's per-image Dice over all images, where an image with an empty ground truth
  scores 1 if the prediction is empty and 0 otherwise (``ssl_segmenter.get_dice``); averaged per
  image here, where MGCA averages per batch and then over batches.
* ``mdice_benchx``: mmseg's ``IoUMetric`` mDice as BenchX reports it: dataset-level Dice of the
  background and the foreground class, averaged. A compatibility figure, never "Dice": with a small
  foreground the background term alone is near 1.

Detection (one class; boxes xyxy in one coordinate frame)
---------------------------------------------------------
* :func:`average_precision` is COCO's bounding-box AP (pycocotools ``COCOeval``: greedy matching in
  score order, 101-point interpolated precision, at most 100 detections per image, area "all")
  at any IoU thresholds; the tests check it against pycocotools on the same boxes.
* ``map_40_75``: AP averaged over IoU 0.40:0.05:0.75 on all test images (an image without
  predictions contributes its misses).
* ``map_40_75_mgca``: the same thresholds with MGCA's selection: detections with score >= 0.5 only,
  scored on the images that have at least one ground-truth box and at least one such detection
  (``ssl_detector.shared_step``); images it skips are exactly those that would lower the number.
* ``coco_map``: AP@[.50:.05:.95] (COCO's headline number).
* ``froc``: Object-CXR's FROC: mean sensitivity at 0.125, 0.25, 0.5, 1, 2, 4 and 8 false positives
  per image, a prediction being its box centre and a hit when it falls inside an object
  (the challenge's ``froc.py``, including its rule of recording one false-positive rate per
  prediction); see :func:`froc_records`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bench import metrics as M

for _name, _desc in (
    ("dice_positive", "mean per-image foreground Dice over images with a non-empty ground truth"),
    ("dice_dataset", "foreground Dice of the test set as one volume (2 sum I / (sum P + sum G))"),
    ("dice_mgca", "MGCA-compatible per-image Dice: an empty ground truth scores 1 if the prediction is empty, else 0"),
    ("mdice_benchx", "BenchX/mmseg mDice: mean of background and foreground dataset Dice (compatibility figure)"),
    ("map_40_75", "COCO-style AP averaged over IoU 0.40:0.05:0.75 on all test images"),
    ("map_40_75_mgca", "MGCA-compatible AP@[.40:.75]: detections with score >= 0.5, images with a box and a detection"),
    ("coco_map", "COCO AP@[.50:.05:.95] (pycocotools' algorithm)"),
    ("froc", "Object-CXR FROC: mean sensitivity at 0.125-8 false positives per image"),
):
    M.METRICS.add(_name, M.MetricSpec(_name, True, _desc))

# ---------------------------------------------------------------------------------------------
# Bootstrap over per-image records
# ---------------------------------------------------------------------------------------------

#: Resamples evaluated together by the detection metrics (their weight matrices are resamples x
#: detections, so smaller than the classification chunk).
DET_CHUNK = 32


def bootstrap(point: float, batched: Callable[[np.ndarray], np.ndarray], groups: Sequence | np.ndarray, *,
              n_boot: int, seed: int, alpha: float = 0.05, chunk: int = 128) -> M.BootstrapCI:
    """Percentile CI of a metric given its point value and ``batched(weights[B, N_images]) -> [B]``.

    Resamples **patients** (``groups`` gives each image's patient) exactly as
    :func:`bench.metrics.bootstrap_ci` does; resamples where the metric is undefined are skipped and
    counted.
    """
    groups = np.asarray(groups)
    if n_boot <= 0 or len(groups) == 0:
        return M.BootstrapCI(float(point), math.nan, math.nan, n_boot, max(n_boot, 0), alpha)
    vals = np.concatenate([np.asarray(batched(np.asarray(w, dtype=np.float64)), dtype=np.float64)
                           for w in M.resample_weights(groups, n_boot, seed, chunk=chunk)])
    ok = vals[np.isfinite(vals)]
    if len(ok) == 0:
        return M.BootstrapCI(float(point), math.nan, math.nan, n_boot, n_boot, alpha)
    low, high = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return M.BootstrapCI(float(point), float(low), float(high), n_boot, int(n_boot - len(ok)), alpha)


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------

#: Columns of a segmentation count table.
SEG_COUNT_COLUMNS = ("intersection", "predicted", "truth", "pixels")


def seg_counts(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-image counts ``[N, 4]`` (intersection, predicted, truth, pixels) of binary masks ``[N, H, W]``.

    ``valid`` (same shape, or None for all pixels) marks the pixels that belong to the image; the
    others (letterbox padding) are left out of every count.
    """
    p = np.asarray(pred).astype(bool)
    t = np.asarray(truth).astype(bool)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"seg_counts: prediction {p.shape} and truth {t.shape} must both be [N, H, W]")
    v = np.ones_like(p) if valid is None else np.asarray(valid).astype(bool)
    if v.shape != p.shape:
        raise ValueError(f"seg_counts: valid {v.shape} must match the masks {p.shape}")
    p, t = p & v, t & v
    return np.stack([(p & t).sum((1, 2)), p.sum((1, 2)), t.sum((1, 2)), v.sum((1, 2))], axis=1).astype(np.float64)


def _per_image_dice(c: np.ndarray) -> np.ndarray:
    inter, pred, truth = c[:, 0], c[:, 1], c[:, 2]
    den = pred + truth
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * inter / den, np.nan)


def _weighted_mean_where(values: np.ndarray, keep: np.ndarray, w: np.ndarray) -> np.ndarray:
    ww = w * keep[None, :]
    tot = ww.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ww @ np.where(keep, values, 0.0) / tot
    out[tot == 0] = math.nan
    return out


def dice_positive_batched(c: np.ndarray, w: np.ndarray) -> np.ndarray:
    positive = c[:, 2] > 0
    return _weighted_mean_where(_per_image_dice(c), positive, w)


def dice_dataset_batched(c: np.ndarray, w: np.ndarray) -> np.ndarray:
    num, den = 2 * (w @ c[:, 0]), w @ (c[:, 1] + c[:, 2])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den == 0] = math.nan
    return out


def dice_mgca_batched(c: np.ndarray, w: np.ndarray) -> np.ndarray:
    empty_truth = c[:, 2] == 0
    per = np.where(empty_truth, (c[:, 1] == 0).astype(np.float64), np.nan_to_num(_per_image_dice(c)))
    return _weighted_mean_where(per, np.ones(len(c), dtype=bool), w)


def mdice_benchx_batched(c: np.ndarray, w: np.ndarray) -> np.ndarray:
    """mmseg IoUMetric's mDice over {background, foreground}: per-class dataset Dice, nan-mean."""
    inter, pred, truth, pixels = (w @ c[:, k] for k in range(4))
    bg_inter = pixels - pred - truth + inter
    bg_den, fg_den = (pixels - pred) + (pixels - truth), pred + truth
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.stack([np.where(bg_den > 0, 2 * bg_inter / bg_den, np.nan),
                        np.where(fg_den > 0, 2 * inter / fg_den, np.nan)], axis=1)
    defined = np.isfinite(per)
    with np.errstate(invalid="ignore"):
        out = np.where(defined, per, 0).sum(1) / defined.sum(1)
    out[defined.sum(1) == 0] = math.nan
    return out


SEG_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "dice_positive": dice_positive_batched,
    "dice_dataset": dice_dataset_batched,
    "dice_mgca": dice_mgca_batched,
    "mdice_benchx": mdice_benchx_batched,
}


def seg_metric(name: str, counts: np.ndarray) -> float:
    """Point value of segmentation metric ``name`` on a count table (:func:`seg_counts`)."""
    c = np.asarray(counts, dtype=np.float64)
    return float(SEG_METRICS[name](c, _ones(len(c)))[0])


# ---------------------------------------------------------------------------------------------
# Detection: per-image matching as COCOeval does it, accumulation under image weights
# ---------------------------------------------------------------------------------------------

IOU_40_75 = np.round(np.arange(0.40, 0.7501, 0.05), 2)          # 0.40, 0.45, ..., 0.75 (MGCA)
IOU_COCO = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)  # as COCOeval
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # as COCOeval
MAX_DETS = 100


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[len(a), len(b)]`` of xyxy boxes, areas without COCO's old +1 (as pycocotools' bbIou)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass(frozen=True)
class MatchedDetections:
    """Every image's detections matched to its boxes at each IoU threshold (fixed under resampling).

    ``image``: index of each detection's image (detections ordered as COCOeval concatenates them:
    by image, then by descending score); ``score``; ``tp`` bool ``[T, D]``; ``n_truth`` boxes per image.
    """

    image: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    n_truth: np.ndarray
    iou_thrs: np.ndarray


def match_detections(det_boxes: Sequence[np.ndarray], det_scores: Sequence[np.ndarray],
                     truth_boxes: Sequence[np.ndarray], iou_thrs: np.ndarray,
                     max_dets: int = MAX_DETS) -> MatchedDetections:
    """COCOeval.evaluateImg for one class, no crowd boxes, area range "all", per threshold: each
    detection (highest score first, at most ``max_dets``) takes the unmatched box of highest IoU
    >= the threshold (a later box wins a tie, as in pycocotools)."""
    if not (len(det_boxes) == len(det_scores) == len(truth_boxes)):
        raise ValueError(f"match_detections: {len(det_boxes)} detection lists, {len(det_scores)} score lists "
                         f"and {len(truth_boxes)} truth lists must have one entry per image")
    thrs = np.asarray(iou_thrs, dtype=np.float64)
    images, scores, tps = [], [], []
    n_truth = np.zeros(len(truth_boxes), dtype=np.int64)
    for i, (db, ds, gb) in enumerate(zip(det_boxes, det_scores, truth_boxes)):
        db = np.asarray(db, dtype=np.float64).reshape(-1, 4)
        ds = np.asarray(ds, dtype=np.float64).ravel()
        gb = np.asarray(gb, dtype=np.float64).reshape(-1, 4)
        if len(db) != len(ds):
            raise ValueError(f"image {i}: {len(db)} boxes but {len(ds)} scores")
        n_truth[i] = len(gb)
        order = np.argsort(-ds, kind="mergesort")[:max_dets]
        db, ds = db[order], ds[order]
        ious = box_iou(db, gb)
        tp = np.zeros((len(thrs), len(db)), dtype=bool)
        for t, thr in enumerate(thrs):
            taken = np.zeros(len(gb), dtype=bool)
            for d in range(len(db)):
                cand = np.where(taken, -1.0, ious[d])
                best = len(gb) - 1 - int(np.argmax(cand[::-1])) if len(gb) else -1   # last of equal maxima
                if best >= 0 and cand[best] >= min(thr, 1 - 1e-10):
                    taken[best] = True
                    tp[t, d] = True
        images.append(np.full(len(db), i, dtype=np.int64))
        scores.append(ds)
        tps.append(tp)
    return MatchedDetections(
        image=np.concatenate(images) if images else np.zeros(0, np.int64),
        score=np.concatenate(scores) if scores else np.zeros(0),
        tp=np.concatenate(tps, axis=1) if tps else np.zeros((len(thrs), 0), bool),
        n_truth=n_truth, iou_thrs=thrs)


def ap_batched(m: MatchedDetections, w: np.ndarray) -> np.ndarray:
    """COCOeval.accumulate + summarize (AP averaged over thresholds and 101 recall points) under
    image weights ``w [B, N]``; nan where a weighting has no ground-truth box."""
    w = np.asarray(w, dtype=np.float64)
    n_gt = w @ m.n_truth.astype(np.float64)                       # [B]
    out = np.full(w.shape[0], math.nan)
    has = n_gt > 0
    if not has.any():
        return out
    order = np.argsort(-m.score, kind="mergesort")
    wd = w[:, m.image[order]]                                    # [B, D]
    total = np.zeros(w.shape[0])
    for t in range(len(m.iou_thrs)):
        tp = m.tp[t, order].astype(np.float64)
        tp_sum = np.cumsum(wd * tp, axis=1)
        fp_sum = np.cumsum(wd * (1.0 - tp), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rc = tp_sum / n_gt[:, None]
        pr = tp_sum / (tp_sum + fp_sum + np.spacing(1))
        env = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1] if pr.shape[1] else pr
        for b in np.flatnonzero(has):
            idx = np.searchsorted(rc[b], REC_THRS, side="left")
            ok = idx < env.shape[1]
            total[b] += env[b, idx[ok]].sum() / len(REC_THRS)
    out[has] = total[has] / len(m.iou_thrs)
    return out


def average_precision(det_boxes: Sequence[np.ndarray], det_scores: Sequence[np.ndarray],
                      truth_boxes: Sequence[np.ndarray], iou_thrs: np.ndarray = IOU_COCO,
                      max_dets: int = MAX_DETS) -> float:
    """COCO bbox AP over ``iou_thrs`` (default AP@[.5:.95]) of one class; nan without any truth box."""
    m = match_detections(det_boxes, det_scores, truth_boxes, iou_thrs, max_dets)
    return float(ap_batched(m, _ones(len(m.n_truth)))[0])


def mgca_selection(det_scores: Sequence[np.ndarray], truth_boxes: Sequence[np.ndarray],
                   conf_thr: float = 0.5) -> tuple[np.ndarray, list[np.ndarray]]:
    """MGCA's scored images (a truth box and a detection with score >= ``conf_thr``) and, per image,
    the indices of its detections that pass ``conf_thr``."""
    keep = [np.flatnonzero(np.asarray(s, dtype=np.float64).ravel() >= conf_thr) for s in det_scores]
    scored = np.array([len(k) > 0 and len(np.asarray(g).reshape(-1, 4)) > 0 for k, g in zip(keep, truth_boxes)],
                      dtype=bool)
    return scored, keep


# ---------------------------------------------------------------------------------------------
# FROC (Object-CXR)
# ---------------------------------------------------------------------------------------------

FROC_FPS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class FrocRecords:
    """Predictions as the challenge scores them, fixed under resampling.

    ``image``/``score`` per predicted point (sorted by descending score, stable in image order);
    ``fp`` whether it lies outside every object of its image; ``first_hit`` per object: the rank of
    the first prediction inside it (``len(score)`` when never hit); ``object_image`` per object.
    """

    image: np.ndarray
    score: np.ndarray
    fp: np.ndarray
    first_hit: np.ndarray
    object_image: np.ndarray
    n_images: int


def froc_records(points: Sequence[np.ndarray], scores: Sequence[np.ndarray],
                 inside: Callable[[int, np.ndarray], np.ndarray], n_objects: Sequence[int]) -> FrocRecords:
    """Build :class:`FrocRecords` from per-image predicted points ``[k, 2]`` (x, y) and scores.

    ``inside(i, points) -> bool [k, n_objects[i]]`` says which of image ``i``'s objects contain each
    point (the challenge: within the box, ellipse or polygon annotation).
    """
    img, sc, hit_rows = [], [], []
    obj_offset = np.concatenate([[0], np.cumsum(np.asarray(n_objects, dtype=np.int64))])
    for i, (pts, s) in enumerate(zip(points, scores)):
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        s = np.asarray(s, dtype=np.float64).ravel()
        if len(pts) != len(s):
            raise ValueError(f"image {i}: {len(pts)} points but {len(s)} scores")
        inside_i = np.asarray(inside(i, pts), dtype=bool).reshape(len(pts), int(n_objects[i])) if len(pts) else \
            np.zeros((0, int(n_objects[i])), dtype=bool)
        img.append(np.full(len(pts), i, dtype=np.int64))
        sc.append(s)
        hit_rows.extend((obj_offset[i] + np.flatnonzero(row)).tolist() for row in inside_i)
    image = np.concatenate(img) if img else np.zeros(0, np.int64)
    score = np.concatenate(sc) if sc else np.zeros(0)
    order = np.argsort(-score, kind="mergesort")     # Python's sorted(reverse=True) keeps ties in order too
    n_obj_total = int(obj_offset[-1])
    first_hit = np.full(n_obj_total, len(score), dtype=np.int64)
    fp = np.zeros(len(score), dtype=bool)
    for rank, p in enumerate(order):
        objs = hit_rows[p]
        if not objs:
            fp[rank] = True
        for o in objs:
            first_hit[o] = min(first_hit[o], rank)
    object_image = np.repeat(np.arange(len(n_objects)), np.asarray(n_objects, dtype=np.int64))
    return FrocRecords(image[order], score[order], fp, first_hit, object_image, len(n_objects))


def froc_batched(r: FrocRecords, w: np.ndarray, fps: Sequence[float] = FROC_FPS) -> np.ndarray:
    """Mean sensitivity at ``fps`` false positives per image under image weights ``w [B, N]``.

    As the challenge's ``froc.py``: predictions in descending score; after each one, if the false
    positives per image reach the next rate, the current sensitivity is recorded for it (one rate per
    prediction); rates never reached take the last recorded sensitivity, or the sensitivity of all
    predictions when none was reached (``froc.py`` fails there). nan without any object.
    """
    w = np.asarray(w, dtype=np.float64)
    n_img = w.sum(axis=1)
    n_obj = w[:, r.object_image].sum(axis=1) if len(r.object_image) else np.zeros(w.shape[0])
    out = np.full(w.shape[0], math.nan)
    n_pred = len(r.score)
    wd = w[:, r.image] if n_pred else np.zeros((w.shape[0], 0))
    fp_cum = np.cumsum(wd * r.fp, axis=1)                                    # [B, D]
    # hits after prediction k: weight of objects whose first hit has rank <= k
    hit_at = np.zeros((w.shape[0], n_pred + 1))
    if len(r.first_hit):
        np.add.at(hit_at.T, r.first_hit, w[:, r.object_image].T)
    hits_cum = np.cumsum(hit_at, axis=1)[:, :n_pred]
    rates = np.asarray(fps, dtype=np.float64)
    for b in range(w.shape[0]):
        if n_obj[b] <= 0 or n_img[b] <= 0:
            continue
        sens, last_step = [], -1
        for rate in rates:
            # first prediction at or after the previous record where FP / images reaches the rate
            reached = np.flatnonzero(fp_cum[b] / n_img[b] >= rate)
            reached = reached[reached > last_step] if len(reached) else reached
            if not len(reached):
                break
            last_step = int(reached[0])
            sens.append(hits_cum[b, last_step] / n_obj[b])
        if not sens:
            sens = [hits_cum[b, -1] / n_obj[b] if n_pred else 0.0]
        sens += [sens[-1]] * (len(rates) - len(sens))
        out[b] = float(np.mean(sens))
    return out


def froc(r: FrocRecords, fps: Sequence[float] = FROC_FPS) -> float:
    return float(froc_batched(r, _ones(r.n_images), fps)[0])
