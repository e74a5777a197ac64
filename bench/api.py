"""Contracts between the engine, methods and tasks.

* A **method** is a factory ``(preset, checkpoint, seed, data) -> Encoder`` registered in ``METHODS``.
* An **Encoder** is an ``nn.Module`` with a frozen :class:`MethodCard` and the feature accessors
  below. Inputs are uint8 grayscale squares ``[B, 1, S, S]`` (S = ``card.image_size``) exactly as
  the image cache stores them; :meth:`Encoder.prepare` turns them into the normalised float tensor
  the backbone expects, so preprocessing travels with the weights.
* A **task** is registered in ``TASKS`` and declares the capabilities it requires.
"""
from __future__ import annotations

import abc
import difflib
import enum
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from bench.data.splits import FRACTIONS  # noqa: F401  (the split layer builds the nested fractions: one home)
from bench.registry import Registry

PRESETS = ("tiny", "paper")


class Capability(str, enum.Enum):
    IMAGE_GLOBAL = "image_global"   # pooled image vector
    IMAGE_DENSE = "image_dense"     # patch tokens and a feature pyramid
    TEXT = "text"                   # joint image-text space (zero-shot, retrieval)
    TRAINABLE = "trainable"         # backbone can be fine-tuned

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class MethodCard:
    """What a consumer of an encoder needs to know, travelling with the weights."""

    name: str                               # registry key, "imagenet"
    backbone: str                           # timm architecture, "resnet18"
    weights_tag: str                        # "random-init", "imagenet-1k", "mimic-synthetic-tiny"...
    weights_sha256: str | None              # of the checkpoint file; None for random init
    image_size: int
    mean: tuple[float, ...]                 # per input channel (3)
    std: tuple[float, ...]
    embed_dim: int                          # width of Features.pooled
    feature_channels: tuple[int, ...]       # channels of each pyramid level
    feature_strides: tuple[int, ...]        # stride of each pyramid level
    patch_dim: int                          # width of Features.patches tokens
    capabilities: frozenset[Capability]
    joint_dim: int | None = None            # width of encode_image / encode_text (TEXT only)
    pretrain_datasets: frozenset[str] = frozenset()
    reference: str = ""
    license: str = ""
    pooling: str = "avg"                    # how `pooled` is made: "avg" (CNN) or "cls" (a ViT's CLS token)
    local_stride: int | None = None         # stride of the level a method's local features come from
    text_tokenizer: str | None = None       # TEXT only: "tiny-wordpiece" (trained here) or "local-bert"
    text_max_length: int | None = None      # TEXT only: tokens per report, [CLS]/[SEP] included

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["capabilities"] = sorted(str(c) for c in self.capabilities)
        d["pretrain_datasets"] = sorted(self.pretrain_datasets)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["feature_channels"], d["feature_strides"] = list(self.feature_channels), list(self.feature_strides)
        return d


@dataclass
class Features:
    pooled: torch.Tensor                    # [B, embed_dim]
    patches: torch.Tensor                   # [B, N, patch_dim] (last pyramid level, flattened)
    pyramid: list[torch.Tensor]             # NCHW maps, strides = card.feature_strides


