"""Read the released MGCA and GLoRIA checkpoints and rename their tensors to our ``VLPModel`` layout.

Nothing here imports PyTorch Lightning, OmegaConf, the official repositories or anything that
downloads weights: a checkpoint is unpickled with ``torch.load(weights_only=True)`` plus a short,
explicit allowlist, and its tensors are renamed by fixed prefix rules.

What the official files hold
----------------------------
**MGCA** (HKU-MedAI/MGCA, ``resnet_50.ckpt`` / ``vit_base.ckpt``; PyTorch Lightning 1.5): a Lightning
checkpoint (``state_dict``, ``hyper_parameters`` with ``img_encoder``, ``epoch``, ``global_step``,
callback / optimiser / scheduler states) of the whole ``MGCA`` LightningModule
(``mgca/models/mgca/mgca_module.py``), whose submodules are:

* ``img_encoder_q`` (``mgca/models/backbones/encoder.py::ImageEncoder``):
  ``model`` is the backbone, torchvision ResNet-50 with ``fc = Identity`` (so no ``fc`` keys) or
  BLIP's ``VisionTransformer`` (``vits.py``; timm key names: ``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.{0-11}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``; no classifier head); ``global_embed`` / ``local_embed`` are ``GlobalEmbedding`` /
  ``LocalEmbedding``, each a ``head`` Sequential of Linear|Conv1d(k=1) → BatchNorm1d → ReLU →
  Linear|Conv1d → BatchNorm1d(affine=False), hence keys ``head.{0,1,3,4}.*``.
* ``text_encoder_q`` (``encoder.py::BertEncoder``): ``model`` is BLIP's ``med.py`` ``BertModel``
  (6 layers from ``mgca/configs/bert_config.json``, ``add_cross_attention: true``, no pooler);
  ``global_embed`` / ``local_embed`` as above.
* ``prototype_layer`` (Linear(128→500, bias=False)) and ``patch_local_atten_layer`` /
  ``word_local_atten_layer`` (``nn.MultiheadAttention(128, 1)``, only run when
  ``use_local_atten=True``, which is off).

**GLoRIA** (marshuang80/gloria, ``chexpert_resnet50.ckpt``; PyTorch Lightning 1.1): a Lightning
checkpoint of ``gloria/lightning/pretrain_model.py::PretrainModel``, whose only submodule is
``gloria`` (``gloria/models/gloria_model.py::GLoRIA``); every key therefore starts with
``gloria.`` (``gloria/builder.py`` strips it before a strict ``load_state_dict``). Its
``hyper_parameters`` is the OmegaConf config (``cfg.model.vision.model_name`` etc.).

* ``gloria.img_encoder.model.*``: torchvision ResNet-50, ``fc = Identity``;
  ``gloria.img_encoder.global_embedder`` = Linear(2048→768) and
  ``gloria.img_encoder.local_embedder`` = Conv2d(1024→768, 1×1, bias=False)
  (``gloria/models/vision_model.py``).
* ``gloria.text_encoder.model.*``: ``AutoModel.from_pretrained(Bio_ClinicalBERT)``, i.e. the
  full 12-layer Hugging Face ``BertModel`` with its pooler (``gloria/models/text_model.py``).
  There is no text projection (``emb_global`` / ``emb_local`` are ``None``).

How keys map (official → ours)
------------------------------
======================================================  =====================================
MGCA                                                    ours
======================================================  =====================================
``img_encoder_q.model.<k>``                             ``image.backbone.<k>``
``img_encoder_q.{global,local}_embed.head.<k>``         ``heads.image_{global,local}.head.<k>``
``text_encoder_q.model.<k>``                            ``text.bert.<k>``
``text_encoder_q.{global,local}_embed.head.<k>``        ``heads.text_{global,local}.head.<k>``
``prototype_layer.weight``                              ``prototypes.weight``
======================================================  =====================================

GLoRIA: ``gloria.img_encoder.model.<k>`` → ``image.backbone.<k>``;
``gloria.img_encoder.global_embedder.{weight,bias}`` → ``heads.image_global.{weight,bias}``;
``gloria.img_encoder.local_embedder.weight`` → ``heads.image_local.weight``;
``gloria.text_encoder.model.<k>`` → ``text.bert.<k>``. Keys without the ``gloria.`` prefix (a
bare ``GLoRIA.state_dict()``) are accepted too.

The backbone names need no rewriting: timm's ``features_only`` ResNet and torchvision's ResNet
share their parameter names, BLIP's ViT uses timm's names, and ``med.py`` uses Hugging Face's
BERT names.

Dropped and filled keys
-----------------------
Dropped (reported under ``dropped``, never as ``unexpected``):

* MGCA ``patch_local_atten_layer.*``, ``word_local_atten_layer.*``: unused by the method.
* MGCA ``text_encoder_q.model.encoder.layer.<i>.crossattention.*``: unused by the method (BLIP
  cross-attention, created at random, never run since the text tower is called with
  ``mode="text"``).
* BERT pooler (GLoRIA's Bio_ClinicalBERT keeps one): unused by the method (GLoRIA's sentence
  embedding is the mean of its word embeddings, see ``text_model.py``); kept only if the
  target model has a pooler.
* ``embeddings.position_ids`` / ``embeddings.token_type_ids``: index buffers (``arange`` /
  zeros) that older ``transformers`` / ``med.py`` saved; ours are non-persistent. Kept only if
  the target model stores them.
* ``fc.*`` / ``head.*`` under an image backbone (not present in the released files): classifier.

Filled (reported under ``filled``):

* MGCA ``text.bert.embeddings.token_type_embeddings.weight`` = **zeros**. ``med.py``'s
  ``BertEmbeddings`` has no token-type embedding (word + position → LayerNorm), while Hugging
  Face's adds ``token_type_embeddings[token_type_ids]``; zero rows make our embedding output
  equal to ``med.py``'s for any token types.

A fidelity note for the text forward (not a conversion matter): ``encoder.py::BertEncoder``
calls ``self.model(ids, attn_mask, token_type, ...)`` and ``med.py``'s ``BertModel.forward``
takes ``position_ids`` as its third argument, so MGCA fed the (all-zero) token-type ids as
*position ids*: every token gets position embedding row 0. To reproduce the released
checkpoint's text features, our text tower must pass ``position_ids = zeros`` for MGCA.

Loading
-------
:func:`load_converted` checks the converted tensors against ``model.state_dict()`` per part
(image backbone, text, heads, prototypes), reusing :class:`methods.backbones.KeyCoverage`, and
refuses (``CheckpointError`` with the report) a model whose image backbone or text tensors would
stay at their random initialisation or mismatch in shape, unless ``allow_partial=True`` (loud
warning, recorded in the report). Heads and prototypes may be absent only with
``allow_missing_heads=True`` (image-only use).
"""
from __future__ import annotations

