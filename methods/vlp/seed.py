"""What the seed methods PLACE, RECLF and SISTA share: MGCA's pipeline (DD-COMMON-1).

None of the three released code, so they are built on MGCA's public pipeline
(``shared/reference/seed_methods.md`` §1): the same image and text towers
(:func:`methods.vlp.method.image_spec`, :func:`methods.mgca.text_spec`), MGCA's local projection heads
(:class:`methods.vlp.model.MGCAEmbedding` on the local tokens and the words; the global heads on the
pooled image feature and the text [CLS] are ConVIRT's MLPs by default, ``global_head``, see below),
128-d joint space, and MGCA's optimisation: :func:`recipe` *calls* :func:`methods.mgca.recipe`, so
when MGCA's recipe is tuned the three follow. Each method adds its own modules and loss terms on
top; a global instance InfoNCE is kept (DD-COMMON-1), or replaced by SISTA's false-negative-aware
version of it.

``global_head`` (DD-COMMON-1): one-hidden-layer MLP global heads (``mlp``, ConVIRT's
:class:`methods.vlp.model.ProjectionMLP`, the default) or MGCA's Linear-BN-ReLU-Linear-BN(affine=False)
heads (``mgca``). A departure from MGCA's pipeline, measured on the synthetic default at the tiny
recipe: the global InfoNCE (τ 0.07) on MGCA's heads barely leaves chance (RECLF with only its global
term, 3 epochs: validation loss 4.44 -> 4.11, chance ln 64 = 4.16; MGCA's own ITA ends its 8 epochs
at 4.03), while on the MLP heads it learns (4.05 -> 3.88), as ConVIRT's does; reading the report from
mean-pooled words instead of [CLS] (4.08) or τ 0.1 (4.09) did not help. On MGCA's heads SISTA's
``rsna-cls`` 10% linear probe overlapped ``random`` and PLACE stayed well under its MLP-head numbers
(README, "The seed methods"). The option is keyed in the weights at every value: the MGCA-head
pretrainings cached before the switch (keyed without it) are never read as the new default.

The joint space used by zero-shot and retrieval (``encode_image`` / ``encode_text``) is the global
heads' output, as MGCA's; downstream image features come from :class:`methods.vlp.method.VLPEncoder`
unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bench.api import MethodOption
from bench.errors import BenchError
from methods.vlp import text as T
from methods.vlp.method import VLPRecipe
from methods.vlp.model import MGCAEmbedding, ProjectionMLP, VLPModel, l2, project_tokens
from methods.vlp.towers import ImageOutput

GLOBAL_HEADS = ("mlp", "mgca")
#: The global heads' option, shared by the three methods (see the module docstring for the measurement).
GLOBAL_HEAD_OPTION = MethodOption("mlp", "DD-COMMON-1: global projection heads: mlp (one hidden layer, "
                                         "ConVIRT's; the global InfoNCE learns at the tiny recipe) or mgca (MGCA's "
                                         "Linear-BN-ReLU-Linear-BN; its global InfoNCE stays near chance there)")


def recipe(preset: str, options: Mapping[str, Any]) -> VLPRecipe:
    """MGCA's recipe at ``preset`` (DD-COMMON-1, DD-PLACE-6, DD-RECLF-5, DD-SISTA-4): optimiser,
    schedule, batch, epochs (``<method>.epochs`` overrides, as for MGCA), embedding and head widths."""
    from methods import mgca

    return mgca.recipe(preset, options)


def text_spec(preset: str, options: Mapping[str, Any]) -> T.TextSpec:
    """MGCA's text tower (tiny: the 4-layer WordPiece BERT; paper: the first 6 layers of a local BERT)."""
    from methods import mgca

    return mgca.text_spec(preset, options)


