"""One dense run: data -> mmdet/mmseg model on the encoder -> mmengine training -> labelled metrics.

:func:`run_dense` is what the task entries of :mod:`tasks.segmentation` and :mod:`tasks.detection`
call. It imports OpenMMLab lazily, so registering the tasks never needs mmcv.

Determinism: the head's initialisation (mmengine seeds the global generators from the run seed
before ``init_weights``), the sampler's order (``DefaultSampler`` seeded by the run seed), the
augmentation warps (seeded by run seed and step) and the bootstrap all derive from ``spec.seed``;
on CPU the same spec gives the same numbers. A run interrupted after a checkpoint resumes from it
(the working folder is keyed by everything that determines the run) and ends where an uninterrupted
run ends; the folder is removed when the run finishes.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.api import FRACTIONS, Capability, Encoder, RunSpec, TaskOutput
from bench.errors import BenchError
from bench.paths import cache_dir
from tasks.common.precision import precision_label
from tasks.common.seeding import derived_seed
from tasks.common.settings import resolve_settings

log = logging.getLogger(__name__)

MM_PACKAGES = ("mmcv", "mmdet", "mmsegmentation", "mmengine", "pycocotools")


@dataclass(frozen=True)
class DenseTask:
    """What a dense task entry binds: family (``det`` / ``seg``), head and label rules."""

    kind: str                       # "det" | "seg"
    head: str                       # "yolov3" | "retinanet" | "unet" | "upernet"
    froc: bool = False              # Object-CXR: also score FROC


def _require_openmmlab() -> None:
    missing = []
    for mod in ("mmcv", "mmengine", "mmdet", "mmseg"):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - any import failure means the stack is unusable
            missing.append(f"{mod} ({type(exc).__name__}: {exc})")
    if missing:
        raise BenchError("dense tasks need mmcv (with compiled ops), mmengine, mmdet and mmsegmentation; "
                         f"missing or broken: {'; '.join(missing)}. Run `bash scripts/setup_env.sh` (it builds mmcv).")
    import mmcv.ops  # noqa: F401  (mmcv-lite lacks the compiled ops mmdet needs)


def package_versions() -> dict[str, str]:
    out = {}
    for dist in MM_PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def train_rows(data: Any, fraction: float, balance_negatives: bool, split_seed: int
               ) -> tuple[np.ndarray, dict[str, int]]:
    """Training rows at ``fraction``; with ``balance_negatives`` (SIIM, MGCA) all positives plus as many
    negatives, drawn in one random order of the split seed (every run seed and method trains on the
    same images). The negatives stay nested like the fractions: each fraction keeps the negatives of
    the smaller ones and adds the next ones in that order from those it newly makes available."""
    rows = np.sort(np.asarray(data.manifest.rows("train", fraction), dtype=np.int64))
    if not balance_negatives:
        return rows, {}

    def split(rr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positive = np.array([data.table.mask_area(int(r)) > 0 for r in rr], dtype=bool)
        return rr[positive], rr[~positive]

    pos, neg = split(rows)
    every = np.sort(np.asarray(data.manifest.rows("train", 1.0), dtype=np.int64))
    rng = np.random.default_rng(derived_seed(split_seed, f"{data.table.dataset}:balanced-negatives"))
    rank = dict(zip(every.tolist(), rng.permutation(len(every)).tolist()))   # one order for every fraction
    kept: list[int] = []
    for f in sorted({*(x for x in FRACTIONS if x < fraction), fraction}):
        p_f, n_f = split(np.asarray(data.manifest.rows("train", f), dtype=np.int64))
        fresh = sorted(set(n_f.tolist()) - set(kept), key=rank.__getitem__)
        kept += fresh[:max(0, min(len(p_f), len(n_f)) - len(kept))]
    take = np.sort(np.asarray(kept, dtype=np.int64))
    return np.sort(np.concatenate([pos, take])), {"positives": int(len(pos)), "negatives_kept": int(len(take)),
                                                   "negatives_available": int(len(neg))}


def budget(settings: dict, n_train: int) -> tuple[int, int]:
    """(iterations, validation interval): ``max_epochs`` epochs capped at ``max_iters`` (0: no cap),
    validating every ``val_every`` iterations (0: once per epoch)."""
    per_epoch = max(1, math.ceil(n_train / int(settings["batch_size"])))
    total = int(settings["max_epochs"]) * per_epoch
    if int(settings["max_iters"]) > 0:
        total = min(total, int(settings["max_iters"]))
    every = int(settings["val_every"]) or per_epoch
    return total, max(1, min(every, total))


def _work_dir(spec: RunSpec, encoder: Encoder, data: Any, settings: dict, name: str) -> Any:
    key = json.dumps({"task": name, "spec": spec.to_dict(), "card": encoder.card.to_dict(),
                      "manifest": getattr(data.manifest, "sha256", None), "settings": settings},
                     sort_keys=True, default=str)
    return cache_dir() / "dense-work" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _seed32(seed: int, purpose: str) -> int:
    """A derived seed in numpy's legacy range (mmengine seeds numpy's global generator with it)."""
    return derived_seed(seed, purpose) % 2**32


def _patients(data: Any, rows: np.ndarray) -> np.ndarray:
    return data.table.frame["patient_id"].to_numpy(dtype=object)[rows].astype(str)


def run_dense(encoder: Encoder, data: Any, spec: RunSpec, device: torch.device | str = "cpu", *,
              task: DenseTask, settings_table: dict[str, dict[str, Any]], task_name: str) -> TaskOutput:
    _require_openmmlab()
    from mmengine.registry import DefaultScope, init_default_scope

    from tasks.dense import backbone as _bb, heads as _heads, preprocess as _pre  # noqa: F401  (registration)
    from tasks.dense import engine
    from tasks.dense.data import DetectionSamples, SegmentationSamples
    from tasks.dense.evaluate import (DET_SELECT, SEG_SELECT, DetectionRecords, SegmentationRecords,
                                      detection_metrics, segmentation_metrics)
    from tasks.dense.models import detector_config, segmentor_config
    from tasks.common.inputs import input_size

    device = torch.device(device)
    settings = resolve_settings(settings_table[spec.preset], spec.overrides)
    size = input_size(settings)
    finetune = bool(settings["finetune"])
    if finetune and Capability.TRAINABLE not in encoder.card.capabilities:
        raise BenchError(f"method {encoder.card.name!r} cannot be fine-tuned (no {Capability.TRAINABLE} capability); "
                         f"run {task_name} with the frozen encoder (finetune=false)")
    scope = "mmdet" if task.kind == "det" else "mmseg"
    if DefaultScope.get_current_instance() is None or DefaultScope.get_current_instance().scope_name != scope:
        init_default_scope(scope)
    from mmengine.registry import MODELS

    rows_train, balance = train_rows(data, spec.fraction, bool(settings.get("balance_negatives", False)),
                                     spec.split_seed)
    rows_val = np.sort(np.asarray(data.manifest.rows("val", 1.0), dtype=np.int64))
    rows_test = np.sort(np.asarray(data.manifest.rows("test", 1.0), dtype=np.int64))
    for split, r in (("train", rows_train), ("val", rows_val), ("test", rows_test)):
        if len(r) == 0:
            raise BenchError(f"{data.table.dataset}: no {split} rows at fraction {spec.fraction if split == 'train' else 1.0}")
    Samples = DetectionSamples if task.kind == "det" else SegmentationSamples
    t_data = time.perf_counter()
    train_set, val_set, test_set = (Samples(data, r, size) for r in (rows_train, rows_val, rows_test))
    t_data = time.perf_counter() - t_data

    aug_seed = derived_seed(spec.seed, "augment")
    if task.kind == "det":
        cfg, head_name = detector_config(task.head, encoder, size, settings, aug_seed=aug_seed, frozen=not finetune), task.head
    else:
        cfg, head_name = segmentor_config(task.head, encoder, size, settings, aug_seed=aug_seed, frozen=not finetune)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(spec.seed, "init"))
        model = MODELS.build(cfg)
    backbone = model.backbone
    n_iters, val_interval = budget(settings, len(rows_train))
    work_dir = _work_dir(spec, encoder, data, settings, task_name)
    resume = engine.last_checkpoint(work_dir) is not None
    if resume:
        log.info("%s: resuming from %s", task_name, engine.last_checkpoint(work_dir))
    elif work_dir.exists():
        shutil.rmtree(work_dir)
    select = DET_SELECT if task.kind == "det" else SEG_SELECT
    prefix = "det" if task.kind == "det" else "seg"
    val_metric = DetectionRecords() if task.kind == "det" else SegmentationRecords()
    test_metric = DetectionRecords() if task.kind == "det" else SegmentationRecords()
    history = engine.ValHistory()
    runner = engine.build_runner(
        model, scope=scope, work_dir=work_dir, train_set=train_set, val_set=val_set, test_set=test_set,
        val_metric=val_metric, test_metric=test_metric, select_key=f"{prefix}/{select}", settings=settings,
        max_iters=n_iters, val_interval=val_interval, seed=_seed32(spec.seed, "dense"),
        shuffle_seed=_seed32(spec.seed, "shuffle"), device=device, resume=resume,
        encoder_lr_mult=float(settings["encoder_lr_mult"]) if finetune else None,
        log_interval=max(1, min(50, n_iters // 10)), extra_hooks=[history.hook()])
    t0 = time.perf_counter()
    runner.train()
    t_train = time.perf_counter() - t0
    best = engine.best_checkpoint(runner)
    if best is None and history.records:
        raise BenchError(f"{spec.task}: {len(history.records)} validations ran but mmengine's best checkpoint "
                         f"is missing from {work_dir}; the test set is never scored with the last weights instead")
    if best is not None:
        # the weights only: Runner.load_checkpoint would also hand the checkpoint to the hooks, which
        # would roll the validation history and patience back to the best iteration
        from mmengine.runner.checkpoint import load_checkpoint

        load_checkpoint(runner.model, str(best), map_location="cpu", logger="silent")
    t1 = time.perf_counter()
    runner.test()
    t_test = time.perf_counter() - t1
    iters_run = int(runner.iter)
    stopped_early = iters_run < n_iters

    groups = _patients(data, rows_test)
    n_boot = int(settings["n_boot"])
    bseed = derived_seed(spec.seed, "bootstrap")
    by_row = {r[0]: r for r in test_metric.records}
    missing = [int(r) for r in rows_test if int(r) not in by_row]
    if missing:
        raise BenchError(f"{task_name}: the test loop returned no prediction for {len(missing)} test images "
                         f"(first rows {missing[:5]})")
    details: dict[str, Any] = {}
    if task.kind == "seg":
        counts = np.stack([by_row[int(r)][1] for r in rows_test])
        values, cis, skipped = segmentation_metrics(counts, groups, n_boot=n_boot, seed=bseed)
        preds = _seg_predictions(data, rows_test, counts)
        details["positive_test_images"] = int((counts[:, 2] > 0).sum())
    else:
        from tasks.dense.data import geometry_of, native_boxes

        frame = data.table.frame
        det_boxes, det_scores, truth = [], [], []
        for r in rows_test:
            _, boxes, scores, _ = by_row[int(r)]
            geom = geometry_of(data, int(r))
            h, w = int(frame["height"].iat[int(r)]), int(frame["width"].iat[int(r)])
            nb = geom.unboxes(boxes).astype(np.float64)
            nb[:, 0::2] = nb[:, 0::2].clip(0, w)
            nb[:, 1::2] = nb[:, 1::2].clip(0, h)
            det_boxes.append(nb)
            det_scores.append(scores)
            truth.append(native_boxes(data, int(r)).astype(np.float64))
        inside = _froc_inside(data, rows_test) if task.froc else None
        values, cis, extra = detection_metrics(det_boxes, det_scores, truth, groups, n_boot=n_boot, seed=bseed,
                                               mgca_conf=float(settings["mgca_conf"]), froc_inside=inside)
        skipped = extra.pop("bootstrap_skipped")
        details.update(extra)
        preds = _det_predictions(data, rows_test, det_boxes, det_scores)

    details.update({
        "family": "segmentation" if task.kind == "seg" else "detection", "head": head_name,
        "encoder": "fine-tuned" if finetune else "frozen", "settings": settings, "image_size": size,
        "pyramid": {"levels": list(backbone.levels), "extra_levels": backbone.extra_levels,
                    "channels": list(backbone.out_channels), "strides": list(backbone.out_strides),
                    "card_channels": list(encoder.card.feature_channels),
                    "card_strides": list(encoder.card.feature_strides)},
        "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "sizes": {s: {"images": int(len(r)), "patients": int(len(np.unique(_patients(data, r))))}
                  for s, r in (("train", rows_train), ("val", rows_val), ("test", rows_test))},
        "train_selection": balance or "all training images of the fraction",
        "iterations": {"budget": n_iters, "run": iters_run, "val_interval": val_interval,
                       "stopped_early": stopped_early, "resumed": resume},
        "model_selection": f"val {select} (best of {len(history.records)} validations)",
        "best_checkpoint_iter": history.best_iter(f"{prefix}/{select}"),
        "val_history": history.records,
        "timing_s": {"data": round(t_data, 3), "train": round(t_train, 3), "test": round(t_test, 3)},
        "precision": precision_label(device), "packages": package_versions(),
        "bootstrap": {"n_boot": n_boot, "unit": "patient", "alpha": 0.05, "method": "percentile",
                      "n_patients": int(len(np.unique(groups))), "skipped": skipped},
        "frame": "native pixels (boxes mapped back from the letterboxed input)" if task.kind == "det" else
                 "the letterboxed input square, counting only the image's content (padding excluded)",
    })
    shutil.rmtree(work_dir, ignore_errors=True)
    return TaskOutput(metrics=values, ci=cis, details=details, predictions=preds)


def _seg_predictions(data: Any, rows: np.ndarray, counts: np.ndarray) -> list[dict[str, Any]]:
    frame = data.table.frame
    out = []
    for r, c in zip(rows, counts):
        den = c[1] + c[2]
        out.append({"image_id": str(frame["image_id"].iat[int(r)]), "patient_id": str(frame["patient_id"].iat[int(r)]),
                    "intersection": int(c[0]), "predicted": int(c[1]), "truth": int(c[2]), "pixels": int(c[3]),
                    "dice": None if den == 0 else round(float(2 * c[0] / den), 6)})
    return out


def _det_predictions(data: Any, rows: np.ndarray, boxes: list[np.ndarray], scores: list[np.ndarray]) -> list[dict]:
    frame = data.table.frame
    out = []
    for r, b, s in zip(rows, boxes, scores):
        out.append({"image_id": str(frame["image_id"].iat[int(r)]), "patient_id": str(frame["patient_id"].iat[int(r)]),
                    "boxes": np.round(b, 2).tolist(), "scores": np.round(s, 6).tolist()})
    return out


def _froc_inside(data: Any, rows: np.ndarray):
    """``inside(i, points)`` for FROC: a point is in an object when it lies in the object's box and on
    the (native) mask of the image's annotated shapes. The table keeps the union mask and each
    shape's bounding box, so the challenge's exact per-shape test is approximated where two objects'
    boxes overlap."""
    from tasks.dense.data import native_boxes

    def inside(i: int, points: np.ndarray) -> np.ndarray:
        row = int(rows[i])
        boxes = native_boxes(data, row).astype(np.float64)
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if not len(boxes):
            return np.zeros((len(pts), 0), dtype=bool)
        mask = data.table.mask(row)
        h, w = mask.shape
        xi = np.clip(np.floor(pts[:, 0]).astype(int), 0, w - 1)
        yi = np.clip(np.floor(pts[:, 1]).astype(int), 0, h - 1)
        on = mask[yi, xi].astype(bool)
        # shape points are pixel indices, both corners included: the box spans [x1, x2 + 1)
        in_box = ((pts[:, None, 0] >= boxes[None, :, 0]) & (pts[:, None, 0] < boxes[None, :, 2] + 1)
                  & (pts[:, None, 1] >= boxes[None, :, 1]) & (pts[:, None, 1] < boxes[None, :, 3] + 1))
        return in_box & on[:, None]

    return inside