import argparse
import functools
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from bench.errors import CheckpointError
from methods.backbones import ALWAYS_ALLOWED_MISSING_SUFFIXES, KeyCoverage, read_state_dict

log = logging.getLogger(__name__)

#: The parts of our model a key belongs to, by its first component(s).
PARTS = ("image", "text", "heads", "prototypes")
#: Parts whose tensors must all come from the checkpoint (unless ``allow_partial``).
REQUIRED_PARTS = ("image", "text", "other")
IMAGE_ARCHS = ("resnet50", "vit_base")

UNUSED = "unused by the method"


def part_of(key: str) -> str:
    """``image`` / ``text`` / ``heads`` / ``prototypes`` for one of our keys, else ``other``."""
    if key.startswith("image."):
        return "image"
    if key.startswith("text."):
        return "text"
    if key.startswith("heads."):
        return "heads"
    if key == "prototypes" or key.startswith("prototypes."):
        return "prototypes"
    return "other"


# ---------------------------------------------------------------------------------------------
# Reading a Lightning checkpoint with weights_only=True
# ---------------------------------------------------------------------------------------------

class _Record:
    """Inert stand-in for a pickled class: keeps constructor args and state, runs no code."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Record":
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args)
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in {self.qualified_name}>"


class _GlobalRef:
    """A class or type object stored as a *value* (OmegaConf ref types, Lightning 1.1's callback
    keys, ``hparams_type``); never called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(f"refusing to call {self.name} while unpickling")

    def __repr__(self) -> str:
        return self.name


