"""Method ``supervised``: the preset's image backbone trained on the CheXpert-style labels of the
MIMIC-CXR pretraining split (the images the vision-language methods pretrain on, with labels
instead of reports). It is the reference a report-supervised method must be compared with: what
the same images teach when a labeller has already read the reports.

Training data and objective
---------------------------
* Images: frontal (PA/AP) images of MIMIC-CXR's official ``train`` split, letterboxed to the
  preset's input size; the ``validate`` split is scored after every epoch (logged only: the final
  epoch's weights are kept, so the weights are a pure function of data, settings and seed).
* Labels: the 14 observations of ``mimic-cxr-2.0.0-chexpert.csv`` (study level, given to each of
  the study's images): 1 -> positive, 0 -> negative, blank (not mentioned) -> negative, -1
  (uncertain) -> left out of the loss (masked), the choice of CheXpert's "U-ignore" baseline.
* Loss: mean binary cross-entropy over the labelled (image, observation) pairs, with a linear head
  on the pooled feature; the head is dropped afterwards.
* Augmentation: the fine-tune augmentation (random resized crop, small rotation, no flip).

Where the weights come from
---------------------------
* ``--checkpoint PATH`` (any data): a file written by ``python -m bench pretrain --method
  supervised`` (or any state dict of the preset's backbone), loaded with full key coverage;
* synthetic data without a checkpoint: this method's own pretraining on the synthetic corpus,
  run on first use (progress bar) and cached under ``cache_dir()/pretrained/supervised/`` by
  (preset, settings, MIMIC split-manifest hash, image cache), then reused;
* real data without a checkpoint: an error that says how to train one on a MIMIC-CXR root.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.api import METHODS, Capability, MethodEntry
from bench.errors import CheckpointError
from bench.paths import cache_dir
from bench.pretrain import PretrainConfig, folder_lock, generator, pretrain
from methods.backbones import (HALF_MEAN, HALF_STD, TimmEncoder, backbone_preset, file_sha256, load_checkpoint_strict,
                               make_card, read_state_dict, seeded_backbone)

log = logging.getLogger(__name__)

NAME = "supervised"
CAPABILITIES = frozenset({Capability.IMAGE_GLOBAL, Capability.IMAGE_DENSE, Capability.TRAINABLE})
PRETRAIN_DATASET = "mimic-cxr"
#: Bump when the training recipe changes in a way the settings below do not show.
RECIPE_VERSION = 1
#: The pretraining seed is fixed: one set of weights per (preset, corpus), shared by every run seed
#: (the run seed varies the downstream head, shuffling and bootstrap, as for every pretrained method).
PRETRAIN_SEED = 0
WEIGHTS_FILE = "backbone.safetensors"
META_FILE = "meta.json"


@dataclass(frozen=True)
class SupervisedRecipe:
    config: PretrainConfig
    aug_scale: tuple[float, float] = (0.7, 1.0)
    aug_rotate_deg: float = 10.0
    eval_batch_size: int = 128


#: Per preset. ``tiny`` is sized for a few CPU minutes on the synthetic corpus (measured in the
#: issue note); ``paper`` is a conventional ImageNet-style schedule for ResNet-50 at 224 on GPU.
RECIPES: dict[str, SupervisedRecipe] = {
    "tiny": SupervisedRecipe(PretrainConfig(epochs=8, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_steps=30,
                                            grad_clip=1.0, seed=PRETRAIN_SEED)),
    "paper": SupervisedRecipe(PretrainConfig(epochs=30, batch_size=128, lr=3e-4, weight_decay=1e-4, warmup_steps=500,
                                             grad_clip=1.0, seed=PRETRAIN_SEED)),
}


def recipe(preset: str) -> SupervisedRecipe:
    try:
        return RECIPES[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(RECIPES)}") from None


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------

def label_targets(raw: np.ndarray) -> np.ndarray:
    """Raw chexpert.csv codes -> BCE targets: 1 -> 1, 0 and blank -> 0, -1 -> NaN (masked)."""
    raw = np.asarray(raw, dtype=np.float32)
    out = np.where(np.isnan(raw), 0.0, raw).astype(np.float32)
    out[raw == -1] = np.nan
    return out


@dataclass
class TrainingSet:
    data: Any                      # PreparedData of MIMIC-CXR
    train_rows: np.ndarray
    val_rows: np.ndarray
    targets: np.ndarray            # float32 [len(table), 14], NaN = masked
    classes: tuple[str, ...]


def training_set(data: Any) -> TrainingSet:
    from bench.errors import DataError

    frame = data.table.frame
    frontal = np.isin(frame["view"].to_numpy(dtype=object), ["PA", "AP"])
    train = np.sort(np.asarray(data.manifest.rows("train", 1.0), dtype=np.int64))
    val = np.sort(np.asarray(data.manifest.rows("val", 1.0), dtype=np.int64))
    train, val = train[frontal[train]], val[frontal[val]]
    if len(train) == 0:
        raise DataError("no frontal (PA/AP) images in the MIMIC-CXR train split", path=data.table.root)
    return TrainingSet(data, train, val, label_targets(data.table.labels), tuple(data.table.classes))


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mask = torch.isfinite(y)
    per = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(y, nan=0.0), reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


class _LabelModel(nn.Module):
    def __init__(self, encoder: TimmEncoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.card.embed_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.image_features(x).pooled)


# ---------------------------------------------------------------------------------------------
# Pretraining (on demand) and the cached checkpoint
# ---------------------------------------------------------------------------------------------

def _prepare_mimic(data: str, image_size: int) -> Any:
    from bench.data.prepare import prepare_dataset

    return prepare_dataset(PRETRAIN_DATASET, data, image_size=image_size)


def weights_key(preset: str, mimic: Any) -> dict[str, Any]:
    """Everything the cached weights depend on."""
    p = backbone_preset(preset)
    r = recipe(preset)
    return {"method": NAME, "recipe_version": RECIPE_VERSION, "preset": preset, "backbone": p.describe(),
            "image_size": p.image_size, "config": r.config.to_dict(), "aug_scale": list(r.aug_scale),
            "aug_rotate_deg": r.aug_rotate_deg, "dataset": PRETRAIN_DATASET,
            "manifest_sha256": mimic.source.get("manifest_sha256"),
            "image_cache": mimic.images.fingerprint, "source_kind": mimic.source.get("kind")}


def weights_dir(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "pretrained" / NAME / f"{key['preset']}-{digest}"


def train_supervised(preset: str, data: str = "synth", *, out_dir: Path | None = None, resume: bool = True,
                     device: str | torch.device = "auto") -> Path:
    """Pretrain on MIMIC-CXR labels from ``data`` ("synth" or a MIMIC-CXR-JPG root); return the
    folder holding ``backbone.safetensors`` and ``meta.json``. A finished folder is reused; an
    interrupted one resumes from its last epoch (``resume``)."""
    from safetensors.torch import save_file

    from bench.env import resolve_device, set_determinism
    from tasks.common.augment import augment
    from tasks.common.inputs import images_of, to_input

    p = backbone_preset(preset)
    r = recipe(preset)
    mimic = _prepare_mimic(data, p.image_size)
    key = weights_key(preset, mimic)
    final = Path(out_dir) if out_dir is not None else weights_dir(key)
    with folder_lock(final):
        if (final / WEIGHTS_FILE).is_file() and (final / META_FILE).is_file():
            return final
        work = final.with_name(final.name + ".work")
        if not resume and work.exists():
            shutil.rmtree(work)
        dev = resolve_device(device)
        set_determinism(r.config.seed)
        ts = training_set(mimic)
        encoder = _build(preset, seed=r.config.seed, weights_tag="training", sha=None)
        model = _LabelModel(encoder, len(ts.classes))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r.config.seed)
            model.head.reset_parameters()
        bs = r.config.batch_size
        targets = torch.from_numpy(ts.targets)
        steps = -(-len(ts.train_rows) // bs)

        def batches(epoch: int):
            perm = torch.randperm(len(ts.train_rows), generator=generator(r.config.seed, f"shuffle:{epoch}")).numpy()
            g_aug = generator(r.config.seed, f"augment:{epoch}")
            for start in range(0, len(perm), bs):
                rows = ts.train_rows[perm[start:start + bs]]
                imgs = images_of(mimic, rows).to(dev).float() / 255.0
                x = to_input(encoder, augment(imgs, g_aug, scale=r.aug_scale, rotate_deg=r.aug_rotate_deg, hflip=False),
                             dev, p.image_size)
                yield x, targets[rows].to(dev)

        def objective(batch):
            x, y = batch
            return {"bce": masked_bce(model(x), y)}

        def evaluate() -> dict[str, float]:
            from bench import metrics as M

            if len(ts.val_rows) == 0:
                return {}
            logits = []
            for start in range(0, len(ts.val_rows), r.eval_batch_size):
                rows = ts.val_rows[start:start + r.eval_batch_size]
                logits.append(model(to_input(encoder, images_of(mimic, rows), dev, p.image_size)).float().cpu())
            lg = torch.cat(logits)
            y = targets[ts.val_rows]
            yv = y.numpy().copy()
            return {"val_bce": float(masked_bce(lg, y)),
                    "val_auroc_macro": M.auroc_macro(np.nan_to_num(yv, nan=0.0), torch.sigmoid(lg).numpy().astype(np.float64))}

        log.info("%s: pretraining %s on %d frontal MIMIC-CXR train images (%s data), %d epochs -> %s", NAME,
                 p.describe(), len(ts.train_rows), mimic.source.get("kind"), r.config.epochs, final)
        t0 = time.perf_counter()
        outcome = pretrain(model, [{"params": list(model.parameters())}], objective, batches, steps, r.config,
                           work_dir=work, device=dev, resume=resume, desc=f"{NAME} pretraining", evaluate=evaluate)
        encoder.cpu()
        tmp = final.with_name(final.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        meta = {"key": key, "train_images": int(len(ts.train_rows)), "val_images": int(len(ts.val_rows)),
                "classes": list(ts.classes), "history": outcome.history, "steps": outcome.steps,
                "resumed_from_epoch": outcome.resumed_from_epoch, "seconds": round(time.perf_counter() - t0, 1),
                "device": str(dev), "label_policy": "1 -> 1; 0, blank -> 0; -1 masked (U-ignore)"}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        shutil.copy(work / "log.csv", tmp / "log.csv")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
        log.info("%s: pretrained in %.0f s -> %s", NAME, meta["seconds"], final)
        return final


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------

def _build(preset: str, *, seed: int, weights_tag: str, sha: str | None, reference: str = "") -> TimmEncoder:
    p = backbone_preset(preset)
    model = seeded_backbone(p.arch, p.out_indices, seed, **p.kwargs)
    card = make_card(name=NAME, model=model, arch=p.describe(), image_size=p.image_size, weights_tag=weights_tag,
                     weights_sha256=sha, mean=HALF_MEAN, std=HALF_STD, capabilities=CAPABILITIES,
                     pretrain_datasets=frozenset({PRETRAIN_DATASET}),
                     reference=reference or "supervised on MIMIC-CXR CheXpert-labeler labels (harness reference)")
    return TimmEncoder(card, model)


def load_weights(preset: str, path: Path, *, weights_tag: str) -> TimmEncoder:
    """The backbone with the weights of ``path`` (a file, or a folder holding backbone.safetensors)."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    sha = file_sha256(file) if file.is_file() else None
    enc = _build(preset, seed=PRETRAIN_SEED, weights_tag=weights_tag, sha=sha,
                 reference=f"supervised on MIMIC-CXR labels, weights {file.name}")
    state = read_state_dict(file)
    prefix = "model." if any(k.startswith("model.") for k in state) and not any(
        k in enc.model.state_dict() for k in state) else ""
    cov = load_checkpoint_strict(enc.model, state, allowed_missing=(), prefix=prefix, source=str(file))
    enc.checkpoint_coverage = cov.to_dict()  # type: ignore[attr-defined]
    enc.checkpoint_path = str(file)          # type: ignore[attr-defined]
    return enc


