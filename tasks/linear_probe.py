"""Frozen linear probe (MGCA §5.1), protocols ``cached`` and ``augmented``.

Frozen encoder in eval mode, one ``nn.Linear`` on the pooled vector, AdamW (lr 5e-4, wd 1e-6),
batch 48, at most 50 epochs, early stopping on validation loss (patience 10), the
best-validation-loss head scores the test set.

* ``cached`` (default): features are extracted once per (method card, weights fingerprint,
  preset, dataset, split manifest, image cache, input size, precision) and cached under
  ``cache_dir()/features/``; the head then trains on the cached vectors.
* ``augmented``: MGCA's way: the frozen backbone is re-run every epoch on augmented training
  images; same head, optimiser, schedule and stopping. Validation and test use the un-augmented
  (cached) features, as MGCA evaluates on plain images. The augmentation is MGCA-*style*, not
  MGCA-exact (see :data:`LINEAR_PROBE_ANCHOR_DIFFERENCES`).

``tiny`` differs from MGCA in lr (1e-2) and batch (64): a tiny encoder's pooled features can be
small (~0.05) and a tiny run has few steps, so lr 5e-4 barely moves the head off its prior.
``tiny`` also standardizes the features (``standardize``): each dimension is shifted and scaled
by the mean and standard deviation of the *training* features (validation and test reuse them),
as MAE's linear probe does with a BatchNorm without affine parameters before the head. A tiny
encoder's pooled features have a large shared offset and per-dimension scales that differ by
orders of magnitude, and an unnormalised head trained for a few hundred steps then ranks
encoders by how well their feature scale suits Adam rather than by what the features hold.
Measured on cached ``rsna-cls`` 10% features (lr 1e-2, patience 5): a tiny MGCA's test AUROC
0.519 unstandardized, 0.601 standardized; ConVIRT's 0.532 and 0.577.

Which dataset and labels a task uses is bound in :mod:`tasks.classification`.
"""
from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from bench.api import Encoder, RunSpec, TaskOutput
from bench.data.labels import LabelSpace
from bench.errors import BenchError
from bench.progress import progress
from tasks.common.augment import augment_fn, augmentation_record
from tasks.common.evaluation import evaluate, main_value, predictions
from tasks.common.feature_cache import cached_features
from tasks.common.heads import loss_fn, n_outputs, prior_loss, scores_of, seeded_linear, targets_tensor
from tasks.common.inputs import images_of, input_size, to_input
from tasks.common.precision import autocast, precision_label
from tasks.common.rows import patients_of, split_rows, split_sizes
from tasks.common.seeding import generator
from tasks.common.settings import resolve_settings

log = logging.getLogger(__name__)

FAMILY = "linear-probe"
#: 2: the tiny preset standardizes features (``standardize``); 1: raw features at every preset.
LINEAR_PROBE_VERSION = 2
LINEAR_PROBE_PROTOCOLS = ("cached", "augmented")

#: Settings per preset. ``paper`` = MGCA §5.1; ``tiny`` is sized for a CPU minute on the ``bench``
#: corpus (64 px: the tiny backbone's size; batch 64 for training sets of up to ~8,000 images).
#: ``image_size`` is the protocol's input resolution (the runner prepares the image cache at it);
#: change it here only.
LINEAR_PROBE_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 224,
        "lr": 5e-4, "weight_decay": 1e-6, "batch_size": 48, "max_epochs": 50, "patience": 10,
        "extract_batch_size": 128, "n_boot": 1000,
        # augmented protocol only (MGCA-style; MGCA itself: RandomCrop 224 of 256, + HFlip for CheXpert)
        "aug_scale_min": 0.6, "aug_scale_max": 1.0, "aug_rotate_deg": 0.0, "aug_hflip": True,
        "standardize": False,
    },
    "tiny": {
        "image_size": 64,
        "lr": 1e-2, "weight_decay": 1e-6, "batch_size": 64, "max_epochs": 30, "patience": 5,
        "standardize": True,
        "extract_batch_size": 256, "n_boot": 200,
        "aug_scale_min": 0.6, "aug_scale_max": 1.0, "aug_rotate_deg": 0.0, "aug_hflip": True,
    },
}


def _tiny_difference() -> str:
    t, p = LINEAR_PROBE_SETTINGS["tiny"], LINEAR_PROBE_SETTINGS["paper"]
    return (f"MGCA: the tiny preset trains with lr {t['lr']:g}, batch {t['batch_size']}, at most {t['max_epochs']} "
            f"epochs and patience {t['patience']} at {t['image_size']} px (the paper preset keeps MGCA's "
            f"{p['lr']:g}, {p['batch_size']}, {p['max_epochs']}, {p['patience']} at {p['image_size']} px).")


