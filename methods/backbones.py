"""Shared timm image backbone for the CNN baselines, and strict checkpoint loading.

:class:`TimmEncoder` wraps ``timm.create_model(arch, pretrained=False, features_only=True)``: the
pyramid is the backbone's feature levels (channels and strides read from timm's ``feature_info``,
so the card cannot drift from the network), the pooled vector is the global average of the last
level, and the patch tokens are the last level flattened row-major (``[B, H*W, C]``).

:func:`load_checkpoint_strict` is the only way weights enter a backbone here. It reports key
coverage and refuses a checkpoint that leaves any backbone tensor at its random initialisation
(BenchX's silent ``strict=False`` failure, ``protocols.md`` §6.2).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bench.api import Capability, Encoder, Features, MethodCard
from bench.errors import CheckpointError

log = logging.getLogger(__name__)

#: MGCA's normalisation (``Normalize(0.5, 0.5)``), used by the random baseline.
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
#: timm / torchvision ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackbonePreset:
    """The backbone a preset uses."""

    arch: str                     # timm architecture name
    image_size: int               # the size the backbone is trained at (its card's image_size)
    out_indices: tuple[int, ...]  # timm feature levels forming the pyramid
    arch_args: tuple[tuple[str, Any], ...] = ()   # extra timm constructor arguments (sorted pairs)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.arch_args)

    def describe(self) -> str:
        """The architecture as recorded on cards: ``resnet18`` or ``resnet18[channels=32-64-128-256]``."""
        if not self.arch_args:
            return self.arch
        def fmt(v: Any) -> str:
            return "-".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)
        return self.arch + "[" + ",".join(f"{k}={fmt(v)}" for k, v in self.arch_args) + "]"


#: The image backbone of the CNN methods (``random``, ``imagenet``, ``supervised``) per preset
#: (keys are ``bench.api.PRESETS``).
#: ``tiny`` is a half-width ResNet-18 (stage widths 32-256, 2.8M parameters) at 64 px: on 2 CPU cores
#: it trains about 2x faster than the full-width network at the same size and about 4x faster than
#: at 128 px, and it learns the synthetic findings (measured in issue 6's note). It has no ImageNet
#: weights, so ``imagenet`` needs ``--preset paper`` (ResNet-50 at 224, MGCA's backbone).
BACKBONES: dict[str, BackbonePreset] = {
    "tiny": BackbonePreset("resnet18", 64, (1, 2, 3, 4), (("channels", (32, 64, 128, 256)),)),
    "paper": BackbonePreset("resnet50", 224, (1, 2, 3, 4)),
}


def backbone_preset(preset: str) -> BackbonePreset:
    try:
        return BACKBONES[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(BACKBONES)}") from None


def create_backbone(arch: str, out_indices: Sequence[int], **kwargs: Any) -> nn.Module:
    """A timm feature-pyramid model with timm's own (global-RNG) initialisation. Never downloads."""
    import timm

    return timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(out_indices), **kwargs)