class _DictFromSubclass:
    """``NEWOBJ`` of a ``dict`` subclass (Lightning's ``AttributeDict``) yields a plain ``dict``,
    which the weights-only unpickler then fills with ``SETITEMS``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return {}


def _as_plain_dict(*args: Any) -> dict:
    """``collections.defaultdict(factory)``: the factory is dropped, the items are kept."""
    return {}


def _path_as_str(*parts: Any) -> str:
    return str(Path(*[str(p) for p in parts])) if parts else ""


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar(dtype, bytes)``: decoded to a Python number."""
    if not isinstance(dtype, _Record) or not dtype.args or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("unsupported numpy scalar in checkpoint")
    import numpy as np

    dt = np.dtype(str(dtype.args[0]))
    if dt.kind not in "biufc":
        raise pickle.UnpicklingError(f"unsupported numpy scalar dtype {dt} in checkpoint")
    state = dtype.state
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
        dt = dt.newbyteorder(state[1])
    return np.frombuffer(bytes(data), dtype=dt, count=1)[0].item()


#: ``dict`` subclasses that become plain dicts.
_DICT_SUBCLASS_NAMES = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)
#: OmegaConf classes (GLoRIA's ``hyper_parameters`` is a ``DictConfig``), read as inert records.
_OMEGACONF_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")
_OMEGACONF_RECORDS = _OMEGACONF_CONTAINERS + (
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    *(f"omegaconf.nodes.{n}" for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                       "BooleanNode", "BytesNode", "PathNode", "ValueNode")),
)
#: Type objects that appear only as values (never instantiated).
_TYPE_VALUE_NAMES = (
    "typing.Any", "builtins.dict", "builtins.list", "builtins.tuple", "builtins.int",
    "builtins.float", "builtins.str", "builtins.bool", "builtins.bytes",
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
)
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "collections.defaultdict": _as_plain_dict,
    "pathlib.PosixPath": _path_as_str, "pathlib.WindowsPath": _path_as_str,
    "pathlib.PurePosixPath": _path_as_str, "pathlib.PureWindowsPath": _path_as_str,
    "numpy.core.multiarray.scalar": _numpy_scalar, "numpy._core.multiarray.scalar": _numpy_scalar,
}


@functools.lru_cache(maxsize=1)
def lightning_safe_globals() -> tuple[tuple[Any, str], ...]:
    """The allowlist used on top of torch's weights-only defaults, as ``(object, name)`` pairs.

    Nothing on it executes code from the file: dict subclasses become dicts, OmegaConf / numpy
    dtype objects become inert records, type objects become name references, and the few
    functions build only a dict, a string or a number. ``argparse.Namespace`` is the real class
    (its unpickling only sets attributes).
    """
    pairs: list[tuple[Any, str]] = [(argparse.Namespace, "argparse.Namespace")]
    pairs += [(_DictFromSubclass, name) for name in _DICT_SUBCLASS_NAMES]
    for name in _OMEGACONF_RECORDS + ("numpy.dtype",):
        record = type("Record_" + name.replace(".", "_"), (_Record,), {"qualified_name": name})
        pairs.append((record, name))
    pairs += [(_GlobalRef(name), name) for name in _TYPE_VALUE_NAMES]
    pairs += [(fn, name) for name, fn in _FUNCTIONS.items()]
    return tuple(pairs)


