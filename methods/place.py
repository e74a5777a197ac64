"""Method ``place``: PLACE (Wang et al., "Improving Medical Visual Representation Learning with
Pathological-level Cross-Modal Alignment and Correlation Exploration", arXiv 2506.10573), re-implemented
from its abstract: no code, formulas or hyper-parameters are published (``seed_methods.md`` §2), so
every structural choice below is a design decision with an ID and a ``--set place.<key>`` option.

``L = λ_ita L_ITA + λ_pcma L_PCMA + λ_cce L_CCE`` (DD-PLACE-5), on MGCA's pipeline (DD-COMMON-1,
:mod:`methods.vlp.seed`; recipe DD-PLACE-6):

* **ITA**, global alignment: MGCA's instance-wise InfoNCE between the projected global embeddings
  (τ 0.07).
* **VPOE** (Visual Pathology Observation Extractor, DD-PLACE-1): ``num_queries`` learnable pathology
  query tokens attend to the image's projected local tokens (patches / regions) through ``vpoe_depth``
  pre-norm transformer-decoder layers (``decoder``: query self-attention + cross-attention + MLP;
  ``cross_attn``: no self-attention); no positional code is added on the patch side, so the
  visual pathology observation representations (**V-PORs**) do not depend on the order of the
  patches (and the attention maps follow any permutation of them).
* **T-PORs** (textual pathological observations, DD-PLACE-2): one per report sentence
  (``t_por_unit = sentence``): the mean of the sentence's last-layer token states, projected by an
  MGCA head. Sentence boundaries: MGCA's caption pipeline joins sentences without markers, so the
  pretraining captions carry their sentence ends beside the text (:class:`methods.vlp.pairs.Caption`)
  and the text tower turns them into a per-token sentence index through the tokenizer's offsets
  (:func:`methods.vlp.text.tokenize`; any other text is split at ``.``/``!``/``?``).
  ``t_por_unit = window`` uses runs of ``t_por_window`` consecutive words instead (no boundaries
  needed); ``noun_phrase`` is refused (it needs a chunker, none ships offline).
* **PCMA** (pathological-level cross-modal alignment, DD-PLACE-3): a batch-wide symmetric InfoNCE at
  ``pcma_temperature`` on the pathological-level similarity of every (image, report) pair: each
  T-POR matched to the V-PORs by ``pcma_matching`` (``max_similarity``: its best V-POR;
  ``optimal_transport``: an entropic OT plan; ``hungarian``: a one-to-one assignment),
  :func:`methods.vlp.seed_objectives.pathology_similarity`. No disease label is used.
* **CCE** (correlation exploration, DD-PLACE-4): from the projected local tokens *conditioned on the
  report* (FiLM by the report's global embedding, ``cce_conditioning = film``; ``none`` for the
  unconditioned ablation), a small MLP predicts patch embeddings whose correlation matrix
  ``[N, N]`` must match a target patch correlation matrix (symmetric PSD, unit diagonal):
  ``cce_target = pixels``, the Pearson correlation between the raw pixel blocks
  (``cce_block`` x ``cce_block``) under the local grid, a fixed teacher that cannot collapse; or
  ``features``, the correlation of the image's own (detached) projected local tokens. Loss
  ``cce_loss`` in {mse, kl, cosine}.

Every module can be switched off from the command line: ``--set place.lambda_pcma=0`` (no VPOE, no
T-POR head), ``--set place.lambda_cce=0`` (no correlation head), ``--set place.lambda_ita=0``; a
switched-off module is not built, and its term is absent from the losses. The options are part of
the run's identity (results, leaderboard rows and the cached pretraining).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from bench.api import METHODS, MethodEntry, MethodOption
from bench.errors import BenchError
from methods.vlp import seed
from methods.vlp import seed_objectives as SO
from methods.vlp import text as T
from methods.vlp.method import CAPABILITIES, VLPMethod, VLPRecipe, make_factory, make_pretrain
from methods.vlp.model import MGCAEmbedding, l2

NAME = "place"
VPOE_TYPES = ("decoder", "cross_attn")
T_POR_UNITS = ("sentence", "window", "noun_phrase")
MATCHINGS = ("max_similarity", "optimal_transport", "hungarian")
CCE_TARGETS = ("pixels", "features")
CCE_LOSSES = ("mse", "kl", "cosine")
CCE_CONDITIONING = ("film", "none")

OPTIONS = {
    "global_head": seed.GLOBAL_HEAD_OPTION,
    "num_queries": MethodOption(16, "DD-PLACE-1: pathology query tokens Nq of the VPOE (V-PORs per image)"),
    "vpoe_type": MethodOption("decoder", "DD-PLACE-1: VPOE layer: decoder (query self-attention + cross-attention "
                                         "+ MLP) or cross_attn (cross-attention + MLP)"),
    "vpoe_depth": MethodOption(2, "DD-PLACE-1: VPOE layers"),
    "vpoe_heads": MethodOption(4, "DD-PLACE-1: attention heads of the VPOE layers"),
    "t_por_unit": MethodOption("sentence", "DD-PLACE-2: textual observation unit: sentence (MGCA's caption "
                                           "sentences), window (t_por_window consecutive words); noun_phrase "
                                           "is refused (needs a chunker)"),
    "t_por_window": MethodOption(8, "DD-PLACE-2: words per T-POR when t_por_unit=window"),
    "pcma_matching": MethodOption("max_similarity", "DD-PLACE-3: T-POR to V-POR matching: max_similarity, "
                                                    "optimal_transport or hungarian"),
    "pcma_temperature": MethodOption(0.1, "DD-PLACE-3: temperature of the PCMA contrast"),
    "ot_epsilon": MethodOption(0.05, "DD-PLACE-3: entropic regularisation of optimal_transport matching"),
    "ot_iterations": MethodOption(10, "DD-PLACE-3: Sinkhorn iterations of optimal_transport matching"),
    "cce_target": MethodOption("pixels", "DD-PLACE-4: patch correlation target: pixels (raw pixel blocks under "
                                         "the local grid) or features (the detached projected local tokens; degenerate: the "
                                         "head can copy its input, kept to rebuild DD-PLACE-4's alternatives)"),
    "cce_block": MethodOption(8, "DD-PLACE-4: pixels per side of each patch's block (cce_target=pixels)"),
    "cce_loss": MethodOption("mse", "DD-PLACE-4: CCE loss: mse, kl (row-wise, at cce_temperature) or cosine"),
    "cce_temperature": MethodOption(0.1, "DD-PLACE-4: temperature of cce_loss=kl"),
    "cce_conditioning": MethodOption("film", "DD-PLACE-4: how the prediction is conditioned on the report: film "
                                             "(scale and shift by the report's global embedding) or none"),
    "ita_temperature": MethodOption(0.07, "DD-COMMON-1: temperature of the global InfoNCE (MGCA's)"),
    "lambda_ita": MethodOption(1.0, "DD-PLACE-5: weight of the global alignment (0 turns it off)"),
    "lambda_pcma": MethodOption(1.0, "DD-PLACE-5: weight of PCMA (0 turns off the VPOE and PCMA)"),
    "lambda_cce": MethodOption(1.0, "DD-PLACE-5: weight of CCE (0 turns off the correlation proxy task)"),
}


class VPOELayer(nn.Module):
    """One pre-norm layer of the Visual Pathology Observation Extractor (DD-PLACE-1)."""

    def __init__(self, dim: int, heads: int, *, self_attention: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True) if self_attention else None
        self.norm_sa = nn.LayerNorm(dim) if self_attention else None
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.self_attn is not None:
            x = self.norm_sa(q)
            q = q + self.self_attn(x, x, x, need_weights=False)[0]
        kv = self.norm_kv(patches)
        out, attn = self.cross_attn(self.norm_q(q), kv, kv, need_weights=True, average_attn_weights=True)
        q = q + out
        return q + self.mlp(self.norm_mlp(q)), attn


class PathologyQueryExtractor(nn.Module):
    """VPOE (DD-PLACE-1): learnable pathology queries attending to patch tokens -> V-PORs.

    ``forward(patches [B, N, D]) -> (V-PORs [B, Q, D], attention [B, Q, N])`` (the last layer's
    query->patch attention, heads averaged). No positional code on the patch side: the V-PORs are
    invariant to a permutation of the patches, and the attention's columns follow it."""

    def __init__(self, dim: int, num_queries: int, depth: int, heads: int, kind: str) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(VPOELayer(dim, heads, self_attention=(kind == "decoder")) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        attn = patches.new_zeros(patches.shape[0], q.shape[1], patches.shape[1])
        for layer in self.layers:
            q, attn = layer(q, patches)
        return self.norm(q), attn


class CorrelationHead(nn.Module):
    """CCE's predictor (DD-PLACE-4): projected local tokens, conditioned on the report (FiLM by its
    global embedding), through an MLP; the output's patch correlation matrix is the prediction."""

    def __init__(self, dim: int, report_dim: int, *, film: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.film = nn.Linear(report_dim, 2 * dim) if film else None
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, patches: torch.Tensor, report: torch.Tensor) -> torch.Tensor:
        x = self.norm(patches)
        if self.film is not None:
            gamma, beta = self.film(report).unsqueeze(1).chunk(2, dim=-1)
            x = x * (1.0 + gamma) + beta
        return SO.patch_correlation(self.mlp(x))


def sentence_states(states: torch.Tensor, sentence_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token state of each sentence: ``states [B, T, H]``, ``sentence_index [B, T]`` (-1 = none)
    -> ``([B, S, H], mask [B, S])`` with S the most sentences of any report in the batch (at least 1)."""
    b, _, h = states.shape
    s = max(int(sentence_index.max()) + 1, 1) if sentence_index.numel() else 1
    keep = sentence_index >= 0
    idx = sentence_index.clamp(min=0)
    total = states.new_zeros(b, s, h).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, h),
                                                   states * keep.unsqueeze(-1).to(states.dtype))
    count = torch.zeros(b, s, device=states.device, dtype=states.dtype).scatter_add_(1, idx, keep.to(states.dtype))
    return total / count.clamp(min=1).unsqueeze(-1), count > 0


def window_index(word_index: torch.Tensor, window: int) -> torch.Tensor:
    """T-POR units of ``window`` consecutive words (DD-PLACE-2, ``t_por_unit = window``): the unit of
    each token, -1 for specials and padding."""
    return torch.where(word_index >= 0, word_index // int(window), torch.full_like(word_index, -1))


class PLACEModel(seed.SeedModel):
    def __init__(self, image, text, recipe: VLPRecipe, options: Mapping[str, Any]) -> None:
        o = options
        t_por_unit = seed.choice(NAME, o, "t_por_unit", T_POR_UNITS)
        if t_por_unit == "noun_phrase":
            raise BenchError("place.t_por_unit=noun_phrase is not implemented: it needs a noun-phrase chunker "
                             "(none ships offline); use sentence or window (DD-PLACE-2)")
        conditioning = seed.choice(NAME, o, "cce_conditioning", CCE_CONDITIONING)
        vpoe_type = seed.choice(NAME, o, "vpoe_type", VPOE_TYPES)
        weights = seed.loss_weights(NAME, o, ("lambda_ita", "lambda_pcma", "lambda_cce"))
        e, h = recipe.embed_dim, recipe.head_hidden
        extra: dict[str, nn.Module] = {}
        if weights["lambda_pcma"]:                  # DD-PLACE-1/2: the VPOE and the T-POR head
            heads = seed.positive(NAME, o, "vpoe_heads", int)
            if e % heads:
                raise BenchError(f"place.vpoe_heads={heads} must divide the embedding width {e}")
            extra["vpoe"] = PathologyQueryExtractor(e, seed.positive(NAME, o, "num_queries", int),
                                                    seed.positive(NAME, o, "vpoe_depth", int), heads, vpoe_type)
            extra["text_por"] = MGCAEmbedding(text.hidden_size, h, e)
        if weights["lambda_cce"]:                   # DD-PLACE-4: the correlation head
            extra["cce"] = CorrelationHead(e, e, film=conditioning == "film")
        super().__init__(image, text, recipe, options, local_image=bool(weights["lambda_pcma"] or weights["lambda_cce"]),
                         local_text=False, extra=extra)
        self.weights = weights
        self.t_por_unit = t_por_unit
        self.text.sentences = t_por_unit == "sentence"     # token batches carry each token's sentence
        self.window = seed.positive(NAME, o, "t_por_window", int)
        self.matching = seed.choice(NAME, o, "pcma_matching", MATCHINGS)
        self.cce_target = seed.choice(NAME, o, "cce_target", CCE_TARGETS)
        self.cce_loss = seed.choice(NAME, o, "cce_loss", CCE_LOSSES)
        self.cce_block = seed.positive(NAME, o, "cce_block", int)
        self.temps = {k: seed.positive(NAME, o, k) for k in ("ita_temperature", "pcma_temperature", "cce_temperature",
                                                              "ot_epsilon")}
        self.ot_iterations = seed.positive(NAME, o, "ot_iterations", int)

    # --- the modules, one by one (tests call them) ----------------------------------------------
    def v_pors(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V-PORs ``[B, Q, E]`` (L2-normalised) and the query->patch attention of projected local tokens."""
        pors, attn = self.heads["vpoe"](patches)
        return l2(pors), attn

    def t_pors(self, txt: T.TextOutput, tokens: T.TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """T-PORs ``[B, S, E]`` (L2-normalised; zero in empty slots) and their mask."""
        if self.t_por_unit == "sentence":
            if tokens.sentence_index is None:
                raise BenchError("place: the token batch has no sentence index (tokenise with the model's text "
                                 "tower, whose `sentences` flag PLACE sets)")
            unit = tokens.sentence_index
        else:
            unit = window_index(tokens.word_index, self.window)
        states, mask = sentence_states(txt.tokens, unit)
        flat = self.heads["text_por"](states[mask])
        out = flat.new_zeros(*mask.shape, flat.shape[-1])
        out[mask] = flat
        return l2(out) * mask.unsqueeze(-1), mask

    def cce_inputs(self, images: torch.Tensor, img, patches: torch.Tensor,
                   report: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, target) patch correlation matrices ``[B, N, N]``."""
        predicted = self.heads["cce"](patches, report)
        if self.cce_target == "pixels":
            target = SO.patch_correlation(SO.pixel_patches(images, img.local_hw, self.cce_block))
        else:
            target = SO.patch_correlation(patches.detach())
        return predicted, target

    def losses(self, images, tokens):
        img = self.image(images)
        txt = self.text(tokens)
        g_v, g_t = self.global_embeddings(img, txt)
        v = t = t_mask = pred = target = None
        if self.weights["lambda_pcma"] or self.weights["lambda_cce"]:
            patches = self.local_patches(img)
            if self.weights["lambda_pcma"]:
                v, _ = self.v_pors(patches)
                t, t_mask = self.t_pors(txt, tokens)
            if self.weights["lambda_cce"]:
                pred, target = self.cce_inputs(images, img, patches, g_t)
        return SO.place_objective(
            g_v, g_t, v, t, t_mask, pred, target, ita_temperature=self.temps["ita_temperature"],
            pcma_temperature=self.temps["pcma_temperature"], matching=self.matching,
            ot_epsilon=self.temps["ot_epsilon"], ot_iterations=self.ot_iterations, cce_loss_kind=self.cce_loss,
            cce_temperature=self.temps["cce_temperature"], **self.weights)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "loss_weights": dict(self.weights)}


objective = SO.place_objective

DEFINITION = VLPMethod(name=NAME, reference="PLACE (Wang et al., arXiv 2506.10573), re-implemented from the abstract "
                                            "by medvlp-bench (design decisions DD-PLACE-1..6)",
                       recipe_version=1, options=OPTIONS, recipe=seed.recipe, text_spec=seed.text_spec,
                       build=PLACEModel)

METHODS.add(NAME, MethodEntry(
    name=NAME, factory=make_factory(DEFINITION), capabilities=CAPABILITIES, pretrain=make_pretrain(DEFINITION),
    options=DEFINITION.all_options(), objective=objective,
    description="PLACE: global + pathological-level alignment (learnable pathology queries -> V-PORs vs report "
                "sentences -> T-PORs) + report-conditioned patch-correlation proxy task; MGCA's pipeline; "
                "pretrained on first use on the synthetic corpus and cached; no released weights"))
