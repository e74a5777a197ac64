"""One vision-language method = a :class:`VLPMethod` definition; this module does the rest.

* :func:`train_vlp`: pretraining on MIMIC-CXR image-report pairs (:mod:`methods.vlp.pairs`) through
  the shared loop (:func:`bench.pretrain.pretrain`: AdamW, warmup-cosine, clipping, accumulation,
  bf16 on CUDA, DDP under ``torchrun``, atomic per-epoch checkpoints, resume, CSV + TensorBoard
  logs). The finished folder holds ``model.safetensors`` (the whole model: towers, heads,
  prototypes), ``tokenizer.json`` and ``meta.json``. On the synthetic corpus it is cached under
  ``cache_dir()/pretrained/<method>/<preset>-<hash>`` keyed by everything the weights depend on
  (recipe, options, towers, the corpus's MIMIC split manifest and image cache), so ``bench run``
  pretrains once and reuses.
* :class:`VLPEncoder`: the :class:`bench.api.Encoder` of a trained model for every task: global
  vector (the backbone's pooled feature, as the methods' own downstream code uses), patch tokens,
  pyramid, and ``encode_image`` / ``encode_text`` in the joint space.
* :func:`make_factory`: checkpoint selection that sees the data source: ``--checkpoint`` (a folder
  of ours or the authors' released file, through the method's converter) on any data; the cached
  own pretraining on the synthetic corpus; an error naming the command on real data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bench.api import Capability, Encoder, Features, MethodCard, MethodOption, resolve_options
from bench.errors import CheckpointError
from bench.paths import cache_dir
from bench.pretrain import PretrainConfig, dist_info, folder_lock, generator, pretrain
from methods.backbones import HALF_MEAN, HALF_STD
from methods.vlp import text as T
from methods.vlp.mlm import MLMRecipe, mlm_dir, mlm_key, pretrained_text_state
from methods.vlp.model import VLPModel
from methods.vlp.pairs import PairSet, pretraining_pairs
from methods.vlp.towers import ImageSpec, ImageTower

log = logging.getLogger(__name__)

PRETRAIN_DATASET = "mimic-cxr"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
#: One set of weights per (method, preset, options, corpus); the run seed varies only the downstream run.
PRETRAIN_SEED = 0
CAPABILITIES = frozenset({Capability.IMAGE_GLOBAL, Capability.IMAGE_DENSE, Capability.TEXT, Capability.TRAINABLE})

#: Options every vision-language method takes (``--set <method>.<key>=value``).
COMMON_OPTIONS: dict[str, MethodOption] = {
    "image_arch": MethodOption("resnet", "image tower: resnet (tiny: half-width ResNet-18 at 64 px; paper: ResNet-50) "
                                         "or vit (tiny: a 4-block ViT, patch 8; paper: ViT-B/16 at 224)"),
    "text_model_dir": MethodOption(None, f"paper preset: local BERT directory (else ${T.BERT_DIR_ENV})",
                                   affects_weights=False),
    "epochs": MethodOption(None, "pretraining epochs (default: the recipe's)"),
}


@dataclass(frozen=True)
class VLPRecipe:
    config: PretrainConfig
    aug_scale: tuple[float, float] = (0.7, 1.0)   # random resized crop (MGCA: crop 224 of a 256 pad-resize)
    embed_dim: int = 128
    head_hidden: int = 512
    #: learning-rate multiplier of the text tower (a pretrained BERT is tuned gently; heads and image
    #: tower learn at the recipe's rate)
    text_lr_mult: float = 1.0


#: The tiny preset's optimisation, one place for every vision-language method (a method keeps only what
#: its published recipe fixes, GLoRIA's gradient clipping): the methods then differ in their objectives,
#: not in how long or how fast they were trained.
TINY_EPOCHS = 8
TINY_BATCH = 64
TINY_LR = 1e-3


def tiny_recipe(options: Mapping[str, Any], *, grad_clip: float = 1.0) -> VLPRecipe:
    """The shared tiny recipe; ``options["epochs"]`` (the common ``epochs`` option) overrides the length."""
    return VLPRecipe(PretrainConfig(epochs=int(options.get("epochs") or TINY_EPOCHS), batch_size=TINY_BATCH,
                                    lr=TINY_LR, weight_decay=0.05, warmup_steps=60, grad_clip=grad_clip,
                                    seed=PRETRAIN_SEED))


@dataclass(frozen=True)
class VLPMethod:
    name: str
    reference: str
    recipe_version: int
    options: Mapping[str, MethodOption]
    #: (preset, options) -> VLPRecipe
    recipe: Callable[[str, Mapping[str, Any]], VLPRecipe]
    #: (preset, options) -> TextSpec
    text_spec: Callable[[str, Mapping[str, Any]], T.TextSpec]
    #: (image tower, text tower, recipe, options) -> VLPModel
    build: Callable[[ImageTower, T.TextTower, VLPRecipe, Mapping[str, Any]], VLPModel]
    #: an authors' checkpoint file -> (our state dict, report) (None: no released weights)
    convert_file: Callable[..., tuple[dict[str, torch.Tensor], Any]] | None = None

    def all_options(self) -> dict[str, MethodOption]:
        return {**COMMON_OPTIONS, **dict(self.options)}


def image_spec(preset: str, options: Mapping[str, Any]) -> ImageSpec:
    arch = options.get("image_arch", "resnet")
    if preset == "tiny":
        if arch == "resnet":   # the same backbone as random/supervised at tiny, so the comparison is fair
            return ImageSpec("resnet", "resnet18", 64, (("channels", (32, 64, 128, 256)),))
        return ImageSpec("vit", "vit_tiny_patch16_224", 64, (("depth", 4), ("embed_dim", 128), ("num_heads", 4),
                                                              ("patch_size", 8)))
    if arch == "resnet":
        return ImageSpec("resnet", "resnet50", 224, upsample_to=299)
    return ImageSpec("vit", "vit_base_patch16_224", 224)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def build_text_tower(method: VLPMethod, preset: str, options: Mapping[str, Any], *, tokenizer: Any,
                     seed: int) -> T.TextTower:
    spec = method.text_spec(preset, options)
    if spec.kind == "tiny-wordpiece":
        bert = T.build_bert(spec, vocab_size=T.tokenizer_vocab_size(tokenizer), seed=seed)
    else:
        bert = T.load_local_bert(Path(spec.model_dir), spec.num_layers)
    return T.TextTower(bert, tokenizer, spec)


def build_model(method: VLPMethod, preset: str, options: Mapping[str, Any], *, tokenizer: Any,
                seed: int = PRETRAIN_SEED) -> VLPModel:
    image = ImageTower(image_spec(preset, options), seed=seed)
    text = build_text_tower(method, preset, options, tokenizer=tokenizer, seed=seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return method.build(image, text, method.recipe(preset, options), options)


def paper_tokenizer(method: VLPMethod, options: Mapping[str, Any]) -> tuple[Any, T.TextSpec]:
    d = T.resolve_bert_dir(options.get("text_model_dir"), method.name)
    return T.local_tokenizer(d), method.text_spec("paper", {**options, "text_model_dir": str(d)})


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------

def weights_key(method: VLPMethod, preset: str, options: Mapping[str, Any], mimic: Any) -> dict[str, Any]:
    r = method.recipe(preset, options)
    known = method.all_options()
    keyed = {k: v for k, v in sorted(options.items()) if known[k].affects_weights}
    return {"method": method.name, "recipe_version": method.recipe_version, "preset": preset, "options": keyed,
            "image": image_spec(preset, options).to_dict(), "text": method.text_spec(preset, options).to_dict(),
            "config": r.config.to_dict(), "aug_scale": list(r.aug_scale), "embed_dim": r.embed_dim,
            "text_mlm": MLMRecipe().to_dict() if method.text_spec(preset, options).init == "mlm" else None,
            "head_hidden": r.head_hidden, "text_lr_mult": r.text_lr_mult, "dataset": PRETRAIN_DATASET,
            "manifest_sha256": mimic.source.get("manifest_sha256"), "image_cache": mimic.images.fingerprint,
            "source_kind": mimic.source.get("kind")}


def weights_dir(key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "pretrained" / key["method"] / f"{key['preset']}-{digest}"


@dataclass
class PairTensors:
    """A split's pairs with every caption tokenised once."""

    pairs: PairSet
    tokens: T.TokenBatch