def _standardize_difference() -> str:
    on = [name for name, s in LINEAR_PROBE_SETTINGS.items() if s["standardize"]]
    return (f"MGCA: with `standardize` (on in presets: {', '.join(on)}) each feature dimension is standardized with "
            "the training features' mean and standard deviation before the linear head (as MAE's BatchNorm without "
            "affine parameters), where MGCA feeds the raw pooled features.")


#: Where every linear-probe task differs from MGCA's protocol (dataset-specific ones are added
#: by :mod:`tasks.classification`).
LINEAR_PROBE_ANCHOR_DIFFERENCES: tuple[str, ...] = (
    "MGCA: the default `cached` protocol trains the head on features of plain images extracted once, without "
    "MGCA's 256->224 random crop or any other augmentation; MGCA re-runs the frozen encoder on augmented "
    "images every epoch.",
    "MGCA: the `augmented` protocol is MGCA-style, not exact: a random resized crop (area 0.6-1, aspect "
    "3/4-4/3, zoomed back to the input size) plus a horizontal flip for every dataset, where MGCA takes a "
    "random 224 crop of a 256 resize and only CheXpert's Moco2 transform flips (and adds colour jitter, "
    "greyscale and blur).",
    "MGCA: validation and test see the whole letterboxed image resized to the input size, where MGCA "
    "resizes to 256 and centre-crops 224.",
    "MGCA: a ResNet-50 sees the protocol's input size, where MGCA's ResNet linear probe upsamples its input "
    "to 299 inside forward().",
    "MGCA: label fractions are nested, patient-level, label-stratified subsets of the split manifest "
    "(1% inside 10% inside 100%), where MGCA draws df.sample(frac, random_state=42) on training rows.",
    "MGCA: each seed is a separate result with 95% patient-level bootstrap CIs on the test metrics, where "
    "MGCA reports a single seed without an interval.",
    _tiny_difference(),
    _standardize_difference(),
)

#: BatchNorm's epsilon, but relative to the mean variance of the dimensions: a dimension that is
#: (nearly) constant on the training set stays finite (an exactly constant one maps to 0), and the
#: probe stays invariant to a global rescaling of the features, which an absolute epsilon breaks
#: (it would silence near-dead dimensions of small-scale features and amplify those of large-scale
#: ones).
STANDARDIZE_EPS = 1e-5


