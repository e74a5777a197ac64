"""Dense metrics against hand-computed cases, pycocotools, and resamples done the slow way."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench import metrics as M
from bench import metrics_dense as D


# -- segmentation -------------------------------------------------------------------------------------------

def _masks():
    """Four 4x4 images: overlap 2 of 4/4; empty/empty; empty truth, 3 predicted; 2 truth, none predicted."""
    pred = np.zeros((4, 4, 4), bool)
    truth = np.zeros((4, 4, 4), bool)
    truth[0, 0, :4] = True
    pred[0, 0, 2:4] = True
    pred[0, 1, 0:2] = True
    pred[2, 3, :3] = True
    truth[3, 2, :2] = True
    return pred, truth


def test_seg_counts_and_each_dice_by_hand():
    pred, truth = _masks()
    c = D.seg_counts(pred, truth)
    assert c.tolist() == [[2, 4, 4, 16], [0, 0, 0, 16], [0, 3, 0, 16], [0, 0, 2, 16]]
    assert D.seg_metric("dice_positive", c) == pytest.approx((0.5 + 0.0) / 2)
    assert D.seg_metric("dice_dataset", c) == pytest.approx(2 * 2 / (7 + 6))
    assert D.seg_metric("dice_mgca", c) == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    bg = 2 * (64 - 7 - 6 + 2) / ((64 - 7) + (64 - 6))
    assert D.seg_metric("mdice_benchx", c) == pytest.approx((bg + 4 / 13) / 2)


def test_padding_pixels_are_not_counted():
    pred, truth = _masks()
    pred[1, :, 3] = True                     # prediction in the padding column of the empty image
    valid = np.ones_like(pred)
    valid[:, :, 3] = False                   # column 3 is letterbox padding everywhere
    c = D.seg_counts(pred, truth, valid)
    assert c[1].tolist() == [0, 0, 0, 12]    # the padding prediction is gone
    assert c[0].tolist() == [1, 3, 3, 12]    # predicted (0,3) and true (0,3) lie in the padding
    assert D.seg_metric("dice_mgca", c) == pytest.approx((2 * 1 / 6 + 1 + 0 + 0) / 4)


def test_undefined_dice_is_nan_not_zero():
    c = np.array([[0, 0, 0, 16], [0, 2, 0, 16]], dtype=float)       # no image has a finding
    assert math.isnan(D.seg_metric("dice_positive", c))
    assert D.seg_metric("dice_dataset", c) == 0.0                  # predicted pixels, no truth: 0
    assert math.isnan(D.seg_metric("dice_dataset", c[:1]))


def test_seg_bootstrap_weights_equal_repeated_rows():
    rng = np.random.default_rng(0)
    c = np.stack([rng.integers(0, 5, 30), rng.integers(0, 8, 30), rng.integers(0, 8, 30), np.full(30, 64)], 1)
    c[:, 0] = np.minimum(c[:, 0], np.minimum(c[:, 1], c[:, 2]))
    groups = np.repeat(np.arange(15), 2)
    w = next(M.resample_weights(groups, 5, seed=3))
    for name, batched in D.SEG_METRICS.items():
        fast = batched(c.astype(float), w.astype(float))
        for b in range(5):
            slow = D.seg_metric(name, np.repeat(c, w[b], axis=0))
            assert fast[b] == pytest.approx(slow, nan_ok=True), name


# -- detection: COCO AP ----------------------------------------------------------------------------------------

def coco_ap(dets, scores, gts, thrs):
    """pycocotools' COCOeval bbox AP on the same boxes (xyxy in, xywh for COCO)."""
    images = [{"id": i + 1, "width": 200, "height": 200} for i in range(len(gts))]
    anns = [{"id": k + 1, "image_id": i + 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
            for k, (i, b) in enumerate((i, b) for i, g in enumerate(gts) for b in g)]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "finding"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        res = [{"image_id": i + 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
               for i, (db, ds) in enumerate(zip(dets, scores)) for b, s in zip(db, ds)]
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.params.iouThrs = np.asarray(thrs, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def _random_case(rng, n_images, ties):
    gts, dets, scores = [], [], []
    for _ in range(n_images):
        k = int(rng.integers(0, 4))
        xy = rng.uniform(0, 100, (k, 2))
        g = np.concatenate([xy, xy + rng.uniform(5, 60, (k, 2))], 1).round(1)
        m = int(rng.integers(0, 6))
        if k:
            d = g[rng.integers(0, k, m)] + rng.normal(0, 5, (m, 4))
        else:
            xy = rng.uniform(0, 100, (m, 2))
            d = np.concatenate([xy, xy + 20], 1)
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2] + 1)
        gts.append(g)
        dets.append(d.round(1))
        scores.append(rng.choice([0.2, 0.5, 0.9], m) if ties else rng.uniform(0, 1, m))
    return dets, scores, gts


@pytest.mark.parametrize("thrs", [D.IOU_COCO, D.IOU_40_75], ids=["coco", "40-75"])
def test_average_precision_equals_pycocotools(thrs):
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(40):
        dets, scores, gts = _random_case(rng, int(rng.integers(1, 10)), ties=trial % 2 == 0)
        if not sum(len(g) for g in gts):
            continue
        assert D.average_precision(dets, scores, gts, thrs) == pytest.approx(coco_ap(dets, scores, gts, thrs), abs=1e-12)
        checked += 1
    assert checked >= 30


def test_average_precision_by_hand():
    # two boxes; detections in score order: hit A, miss, hit B -> at IoU 0.5 precision 1, 2/3 at recalls 0.5, 1
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)]
    dets = [np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31]], float)]
    scores = [np.array([0.9, 0.8, 0.7])]
    # recall points 0..0.5 (51 of 101) get precision 1, 0.51..1.0 (50) get 2/3
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert D.average_precision(dets, scores, gts, np.array([0.5])) == pytest.approx(expected)
    # at IoU 0.95 the third detection (IoU 10/11 = 0.909) misses: recall 0.5 only
    assert D.average_precision(dets, scores, gts, np.array([0.95])) == pytest.approx(51 / 101)