def _plain(obj: Any, _path: frozenset[int] = frozenset()) -> Any:
    """Turn what the allowlisted unpickling produced into plain Python (dicts, lists, scalars)."""
    if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Tensor)):
        return obj
    if id(obj) in _path:  # a back-reference (OmegaConf's ``_parent``): cut the cycle
        return None
    path = _path | {id(obj)}
    if isinstance(obj, Mapping):
        return {_plain(k, path): _plain(v, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        items = [_plain(v, path) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj), path)
    if isinstance(obj, _GlobalRef):
        return obj.name
    if isinstance(obj, type) and issubclass(obj, _Record):
        return obj.qualified_name
    if isinstance(obj, _Record):
        state = obj.state if isinstance(obj.state, Mapping) else {}
        if obj.qualified_name in _OMEGACONF_CONTAINERS:
            return _plain(state.get("_content"), path)
        if obj.qualified_name.startswith("omegaconf.nodes."):
            return _plain(state.get("_val"), path)
        return {"__global__": obj.qualified_name, "state": _plain(obj.state, path)}
    return repr(obj)


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def _refused_globals(path: Path, error: BaseException) -> list[str]:
    names: list[str] = []
    try:
        with torch.serialization.safe_globals(list(lightning_safe_globals())):
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files, truncated files
        names = []
    if not names:
        names = _GLOBAL_IN_MESSAGE.findall(str(error))
    return sorted(dict.fromkeys(names))


def _safe_torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(lightning_safe_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _refused_globals(path, e)
        if not bad and not any(m in str(e) for m in ("GLOBAL", "Can only", "allowlisted")):
            raise CheckpointError(f"{path}: cannot read checkpoint (corrupt, truncated or not a "
                                  f"torch file: {str(e).strip().splitlines()[-1]})") from e
        what = ("global " + ", ".join(repr(b) for b in bad)) if bad else "an object"
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Can only" in ln or "Unsupported" in ln),
                      first[-1] if first else "")
        raise CheckpointError(
            f"{path}: refusing to unpickle {what}: the file holds objects outside the weights-only "
            f"allowlist (tensors, containers and the PyTorch-Lightning bookkeeping in "
            f"methods.vlp.convert.lightning_safe_globals). Hint: in a trusted environment, re-save "
            f"only the tensors, e.g. torch.save(torch.load(f)['state_dict'], 'weights.pt'), or "
            f"review the class and add it to the allowlist. [{detail.strip()}]") from e
    except CheckpointError:
        raise
    except Exception as e:  # not a torch file, truncated, bad zip
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def read_lightning_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, hyper_parameters)`` of a PyTorch-Lightning checkpoint or a plain state dict.

    Loaded with ``torch.load(weights_only=True)`` and :func:`lightning_safe_globals`; a file that
    pickles anything else raises :class:`CheckpointError` naming the file and the global.
    ``hyper_parameters`` comes back as plain Python (``AttributeDict`` / ``Namespace`` /
    OmegaConf ``DictConfig`` → dict); it is ``{}`` for a plain state dict. A ``.safetensors`` file
    is read as a plain state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return read_state_dict(path), {}
    obj = _safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint or state dict (got {type(obj).__name__})")
    hparams: Any = {}
    state: Any = obj
    if isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        hparams = obj.get("hyper_parameters") or {}
    else:
        for wrapper in ("model", "state_dict_ema", "module"):
            if isinstance(obj.get(wrapper), Mapping):
                state = obj[wrapper]
                break
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    others = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        log.info("%s: %d non-tensor state_dict entries ignored (%s)", path, len(others), ", ".join(others[:4]))
    hparams = _plain(hparams)
    if not isinstance(hparams, dict):
        hparams = {"value": hparams}
    return tensors, hparams


# ---------------------------------------------------------------------------------------------
# The conversion report
# ---------------------------------------------------------------------------------------------