def _tokenised(pairs: PairSet, tower: T.TextTower) -> PairTensors:
    return PairTensors(pairs, tower.tokenize(pairs.captions))


def _batch(data: Any, rows: np.ndarray, tokens: T.TokenBatch, *, encoder_prepare: Callable[[torch.Tensor], torch.Tensor],
           size: int, device: torch.device, g_aug: torch.Generator | None, aug_scale: tuple[float, float]):
    from tasks.common.augment import augment
    from tasks.common.inputs import images_of

    imgs = images_of(data, rows).to(device).float() / 255.0
    if g_aug is not None:
        imgs = augment(imgs, g_aug, scale=aug_scale, rotate_deg=0.0, hflip=False)  # laterality is in the reports
    if imgs.shape[-1] != size:
        imgs = torch.nn.functional.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False,
                                               antialias=True)
    return encoder_prepare(imgs), tokens.to(device)


def _prepare_fn(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(HALF_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(HALF_STD, device=device).view(1, -1, 1, 1)
    return lambda x: (x.expand(-1, 3, -1, -1) - mean) / std


def train_vlp(method: VLPMethod, preset: str, data: str = "synth", *, options: Mapping[str, Any] | None = None,
              out_dir: Path | None = None, resume: bool = True, device: str | torch.device = "auto") -> Path:
    """Pretrain ``method`` on the MIMIC-CXR pairs of ``data``; return the weights folder (reused when finished)."""
    from safetensors.torch import save_file

    from bench.data.prepare import prepare_dataset
    from bench.env import resolve_device, set_determinism

    options = resolve_options(method.name, method.all_options(), options or {})
    r = method.recipe(preset, options)
    ispec = image_spec(preset, options)
    mimic = prepare_dataset(PRETRAIN_DATASET, data, image_size=ispec.image_size)
    key = weights_key(method, preset, options, mimic)
    final = Path(out_dir) if out_dir is not None else weights_dir(key)
    rank, world = dist_info()
    lock = folder_lock(final) if rank == 0 else contextlib.nullcontext()
    with lock:
        if (final / WEIGHTS_FILE).is_file() and (final / META_FILE).is_file():
            return final
        work = final.with_name(final.name + ".work")
        if not resume and work.exists() and rank == 0:
            shutil.rmtree(work)
        dev = resolve_device(device)
        if dev.type == "cuda" and world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        set_determinism(r.config.seed)
        train, val = pretraining_pairs(mimic, "train"), pretraining_pairs(mimic, "val")
        if len(train) == 0:
            from bench.errors import DataError

            raise DataError(f"no MIMIC-CXR train pairs (skipped: {train.skipped})", path=mimic.table.root)
        if preset == "tiny":
            spec = method.text_spec(preset, options)
            tokenizer = T.fast_tokenizer(T.train_wordpiece(train.captions, spec.vocab_size))
        else:
            tokenizer, _ = paper_tokenizer(method, options)
            options = {**options, "text_model_dir": str(T.resolve_bert_dir(options.get("text_model_dir"), method.name))}
        model = build_model(method, preset, options, tokenizer=tokenizer)
        text_init: dict[str, Any] = {"init": model.text.spec.init}
        if model.text.spec.init == "mlm":      # the tiny preset's pretrained clinical BERT (methods.vlp.mlm)
            state = pretrained_text_state(train.captions, tokenizer, model.text.spec, MLMRecipe(), device=dev)
            model.text.bert.load_state_dict(state, strict=True)
            text_init["mlm_dir"] = str(mlm_dir(mlm_key(train.captions, tokenizer, model.text.spec, MLMRecipe())))
        train_t, val_t = _tokenised(train, model.text), _tokenised(val, model.text)
        prepare = _prepare_fn(dev)
        bs = r.config.batch_size
        if bs % world:
            raise ValueError(f"batch size {bs} is not divisible by the {world} DDP ranks")
        steps = len(train) // bs          # full batches only: a contrastive loss on a 3-pair batch is noise

        def batches(epoch: int):
            model.current_epoch = epoch
            perm = torch.randperm(len(train), generator=generator(r.config.seed, f"shuffle:{epoch}")).numpy()
            g_aug = generator(r.config.seed, f"augment:{epoch}:rank{rank}")
            for s in range(steps):
                idx = perm[s * bs:(s + 1) * bs][rank::world]     # this rank's share of the global batch
                yield _batch(mimic, train.rows[idx], train_t.tokens[torch.from_numpy(idx)], encoder_prepare=prepare,
                             size=ispec.image_size, device=dev, g_aug=g_aug, aug_scale=r.aug_scale)

        runner_model: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model.to(dev)
            runner_model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                               find_unused_parameters=True)

        def objective(batch):
            images, tokens = batch
            return runner_model(images, tokens)

        def evaluate() -> dict[str, float]:
            if len(val) < 2:
                return {}
            sums: dict[str, float] = {}
            n = 0
            for s in range(0, len(val) - 1, bs):
                rows = np.arange(s, min(s + bs, len(val)))
                if len(rows) < 2:
                    break
                x, tok = _batch(mimic, val.rows[rows], val_t.tokens[torch.from_numpy(rows)], encoder_prepare=prepare,
                                size=ispec.image_size, device=dev, g_aug=None, aug_scale=r.aug_scale)
                for k, v in model(x, tok).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(rows)
                n += len(rows)
            out = {f"val_{k}": v / n for k, v in sums.items()}
            out["val_loss"] = sum(out.values())
            return out

        log.info("%s: pretraining on %d MIMIC-CXR image-report pairs (%s data; skipped %s), %d epochs, batch %d "
                 "over %d rank(s) -> %s", method.name, len(train), mimic.source.get("kind"), train.skipped,
                 r.config.epochs, bs, world, final)
        t0 = time.perf_counter()
        frozen = lambda: model.frozen_parameters()  # noqa: E731
        text_ids = {id(p) for p in model.text.parameters()}
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in text_ids]},
                  {"params": [p for p in model.text.parameters() if p.requires_grad],
                   "lr": r.config.lr * r.text_lr_mult}]
        outcome = pretrain(model, [g for g in groups if g["params"]], objective,
                           batches, steps, r.config, work_dir=work, device=dev, resume=resume,
                           desc=f"{method.name} pretraining", evaluate=evaluate, frozen=frozen,
                           record={"contrast_scope": model.contrast_scope, "world_size": world})
        if rank != 0:
            return final
        model.cpu()
        tmp = final.with_name(final.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        if preset == "tiny":
            T.save_tokenizer(tokenizer, tmp)
        meta = {"key": key, "options": {k: v for k, v in options.items()}, "train": train.summary(),
                "val": val.summary(), "history": outcome.history, "steps": outcome.steps,
                "resumed_from_epoch": outcome.resumed_from_epoch, "seconds": round(time.perf_counter() - t0, 1),
                "device": str(dev), "world_size": world, "contrast_scope": model.contrast_scope,
                "tokenizer": T.describe_tokenizer(tokenizer), "model": model.describe(), "text_init": text_init}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        for name in ("log.csv",):
            if (work / name).is_file():
                shutil.copy(work / name, tmp / name)
        if (work / "tensorboard").is_dir():
            shutil.copytree(work / "tensorboard", tmp / "tensorboard")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
        log.info("%s: pretrained in %.0f s -> %s", method.name, meta["seconds"], final)
        return final


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------

class VLPEncoder(Encoder):
    """A trained :class:`VLPModel` as an Encoder (image features for every task, joint space for text tasks)."""

    def __init__(self, card: MethodCard, model: VLPModel) -> None:
        super().__init__(card)
        self.model = model
        self.model.eval()

    def image_features(self, x: torch.Tensor) -> Features:
        # no 299 px upsampling here (MGCA-ResNet's pretraining input): the pyramid must keep the strides
        # the card declares for the run's input size; a task that wants 299 sets its image_size
        out = self.model.image(x, upsample=False)
        last = out.pyramid[-1]
        return Features(pooled=out.global_, patches=last.flatten(2).transpose(1, 2), pyramid=list(out.pyramid))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.image_embedding(x)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        if self.model.text.tokenizer is None:
            raise CheckpointError(f"{self.card.name}: no tokenizer (paper preset: set {self.card.name}.text_model_dir "
                                  f"or ${T.BERT_DIR_ENV})")
        dev = next(self.model.parameters()).device
        return self.model.text_embedding(self.model.text.tokenize(list(texts)).to(dev))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.model.image.parameters())