def choice(method: str, options: Mapping[str, Any], key: str, allowed: Sequence[str]) -> str:
    """``options[key]`` checked against ``allowed`` (a BenchError naming the valid values otherwise)."""
    value = options[key]
    if value not in allowed:
        raise BenchError(f"{method}.{key} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def positive(method: str, options: Mapping[str, Any], key: str, kind: type = float, *, allow_zero: bool = False):
    """``options[key]`` as ``kind``, checked to be > 0 (>= 0 with ``allow_zero``)."""
    try:
        value = kind(options[key])
    except (TypeError, ValueError) as e:
        raise BenchError(f"{method}.{key} must be a number; got {options[key]!r}") from e
    if value < 0 or (value == 0 and not allow_zero):
        raise BenchError(f"{method}.{key} must be {'>= 0' if allow_zero else '> 0'}; got {options[key]!r}")
    return value


def loss_weights(method: str, options: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    """The loss-term weights ``keys`` (each >= 0; 0 switches its module off), refusing all zero: a
    method with no loss term would train nothing."""
    weights = {k: positive(method, options, k, allow_zero=True) for k in keys}
    if not any(weights.values()):
        raise BenchError(f"{method}: every loss weight is 0 ({', '.join(f'{k}=0' for k in keys)}); "
                         "at least one term must stay on")
    return weights


def trim_words(words: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the word slots that no report of the batch uses (words fill slots 0, 1, ... in order),
    so the pairwise modules never pay for padding beyond the longest report."""
    n = int(mask.sum(1).max()) if mask.numel() else 0
    n = max(n, 1)
    return words[:, :n], mask[:, :n]


class SeedModel(VLPModel):
    """MGCA's towers and heads (DD-COMMON-1) plus a method's own modules (``extra`` heads).

    Heads: ``image_global`` / ``text_global`` always (``options["global_head"]``: ProjectionMLP or
    MGCAEmbedding); ``image_local`` / ``text_local`` (1x1-conv MGCAEmbedding over the local tokens / the
    words) when ``local_image`` / ``local_text``."""

    def __init__(self, image, text, recipe: VLPRecipe, options: Mapping[str, Any], *, local_image: bool,
                 local_text: bool, extra: Mapping[str, nn.Module] | None = None) -> None:
        e, h, d = recipe.embed_dim, recipe.head_hidden, text.hidden_size
        method = type(self).__name__.removesuffix("Model").lower()       # PLACEModel -> place
        kind = choice(method, {"global_head": options.get("global_head", GLOBAL_HEAD_OPTION.default)}, "global_head",
                      GLOBAL_HEADS)
        head = ProjectionMLP if kind == "mlp" else MGCAEmbedding
        heads: dict[str, nn.Module] = {"image_global": head(image.global_dim, h, e), "text_global": head(d, h, e)}
        if local_image:
            heads["image_local"] = MGCAEmbedding(image.local_dim, h, e, conv=True)
        if local_text:
            heads["text_local"] = MGCAEmbedding(d, h, e, conv=True)
        heads.update(extra or {})
        super().__init__(image, text, heads, embed_dim=e)
        #: the resolved options of the method (recorded by ``describe`` and in the checkpoint's meta)
        self.options = dict(options)

    # joint space (zero-shot, retrieval): MGCA's global heads
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return l2(self.heads["image_global"](self.image(images).global_))

    def text_embedding(self, tokens: T.TokenBatch) -> torch.Tensor:
        return l2(self.heads["text_global"](self.text(tokens).cls))

    def global_embeddings(self, img: ImageOutput, txt: T.TextOutput) -> tuple[torch.Tensor, torch.Tensor]:
        return l2(self.heads["image_global"](img.global_)), l2(self.heads["text_global"](txt.cls))

    def local_patches(self, img: ImageOutput) -> torch.Tensor:
        """Projected local tokens ``[B, N, E]`` (not normalised)."""
        return project_tokens(self.heads["image_local"], img.local)

    def local_words(self, txt: T.TextOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected words ``[B, W, E]`` (not normalised; zero in padded slots), trimmed to the longest
        report of the batch, and their mask."""
        words, mask = trim_words(*txt.words())
        return project_tokens(self.heads["text_local"], words, mask), mask

    def describe(self) -> dict[str, Any]:
        opts = {k: v for k, v in self.options.items() if k != "text_model_dir"}
        return {**super().describe(), "options": opts}