@dataclass(frozen=True)
class FeatureStandardizer:
    """Per-dimension ``(x - mean) / sqrt(var + eps * mean(var))`` with statistics of the training
    features."""
    mean: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def fit(cls, x_train: torch.Tensor) -> "FeatureStandardizer":
        x = x_train.double()
        var = x.var(0, unbiased=False)
        floor = (STANDARDIZE_EPS * var.mean()).clamp_min(1e-30)
        return cls(x.mean(0).float(), (var + floor).rsqrt().float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.to(x.device)) * self.scale.to(x.device)


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
                     labels: Callable[[Any], LabelSpace], main_metric: str,
                     feature_root: Path | None = None) -> TaskOutput:
    """Train a linear head on the frozen encoder's pooled features; ``labels`` reads the label space
    from the table, ``main_metric`` is reported on validation."""
    device = torch.device(device)
    protocol = spec.protocol or LINEAR_PROBE_PROTOCOLS[0]
    if protocol not in LINEAR_PROBE_PROTOCOLS:
        raise BenchError(f"linear probe has no protocol {protocol!r} (protocols: {', '.join(LINEAR_PROBE_PROTOCOLS)})")
    settings = resolve_settings(LINEAR_PROBE_SETTINGS[spec.preset], spec.overrides)
    size = input_size(settings)
    space = labels(data.table)
    rows = split_rows(data, space, spec.fraction)
    encoder = encoder.to(device).eval()   # frozen: every backbone pass below runs under no_grad
    t0 = time.perf_counter()
    standardize = bool(settings["standardize"])
    # val / test (and, for the cached protocol or standardization statistics, train) features come
    # from the cache; the augmented protocol standardizes with the statistics of plain images
    need = np.concatenate([rows.val, rows.test] + ([rows.train] if protocol == "cached" or standardize else []))
    cf = cached_features(encoder, data, need, preset=spec.preset, device=device,
                         batch_size=int(settings["extract_batch_size"]), image_size=size, root=feature_root)
    n_v, n_t = len(rows.val), len(rows.test)
    x_val = torch.from_numpy(cf.features[:n_v])
    x_test = torch.from_numpy(cf.features[n_v:n_v + n_t])
    x_train_plain = torch.from_numpy(cf.features[n_v + n_t:]) if len(need) > n_v + n_t else None
    norm: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # noqa: E731
    if standardize:
        assert x_train_plain is not None
        norm = FeatureStandardizer.fit(x_train_plain)
        x_val, x_test = norm(x_val), norm(x_test)
    t_features = time.perf_counter() - t0
    y_train = targets_tensor(space, rows.train)
    y_val = targets_tensor(space, rows.val)

    if protocol == "cached":
        assert x_train_plain is not None
        x_train = norm(x_train_plain)
        batch_features: Callable[[np.ndarray, int], torch.Tensor] = lambda idx, epoch: x_train[idx]  # noqa: E731
    else:
        g_aug = generator(spec.seed, "augment")
        aug = augment_fn(settings)

        @torch.no_grad()
        def batch_features(idx: np.ndarray, epoch: int) -> torch.Tensor:
            imgs = images_of(data, rows.train[idx]).to(device).float() / 255.0
            with autocast(device):
                pooled = encoder.image_features(to_input(encoder, aug(imgs, g_aug), device, size)).pooled
            return norm(pooled.float())

    t1 = time.perf_counter()
    fit = fit_linear_head(batch_features, len(rows.train), y_train, x_val, y_val, in_dim=encoder.card.embed_dim,
                          kind=space.kind, n_out=n_outputs(space), settings=settings, seed=spec.seed, device=device)
    t_train = time.perf_counter() - t1
    with torch.no_grad():
        p_val = scores_of(space.kind, fit.head(x_val.to(device)))
        p_test = scores_of(space.kind, fit.head(x_test.to(device)))
    y_val_np, y_test_np = space.targets[rows.val], space.targets[rows.test]
    values, cis, extra = evaluate(space, y_val_np, p_val, y_test_np, p_test, patients_of(data, rows.test),
                                  n_boot=int(settings["n_boot"]), seed=spec.seed)
    details = {
        "family": FAMILY, "protocol": protocol, "settings": settings, "classes": list(space.classes),
        "label_kind": space.kind, "label_policy": space.policy, "sizes": split_sizes(data, rows),
        "epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch, "best_val_loss": fit.best_val_loss,
        "stop_reason": fit.stop_reason,
        "early_stopping": f"val_loss, patience {settings['patience']}",
        "val_main_metric": main_value(space, main_metric, y_val_np, p_val),
        "history": fit.history,
        "prior_loss": prior_loss(space.kind, y_train, n_outputs(space)),
        "feature_cache": {"path": str(cf.path), "hit_rows": cf.hit_rows, "extracted_rows": cf.extracted_rows},
        "timing_s": {"features": round(t_features, 3), "head": round(t_train, 3)},
        "precision": precision_label(device), "image_size": size,
        "input_array_size": int(data.images.array.shape[-1]),
        **extra,
    }
    if protocol == "augmented":
        details["augmentation"] = augmentation_record(settings)
    return TaskOutput(metrics=values, ci=cis, details=details, predictions=predictions(data, space, rows.test, p_test))


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
    import tasks  # noqa: F401  (registers the tasks this probe looks up)
    from bench.api import METHODS, TASKS
    from bench.data.prepare import prepare_dataset
    from bench.env import resolve_device

    if task is not None:
        entry = TASKS.get(task)
        if entry.family != FAMILY:
            raise BenchError(f"perf probe needs a linear-probe task, got {task!r} ({entry.family})")
        dataset = entry.dataset
    dataset, method = dataset or "rsna", method or "random"
    preset, data = preset or "tiny", data or "synth"
    device = resolve_device(device or "cpu")
    entry = TASKS.get(f"{dataset}-cls")
    encoder = METHODS.get(method).factory(preset, Path(checkpoint) if checkpoint else None, seed, data=data)
    # the image cache at the protocol's input size, as the runner prepares it
    prepared = prepare_dataset(dataset, data, image_size=input_size(LINEAR_PROBE_SETTINGS[preset]))
    out: dict[str, Any] = {"dataset": dataset, "method": method, "fraction": fraction, "seed": seed,
                           "preset": preset, "device": str(device), "main_metric": entry.main_metric}
    with tempfile.TemporaryDirectory(prefix="medvlp-perf-") as tmp:
        root = Path(tmp)
        results = {}
        for label, protocol in (("cached_cold", "cached"), ("cached_warm", "cached"), ("augmented", "augmented")):
            spec = RunSpec(method=method, task=entry.name, fraction=fraction, seed=seed, preset=preset,
                           protocol=protocol)
            t = time.perf_counter()
            res = entry.run(encoder, prepared, spec, device, feature_root=root)
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