@dataclass
class ConversionReport:
    """What a conversion did, key by key, and (once known) how it covers the target model."""

    method: str
    image_arch: str
    source: str = ""
    mapped: dict[str, str] = field(default_factory=dict)                 # our key -> official key
    dropped: dict[str, tuple[str, str]] = field(default_factory=dict)    # official key -> (part, why)
    filled: dict[str, tuple[str, str]] = field(default_factory=dict)     # our key -> (part, why)
    unexpected: list[str] = field(default_factory=list)                  # official keys no rule knows
    coverage: dict[str, KeyCoverage] = field(default_factory=dict)       # part -> against the target
    partial: bool = False
    warnings: list[str] = field(default_factory=list)

    def loaded(self, part: str) -> list[str]:
        """Our keys of ``part`` taken from the checkpoint (or filled), or matched in the target."""
        if part in self.coverage:
            return list(self.coverage[part].matched)
        return sorted(k for k in list(self.mapped) + list(self.filled) if part_of(k) == part)

    def missing(self, part: str) -> list[str]:
        cov = self.coverage.get(part)
        return list(cov.missing) if cov else []

    def dropped_in(self, part: str) -> list[str]:
        return sorted(k for k, (p, _) in self.dropped.items() if p == part)

    def filled_in(self, part: str) -> list[str]:
        return sorted(k for k, (p, _) in self.filled.items() if p == part)

    @property
    def ok(self) -> bool:
        """True once coverage is known and the target's image backbone and text tensors are all
        covered (``False`` before :func:`load_converted` or a ``target_keys`` dry run)."""
        return bool(self.coverage) and all(self.coverage[p].ok for p in REQUIRED_PARTS if p in self.coverage)

    def summary(self, limit: int = 6) -> str:
        def show(keys: Iterable[object]) -> str:
            keys = list(keys)
            more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return ", ".join(str(k) for k in keys[:limit]) + more

        head = f"{self.method} ({self.image_arch})" + (f" from {self.source}" if self.source else "")
        lines = [f"{head}: {len(self.mapped)} tensors mapped, {len(self.filled)} filled, "
                 f"{len(self.dropped)} dropped, {len(self.unexpected)} unexpected"
                 + (" [PARTIAL LOAD]" if self.partial else "")]
        parts = [p for p in PARTS + ("other",) if p in self.coverage or p != "other"]
        for part in parts:
            cov = self.coverage.get(part)
            if cov is not None:
                line = f"{part}: loaded {len(cov.matched)}/{cov.model_keys}"
                if cov.missing:
                    line += f"; MISSING {len(cov.missing)}: {show(cov.missing)}"
                if cov.shape_mismatch:
                    line += f"; SHAPE MISMATCH {len(cov.shape_mismatch)}: " + show(
                        f"{k} model{tuple(a)} vs checkpoint{tuple(b)}" for k, a, b in cov.shape_mismatch)
                if cov.allowed_missing:
                    line += f"; allowed missing {len(cov.allowed_missing)}: {show(cov.allowed_missing)}"
                if cov.unexpected:
                    line += f"; not in model {len(cov.unexpected)}: {show(cov.unexpected)}"
            else:
                line = f"{part}: converted {len(self.loaded(part))}"
            filled = self.filled_in(part)
            if filled:
                line += "; filled: " + show(f"{k} ({self.filled[k][1]})" for k in filled)
            dropped = self.dropped_in(part)
            if dropped:
                reasons = sorted({self.dropped[k][1] for k in dropped})
                line += f"; dropped {len(dropped)} ({'; '.join(reasons)}): {show(dropped)}"
            lines.append(line)
        if self.unexpected:
            lines.append(f"unexpected official keys ({len(self.unexpected)}): {show(self.unexpected)}")
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n  ".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "image_arch": self.image_arch, "source": self.source,
                "mapped": len(self.mapped), "filled": {k: why for k, (_, why) in self.filled.items()},
                "dropped": {k: why for k, (_, why) in self.dropped.items()},
                "unexpected": list(self.unexpected), "partial": self.partial,
                "warnings": list(self.warnings),
                "coverage": {p: c.to_dict() for p, c in self.coverage.items()}}


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