def seeded_backbone(arch: str, out_indices: Sequence[int], seed: int, **kwargs: Any) -> nn.Module:
    """Build a backbone whose random initialisation is a pure function of ``seed``.

    timm initialises from the global generator, so the draw happens inside ``fork_rng``: the
    global state is seeded for the construction only and restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return create_backbone(arch, out_indices, **kwargs)


class TimmEncoder(Encoder):
    """An :class:`~bench.api.Encoder` over a timm ``features_only`` backbone."""

    def __init__(self, card: MethodCard, model: nn.Module) -> None:
        super().__init__(card)
        self.model = model
        channels = tuple(model.feature_info.channels())
        strides = tuple(model.feature_info.reduction())
        if channels != tuple(card.feature_channels) or strides != tuple(card.feature_strides):
            raise ValueError(f"{card.name}: card pyramid {card.feature_channels}/{card.feature_strides} "
                             f"!= backbone {channels}/{strides}")

    def image_features(self, x: torch.Tensor) -> Features:
        pyramid = list(self.model(x))
        last = pyramid[-1]
        pooled = last.mean(dim=(2, 3))
        patches = last.flatten(2).transpose(1, 2)
        return Features(pooled=pooled, patches=patches, pyramid=pyramid)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


def make_card(*, name: str, model: nn.Module, arch: str, image_size: int, weights_tag: str,
              weights_sha256: str | None, mean: Sequence[float], std: Sequence[float],
              capabilities: frozenset[Capability], pretrain_datasets: frozenset[str] = frozenset(),
              reference: str = "", license: str = "") -> MethodCard:
    """A card whose feature dimensions are read off the built backbone."""
    channels = tuple(int(c) for c in model.feature_info.channels())
    strides = tuple(int(s) for s in model.feature_info.reduction())
    return MethodCard(
        name=name, backbone=arch, weights_tag=weights_tag, weights_sha256=weights_sha256,
        image_size=int(image_size), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        embed_dim=channels[-1], feature_channels=channels, feature_strides=strides, patch_dim=channels[-1],
        capabilities=capabilities, pretrain_datasets=pretrain_datasets, reference=reference, license=license)


# ---------------------------------------------------------------------------------------------
# Checkpoint files and strict loading
# ---------------------------------------------------------------------------------------------

#: Model keys that may stay at their initial value without harm (BatchNorm step counters are not
#: saved by every exporter and are never used with a fixed momentum).
ALWAYS_ALLOWED_MISSING_SUFFIXES = ("num_batches_tracked",)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a pickle read with ``weights_only=True``.

    A wrapper dict (``{"state_dict": ...}``, ``{"model": ...}``, ``{"state_dict_ema": ...}``) is
    unwrapped; nothing else is guessed (prefixes are stripped explicitly by the caller).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable, truncated or not a tensor pickle
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "state_dict_ema", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a state dict (got {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return tensors


@dataclass
class KeyCoverage:
    """How a checkpoint's keys cover a model's state dict."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)         # model keys absent from the checkpoint
    allowed_missing: list[str] = field(default_factory=list)  # ... of which harmless (heads, counters)
    unexpected: list[str] = field(default_factory=list)      # checkpoint keys the model lacks
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    model_keys: int = 0
    checkpoint_keys: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.shape_mismatch

    def summary(self, limit: int = 8) -> str:
        def show(keys: Sequence[object]) -> str:
            keys = list(keys)
            more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return ", ".join(str(k) for k in keys[:limit]) + more

        lines = [f"key coverage: {len(self.matched)}/{self.model_keys} model keys matched "
                 f"({self.checkpoint_keys} keys in checkpoint)"]
        if self.missing:
            lines.append(f"missing backbone keys ({len(self.missing)}): {show(self.missing)}")
        if self.shape_mismatch:
            lines.append(f"shape mismatches ({len(self.shape_mismatch)}): " + show(
                f"{k} model{tuple(a)} vs checkpoint{tuple(b)}" for k, a, b in self.shape_mismatch))
        if self.allowed_missing:
            lines.append(f"allowed missing ({len(self.allowed_missing)}): {show(self.allowed_missing)}")
        if self.unexpected:
            lines.append(f"unexpected checkpoint keys ({len(self.unexpected)}): {show(self.unexpected)}")
        return "\n  ".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"matched": len(self.matched), "model_keys": self.model_keys,
                "checkpoint_keys": self.checkpoint_keys, "missing": list(self.missing),
                "allowed_missing": list(self.allowed_missing), "unexpected": list(self.unexpected),
                "shape_mismatch": [[k, list(a), list(b)] for k, a, b in self.shape_mismatch]}


def load_checkpoint_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                           allowed_missing: Sequence[str] = ("fc.", "head."), prefix: str = "",
                           source: str = "checkpoint") -> KeyCoverage:
    """Load ``state_dict`` into ``model`` and insist that every backbone key is covered.

    ``prefix`` is stripped from checkpoint keys first (keys without it are dropped, e.g.
    ``"img_encoder_q.model."`` for an MGCA checkpoint). Model keys starting with one of
    ``allowed_missing`` (classifier heads) may be absent; any other absent model key, or any
    shape mismatch, raises :class:`CheckpointError` with the coverage report. Checkpoint keys the
    model lacks (a classifier ``fc`` loaded into a ``features_only`` backbone) are reported and
    logged, not fatal.
    """
    if prefix:
        state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    else:
        state = dict(state_dict)
    target = model.state_dict()
    cov = KeyCoverage(model_keys=len(target), checkpoint_keys=len(state))
    for key, param in target.items():
        if key not in state:
            if key.startswith(tuple(allowed_missing)) or key.endswith(ALWAYS_ALLOWED_MISSING_SUFFIXES):
                cov.allowed_missing.append(key)
            else:
                cov.missing.append(key)
        elif tuple(state[key].shape) != tuple(param.shape):
            cov.shape_mismatch.append((key, tuple(param.shape), tuple(state[key].shape)))
        else:
            cov.matched.append(key)
    cov.unexpected = sorted(k for k in state if k not in target)
    if not cov.ok:
        hint = f" after stripping prefix {prefix!r}" if prefix else ""
        raise CheckpointError(f"{source} does not cover the backbone{hint}; refusing a partly random "
                              f"encoder.\n  {cov.summary()}")
    with torch.no_grad():
        result = model.load_state_dict({k: state[k] for k in cov.matched}, strict=False)
    leftover = [k for k in result.missing_keys if k not in cov.allowed_missing]
    if leftover:  # cannot happen when the coverage above is right; kept as a guard
        raise CheckpointError(f"{source}: keys left unloaded: {leftover[:8]}")
    if cov.unexpected:
        log.info("%s: %d checkpoint keys not used by the backbone (%s)", source, len(cov.unexpected),
                 ", ".join(cov.unexpected[:4]))
    log.info("%s: %s", source, cov.summary().replace("\n  ", "; "))
    return cov


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): identifies its weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                     else t.numpy().tobytes())
    return h.hexdigest()