def factory(preset: str = "tiny", checkpoint: Path | str | None = None, seed: int = 0,
            data: str = "synth") -> TimmEncoder:
    """``seed`` is the run seed: it does not change the pretrained weights (see PRETRAIN_SEED)."""
    if checkpoint is not None:
        return load_weights(preset, Path(checkpoint).expanduser(), weights_tag="supervised-mimic-labels (--checkpoint)")
    if str(data) != "synth":
        raise CheckpointError(
            f"method {NAME!r} on real data needs --checkpoint: pretrain it on your MIMIC-CXR-JPG root with "
            f"`python -m bench pretrain --method {NAME} --data /path/to/mimic-cxr-jpg/2.0.0 --preset {preset} "
            f"--out DIR`, then pass --checkpoint DIR/{WEIGHTS_FILE}")
    folder = train_supervised(preset, "synth")
    return load_weights(preset, folder, weights_tag=f"supervised-mimic-labels-synthetic-{preset}")


METHODS.add(NAME, MethodEntry(
    name=NAME, factory=factory, capabilities=CAPABILITIES, pretrain=train_supervised,
    description="backbone trained on the CheXpert-style labels of MIMIC-CXR's train split (reference for "
                "report-supervised methods); pretrained on first use on the synthetic corpus and cached"))