def test_images_without_predictions_count_and_mgca_selection_skips_them():
    gts = [np.array([[0, 0, 10, 10]], float), np.array([[0, 0, 10, 10]], float), np.zeros((0, 4))]
    dets = [np.array([[0, 0, 10, 10]], float), np.zeros((0, 4)), np.array([[5, 5, 9, 9]], float)]
    scores = [np.array([0.9]), np.zeros(0), np.array([0.8])]
    # all images: 1 hit at rank 1, then a false positive; 2 boxes -> recall 0.5 max, precision 1 up to it
    assert D.average_precision(dets, scores, gts, D.IOU_40_75) == pytest.approx(51 / 101)
    scored, keep = D.mgca_selection(scores, gts, 0.5)
    assert scored.tolist() == [True, False, False]      # no detection / no box: skipped
    sub = [i for i in range(3) if scored[i]]
    assert D.average_precision([dets[i][keep[i]] for i in sub], [scores[i][keep[i]] for i in sub],
                               [gts[i] for i in sub], D.IOU_40_75) == pytest.approx(1.0)


def test_weighted_ap_equals_pycocotools_on_duplicated_images():
    rng = np.random.default_rng(11)
    dets, scores, gts = _random_case(rng, 6, ties=True)
    gts[0] = np.array([[10, 10, 40, 40]], float)
    w = np.array([2, 0, 1, 3, 1, 0])
    m = D.match_detections(dets, scores, gts, D.IOU_40_75)
    fast = D.ap_batched(m, w[None].astype(float))[0]
    rep = np.repeat(np.arange(6), w)
    slow = coco_ap([dets[i] for i in rep], [scores[i] for i in rep], [gts[i] for i in rep], D.IOU_40_75)
    assert fast == pytest.approx(slow, abs=1e-12)


# -- FROC ----------------------------------------------------------------------------------------------------

def _inside_boxes(boxes_per_image):
    def inside(i, pts):
        b = np.asarray(boxes_per_image[i], float).reshape(-1, 4)
        p = np.asarray(pts, float).reshape(-1, 2)
        return ((p[:, None, 0] >= b[None, :, 0]) & (p[:, None, 0] <= b[None, :, 2])
                & (p[:, None, 1] >= b[None, :, 1]) & (p[:, None, 1] <= b[None, :, 3]))
    return inside


def test_froc_by_hand():
    # 4 images, 3 objects; points by score: hit obj0 (0.9), FP (0.8), hit obj0 again (0.7: not a new hit),
    # FP (0.6), hit obj1 (0.5), FP (0.4)
    boxes = [[[0, 0, 10, 10]], [[0, 0, 10, 10], [20, 20, 30, 30]], [], []]
    points = [np.array([[5, 5], [6, 6]]), np.array([[25, 25], [50, 50]]), np.array([[1, 1]]), np.array([[2, 2]])]
    scores = [np.array([0.9, 0.7]), np.array([0.5, 0.4]), np.array([0.8]), np.array([0.6])]
    rec = D.froc_records(points, scores, _inside_boxes(boxes), [1, 2, 0, 0])
    assert rec.fp.tolist() == [False, True, False, True, False, True]
    # FP/image after each prediction: 0, .25, .25, .5, .5, .75; rates 0.125 -> step 1 (sens 1/3),
    # 0.25 -> step 2 (one rate per prediction: 1/3), 0.5 -> step 3 (1/3), 1, 2, 4, 8 never reached:
    # last recorded value (1/3)
    assert D.froc(rec) == pytest.approx(1 / 3)
    # ranking obj1's hit first raises the curve: sensitivity 2/3 from the first FP on
    scores[1] = np.array([0.95, 0.4])
    assert D.froc(D.froc_records(points, scores, _inside_boxes(boxes), [1, 2, 0, 0])) == pytest.approx(2 / 3)


def test_froc_without_false_positives_uses_all_predictions():
    boxes = [[[0, 0, 10, 10]], [[0, 0, 10, 10]]]
    rec = D.froc_records([np.array([[5, 5]]), np.zeros((0, 2))], [np.array([0.9]), np.zeros(0)],
                         _inside_boxes(boxes), [1, 1])
    assert D.froc(rec) == pytest.approx(0.5)


def test_bootstrap_percentiles_come_from_patients():
    rng = np.random.default_rng(1)
    c = np.stack([rng.integers(0, 3, 40), rng.integers(0, 6, 40), rng.integers(1, 6, 40), np.full(40, 36)], 1).astype(float)
    c[:, 0] = np.minimum(c[:, 0], np.minimum(c[:, 1], c[:, 2]))
    groups = np.repeat(np.arange(20), 2)
    ci = D.bootstrap(D.seg_metric("dice_dataset", c), lambda w: D.dice_dataset_batched(c, w), groups,
                     n_boot=300, seed=5)
    vals = np.concatenate([D.dice_dataset_batched(c, w.astype(float)) for w in M.resample_weights(groups, 300, 5)])
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(vals, [0.025, 0.975])))
    assert ci.low < ci.point < ci.high
