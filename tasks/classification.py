"""Image classification: frozen linear probe (MGCA) and full fine-tuning (BenchX-style).

Families and protocols
----------------------
``linear-probe`` (tasks ``<dataset>-cls``), MGCA §5.1: frozen encoder in eval mode, one
``nn.Linear`` on the pooled vector, AdamW (lr 5e-4, wd 1e-6), batch 48, at most 50 epochs,
early stopping on validation loss (patience 10), the best-validation-loss head scores the test set.

* ``cached`` (default): features are extracted once per (method card, weights fingerprint,
  preset, dataset, split manifest, image cache, image size, precision) and cached under
  ``cache_dir()/features/``; the head then trains on the cached vectors.
* ``augmented``: MGCA's way: the frozen backbone is re-run every epoch on augmented training
  images; same head, optimiser, schedule and stopping. Validation and test use the un-augmented
  (cached) features, as MGCA evaluates on plain images. The augmentation is MGCA-*style*, not
  MGCA-exact: a random resized crop (area 0.6-1, aspect 3/4-4/3, zoomed back to the input size) +
  horizontal flip, where MGCA crops a fixed 224 of a 256 resize (and only CheXpert's Moco2
  transform flips and jitters colour). Evaluation sees the whole letterboxed image (MGCA: centre
  crop 224 of 256), for both protocols.

``tiny`` differs from MGCA in lr (1e-2) and batch (32): random-init features are small (pooled
values ~0.05) and a tiny run has few steps, so lr 5e-4 barely moves the head off its prior.

``fine-tune`` (tasks ``<dataset>-ft``), after BenchX §2.2 with its defects fixed: the whole vision
tower trains with lr x ``encoder_lr_mult`` (0.1), AdamW, warmup-cosine schedule **clamped** at its
end (BenchX's rises again; here training stops when the schedule ends), gradient clipping 1.0,
early stopping on the validation main metric (the best-validation weights score the test set),
bf16 autocast on CUDA only. The encoder is trained in place. Augmentation: random resized crop and a small rotation, **no
horizontal flip by default** (``aug_hflip=False``): a flip moves the heart to the right and swaps
the side of every lateralised finding, producing images that do not occur in practice; BenchX
flips, so ``--set aug_hflip=true`` reproduces that choice. The setting is recorded with results.

Labels and metrics per dataset
------------------------------
* ``chexpert``: frontal images only (``Frontal/Lateral == "Frontal"``, i.e. view != LATERAL), the
  5 competition labels with MGCA's U-ones/U-zeros map and ``fillna(0)``; macro AUROC.
* ``rsna``: binary (class "Pneumonia" = Target); AUROC, plus F1 and accuracy at thresholds
  chosen on validation.
* ``covidx``: 3-class softmax; accuracy (main, MGCA) and one-vs-rest macro AUROC.
* ``nih``: 14 labels; macro AUROC.

Every test metric carries a 95% bootstrap CI resampling patients (``n_boot`` settings).

Determinism: everything random (head init, shuffling, augmentation, bootstrap) draws from
generators derived from ``spec.seed``; on CPU the same spec gives the same numbers.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import metrics as M
from bench.api import TASKS, Capability, Encoder, RunSpec, TaskEntry, TaskOutput
from bench.errors import BenchError, DataError
from bench.paths import cache_dir
from bench.progress import progress

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1
LINEAR_PROBE_PROTOCOLS = ("cached", "augmented")
FINE_TUNE_PROTOCOLS = ("full",)

# ---------------------------------------------------------------------------------------------
# Settings per preset
# ---------------------------------------------------------------------------------------------

#: Linear probe. ``paper`` = MGCA §5.1; ``tiny`` is sized for a CPU minute.
LINEAR_PROBE_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {
        "lr": 5e-4, "weight_decay": 1e-6, "batch_size": 48, "max_epochs": 50, "patience": 10,
        "extract_batch_size": 128, "n_boot": 1000,
        # augmented protocol only (MGCA-style; MGCA itself: RandomCrop 224 of 256, + HFlip for CheXpert)
        "aug_scale_min": 0.6, "aug_scale_max": 1.0, "aug_rotate_deg": 0.0, "aug_hflip": True,
    },
    "tiny": {
        "lr": 1e-2, "weight_decay": 1e-6, "batch_size": 32, "max_epochs": 30, "patience": 5,
        "extract_batch_size": 64, "n_boot": 200,
        "aug_scale_min": 0.6, "aug_scale_max": 1.0, "aug_rotate_deg": 0.0, "aug_hflip": True,
    },
}

#: Fine-tuning. ``paper`` follows BenchX §2.2 (encoder lr x 0.1, warmup 50 steps, schedule t_total
#: 3000 steps (clamped here), 200 epochs, validation every 5 epochs from epoch 10, early stop after 10
#: evaluations, clip 1.0, AMP) with one fixed lr / batch for every method (BenchX hand-tunes per
#: method; lr 1e-4 head / 1e-5 encoder, batch 32 = its MGCA-R50 NIH setting); ``tiny`` fits a few
#: CPU minutes.
FINE_TUNE_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {
        "lr": 1e-4, "encoder_lr_mult": 0.1, "weight_decay": 1e-4, "batch_size": 32, "max_epochs": 200,
        "warmup_steps": 50, "schedule_steps": 3000, "min_lr_ratio": 0.0, "eval_every": 5, "eval_start": 10,
        "patience": 10, "grad_clip": 1.0, "eval_batch_size": 128, "n_boot": 1000,
        "aug_scale_min": 0.7, "aug_scale_max": 1.0, "aug_rotate_deg": 10.0, "aug_hflip": False,
    },
    "tiny": {
        "lr": 1e-3, "encoder_lr_mult": 0.1, "weight_decay": 1e-4, "batch_size": 32, "max_epochs": 4,
        "warmup_steps": 5, "schedule_steps": 0, "min_lr_ratio": 0.0, "eval_every": 1, "eval_start": 1,
        "patience": 2, "grad_clip": 1.0, "eval_batch_size": 64, "n_boot": 200,
        "aug_scale_min": 0.7, "aug_scale_max": 1.0, "aug_rotate_deg": 10.0, "aug_hflip": False,
    },
}


def resolve_settings(defaults: Mapping[str, Any], overrides: tuple[tuple[str, Any], ...] | Mapping[str, Any]) -> dict[str, Any]:
    """Preset settings with ``--set key=value`` overrides, each coerced to the default's type."""
    out = dict(defaults)
    for key, value in (overrides.items() if isinstance(overrides, Mapping) else overrides):
        if key not in out:
            raise BenchError(f"unknown setting {key!r} (settings: {', '.join(sorted(out))})")
        out[key] = _coerce(key, value, out[key])
    return out