def make_card(method: VLPMethod, model: VLPModel, *, weights_tag: str, sha: str | None, reference: str) -> MethodCard:
    tower = model.image
    text = model.text.spec
    return MethodCard(
        name=method.name, backbone=tower.spec.describe(), weights_tag=weights_tag, weights_sha256=sha,
        image_size=tower.spec.image_size, mean=HALF_MEAN, std=HALF_STD, embed_dim=tower.global_dim,
        feature_channels=tower.channels, feature_strides=tower.strides, patch_dim=tower.channels[-1],
        capabilities=CAPABILITIES, joint_dim=int(model.embed_dim),
        pretrain_datasets=frozenset({PRETRAIN_DATASET}), reference=reference,
        pooling="cls" if tower.spec.arch == "vit" else "avg", local_stride=tower.strides[tower.local_level],
        text_tokenizer=text.kind, text_max_length=text.max_length)


def load_folder(method: VLPMethod, preset: str, folder: Path, options: Mapping[str, Any], *, weights_tag: str) -> VLPEncoder:
    """A folder written by :func:`train_vlp` (``model.safetensors`` + ``tokenizer.json`` + ``meta.json``)."""
    from safetensors.torch import load_file

    from methods.backbones import file_sha256, load_checkpoint_strict

    folder = Path(folder)
    wfile = folder / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (expected a folder written by `bench pretrain --method "
                              f"{method.name}`)")
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
    saved = {**dict(meta.get("options") or {}), **{k: v for k, v in options.items() if v is not None}}
    opts = resolve_options(method.name, method.all_options(), {k: v for k, v in saved.items()
                                                               if k in method.all_options()})
    if (folder / T.TOKENIZER_FILE).is_file():
        tokenizer = T.fast_tokenizer(folder / T.TOKENIZER_FILE)
    elif preset == "paper":
        tokenizer, _ = paper_tokenizer(method, opts)
    else:
        raise CheckpointError(f"{folder}: no {T.TOKENIZER_FILE} beside the weights")
    model = build_model(method, preset, opts, tokenizer=tokenizer)
    cov = load_checkpoint_strict(model, load_file(str(wfile)), allowed_missing=(), source=str(wfile))
    sha = file_sha256(wfile)
    enc = VLPEncoder(make_card(method, model, weights_tag=weights_tag, sha=sha,
                               reference=f"{method.reference}; weights {wfile}"), model)
    enc.checkpoint_coverage = cov.to_dict()  # type: ignore[attr-defined]
    return enc