#: (official prefix, our prefix) pairs.
_MGCA_RULES = (
    ("img_encoder_q.model.", "image.backbone."),
    ("img_encoder_q.global_embed.", "heads.image_global."),
    ("img_encoder_q.local_embed.", "heads.image_local."),
    ("text_encoder_q.model.", "text.bert."),
    ("text_encoder_q.global_embed.", "heads.text_global."),
    ("text_encoder_q.local_embed.", "heads.text_local."),
    ("prototype_layer.", "prototypes."),
)
#: (pattern on the official key, part, reason): always dropped.
_MGCA_DROP = (
    (re.compile(r"^patch_local_atten_layer\."), "heads",
     f"{UNUSED}: MultiheadAttention only run with use_local_atten=True"),
    (re.compile(r"^word_local_atten_layer\."), "heads",
     f"{UNUSED}: MultiheadAttention only run with use_local_atten=True"),
    (re.compile(r"^text_encoder_q\.model\.encoder\.layer\.\d+\.crossattention\."), "text",
     f"{UNUSED}: BLIP cross-attention, never run in mode='text'"),
)
_GLORIA_RULES = (
    ("img_encoder.model.", "image.backbone."),
    ("img_encoder.global_embedder.", "heads.image_global."),
    ("img_encoder.local_embedder.", "heads.image_local."),
    ("text_encoder.model.", "text.bert."),
)
#: Our keys kept only when the target stores them (else dropped with the reason).
_OPTIONAL_TARGETS = (
    (re.compile(r"^text\.bert\.embeddings\.(position_ids|token_type_ids)$"),
     "index buffer; non-persistent in our BertModel"),
    (re.compile(r"^text\.bert\.pooler\."), f"{UNUSED}: BERT pooler"),
    (re.compile(r"^image\.backbone\.(fc|head)\."), "classifier head, not part of the encoder"),
)
TOKEN_TYPE_KEY = "text.bert.embeddings.token_type_embeddings.weight"
_WORD_EMB_KEY = "text.bert.embeddings.word_embeddings.weight"


def _shape_of(v: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in (v.shape if hasattr(v, "shape") else v))


def _target_shapes(target_keys: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]] | None:
    return None if target_keys is None else {str(k): _shape_of(v) for k, v in target_keys.items()}


def _rename(state_dict: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]],
            drops: Sequence[tuple[re.Pattern[str], str, str]], report: ConversionReport,
            targets: dict[str, tuple[int, ...]] | None, strip: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = key[len(strip):] if strip and key.startswith(strip) else key
        dropped = next(((part, why) for pat, part, why in drops if pat.search(name)), None)
        if dropped is not None:
            report.dropped[key] = dropped
            continue
        rule = next(((src, dst) for src, dst in rules if name.startswith(src)), None)
        if rule is None:
            report.unexpected.append(key)
            continue
        ours = rule[1] + name[len(rule[0]):]
        optional = next((why for pat, why in _OPTIONAL_TARGETS if pat.search(ours)), None)
        if optional is not None and (targets is None or ours not in targets):
            report.dropped[key] = (part_of(ours), optional)
            continue
        out[ours] = tensor
        report.mapped[ours] = key
    report.unexpected.sort()
    return out


def _coverage(targets: Mapping[str, tuple[int, ...]], ours: Mapping[str, torch.Tensor], *,
              allow_missing_heads: bool) -> dict[str, KeyCoverage]:
    cov: dict[str, KeyCoverage] = {}

    def get(part: str) -> KeyCoverage:
        return cov.setdefault(part, KeyCoverage())

    for part in PARTS:
        get(part)
    for key, shape in targets.items():
        part = part_of(key)
        c = get(part)
        c.model_keys += 1
        if key not in ours:
            if key.endswith(ALWAYS_ALLOWED_MISSING_SUFFIXES) or (
                    allow_missing_heads and part in ("heads", "prototypes")):
                c.allowed_missing.append(key)
            else:
                c.missing.append(key)
        elif _shape_of(ours[key]) != tuple(shape):
            c.shape_mismatch.append((key, tuple(shape), _shape_of(ours[key])))
        else:
            c.matched.append(key)
    for key in ours:
        c = get(part_of(key))
        c.checkpoint_keys += 1
        if key not in targets:
            c.unexpected.append(key)
    return cov


def detect_image_arch(state_dict: Mapping[str, Any], prefix: str) -> str | None:
    """``vit_base`` / ``resnet50`` from the backbone keys under ``prefix``, else ``None``."""
    if f"{prefix}cls_token" in state_dict or f"{prefix}patch_embed.proj.weight" in state_dict:
        return "vit_base"
    if f"{prefix}conv1.weight" in state_dict:
        return "resnet50"
    return None