def _coerce(key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return low in ("true", "1", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise BenchError(f"setting {key}={value!r}: expected a {type(default).__name__}") from None
    return value


# ---------------------------------------------------------------------------------------------
# Labels per dataset
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelSpace:
    """What a classification task predicts from a canonical table."""

    kind: str                                   # "multilabel" | "binary" | "multiclass"
    classes: tuple[str, ...]                    # output names (columns of the targets)
    targets: np.ndarray                         # multilabel/binary: float [N, C] 1/0/NaN; multiclass: int [N] (-1 none)
    keep: np.ndarray                            # bool [N]: rows the task uses (view filter, labelled)
    policy: str                                 # how labels were derived, recorded in details


def _class_columns(table: Any, names: tuple[str, ...]) -> list[int]:
    missing = [c for c in names if c not in table.classes]
    if missing:
        raise DataError(f"{table.dataset}: label columns {missing} not in table classes {list(table.classes)}")
    return [list(table.classes).index(c) for c in names]


def frontal_mask(table: Any) -> np.ndarray:
    """MGCA's ``Frontal/Lateral == "Frontal"``: the CheXpert loader writes laterals as view LATERAL
    (frontal rows keep AP/PA/LL, or "" when the AP/PA column is blank)."""
    return table.frame["view"].to_numpy(dtype=object) != "LATERAL"


def chexpert_labels(table: Any) -> LabelSpace:
    from bench.data.loaders.chexpert import COMPETITION_TASKS, MGCA_UNCERTAIN_POLICY
    from bench.data.table import apply_uncertainty_policy

    cols = _class_columns(table, tuple(COMPETITION_TASKS))
    y = apply_uncertainty_policy(table.labels[:, cols], COMPETITION_TASKS, MGCA_UNCERTAIN_POLICY, blank=0.0)
    policy = ("frontal only; 5 competition labels; blank -> 0 (fillna(0)); -1 -> "
              + ", ".join(f"{c}: {int(v)}" for c, v in MGCA_UNCERTAIN_POLICY.items()) + " (MGCA U-ones/U-zeros)")
    return LabelSpace("multilabel", tuple(COMPETITION_TASKS), y.astype(np.float32), frontal_mask(table), policy)


def rsna_labels(table: Any) -> LabelSpace:
    name = "Pneumonia" if "Pneumonia" in table.classes else (table.classes[0] if len(table.classes) == 1 else None)
    if name is None:
        raise DataError(f"rsna: expected a single 'Pneumonia' label column, got {list(table.classes)}")
    (col,) = _class_columns(table, (name,))
    y = table.labels[:, [col]].astype(np.float32)
    keep = np.isin(y[:, 0], (0.0, 1.0))
    return LabelSpace("binary", (name,), y, keep, f"binary {name!r} (Target: any Lung Opacity box)")


def covidx_labels(table: Any) -> LabelSpace:
    names = ("normal", "pneumonia", "COVID-19")
    cols = _class_columns(table, names)
    onehot = np.nan_to_num(table.labels[:, cols], nan=0.0) == 1
    single = onehot.sum(axis=1) == 1
    y = np.where(single, onehot.argmax(axis=1), -1).astype(np.int64)
    return LabelSpace("multiclass", names, y, single,
                      "3-class single label: normal 0, pneumonia 1, COVID-19 2 (MGCA label map)")


def nih_labels(table: Any) -> LabelSpace:
    classes = tuple(table.classes)
    if len(classes) != 14:
        raise DataError(f"nih: expected the 14 ChestX-ray14 labels, got {len(classes)}: {list(classes)}")
    from bench.data.table import apply_uncertainty_policy

    y = apply_uncertainty_policy(table.labels, classes, None, blank=0.0)
    return LabelSpace("multilabel", classes, y.astype(np.float32), np.ones(len(table), dtype=bool),
                      "14 labels from Finding Labels; blank -> 0")


@dataclass(frozen=True)
class DatasetTask:
    dataset: str
    title: str
    labels: Callable[[Any], LabelSpace]
    main_metric: str


DATASET_TASKS: dict[str, DatasetTask] = {
    "chexpert": DatasetTask("chexpert", "CheXpert 5 competition labels (frontal)", chexpert_labels, "auroc_macro"),
    "rsna": DatasetTask("rsna", "RSNA pneumonia (binary)", rsna_labels, "auroc"),
    "covidx": DatasetTask("covidx", "COVIDx 3-class", covidx_labels, "accuracy"),
    "nih": DatasetTask("nih", "NIH ChestX-ray14 14 labels", nih_labels, "auroc_macro"),
}


# ---------------------------------------------------------------------------------------------
# Splits, seeds and inputs
# ---------------------------------------------------------------------------------------------

def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed per purpose ("init", "shuffle", "augment", "bootstrap") of one run seed."""
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, purpose))


@dataclass
class SplitRows:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_rows(data: Any, space: LabelSpace, fraction: float) -> SplitRows:
    rows = {}
    for split, frac in (("train", fraction), ("val", 1.0), ("test", 1.0)):
        r = np.asarray(data.manifest.rows(split, frac), dtype=np.int64)
        r = r[space.keep[r]]
        if len(r) == 0:
            raise DataError(f"{data.table.dataset}: no usable {split} rows (fraction {frac}) after the task's "
                            f"filter ({space.policy})")
        rows[split] = np.sort(r)
    return SplitRows(**rows)


def _patients(data: Any, rows: np.ndarray) -> np.ndarray:
    return data.table.frame["patient_id"].to_numpy(dtype=object)[rows].astype(str)


def _images(data: Any, rows: np.ndarray) -> torch.Tensor:
    """uint8 [B, 1, S, S] of table rows (sorted reads are fastest on a memmap)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    batch = np.empty((len(rows),) + tuple(data.images.array.shape[1:]), dtype=np.uint8)
    batch[order] = np.asarray(data.images.array[rows[order]])
    return torch.from_numpy(batch).unsqueeze(1)


def _to_input(encoder: Encoder, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 or [0,1] float images -> normalised encoder input at ``card.image_size`` on ``device``."""
    x = x.to(device, non_blocking=True)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    size = encoder.card.image_size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = encoder.prepare(x)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def augment(x: torch.Tensor, g: torch.Generator, *, scale: tuple[float, float], rotate_deg: float,
            hflip: bool, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Batched random resized crop + rotation + optional horizontal flip of [0,1] images.

    One affine warp per image (``grid_sample``); parameters are drawn on the CPU from ``g`` so the
    same seed gives the same augmentation on any device. Out-of-image pixels are black, as the
    letterbox padding is.
    """
    b = x.shape[0]
    u = torch.rand(b, 6, generator=g, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)      # crop width / image width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)                  # crop centre in [-1, 1] coordinates
    cy = (1 - h) * (2 * u[:, 3] - 1)
    theta_r = math.radians(rotate_deg) * (2 * u[:, 4] - 1)
    flip = torch.where((u[:, 5] < 0.5) & torch.tensor(bool(hflip)), -1.0, 1.0).double()
    cos, sin = torch.cos(theta_r), torch.sin(theta_r)
    theta = torch.stack([torch.stack([w * cos * flip, -h * sin, cx], 1),
                         torch.stack([w * sin * flip, h * cos, cy], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _aug_fn(settings: Mapping[str, Any]) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    return partial(augment, scale=(float(settings["aug_scale_min"]), float(settings["aug_scale_max"])),
                   rotate_deg=float(settings["aug_rotate_deg"]), hflip=bool(settings["aug_hflip"]))


def _autocast(device: torch.device):
    from bench.env import autocast

    return autocast(device)


def _precision(device: torch.device) -> str:
    return "bf16-autocast" if device.type == "cuda" else "fp32"


# ---------------------------------------------------------------------------------------------
# Feature extraction and its cache
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(encoder: Encoder, data: Any, rows: np.ndarray, device: torch.device,
                     batch_size: int) -> np.ndarray:
    """Pooled features (float32 [len(rows), D]) of plain (un-augmented) images, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = np.empty((len(rows), encoder.card.embed_dim), dtype=np.float32)
    try:
        for start in progress(range(0, len(rows), batch_size), f"extracting {encoder.card.name} features",
                              unit="batch"):
            sl = slice(start, start + batch_size)
            with _autocast(device):
                pooled = encoder.image_features(_to_input(encoder, _images(data, rows[sl]), device)).pooled
            out[sl] = pooled.float().cpu().numpy()
    finally:
        encoder.train(was_training)
    return out


def feature_cache_key(encoder: Encoder, data: Any, preset: str, device: torch.device) -> dict[str, Any]:
    from methods.backbones import state_fingerprint

    source = dict(getattr(data, "source", None) or {})
    return {
        "version": FEATURE_CACHE_VERSION,
        "card": encoder.card.to_dict(),
        "weights_fingerprint": state_fingerprint(encoder),
        "preset": preset,
        "dataset": data.table.dataset,
        "manifest_sha256": source.get("manifest_sha256") or getattr(data.manifest, "sha256", None),
        "image_cache": getattr(data.images, "fingerprint", None) or None,
        "array_size": int(data.images.array.shape[-1]),
        "image_size": int(encoder.card.image_size),
        "precision": _precision(device),
        "feature": "pooled",
    }


def feature_cache_path(key: Mapping[str, Any], root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    card = key["card"]
    return (root or cache_dir()) / "features" / str(key["dataset"]) / str(card["name"]) / f"{digest[:32]}.npz"


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class CachedFeatures:
    features: np.ndarray          # float32 [len(rows), D] in the order asked
    path: Path
    hit_rows: int                 # rows read from the cache
    extracted_rows: int           # rows computed now


def cached_features(encoder: Encoder, data: Any, rows: np.ndarray, *, preset: str, device: torch.device,
                    batch_size: int, root: Path | None = None) -> CachedFeatures:
    """Pooled features of ``rows``, read from the feature cache where present.

    One file per cache key holds ``rows`` (sorted table indices) and ``features``; rows not yet in
    it are extracted and merged in (atomic rewrite), so the 1% run's features serve the 100% run.
    """
    key = feature_cache_key(encoder, data, preset, device)
    path = feature_cache_path(key, root)
    want = np.unique(np.asarray(rows, dtype=np.int64))
    have_rows = np.zeros(0, dtype=np.int64)
    have = np.zeros((0, encoder.card.embed_dim), dtype=np.float32)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["key"])) == json.loads(json.dumps(key, default=str)):
                    have_rows, have = z["rows"].astype(np.int64), z["features"].astype(np.float32)
                else:
                    log.warning("feature cache %s: key mismatch (hash collision?); rebuilding", path)
        except Exception as e:  # truncated or foreign file: rebuild, never trust it
            log.warning("feature cache %s unreadable (%s); rebuilding", path, e)
    missing = np.setdiff1d(want, have_rows, assume_unique=True)
    if len(missing):
        log.info("extracting %d feature rows (%d cached) -> %s", len(missing), len(have_rows), path)
        new = extract_features(encoder, data, missing, device, batch_size)
        all_rows = np.concatenate([have_rows, missing])
        order = np.argsort(all_rows, kind="stable")
        have_rows, have = all_rows[order], np.concatenate([have, new])[order]
        _atomic_save_npz(path, rows=have_rows, features=have, key=np.array(json.dumps(key, sort_keys=True, default=str)))
    else:
        log.info("feature cache hit: %d rows from %s", len(want), path)
    idx = np.searchsorted(have_rows, np.asarray(rows, dtype=np.int64))
    return CachedFeatures(have[idx], path, int(len(want) - len(missing)), int(len(missing)))


# ---------------------------------------------------------------------------------------------
# Heads, losses, predictions
# ---------------------------------------------------------------------------------------------

def seeded_linear(in_dim: int, out_dim: int, g: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from ``g`` (not the global generator)."""
    head = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=g)
        bound = 1 / math.sqrt(in_dim) if in_dim > 0 else 0
        nn.init.uniform_(head.bias, -bound, bound, generator=g)
    return head


def n_outputs(space: LabelSpace) -> int:
    return len(space.classes)


def targets_tensor(space: LabelSpace, rows: np.ndarray) -> torch.Tensor:
    t = space.targets[rows]
    return torch.from_numpy(t.astype(np.int64) if space.kind == "multiclass" else t.astype(np.float32))


def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if kind == "multiclass":
        return F.cross_entropy(logits, y)
    mask = torch.isfinite(y)
    per = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y, nan=0.0), reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def scores_of(kind: str, logits: torch.Tensor) -> np.ndarray:
    logits = logits.float()
    p = torch.softmax(logits, dim=1) if kind == "multiclass" else torch.sigmoid(logits)
    return p.cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Metrics on validation and test
# ---------------------------------------------------------------------------------------------

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
    """Test metrics, their patient-level bootstrap CIs, and the validation-chosen thresholds."""
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


def _predictions(data: Any, space: LabelSpace, rows: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
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


def _sizes(data: Any, rows: SplitRows) -> dict[str, Any]:
    return {s: {"images": int(len(r)), "patients": int(len(np.unique(_patients(data, r))))}
            for s, r in (("train", rows.train), ("val", rows.val), ("test", rows.test))}


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------

@dataclass
class HeadFit:
    head: nn.Linear
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]]
    stop_reason: str = "max_epochs"


def fit_linear_head(batch_features: Callable[[np.ndarray, int], torch.Tensor], n_train: int, y_train: torch.Tensor,
                    x_val: torch.Tensor, y_val: torch.Tensor, *, in_dim: int, kind: str, n_out: int,
                    settings: Mapping[str, Any], seed: int, device: torch.device) -> HeadFit:
    """MGCA's linear-probe loop: AdamW, no scheduler, early stopping on validation loss, best head.

    ``batch_features(idx, epoch)`` returns the training features of positions ``idx`` (cached
    vectors, or the frozen backbone run on freshly augmented images).
    """
    head = seeded_linear(in_dim, n_out, generator(seed, "init")).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"]))
    g_shuffle = generator(seed, "shuffle")
    bs, patience = int(settings["batch_size"]), int(settings["patience"])
    x_val, y_val = x_val.to(device), y_val.to(device)
    best = (math.inf, 0, copy.deepcopy(head.state_dict()))
    history: list[dict[str, float]] = []
    bad = 0
    epoch = 0
    stop_reason = "max_epochs"
    for epoch in progress(range(1, int(settings["max_epochs"]) + 1), "linear head", unit="epoch"):
        head.train()
        perm = torch.randperm(n_train, generator=g_shuffle).numpy()
        total, count = 0.0, 0
        for start in range(0, n_train, bs):
            idx = perm[start:start + bs]
            x = batch_features(idx, epoch).to(device).float()
            loss = loss_fn(kind, head(x), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        head.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(kind, head(x_val), y_val))
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss})
        log.debug("linear probe epoch %d: %s", epoch, history[-1])
        if val_loss < best[0]:
            best, bad = (val_loss, epoch, copy.deepcopy(head.state_dict())), 0
        else:
            bad += 1
            if bad >= patience:
                stop_reason = "early_stopping"
                break
    head.load_state_dict(best[2])
    head.eval()
    log.info("linear head: %d epochs, best epoch %d (val loss %.4f)", epoch, best[1], best[0])
    return HeadFit(head, epoch, best[1], best[0], history, stop_reason)


def run_linear_probe(encoder: Encoder, data: Any, spec: RunSpec, device: torch.device | str = "cpu", *,
                     task: DatasetTask, feature_root: Path | None = None) -> TaskOutput:
    device = torch.device(device)
    protocol = spec.protocol or LINEAR_PROBE_PROTOCOLS[0]
    if protocol not in LINEAR_PROBE_PROTOCOLS:
        raise BenchError(f"linear probe has no protocol {protocol!r} (protocols: {', '.join(LINEAR_PROBE_PROTOCOLS)})")
    settings = resolve_settings(LINEAR_PROBE_SETTINGS[spec.preset], spec.overrides)
    space = task.labels(data.table)
    rows = split_rows(data, space, spec.fraction)
    encoder = encoder.to(device).eval()   # frozen: every backbone pass below runs under no_grad
    t0 = time.perf_counter()
    # val / test (and, for the cached protocol, train) features come from the cache
    need = np.concatenate([rows.val, rows.test] + ([rows.train] if protocol == "cached" else []))
    cf = cached_features(encoder, data, need, preset=spec.preset, device=device,
                         batch_size=int(settings["extract_batch_size"]), root=feature_root)
    n_v, n_t = len(rows.val), len(rows.test)
    x_val = torch.from_numpy(cf.features[:n_v])
    x_test = torch.from_numpy(cf.features[n_v:n_v + n_t])
    t_features = time.perf_counter() - t0
    y_train = targets_tensor(space, rows.train)
    y_val = targets_tensor(space, rows.val)

    if protocol == "cached":
        x_train = torch.from_numpy(cf.features[n_v + n_t:])
        batch_features: Callable[[np.ndarray, int], torch.Tensor] = lambda idx, epoch: x_train[idx]  # noqa: E731
    else:
        g_aug = generator(spec.seed, "augment")
        aug = _aug_fn(settings)

        @torch.no_grad()
        def batch_features(idx: np.ndarray, epoch: int) -> torch.Tensor:
            imgs = _images(data, rows.train[idx]).to(device).float() / 255.0
            with _autocast(device):
                pooled = encoder.image_features(_to_input(encoder, aug(imgs, g_aug), device)).pooled
            return pooled.float()

    t1 = time.perf_counter()
    fit = fit_linear_head(batch_features, len(rows.train), y_train, x_val, y_val, in_dim=encoder.card.embed_dim,
                          kind=space.kind, n_out=n_outputs(space), settings=settings, seed=spec.seed, device=device)
    t_train = time.perf_counter() - t1
    with torch.no_grad():
        p_val = scores_of(space.kind, fit.head(x_val.to(device)))
        p_test = scores_of(space.kind, fit.head(x_test.to(device)))
    y_val_np, y_test_np = space.targets[rows.val], space.targets[rows.test]
    values, cis, extra = evaluate(space, y_val_np, p_val, y_test_np, p_test, _patients(data, rows.test),
                                  n_boot=int(settings["n_boot"]), seed=spec.seed)
    details = {
        "family": "linear-probe", "protocol": protocol, "settings": settings, "classes": list(space.classes),
        "label_kind": space.kind, "label_policy": space.policy, "sizes": _sizes(data, rows),
        "epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch, "best_val_loss": fit.best_val_loss,
        "stop_reason": fit.stop_reason,
        "early_stopping": f"val_loss, patience {settings['patience']}",
        "val_main_metric": main_value(space, task.main_metric, y_val_np, p_val),
        "history": fit.history,
        "feature_cache": {"path": str(cf.path), "hit_rows": cf.hit_rows, "extracted_rows": cf.extracted_rows},
        "timing_s": {"features": round(t_features, 3), "head": round(t_train, 3)},
        "precision": _precision(device), "image_size": encoder.card.image_size,
        "input_array_size": int(data.images.array.shape[-1]),
        **extra,
    }
    if protocol == "augmented":
        details["augmentation"] = {k: settings[k] for k in settings if k.startswith("aug_")}
    return TaskOutput(metrics=values, ci=cis, details=details, predictions=_predictions(data, space, rows.test, p_test))


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------

def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR factor: linear warmup, cosine decay to ``min_ratio``, then **held** there (clamped)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Classifier(nn.Module):
    def __init__(self, encoder: Encoder, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.image_features(x).pooled)


@torch.no_grad()
def _predict_logits(model: _Classifier, data: Any, rows: np.ndarray, device: torch.device,
                    batch_size: int) -> torch.Tensor:
    """float32 CPU logits of plain (un-augmented) images, model in eval mode."""
    model.eval()
    out = []
    for start in progress(range(0, len(rows), batch_size), "predicting", unit="batch"):
        with _autocast(device):
            logits = model(_to_input(model.encoder, _images(data, rows[start:start + batch_size]), device))
        out.append(logits.float().cpu())
    return torch.cat(out)


def run_fine_tune(encoder: Encoder, data: Any, spec: RunSpec, device: torch.device | str = "cpu", *,
                  task: DatasetTask) -> TaskOutput:
    """Fine-tune the encoder's vision tower with a linear head. The encoder is trained **in place**
    and holds the best-validation weights afterwards."""
    device = torch.device(device)
    protocol = spec.protocol or FINE_TUNE_PROTOCOLS[0]
    if protocol not in FINE_TUNE_PROTOCOLS:
        raise BenchError(f"fine-tune has no protocol {protocol!r} (protocols: {', '.join(FINE_TUNE_PROTOCOLS)})")
    settings = resolve_settings(FINE_TUNE_SETTINGS[spec.preset], spec.overrides)
    space = task.labels(data.table)
    rows = split_rows(data, space, spec.fraction)
    backbone = list(encoder.backbone_parameters())
    backbone_ids = {id(p) for p in backbone}
    grad_flags = [(p, p.requires_grad) for p in encoder.parameters()]
    for p in encoder.parameters():   # only the vision tower trains (a text tower, if any, stays put)
        p.requires_grad_(id(p) in backbone_ids)
    head = seeded_linear(encoder.card.embed_dim, n_outputs(space), generator(spec.seed, "init"))
    model = _Classifier(encoder, head).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = float(settings["lr"])
    opt = torch.optim.AdamW([
        {"params": backbone, "lr": lr * float(settings["encoder_lr_mult"]), "name": "encoder"},
        {"params": list(head.parameters()), "lr": lr, "name": "head"},
    ], weight_decay=float(settings["weight_decay"]))
    bs = int(settings["batch_size"])
    n_train = len(rows.train)
    steps_per_epoch = math.ceil(n_train / bs)
    max_epochs = int(settings["max_epochs"])
    # BenchX sets its schedule length in steps (t_total); 0 = the whole epoch budget. Training ends
    # with the schedule: past it the (clamped) learning rate stays at its floor.
    total_steps = int(settings["schedule_steps"]) or steps_per_epoch * max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        warmup_cosine, warmup=int(settings["warmup_steps"]), total=total_steps, min_ratio=float(settings["min_lr_ratio"])))
    y_train = targets_tensor(space, rows.train)
    y_val_np = space.targets[rows.val]
    g_shuffle, g_aug = generator(spec.seed, "shuffle"), generator(spec.seed, "augment")
    aug = _aug_fn(settings)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    eval_bs = int(settings["eval_batch_size"])
    best_value, best_epoch, best_state = -math.inf, 0, copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    lr_curve: list[list[float]] = []
    bad, epoch, step = 0, 0, 0
    lrs = [float(g["lr"]) for g in opt.param_groups]
    stop_reason = "max_epochs"
    every, start_at, patience = int(settings["eval_every"]), int(settings["eval_start"]), int(settings["patience"])
    t0 = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(n_train, generator=g_shuffle).numpy()
        total, count = 0.0, 0
        for start in progress(range(0, n_train, bs), f"fine-tune epoch {epoch}", unit="batch"):
            if step >= total_steps:
                break
            idx = perm[start:start + bs]
            imgs = _images(data, rows.train[idx]).to(device).float() / 255.0
            x = _to_input(encoder, aug(imgs, g_aug), device)
            with _autocast(device):
                logits = model(x)
            loss = loss_fn(space.kind, logits, y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float(settings["grad_clip"]))
            lrs = [float(g["lr"]) for g in opt.param_groups]
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        lr_curve.append([step] + lrs)           # learning rates of the epoch's last step
        schedule_done = step >= total_steps
        record = {"epoch": epoch, "train_loss": total / max(count, 1)}
        if (epoch >= start_at and epoch % every == 0) or epoch == max_epochs or schedule_done:
            val_logits = _predict_logits(model, data, rows.val, device, eval_bs)
            value = main_value(space, task.main_metric, y_val_np, scores_of(space.kind, val_logits))
            record["val_" + task.main_metric] = value
            record["val_loss"] = float(loss_fn(space.kind, val_logits, targets_tensor(space, rows.val)))
            if not math.isfinite(value):  # main metric undefined on validation (one class): use -loss
                value = -record["val_loss"]
            if value > best_value:
                best_value, best_epoch, bad = value, epoch, 0
                best_state = copy.deepcopy({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
            else:
                bad += 1
        history.append(record)
        log.info("fine-tune epoch %d: %s", epoch, record)
        if bad >= patience:
            stop_reason = "early_stopping"
            break
        if schedule_done:
            stop_reason = "schedule_end"
            break
    t_train = time.perf_counter() - t0
    model.load_state_dict(best_state)
    for p, flag in grad_flags:
        p.requires_grad_(flag)
    p_val = scores_of(space.kind, _predict_logits(model, data, rows.val, device, eval_bs))
    p_test = scores_of(space.kind, _predict_logits(model, data, rows.test, device, eval_bs))
    values, cis, extra = evaluate(space, y_val_np, p_val, space.targets[rows.test], p_test, _patients(data, rows.test),
                                  n_boot=int(settings["n_boot"]), seed=spec.seed)
    details = {
        "family": "fine-tune", "protocol": protocol, "settings": settings, "classes": list(space.classes),
        "label_kind": space.kind, "label_policy": space.policy, "sizes": _sizes(data, rows),
        "epochs_run": epoch, "best_epoch": best_epoch, "best_val_main_metric": best_value, "stop_reason": stop_reason,
        "early_stopping": f"val {task.main_metric}, patience {settings['patience']} evaluations",
        "scheduler": f"warmup-cosine, warmup {settings['warmup_steps']} steps, clamped at {total_steps} steps",
        "schedule_steps": total_steps,
        "steps": step, "lr_curve": lr_curve, "history": history,
        "timing_s": {"train": round(t_train, 3)}, "precision": _precision(device),
        "image_size": encoder.card.image_size, "input_array_size": int(data.images.array.shape[-1]),
        "augmentation": {k: settings[k] for k in settings if k.startswith("aug_")},
        **extra,
    }
    return TaskOutput(metrics=values, ci=cis, details=details, predictions=_predictions(data, space, rows.test, p_test))


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def _register() -> None:
    lp_req = frozenset({Capability.IMAGE_GLOBAL})
    ft_req = frozenset({Capability.IMAGE_GLOBAL, Capability.TRAINABLE})
    for ds in ("chexpert", "rsna", "covidx", "nih"):
        t = DATASET_TASKS[ds]
        TASKS.add(f"{ds}-cls", TaskEntry(
            name=f"{ds}-cls", family="linear-probe", dataset=ds, version=1, requires=lp_req,
            main_metric=t.main_metric, higher_is_better=M.higher_is_better(t.main_metric),
            protocols=LINEAR_PROBE_PROTOCOLS, run=partial(run_linear_probe, task=t),
            description=f"{t.title}: frozen linear probe (MGCA), {t.main_metric}",
            settings={k: dict(v) for k, v in LINEAR_PROBE_SETTINGS.items()}))
        TASKS.add(f"{ds}-ft", TaskEntry(
            name=f"{ds}-ft", family="fine-tune", dataset=ds, version=1, requires=ft_req,
            main_metric=t.main_metric, higher_is_better=M.higher_is_better(t.main_metric),
            protocols=FINE_TUNE_PROTOCOLS, run=partial(run_fine_tune, task=t),
            description=f"{t.title}: full fine-tuning (BenchX-style, clamped warmup-cosine), {t.main_metric}",
            settings={k: dict(v) for k, v in FINE_TUNE_SETTINGS.items()}))


_register()


# ---------------------------------------------------------------------------------------------
# Performance probe: cached vs augmented linear probe
# ---------------------------------------------------------------------------------------------

def perf_probe(dataset: str | None = "rsna", method: str | None = "random", fraction: float = 1.0, seed: int = 0, *,
               task: str | None = None, preset: str | None = "tiny", data: str | None = "synth",
               device: str | torch.device | None = "cpu", checkpoint: str | None = None) -> dict[str, Any]:
    """Time the ``cached`` linear probe (cold cache, then warm) against the ``augmented`` one on the
    same data and encoder; report wall times, the speed-up and the main-metric difference.

    ``task`` (a ``<dataset>-cls`` name) may be given instead of ``dataset``. The feature cache of
    the probe lives in a temporary folder, so the cold run is really cold.
    """
    import methods  # noqa: F401  (registers methods)
    from bench.api import METHODS
    from bench.data.prepare import prepare_dataset
    from bench.env import resolve_device

    if task is not None:
        entry = TASKS.get(task)
        if entry.family != "linear-probe":
            raise BenchError(f"perf probe needs a linear-probe task, got {task!r} ({entry.family})")
        dataset = entry.dataset
    dataset, method = dataset or "rsna", method or "random"
    preset, data = preset or "tiny", data or "synth"
    device = resolve_device(device or "cpu")
    entry = TASKS.get(f"{dataset}-cls")
    encoder = METHODS.get(method).factory(preset, Path(checkpoint) if checkpoint else None, seed)
    prepared = prepare_dataset(dataset, data, image_size=encoder.card.image_size)
    out: dict[str, Any] = {"dataset": dataset, "method": method, "fraction": fraction, "seed": seed,
                           "preset": preset, "device": str(device), "main_metric": entry.main_metric}
    with tempfile.TemporaryDirectory(prefix="medvlp-perf-") as tmp:
        root = Path(tmp)
        results = {}
        for label, protocol in (("cached_cold", "cached"), ("cached_warm", "cached"), ("augmented", "augmented")):
            spec = RunSpec(method=method, task=entry.name, fraction=fraction, seed=seed, preset=preset,
                           protocol=protocol)
            t = time.perf_counter()
            res = run_linear_probe(encoder, prepared, spec, device, task=DATASET_TASKS[dataset], feature_root=root)
            wall = time.perf_counter() - t
            results[label] = (wall, res)
            out[f"{label}_wall_s"] = round(wall, 3)
            out[f"{label}_{entry.main_metric}"] = res.metrics[entry.main_metric]
            out[f"{label}_epochs"] = res.details["epochs_run"]
    out["speedup_cold"] = round(results["augmented"][0] / max(results["cached_cold"][0], 1e-9), 2)
    out["speedup_warm"] = round(results["augmented"][0] / max(results["cached_warm"][0], 1e-9), 2)
    out["metric_diff_augmented_minus_cached"] = (results["augmented"][1].metrics[entry.main_metric]
                                                 - results["cached_cold"][1].metrics[entry.main_metric])
    out["sizes"] = results["cached_cold"][1].details["sizes"]
    out["note"] = ("cached_cold includes feature extraction; augmented re-runs the frozen backbone on augmented "
                   "training images every epoch and reuses the cached val/test features")
    return out