def load_official(method: VLPMethod, preset: str, file: Path, options: Mapping[str, Any]) -> VLPEncoder:
    """The authors' released file, through the method's converter (full key coverage required)."""
    from methods.backbones import file_sha256

    if method.convert_file is None:
        raise CheckpointError(f"{file}: {method.name} has no released checkpoint format to convert; pass a folder "
                              f"written by `bench pretrain --method {method.name}`")
    opts = resolve_options(method.name, method.all_options(), dict(options))
    try:
        tokenizer, _ = paper_tokenizer(method, opts)
    except CheckpointError:
        tokenizer = None   # image-only use; encode_text then says what is missing
    model = build_model(method, preset, opts, tokenizer=tokenizer) if tokenizer is not None else None
    if model is None:
        raise CheckpointError(f"{file}: building {method.name}'s text tower needs a local BERT directory "
                              f"(--set {method.name}.text_model_dir=DIR or ${T.BERT_DIR_ENV})")
    from methods.vlp.convert import load_converted

    state, report = method.convert_file(file, opts)
    load_converted(model, state, report)
    enc = VLPEncoder(make_card(method, model, weights_tag=f"{method.name}-official", sha=file_sha256(file),
                               reference=f"{method.reference}; authors' checkpoint {file.name}"), model)
    enc.checkpoint_coverage = report.to_dict() if hasattr(report, "to_dict") else str(report)  # type: ignore[attr-defined]
    return enc