def _check_arch(image_arch: str, found: str | None, hp_arch: str | None, method: str) -> None:
    if image_arch not in IMAGE_ARCHS:
        raise ValueError(f"image_arch must be one of {IMAGE_ARCHS}, got {image_arch!r}")
    if found is not None and found != image_arch:
        raise CheckpointError(f"{method}: image_arch={image_arch!r} but the checkpoint's image "
                              f"backbone keys are those of {found!r}")
    if hp_arch is not None and hp_arch != image_arch:
        raise CheckpointError(f"{method}: image_arch={image_arch!r} but the checkpoint's "
                              f"hyper_parameters name {hp_arch!r}")


def _finish(out: dict[str, torch.Tensor], report: ConversionReport,
            targets: dict[str, tuple[int, ...]] | None, method: str, n_source: int) -> None:
    if not report.mapped:
        raise CheckpointError(f"{method}: none of the {n_source} checkpoint keys has the official "
                              f"{method} layout (first keys: {', '.join(report.unexpected[:4])})")
    if report.unexpected:
        log.warning("%s: %d checkpoint keys match no rule (%s)", method, len(report.unexpected),
                    ", ".join(report.unexpected[:4]))
    if targets is not None:
        report.coverage = _coverage(targets, out, allow_missing_heads=False)


_MGCA_HP_ARCH = {"resnet_50": "resnet50", "vit_base": "vit_base"}


def convert_mgca(state_dict: Mapping[str, torch.Tensor], *, image_arch: str,
                 target_keys: Mapping[str, Any] | None = None,
                 hyper_parameters: Mapping[str, Any] | None = None,
                 source: str = "") -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename an official MGCA ``state_dict`` to our layout (see the module docstring).

    ``image_arch`` (``resnet50`` / ``vit_base``) must agree with the backbone keys and, when
    given, with ``hyper_parameters['img_encoder']``. ``target_keys`` (our model's key → shape or
    tensor) decides optional buffers and the filled token-type shape, and fills
    ``report.coverage`` as a dry run; nothing is raised for missing keys here
    (:func:`load_converted` decides).
    """
    hp_arch = _MGCA_HP_ARCH.get(str((hyper_parameters or {}).get("img_encoder")))
    _check_arch(image_arch, detect_image_arch(state_dict, "img_encoder_q.model."), hp_arch, "MGCA")
    report = ConversionReport(method="mgca", image_arch=image_arch, source=source)
    targets = _target_shapes(target_keys)
    out = _rename(state_dict, _MGCA_RULES, _MGCA_DROP, report, targets)
    if TOKEN_TYPE_KEY not in out and _WORD_EMB_KEY in out and (targets is None or TOKEN_TYPE_KEY in targets):
        word = out[_WORD_EMB_KEY]
        shape = targets[TOKEN_TYPE_KEY] if targets is not None else (2, word.shape[1])
        out[TOKEN_TYPE_KEY] = torch.zeros(shape, dtype=word.dtype)
        report.filled[TOKEN_TYPE_KEY] = (
            "text", "zeros: med.py's BertEmbeddings has no token-type embedding")
    _finish(out, report, targets, "MGCA", len(state_dict))
    return out, report


def convert_gloria(state_dict: Mapping[str, torch.Tensor], *, image_arch: str = "resnet50",
                   target_keys: Mapping[str, Any] | None = None,
                   hyper_parameters: Mapping[str, Any] | None = None,
                   source: str = "") -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename an official GLoRIA ``state_dict`` (keys under ``gloria.``, or bare) to our layout.

    Only the ResNet-50 release exists; ``hyper_parameters['model']['vision']['model_name']``
    (``resnet_50``), when present, must agree.
    """
    if image_arch != "resnet50":
        raise ValueError(f"GLoRIA's released checkpoint is ResNet-50; got image_arch={image_arch!r}")
    hp_arch = None
    vision = ((hyper_parameters or {}).get("model") or {})
    vision = vision.get("vision") if isinstance(vision, Mapping) else None
    if isinstance(vision, Mapping) and vision.get("model_name") is not None:
        name = str(vision["model_name"])
        hp_arch = "resnet50" if name == "resnet_50" else name
    strip = "gloria." if any(k.startswith("gloria.") for k in state_dict) else ""
    found = detect_image_arch(state_dict, f"{strip}img_encoder.model.")
    _check_arch(image_arch, found, hp_arch, "GLoRIA")
    report = ConversionReport(method="gloria", image_arch=image_arch, source=source)
    targets = _target_shapes(target_keys)
    out = _rename(state_dict, _GLORIA_RULES, (), report, targets, strip=strip)
    _finish(out, report, targets, "GLoRIA", len(state_dict))
    return out, report