class Encoder(nn.Module, abc.ABC):
    """Base class of every method's image (and optionally text) encoder."""

    card: MethodCard

    def __init__(self, card: MethodCard) -> None:
        super().__init__()
        self.card = card
        self.register_buffer("_mean", torch.tensor(card.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(card.std).view(1, -1, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 1, S, S] (or float in [0, 1]) -> normalised float [B, 3, S, S]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, self._mean.shape[1], -1, -1)
        return (x - self._mean) / self._std

    @abc.abstractmethod
    def image_features(self, x: torch.Tensor) -> Features:
        """Features of prepared images ``x`` (output of :meth:`prepare`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_features(x).pooled

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.card.name} has no joint image-text space")

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.card.name} has no text tower")

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters updated by fine-tuning (the vision tower)."""
        return [p for p in self.parameters()]


@dataclass(frozen=True)
class MethodOption:
    """A method setting users can switch (``--set <method>.<key>=value``): part of the run's identity."""

    default: Any
    doc: str
    affects_weights: bool = True            # False: only where weights are read from (a directory)


def resolve_options(method: str, known: Mapping[str, MethodOption], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` (keys with or without the ``<method>.`` prefix) over the defaults; unknown keys are errors."""
    from bench.errors import BenchError

    out = {k: o.default for k, o in known.items()}
    for key, value in given.items():
        bare = key[len(method) + 1:] if key.startswith(method + ".") else key
        if bare not in known:
            close = difflib.get_close_matches(bare, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise BenchError(f"method {method!r} has no option {bare!r}{hint} (options: {', '.join(sorted(known))})")
        out[bare] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: a factory and a one-line description."""

    name: str
    #: ``(preset, checkpoint: Path | None, seed, data="synth") -> Encoder``; ``data`` is the run's data
    #: source (``"synth"`` or a root), so a pretrained method picks its own synthetic pretraining on
    #: the synthetic corpus and asks for ``--checkpoint`` on real data.
    factory: Callable[..., Encoder]
    capabilities: frozenset[Capability]
    description: str
    needs_weights: bool = False             # True when no run is possible without a weights file
    #: ``(preset, data, *, out_dir, resume, device) -> Path`` for methods that this harness can
    #: pretrain (``python -m bench pretrain``); the folder returned holds the weights. None: not trainable here.
    pretrain: Callable[..., Path] | None = None
    #: Switches of the method (``--set <name>.<key>=value`` on ``run`` and ``pretrain``); the factory and
    #: ``pretrain`` take them as ``options=``. Empty: the method has none.
    options: Mapping[str, MethodOption] = field(default_factory=dict)
    #: The pretraining losses as a function of plain tensors (``methods.<name>.objective``), returning
    #: a dict of named terms; None for methods without a pretraining objective of their own.
    objective: Callable[..., Mapping[str, torch.Tensor]] | None = None
    #: ``convert(official_state_dict, **kw) -> (our_state_dict, coverage report)`` for the authors'
    #: released checkpoints; None when none were released.
    convert: Callable[..., Any] | None = None


METHODS: Registry[MethodEntry] = Registry("method")


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's numbers. A run is a pure function of its spec."""

    method: str
    task: str
    fraction: float = 1.0
    seed: int = 0
    preset: str = "tiny"
    data: str = "synth"                     # "synth" or a dataset root path
    protocol: str | None = None             # None -> the task's default protocol
    checkpoint: str | None = None
    split_seed: int = 0                     # the split and fraction subsets are fixed across seeds
    overrides: tuple[tuple[str, Any], ...] = ()  # protocol hyper-parameter overrides, sorted

    def __post_init__(self) -> None:
        if self.fraction not in FRACTIONS:
            raise ValueError(f"fraction must be one of {FRACTIONS}, got {self.fraction}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        object.__setattr__(self, "overrides", tuple(sorted(self.overrides)))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: a family bound to a dataset and a protocol per preset."""

    name: str                               # "rsna-cls"
    family: str                             # "linear-probe", "fine-tune", ...
    dataset: str                            # DATASETS key
    version: int                            # bump when the protocol changes numbers
    requires: frozenset[Capability]
    main_metric: str                        # key in the metrics dict
    higher_is_better: bool
    protocols: tuple[str, ...]              # first one is the default
    run: Callable[..., "TaskOutput"]        # (encoder, data, spec, device) -> TaskOutput
    description: str = ""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> hyper-parameters
    #: Where this protocol differs from its anchor's (MGCA, BenchX), one sentence each, starting with
    #: the anchor's name ("MGCA: ..."); copied into results so a reader never mistakes it for the anchor's.
    anchor_differences: tuple[str, ...] = ()


@dataclass
class TaskOutput:
    metrics: dict[str, float]                           # point estimates on the test split
    ci: dict[str, tuple[float, float]]                  # 95% bootstrap CIs of selected metrics
    details: dict[str, Any] = field(default_factory=dict)  # epochs run, chosen lr, sizes...
    predictions: list[dict[str, Any]] | None = None     # per-sample test predictions


TASKS: Registry[TaskEntry] = Registry("task")