def make_factory(method: VLPMethod) -> Callable[..., VLPEncoder]:
    def factory(preset: str = "tiny", checkpoint: Path | str | None = None, seed: int = 0, data: str = "synth",
                options: Mapping[str, Any] | None = None) -> VLPEncoder:
        opts = dict(options or {})
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if path.is_dir():
                return load_folder(method, preset, path, opts, weights_tag=f"{method.name} (--checkpoint folder)")
            return load_official(method, preset, path, opts)
        if str(data) != "synth":
            raise CheckpointError(
                f"method {method.name!r} on real data needs --checkpoint: the authors' released file, or a folder "
                f"from `python -m bench pretrain --method {method.name} --data /path/to/mimic-cxr-jpg/2.0.0 "
                f"--preset {preset} --out DIR`")
        folder = train_vlp(method, preset, "synth", options=opts)
        return load_folder(method, preset, folder, opts, weights_tag=f"{method.name}-mimic-synthetic-{preset}")
    return factory


def make_pretrain(method: VLPMethod) -> Callable[..., Path]:
    def run(preset: str, data: str = "synth", *, out_dir: Path | None = None, resume: bool = True,
            device: str | torch.device = "auto", options: Mapping[str, Any] | None = None) -> Path:
        return train_vlp(method, preset, data, options=options, out_dir=out_dir, resume=resume, device=device)
    return run