CONVERTERS = {"mgca": convert_mgca, "gloria": convert_gloria}


def convert_file(path: str | Path, method: str, *, image_arch: str,
                 target_keys: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], ConversionReport, dict[str, Any]]:
    """Read ``path`` and convert it: ``(our_state_dict, report, hyper_parameters)``."""
    if method not in CONVERTERS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(CONVERTERS)}")
    state, hparams = read_lightning_checkpoint(path)
    out, report = CONVERTERS[method](state, image_arch=image_arch, target_keys=target_keys,
                                     hyper_parameters=hparams, source=str(path))
    return out, report, hparams


# ---------------------------------------------------------------------------------------------
# Loading into our model
# ---------------------------------------------------------------------------------------------

def load_converted(model: nn.Module, our_state_dict: Mapping[str, torch.Tensor], report: ConversionReport,
                   *, allow_partial: bool = False, allow_missing_heads: bool = False) -> ConversionReport:
    """Load converted tensors into ``model`` after checking coverage part by part.

    Refuses (:class:`CheckpointError` with the report summary) when any image-backbone or text
    tensor of ``model`` (or any tensor outside the known parts) is missing or mismatches in
    shape, and when heads / prototypes are missing or mismatch, unless ``allow_missing_heads``
    (image-only use: they stay as built). ``allow_partial=True`` loads what matches instead,
    logs a loud warning and records it in the report (``partial``, ``warnings``).
    Keys the model lacks are reported, not fatal. Returns ``report`` with ``coverage`` set.
    """
    targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cov = _coverage(targets, our_state_dict, allow_missing_heads=allow_missing_heads)
    report.coverage = cov
    fatal: list[str] = []
    skipped_heads: list[str] = []
    for part, c in cov.items():
        bad = list(c.missing) + [k for k, _, _ in c.shape_mismatch]
        if not bad:
            continue
        if part in ("heads", "prototypes") and allow_missing_heads:
            skipped_heads += bad  # shape-mismatched heads: left as built, like missing ones
        else:
            fatal += bad
    where = report.source or report.method
    if skipped_heads:
        report.warnings.append(f"{len(skipped_heads)} head tensors left as built (allow_missing_heads): "
                               + ", ".join(skipped_heads[:4]))
    if fatal:
        if not allow_partial:
            raise CheckpointError(f"{where}: the converted checkpoint does not cover the model "
                                  f"({len(fatal)} tensors, first {fatal[0]!r}); refusing a partly "
                                  f"random model.\n  {report.summary()}")
        report.partial = True
        msg = (f"PARTIAL LOAD (allow_partial=True): {len(fatal)} model tensors keep their random "
               f"initialisation: {', '.join(fatal[:6])}" + (" ..." if len(fatal) > 6 else ""))
        report.warnings.append(msg)
        log.warning("%s: %s", where, msg)
    matched = [k for c in cov.values() for k in c.matched]
    with torch.no_grad():
        result = model.load_state_dict({k: our_state_dict[k] for k in matched}, strict=False)
    covered = set(matched) | {k for c in cov.values() for k in c.allowed_missing} | set(fatal) | set(skipped_heads)
    leftover = [k for k in result.missing_keys if k not in covered]
    if leftover:  # cannot happen when the coverage above is right; kept as a guard
        raise CheckpointError(f"{where}: keys left unloaded: {leftover[:8]}")
    log.info("%s: %s", where, report.summary().replace("\n  ", "; "))
    return report
